"""The training machinery that ``train_d`` and ``binarize`` share.

A ``Recipe`` reads one stage's keys (``d_*`` or ``b_*``: steps, batch size, learning rate, warm-up,
weight decay, checkpoint and snapshot periods, run folder). ``StudentTrainer`` owns everything a run
needs besides its model and its loss: AdamW with a one-cycle schedule (cosine, warm-up share of the
recipe, start and end at lr / 1e4 as the reference), EMA weights (diffusers ``EMAModel`` with warm-up,
so that short runs are not dominated by the initial weights), gradient clipping, autocast where it is
fast (fp16 on CUDA adds a GradScaler), streamed batches that never touch the held-out records, tqdm,
``stats.jsonl`` every ``LOG_EVERY`` steps (loss parts, per-chunk losses, learning rate, data-loading
stall and whatever the stage adds), ``checkpoint.pt`` (model, EMA, optimizer, schedule, scaler, step,
RNG, config, record) every ``checkpoint_every`` steps and on Ctrl-C / SIGTERM, and resuming from it
when the same command is run again (the batch order after a resume is a fresh shuffle seeded by
(seed, step)). A subclass builds the model and says how to compute the loss and what to export.
"""
import dataclasses
import json
import time

import torch
from diffusers.training_utils import EMAModel
from tqdm import tqdm

from . import atomic, checkpoint, runtime, teacher_data
from .config import output_dir
from .errors import UserError

DATA_KEYS = ("teacher_sha256", "space", "steps", "chunks", "T", "image_shape", "latent_channels", "percentile", "seed")
LOG_EVERY = 10


@dataclasses.dataclass(frozen=True)
class Recipe:
    stage: str
    # the fields are the config keys without their stage prefix (d_train_steps -> train_steps)
    train_steps: int
    batch_size: int
    lr: float
    lr_warmup_fraction: float
    weight_decay: float
    checkpoint_every: int
    snapshot_every: int

    @classmethod
    def from_config(cls, cfg, prefix: str, stage: str):
        names = [f.name for f in dataclasses.fields(cls)][1:]
        recipe = cls(stage, *(cfg[f"{prefix}_{name}"] for name in names))
        for name in ("train_steps", "batch_size", "checkpoint_every"):
            if getattr(recipe, name) <= 0:
                raise UserError(f"{prefix}_{name} must be positive, got {getattr(recipe, name)}")
        if recipe.snapshot_every < 0:
            raise UserError(f"{prefix}_snapshot_every must be zero or positive")
        if not 0 < recipe.lr_warmup_fraction < 1:
            raise UserError(f"{prefix}_lr_warmup_fraction must be within (0, 1), got {recipe.lr_warmup_fraction}")
        if cfg["data_workers"] < 0 or cfg["shuffle_buffer"] <= 0:
            raise UserError("data_workers must be zero or positive and shuffle_buffer positive")
        return recipe


def data_fingerprint(manifest) -> dict:
    generator = manifest.data["generator"]
    return {k: generator.get(k) for k in DATA_KEYS}


def one_cycle(opt, recipe: Recipe):
    # torch needs at least one step in each phase: very short (test) runs get a longer warm-up share
    total = max(recipe.train_steps, 4)
    return torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=recipe.lr, total_steps=total, pct_start=max(recipe.lr_warmup_fraction, 2.0 / total),
        anneal_strategy="cos", div_factor=1e4, final_div_factor=1e4)


