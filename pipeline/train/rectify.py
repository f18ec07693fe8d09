"""``Main_Diffusion.py --mode rectify``: train the rectified latent recurrence RNet (docs/design.md §14).

One step: a depth s is drawn from ``rect_depth_weights`` (one per batch), and per image a start τ_i on
the ring's grid with i + s within it; x_t = c0·x0 + c1·ε at τ_i. The chain's teacher (the RNet itself,
or its EMA weights) runs s DDIM steps (η = 0) from x_t along the grid, giving its latents
z̃_k = Rin(x̃_k, τ_{i+k}), predictions and x0 read-outs. The student unrolls z_0 = Rin(x_t, τ_i),
z_k = R(z_{k-1}, τ_{i+k-1}) and is trained on

  L = L_main + λ_cons · mean_k MSE(z_k, z̃_k) + λ_x0 · L_x0,
  L_main = (L_0 + w · mean_{k≥1} L_k) / (1 + w),

where L_0 compares Rout(z_0, τ_i) with the exact target (v, ε or x0 of the drawn x0 and ε), L_k with
the teacher's prediction at x̃_k, and L_x0 combines X0out's losses the same way (against x0, then the
teacher's read-outs). With ``rect_teacher=pretrained`` the chain is the frozen teacher UNet's own DDIM
chain (clipped x0, as the DDIM teacher samples), and its ε and clipped x0 are every target, k = 0
included (an ablation, measured worse: at high noise the teacher's x0 is amplified noise, docs/design.md
§14). Everything else (AdamW, one-cycle schedule, EMA, clipping, autocast, resume, stats.jsonl,
SIGTERM) is the shared training loop's; ``rect_init`` starts from another RNet's weights.
"""
import copy

import torch
import torch.nn.functional as F

from ..core import distributed, images, runtime
from ..core.config import output_dir, project_path
from ..core.errors import UserError
from ..teacher import lora, ring, rnet, rnet_files, teachers
from ..data import datasets
from . import trainer

# keys whose change makes a saved run another experiment (a resume with any other value is refused)
RUN_KEYS = ("dataset", "seed", "num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "hflip", "ema_decay",
            "grad_clip", "rect_steps", "rect_depth_weights", "rect_prediction", "rect_teacher",
            "rect_lambda_consistency", "rect_lambda_x0", "rect_depth_weight", "rect_batch_size", "rect_lr",
            "rect_lr_warmup_fraction", "rect_weight_decay", "rect_train_steps", "rect_rin_blocks", "rect_r_blocks",
            "rect_head_blocks", "rect_lora", "rect_lora_rank", "rect_lora_alpha", "rect_gate_cap", "rect_init")


def rnet_settings(cfg, T: int) -> dict:
    return {"T": T, "rin_blocks": cfg["rect_rin_blocks"], "r_blocks": cfg["rect_r_blocks"],
            "head_blocks": cfg["rect_head_blocks"], "lora_target": cfg["rect_lora"], "lora_rank": cfg["rect_lora_rank"],
            "lora_alpha": cfg["rect_lora_alpha"], "gate_cap": cfg["rect_gate_cap"]}


def check_lora_rank(cfg, teacher, source) -> None:
    """Refuse a LoRA rank above the full rank of every layer it wraps, where it adds parameters only (rank
    200,000 asked for 22.9 GB); checked by the run and by its --dry-run plan."""
    limit = lora.full_rank(teacher, cfg["rect_lora"])
    if limit is not None and cfg["rect_lora_rank"] > limit:
        raise UserError(f"rect_lora_rank={cfg['rect_lora_rank']} is more than {limit}, the full rank of every layer "
                        f"that rect_lora={cfg['rect_lora']} wraps in the teacher in {source}, so the rest would only "
                        f"cost memory; use at most {limit}")


def counts_line(net) -> str:
    trainable, total = rnet.parameter_counts(net)
    return f"{trainable:,} trainable of {total:,} parameters"


def mean(values):
    return sum(values) / len(values)


