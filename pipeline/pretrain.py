"""``Main_Diffusion.py --mode pretrain``: train a teacher DDPM where no pretrained one exists.

Epsilon-prediction DDPM loss (Ho et al. 2020, eq. 14) on a diffusers ``UNet2DModel`` with AdamW, a
warm-up + cosine learning rate, EMA weights (diffusers ``EMAModel``), gradient clipping and autocast
where the hardware makes it fast. Progress goes to a tqdm bar and ``stats.jsonl``; rerunning the same
command resumes from ``checkpoint.pt``. At the end the EMA weights are written in diffusers layout to
``teacher_path``.
"""
import json
import math
import time

import torch
import torch.nn.functional as F
from diffusers.training_utils import EMAModel
from tqdm import tqdm

from . import atomic, checkpoint, datasets, images, runtime, teachers
from .config import output_dir, project_path
from .errors import UserError
from .trajectory import ddim_sample

ARCHITECTURE_KEYS = ("dataset", "unet_channels", "unet_layers_per_block", "unet_attention_levels",
                     "unet_norm_groups", "num_train_timesteps", "beta_start", "beta_end", "beta_schedule",
                     "batch_size", "lr", "seed")


def learning_rate(cfg, step: int) -> float:
    """Linear warm-up, then cosine decay to 10% of ``lr`` at ``train_steps``."""
    if step < cfg["lr_warmup_steps"]:
        return cfg["lr"] * (step + 1) / cfg["lr_warmup_steps"]
    progress = min(1.0, (step - cfg["lr_warmup_steps"]) / max(1, cfg["train_steps"] - cfg["lr_warmup_steps"]))
    return cfg["lr"] * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


class Trainer:
    def __init__(self, cfg):
        for key in ("train_steps", "batch_size", "checkpoint_every"):
            if cfg[key] <= 0:
                raise UserError(f"{key} must be positive, got {cfg[key]}")
        self.cfg = cfg
        self.device = runtime.configure(cfg)
        self.amp = runtime.autocast_dtype(cfg["precision"], self.device)
        print(f"[pretrain] autocast={self.amp or 'off (fp32)'}")
        self.run_dir = output_dir(cfg, "run_dir", "Checkpoints/diffusion")
        self.teacher_dir = project_path(cfg["teacher_path"])
        if teachers.has_weights(self.teacher_dir / "unet") and not cfg["overwrite_teacher"]:
            raise UserError(f"a teacher already exists in {self.teacher_dir}; pretrain only makes one where none "
                            f"exists (pass overwrite_teacher=true to replace it, or set teacher_path=)")
        self.data = datasets.to_model_range(datasets.load_images(cfg, "train"))
        torch.manual_seed(cfg["seed"])
        self.unet = teachers.new_unet(cfg, channels=self.data.shape[1]).to(self.device)
        self.scheduler = teachers.new_scheduler(cfg)
        self.alphas_cumprod = self.scheduler.alphas_cumprod.to(self.device)
        self.opt = torch.optim.AdamW(self.unet.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
        self.ema = EMAModel(self.unet.parameters(), decay=cfg["ema_decay"], use_ema_warmup=True, power=3 / 4)
        self.batch_rng = torch.Generator().manual_seed(cfg["seed"])
        self.step = 0
        self._resume()

    def _resume(self):
        state = checkpoint.load(self.run_dir)
        if state is not None:
            checkpoint.check_same_config(state["config"], self.cfg, ARCHITECTURE_KEYS, self.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        atomic.write_json(self.run_dir / "config.json", self.cfg)  # after the check: a refused resume leaves the record alone
        if state is None:
            return
        self.step = checkpoint.restore(state, {"model": self.unet, "optimizer": self.opt, "ema": self.ema})
        self.batch_rng.set_state(state["batch_rng"])
        print(f"[pretrain] resumed {self.run_dir / checkpoint.LATEST} at step {self.step}")

    def save(self):
        checkpoint.save(self.run_dir, {
            "model": self.unet.state_dict(), "optimizer": self.opt.state_dict(), "ema": self.ema.state_dict(),
            "batch_rng": self.batch_rng.get_state(), "rng": checkpoint.rng_state(), "step": self.step,
            "config": json.dumps(self.cfg)})

    def train_step(self) -> float:
        cfg = self.cfg
        idx = torch.randint(len(self.data), (cfg["batch_size"],), generator=self.batch_rng)
        x0 = self.data[idx].to(self.device)
        if cfg["hflip"]:
            flip = torch.rand(len(x0), generator=self.batch_rng) < 0.5
            x0 = torch.where(flip.view(-1, 1, 1, 1).to(self.device), x0.flip(-1), x0)
        t = torch.randint(cfg["num_train_timesteps"], (len(x0),), device=self.device)
        noise = torch.randn_like(x0)
        a = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        for group in self.opt.param_groups:
            group["lr"] = learning_rate(cfg, self.step)
        with runtime.autocast(self.amp, self.device):
            eps = self.unet(x_t, t).sample
        loss = F.mse_loss(eps.float(), noise)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.unet.parameters(), cfg["grad_clip"])
        self.opt.step()
        self.ema.step(self.unet.parameters())
        self.step += 1
        return loss.item()

    def ema_unet(self):
        """A copy of the UNet holding the EMA weights."""
        ema_unet = teachers.new_unet(self.cfg, channels=self.data.shape[1]).to(self.device)
        ema_unet.load_state_dict(self.unet.state_dict())
        self.ema.copy_to(ema_unet.parameters())
        return ema_unet.eval()

    def sample_grid(self):
        unet = self.ema_unet()
        x_T = torch.randn(64, *self.data.shape[1:], generator=torch.Generator().manual_seed(0)).to(self.device)
        x0 = ddim_sample(unet, teachers.ddim_scheduler(self.scheduler), x_T, 50)
        images.save_grid(datasets.to_uint8(x0), self.run_dir / "samples" / f"step-{self.step:06d}.png")

    def run(self):
        cfg = self.cfg
        stats_path = self.run_dir / "stats.jsonl"
        bar = tqdm(total=cfg["train_steps"], initial=self.step, desc="pretrain", dynamic_ncols=True)
        window, started = [], time.time()
        with checkpoint.saved_on_exit(self.save, bar):
            while self.step < cfg["train_steps"]:
                window.append(self.train_step())
                bar.update(1)
                if self.step % 25 == 0 or self.step == cfg["train_steps"]:
                    record = {"step": self.step, "loss": sum(window) / len(window),
                              "lr": learning_rate(cfg, self.step - 1),
                              "seconds_per_step": (time.time() - started) / len(window)}
                    with open(stats_path, "a") as f:
                        f.write(json.dumps(record) + "\n")
                    bar.set_postfix(loss=f"{record['loss']:.4f}")
                    window, started = [], time.time()
                if self.step % cfg["checkpoint_every"] == 0:
                    self.save()
                if cfg["sample_every"] and self.step % cfg["sample_every"] == 0:
                    self.sample_grid()
        self.export()

    def export(self):
        teachers.save_teacher(self.ema_unet().cpu(), self.scheduler, self.teacher_dir,
                              extra_files={"pretrain_config.json": self.cfg})
        print(f"[pretrain] EMA teacher ({teachers.parameter_count(self.unet):,} parameters) written to "
              f"{self.teacher_dir}")


def pretrain(cfg):
    Trainer(cfg).run()