class StudentTrainer:
    """Subclasses set ``run_keys`` and implement ``build_model``, ``loss`` and ``export``."""

    run_keys: tuple = ()
    export_name = "student"  # the EMA student is written to <run>/<export_name> at every checkpoint

    def __init__(self, cfg, recipe: Recipe, run_dir_key: str, default_root: str):
        self.cfg, self.recipe = cfg, recipe
        self.device = runtime.configure(cfg)
        self.amp = runtime.autocast_dtype(cfg["precision"], self.device)
        self.run_dir = output_dir(cfg, run_dir_key, default_root)
        self.manifest = teacher_data.open_data(cfg)
        self.holdout, self.train_range = teacher_data.split(cfg, self.manifest)
        torch.manual_seed(cfg["seed"])
        self.model = self.build_model().to(self.device).train()
        self.opt = torch.optim.AdamW(self.parameter_groups(), lr=recipe.lr, weight_decay=recipe.weight_decay)
        self.schedule = one_cycle(self.opt, recipe)
        self.ema = EMAModel(self.model.parameters(), decay=cfg["ema_decay"], use_ema_warmup=True, power=2 / 3)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp == torch.float16)
        self.step = 0  # a subclass calls resume() once its own state exists

    # --- what a stage provides
    def build_model(self):
        raise NotImplementedError

    def parameter_groups(self):
        return self.model.parameters()

    def loss(self, batch) -> tuple:
        """(total loss, {name: float or list} to log)."""
        raise NotImplementedError

    def export(self, folder):
        raise NotImplementedError

    def extra_state(self) -> dict:
        """Tensors the stage keeps in its checkpoint beside the common ones."""
        return {}

    def load_extra_state(self, state: dict):
        pass

    def before_step(self):
        pass

    def after_step(self) -> dict:
        return {}

    def first_batch(self, batch):
        """Called once on a fresh run with the first batch, which is then not trained on."""

    # --- the shared machinery
    def record(self) -> dict:
        return {"config": self.cfg, "data": data_fingerprint(self.manifest), "data_dir": str(self.manifest.folder),
                "holdout_indices": list(self.holdout), "train_indices": list(self.train_range)}

    def resume(self):
        state = checkpoint.load(self.run_dir)
        if state is not None:
            checkpoint.check_same_config(state["config"], self.cfg, self.run_keys, self.run_dir)
            saved = json.loads(state["record"])
            if saved["data"] != data_fingerprint(self.manifest):
                raise UserError(f"{self.run_dir} was trained on other teacher data than {self.manifest.folder} "
                                f"(its manifest changed); use the original data or another run folder")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        atomic.write_json(self.run_dir / "run.json", self.record())
        if state is None:
            return
        try:
            self.model.load_state_dict(state["model"])
            self.load_extra_state(state)
        except RuntimeError:
            raise UserError(f"{self.run_dir / checkpoint.LATEST} holds another architecture; use another "
                            f"run folder") from None
        self.step = checkpoint.restore(state, {"optimizer": self.opt, "schedule": self.schedule, "ema": self.ema,
                                               "scaler": self.scaler})
        print(f"[{self.recipe.stage}] resumed {self.run_dir / checkpoint.LATEST} at step {self.step}")

    def save(self):
        checkpoint.save(self.run_dir, {
            "model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
            "schedule": self.schedule.state_dict(), "ema": self.ema.state_dict(), "scaler": self.scaler.state_dict(),
            "rng": checkpoint.rng_state(), "step": self.step, "config": json.dumps(self.cfg),
            "record": json.dumps(self.record()), **self.extra_state()})
        self.export(self.run_dir / self.export_name)

    def train_step(self, batch) -> dict:
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        self.before_step()
        loss, logged = self.loss(batch)
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.opt)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg["grad_clip"])
        self.scaler.step(self.opt)
        self.scaler.update()
        self.schedule.step()
        self.ema.step(self.model.parameters())
        self.step += 1
        return {"loss": loss.item(), **logged, "grad_norm": float(grad_norm), **self.after_step()}

    def run(self):
        cfg, recipe, stage = self.cfg, self.recipe, self.recipe.stage
        stream = teacher_data.batches(cfg, self.manifest, *self.train_range, seed=[cfg["seed"], self.step],
                                      batch_size=recipe.batch_size)
        if self.step == 0:
            self.first_batch({k: v.to(self.device) for k, v in next(stream).items()})
        bar = tqdm(total=recipe.train_steps, initial=self.step, desc=stage, dynamic_ncols=True)
        window, waited, started = [], 0.0, time.time()
        with checkpoint.saved_on_exit(self.save, bar):
            while self.step < recipe.train_steps:
                t0 = time.time()
                batch = next(stream)
                waited += time.time() - t0
                window.append(self.train_step(batch))
                bar.update(1)
                if self.step % LOG_EVERY == 0 or self.step == recipe.train_steps:
                    self._log(window, waited, time.time() - started, bar)
                    window, waited, started = [], 0.0, time.time()
                if self.step % recipe.checkpoint_every == 0:
                    self.save()
                if recipe.snapshot_every and self.step % recipe.snapshot_every == 0:
                    self.export(self.run_dir / "snapshots" / f"step-{self.step:06d}")
        print(f"[{stage}] EMA student written to {self.run_dir / self.export_name}")
        return self.run_dir / self.export_name

    def _log(self, window, waited, elapsed, bar):
        n = len(window)
        record = {"step": self.step, "lr": self.schedule.get_last_lr()[0],
                  "seconds_per_step": elapsed / n, "data_wait_fraction": waited / elapsed}
        for key in window[0]:
            if isinstance(window[0][key], list):
                record[key] = [sum(w[key][j] for w in window) / n for j in range(len(window[0][key]))]
            else:
                record[key] = sum(w[key] for w in window) / n
        with open(self.run_dir / "stats.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        bar.set_postfix(loss=f"{record['loss']:.4f}", wait=f"{100 * record['data_wait_fraction']:.1f}%")