class RectifyTrainer(trainer.Trainer):
    run_keys = RUN_KEYS
    ddp_unused_parameters = True  # a depth-0 step leaves R without gradients

    def __init__(self, cfg):
        self.teacher, ddpm, self.teacher_source = teachers.load_teacher(cfg)
        self.teacher_sha256 = teachers.weights_sha256(self.teacher)
        self.data = datasets.to_model_range(datasets.load_images(cfg, "train"))
        if list(self.data.shape[1:]) != [self.teacher.config.in_channels] + [self.teacher.config.sample_size] * 2:
            raise UserError(f"the teacher in {self.teacher_source} makes {self.teacher.config.in_channels}-channel "
                            f"{self.teacher.config.sample_size}px images but {cfg['dataset']} has shape "
                            f"{list(self.data.shape[1:])}; rectify a teacher of this dataset")
        self.T = ddpm.config.num_train_timesteps
        check_lora_rank(cfg, self.teacher, self.teacher_source)
        if cfg["rect_steps"] > self.T - 1:  # the config rule knows num_train_timesteps, not this teacher's T
            raise UserError(f"rect_steps={cfg['rect_steps']} must be at most {self.T - 1}, the teacher in "
                            f"{self.teacher_source} having T={self.T} (the ring ends at t = 0); lower rect_steps")
        self.batch_rng = torch.Generator().manual_seed(cfg["seed"])
        super().__init__(cfg, trainer.Recipe.from_config(cfg, "rect_", "rectify"), output_dir(cfg, "rect_run_dir"))
        self.alphas_cumprod = ddpm.alphas_cumprod.to(self.device)
        self.grid = ring.ring_timesteps(self.T, cfg["rect_steps"]).to(self.device)
        weights = torch.tensor(cfg["rect_depth_weights"], dtype=torch.float64)
        self.depth_probs = weights / weights.sum()
        self.chain_teacher = self.model
        self.pretrained_chain = cfg["rect_teacher"] == "pretrained"
        if self.pretrained_chain:
            self.teacher.to(self.device)
        if cfg["rect_teacher"] == "ema":
            # same requires_grad flags as the model, so that ema_parameters pairs them; used under no_grad only
            self.chain_teacher = copy.deepcopy(self.model)
        if distributed.is_main():
            print(f"[rectify] RNet around {self.teacher_source}: {counts_line(self.model)}; ring of "
                  f"{cfg['rect_steps']} steps; autocast={self.amp or 'off (fp32)'}{self.processes_note()}", flush=True)
        self.resume()
        self.after_step()  # an EMA teacher starts from the (resumed) EMA weights

    # --- the stage's model and data
    def build_model(self):
        """The RNet around the teacher; with ``rect_init`` it starts from that RNet's weights (before the EMA is
        made, so the EMA starts there too; a checkpoint of this run, when there is one, replaces both)."""
        net = rnet.RNet(self.teacher, **rnet_settings(self.cfg, self.T))
        if self.cfg["rect_init"]:
            folder = project_path(self.cfg["rect_init"])
            start, _ = rnet_files.load_rnet(folder, self.teacher, self.teacher_sha256)
            if start.config != net.config:
                raise UserError(f"the RNet in {folder} is another network than rect_* describes (blocks, LoRA or gate "
                                f"differ); set those keys as it was trained or start without rect_init")
            net.load_state_dict(start.state_dict())
        return net

    def parameter_groups(self):
        return [p for p in self.model.parameters() if p.requires_grad]

    def ema_parameters(self, model) -> list:
        return [p for p in model.parameters() if p.requires_grad]

    def make_schedule(self):
        return trainer.one_cycle(self.opt, self.recipe.train_steps, self.recipe.lr, self.cfg["rect_lr_warmup_fraction"])

    def record(self):
        return dict(super().record(), teacher=self.teacher_source, teacher_sha256=self.teacher_sha256)

    def check_resume(self, saved_record):
        if saved_record.get("teacher_sha256") != self.teacher_sha256:
            raise UserError(f"{self.run_dir} rectifies another teacher than {self.teacher_source}; use another "
                            f"rect_run_dir or the teacher it was started with")

    def extra_state(self):
        return {"batch_rng": self.batch_rng.get_state()}

    def load_extra_state(self, state):
        self.batch_rng.set_state(state["batch_rng"])

    def batches(self):
        return datasets.random_batches(self.data, self.recipe.batch_size, self.cfg["hflip"], self.batch_rng)

    # --- the loss
    @torch.no_grad()
    def teacher_chain(self, x_t, times):
        """The teacher's latents, predictions and x0 read-outs at x̃_0 .. x̃_s (DDIM along ``times``)."""
        net, prediction, out = self.chain_teacher, self.cfg["rect_prediction"], {"z": [], "pred": [], "x0": []}
        x = x_t
        for k, t in enumerate(times):
            z = net.rin(x, t)
            pred = net.rout(z, t).float()
            out["z"].append(z.float())
            out["pred"].append(pred)
            out["x0"].append(net.x0out(z, t).float() if self.cfg["rect_lambda_x0"] else None)
            if k + 1 < len(times):
                eps, x0 = ring.chain_estimates(prediction, pred, x, self.alphas_cumprod, t, clip_x0=False)
                x = ring.ddim_step(x0, eps, self.alphas_cumprod, times[k + 1])
        return out

    @torch.no_grad()
    def pretrained_chain_targets(self, x_t, times):
        """The frozen teacher's DDIM chain from x_t: at x̃_0 .. x̃_s its ε and clipped x0, as the head's prediction
        type and as X0out's target, and the latents Rin(x̃_k, τ_k) of the RNet being trained for k ≥ 1."""
        prediction, out = self.cfg["rect_prediction"], {"z": [], "pred": [], "x0": []}
        x = x_t
        for k, t in enumerate(times):
            # x0 clipped as the DDIM teacher clips it: unclipped, x0 = (x − c1·ε)/c0 (and v with it) multiplies the
            # teacher's ε error by 1/c0 ≈ 160 at t = T−1, targets the heads cannot and should not learn
            eps, x0 = ring.chain_estimates("eps", self.teacher(x, t).sample.float(), x, self.alphas_cumprod, t,
                                           clip_x0=True)
            out["pred"].append(ring.target(prediction, x0, eps, *ring.coefficients(self.alphas_cumprod, t)))
            out["x0"].append(x0)
            out["z"].append(self.model.rin(x, t).float() if k else None)
            if k + 1 < len(times):
                x = ring.ddim_step(x0, eps, self.alphas_cumprod, times[k + 1])
        return out

    def forward_module(self):
        return Unroll(self.model, self.cfg["rect_lambda_x0"] > 0)

    def loss(self, batch):
        """Every rank draws the depth and the global batch's images, start steps and noise alike and trains on its
        share (the depth must agree: it decides which parameters get gradients)."""
        x0 = batch["x0"]
        depth = int(torch.multinomial(self.depth_probs, 1))
        start = torch.randint(0, len(self.grid) - depth, (len(x0),), device=self.device)
        eps = torch.randn_like(x0)
        x0, start, eps = self.share(x0), self.share(start), self.share(eps)
        times = [self.grid[start + k] for k in range(depth + 1)]
        c0, c1 = ring.coefficients(self.alphas_cumprod, times[0])
        x_t = c0 * x0 + c1 * eps
        with runtime.autocast(self.amp, self.device):
            if self.pretrained_chain:
                chain = self.pretrained_chain_targets(x_t, times)
                parts = self.network(x_t, times, chain, chain["pred"][0], chain["x0"][0])
            else:
                chain = self.teacher_chain(x_t, times) if depth else None
                parts = self.network(x_t, times, chain, ring.target(self.cfg["rect_prediction"], x0, eps, c0, c1), x0)
        w = self.cfg["rect_depth_weight"]

        def combine(losses):
            return losses[0] if len(losses) == 1 else (losses[0] + w * mean(losses[1:])) / (1 + w)

        total = combine(parts["main"])
        logged = {"main": total.item(), "depth": depth}
        if parts["x0"]:
            x0_loss = combine(parts["x0"])
            total = total + self.cfg["rect_lambda_x0"] * x0_loss
            logged["x0"] = x0_loss.item()
        if parts["consistency"]:
            consistency = mean(parts["consistency"])
            total = total + self.cfg["rect_lambda_consistency"] * consistency
            logged["consistency"] = consistency.item()
        return total, logged

    # --- what the run writes
    def after_step(self):
        if self.chain_teacher is not self.model:
            self.ema.copy_to(self.ema_parameters(self.chain_teacher))
        return {}

    def ema_rnet(self):
        return self.ema_model(rnet.RNet(self.teacher, **rnet_settings(self.cfg, self.T)).to(self.device))

    def export(self, net, folder):
        rnet_files.save_rnet(net, folder, self.teacher_sha256, self.cfg["rect_steps"], self.cfg["rect_prediction"])

    def on_checkpoint(self):
        self.export(self.ema_rnet(), self.run_dir / "rnet")

    def periodic(self):
        every = self.cfg["rect_snapshot_every"]
        if every and self.step % every == 0:
            folder = self.run_dir / "snapshots" / f"step-{self.step:06d}"
            net = self.ema_rnet()
            self.export(net, folder)
            self.sample_grid(net, folder / "grid.png")

    def sample_grid(self, net, path):
        shape = [self.teacher.config.in_channels] + [self.teacher.config.sample_size] * 2
        x_T = torch.randn([64] + shape, generator=torch.Generator().manual_seed(0)).to(self.device)
        images.save_grid(datasets.to_uint8(ring.ring_sample(net, x_T, self.grid)), path)

    def finish(self):
        print(f"[rectify] EMA RNet written to {self.run_dir / 'rnet'}")
        return self.run_dir / "rnet"


