"""``Main_Diffusion.py --mode pretrain``: train a teacher DDPM where no pretrained one exists.

Epsilon-prediction DDPM loss (Ho et al. 2020, eq. 14) on a diffusers ``UNet2DModel`` with AdamW, a
warm-up + cosine learning rate, EMA weights (diffusers ``EMAModel``), gradient clipping and autocast
where the hardware makes it fast, on the training loop that the students share (``trainer.Trainer``).
Progress goes to a tqdm bar and ``stats.jsonl``; rerunning the same command resumes from
``checkpoint.pt``. At the end the EMA weights are written in diffusers layout to ``teacher_path``.
"""
import math

import torch
import torch.nn.functional as F

from ..core import distributed, images, runtime
from ..core.config import output_dir, project_path
from ..core.errors import UserError
from ..teacher import teachers
from ..teacher.trajectory import ddim_sample
from ..data import datasets
from . import trainer

ARCHITECTURE_KEYS = ("dataset", "unet_channels", "unet_layers_per_block", "unet_attention_levels",
                     "unet_norm_groups", "num_train_timesteps", "beta_start", "beta_end", "beta_schedule",
                     "batch_size", "lr", "seed")


def learning_rate(cfg, step: int) -> float:
    """Linear warm-up, then cosine decay to 10% of ``lr`` at ``train_steps``."""
    if step < cfg["lr_warmup_steps"]:
        return cfg["lr"] * (step + 1) / cfg["lr_warmup_steps"]
    progress = min(1.0, (step - cfg["lr_warmup_steps"]) / max(1, cfg["train_steps"] - cfg["lr_warmup_steps"]))
    return cfg["lr"] * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


class PretrainTrainer(trainer.Trainer):
    """The denoising loss on dataset images, on the shared training loop."""

    run_keys = ARCHITECTURE_KEYS
    log_every = 25
    ema_power = 3 / 4

    def __init__(self, cfg):
        self.teacher_dir = project_path(cfg["teacher_path"])
        if teachers.has_weights(self.teacher_dir / "unet") and not cfg["overwrite_teacher"]:
            raise UserError(f"a teacher already exists in {self.teacher_dir}; pretrain only makes one where none "
                            f"exists (pass overwrite_teacher=true to replace it, or set teacher_path=)")
        self.data = datasets.to_model_range(datasets.load_images(cfg, "train"))
        self.scheduler = teachers.new_scheduler(cfg)
        self.batch_rng = torch.Generator().manual_seed(cfg["seed"])
        super().__init__(cfg, trainer.Recipe.from_config(cfg, "", "pretrain"), output_dir(cfg, "run_dir"))
        self.alphas_cumprod = self.scheduler.alphas_cumprod.to(self.device)
        if distributed.is_main():
            print(f"[pretrain] {teachers.parameter_count(self.model):,} parameters; autocast={self.amp or 'off (fp32)'}"
                  f"{self.processes_note()}")
        self.resume()

    def build_model(self):
        return teachers.new_unet(self.cfg, channels=self.data.shape[1])

    def make_schedule(self):
        return torch.optim.lr_scheduler.LambdaLR(self.opt, lambda step: learning_rate(self.cfg, step) / self.cfg["lr"])

    def extra_state(self):
        return {"batch_rng": self.batch_rng.get_state()}

    def load_extra_state(self, state):
        self.batch_rng.set_state(state["batch_rng"])

    def batches(self):
        """Random training images, flipped at random; the generator is in the checkpoint."""
        return datasets.random_batches(self.data, self.cfg["batch_size"], self.cfg["hflip"], self.batch_rng)

    def loss(self, batch):
        """Epsilon prediction at a uniform timestep (Ho et al. 2020, eq. 14). Every rank draws the global
        batch's images, timesteps and noise alike and trains on its share."""
        x0 = batch["x0"]
        t = torch.randint(self.cfg["num_train_timesteps"], (len(x0),), device=self.device)
        noise = torch.randn_like(x0)
        x0, t, noise = self.share(x0), self.share(t), self.share(noise)
        a = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        with runtime.autocast(self.amp, self.device):
            eps = self.network(x_t, t).sample
        return F.mse_loss(eps.float(), noise), {}

    def periodic(self):
        if self.cfg["sample_every"] and self.step % self.cfg["sample_every"] == 0:
            self.sample_grid()
        if self.cfg["snapshot_every"] and self.step % self.cfg["snapshot_every"] == 0:
            self.snapshot()

    def finish(self):
        self.export()

    def ema_unet(self):
        """A copy of the UNet holding the EMA weights."""
        return self.ema_model(teachers.new_unet(self.cfg, channels=self.data.shape[1]).to(self.device))

    def sample_grid(self):
        unet = self.ema_unet()
        x_T = torch.randn(64, *self.data.shape[1:], generator=torch.Generator().manual_seed(0)).to(self.device)
        x0 = ddim_sample(unet, teachers.ddim_scheduler(self.scheduler), x_T, 50)
        images.save_grid(datasets.to_uint8(x0), self.run_dir / "samples" / f"step-{self.step:06d}.png")

    def snapshot(self):
        """The EMA weights at this step as a teacher folder, so that ``--mode sample teacher_path=...``
        scores it: one run gives the FID-against-steps curve."""
        folder = self.run_dir / "snapshots" / f"step-{self.step:06d}"
        teachers.save_teacher(self.ema_unet().cpu(), self.scheduler, folder,
                              extra_files={"pretrain_config.json": {**self.cfg, "snapshot_step": self.step}})

    def export(self):
        teachers.save_teacher(self.ema_unet().cpu(), self.scheduler, self.teacher_dir,
                              extra_files={"pretrain_config.json": self.cfg})
        print(f"[pretrain] EMA teacher ({teachers.parameter_count(self.model):,} parameters) written to "
              f"{self.teacher_dir}")


def pretrain(cfg):
    with distributed.together():  # under torchrun a refused set-up stops every rank with one sentence
        trainer = PretrainTrainer(cfg)
    trainer.run()