class Unroll(torch.nn.Module):
    """The RNet's training pass as one forward call, so that DistributedDataParallel sees it (the RNet itself
    is called part by part: Rin, R, the heads)."""

    def __init__(self, net, with_x0: bool):
        super().__init__()
        self.net, self.with_x0 = net, with_x0

    def forward(self, x_t, times, chain, target_0, x0):
        """The student's losses at depths 0..s: main, x0 read-out, latent consistency (k ≥ 1)."""
        net, parts = self.net, {"main": [], "x0": [], "consistency": []}
        z = net.rin(x_t, times[0])
        for k, t in enumerate(times):
            if k:
                z = net.r(z, times[k - 1])
                parts["consistency"].append(F.mse_loss(z.float(), chain["z"][k]))
            parts["main"].append(F.mse_loss(net.rout(z, t).float(), chain["pred"][k] if k else target_0))
            if self.with_x0:
                parts["x0"].append(F.mse_loss(net.x0out(z, t).float(), chain["x0"][k] if k else x0))
        return parts


def rectify(cfg):
    with distributed.together():  # under torchrun a refused set-up stops every rank with one sentence
        trainer = RectifyTrainer(cfg)
    trainer.run()


def plan(cfg) -> list:
    """--dry-run: what would train, with the RNet's parameter counts (built around the teacher)."""
    teacher, ddpm, source = teachers.load_teacher(cfg)
    check_lora_rank(cfg, teacher, source)
    with torch.device("meta"):  # counted, not allocated: a plan of any size costs no memory (docs/design.md §14)
        shape = type(teacher).from_config(teacher.config)
        net = rnet.RNet(shape, **rnet_settings(cfg, ddpm.config.num_train_timesteps))
    start = []
    if cfg["rect_init"]:
        folder = project_path(cfg["rect_init"])
        rnet_files.read_config(folder)  # refuses, here already, a folder that holds no RNet
        start = [f"would start from the RNet in {folder}"]
    return [f"would rectify {source}: RNet with {counts_line(net)}", *start,
            f"would train {cfg['rect_train_steps']} steps at batch {cfg['rect_batch_size']} on a ring of "
            f"{cfg['rect_steps']} steps (checkpoints in {output_dir(cfg, 'rect_run_dir')})"]
