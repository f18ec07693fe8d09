"""``Main_Distill.py --mode train_d``: fit the one-step student D to the offline teacher data.

AdamW with a one-cycle schedule (cosine, warm-up share ``d_lr_warmup_fraction``, start and end at
lr / 1e4 as the reference), EMA weights (diffusers ``EMAModel`` with warm-up, so that short runs are
not dominated by the initial weights), gradient clipping, autocast where it is fast (fp16 on CUDA adds
a GradScaler). Batches stream from the shards through DataLoader workers; the held-out records are
never read. Progress goes to tqdm and ``stats.jsonl`` (per-chunk losses, learning rate, data-loading
stall); ``checkpoint.pt`` holds model, EMA, optimizer, schedule, step, RNG and config, and rerunning
the same command resumes from it. After a resume the batch order is a fresh shuffle seeded by
(seed, step). The EMA student is written to ``<run>/student`` at every checkpoint.
"""
import json
import time

import torch
from diffusers.training_utils import EMAModel
from tqdm import tqdm

from . import atomic, checkpoint, runtime, students, teacher_data
from .config import output_dir
from .errors import UserError
from .losses import d_losses

# Keys whose change makes a saved run a different experiment: resuming with other values is refused.
RUN_KEYS = ("data_dir", "d_init", "d_head_channels", "d_train_steps", "d_batch_size", "d_lr",
            "d_lr_warmup_fraction", "d_weight_decay", "lambda_rin", "lambda_chunks", "lambda_x0",
            "holdout_samples", "train_samples", "ema_decay", "grad_clip", "seed")
DATA_KEYS = ("teacher_sha256", "space", "steps", "chunks", "T", "image_shape", "latent_channels", "percentile", "seed")
LOG_EVERY = 10


def validate(cfg):
    for key in ("d_train_steps", "d_batch_size", "d_checkpoint_every", "d_head_channels", "shuffle_buffer"):
        if cfg[key] <= 0:
            raise UserError(f"{key} must be positive, got {cfg[key]}")
    if cfg["data_workers"] < 0 or cfg["d_snapshot_every"] < 0:
        raise UserError("data_workers and d_snapshot_every must be zero or positive")
    if not 0 < cfg["d_lr_warmup_fraction"] < 1:
        raise UserError(f"d_lr_warmup_fraction must be within (0, 1), got {cfg['d_lr_warmup_fraction']}")


def data_fingerprint(manifest) -> dict:
    generator = manifest.data["generator"]
    return {k: generator.get(k) for k in DATA_KEYS}


def one_cycle(opt, cfg):
    # torch needs at least one step in each phase: very short (test) runs get a longer warm-up share
    total = max(cfg["d_train_steps"], 4)
    return torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=cfg["d_lr"], total_steps=total, pct_start=max(cfg["d_lr_warmup_fraction"], 2.0 / total),
        anneal_strategy="cos", div_factor=1e4, final_div_factor=1e4)


def ema_copy(model, ema: EMAModel):
    """A new model of the same config holding the EMA weights (the training model is untouched)."""
    copy = students.StudentD.from_config(model.config)
    copy.load_state_dict(model.state_dict())
    ema.copy_to(copy.parameters())
    return copy.eval()


class DTrainer:
    def __init__(self, cfg):
        validate(cfg)
        self.cfg = cfg
        self.device = runtime.configure(cfg)
        self.amp = runtime.autocast_dtype(cfg["precision"], self.device)
        self.run_dir = output_dir(cfg, "d_run_dir", "Checkpoints/distill")
        self.manifest = teacher_data.open_data(cfg)
        self.holdout, self.train_range = teacher_data.split(cfg, self.manifest)
        teacher, _, self.teacher_source = teacher_data.teacher_of(cfg, self.manifest, "cpu")
        torch.manual_seed(cfg["seed"])
        self.model = students.new_student(teacher.config, self.manifest.data["generator"], cfg["d_head_channels"])
        if cfg["d_init"] == "teacher":
            students.init_from_teacher(self.model, teacher)
        self.model.to(self.device).train()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=cfg["d_lr"], weight_decay=cfg["d_weight_decay"])
        self.schedule = one_cycle(self.opt, cfg)
        self.ema = EMAModel(self.model.parameters(), decay=cfg["ema_decay"], use_ema_warmup=True, power=2 / 3)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp == torch.float16)
        self.step = 0
        print(f"[train_d] D: {students.parameter_count(self.model):,} parameters ({cfg['d_init']} init), "
              f"chunk groups by decoder depth {self.model.groups}; autocast={self.amp or 'off (fp32)'}; "
              f"held-out records {self.holdout[0]}..{self.holdout[1] - 1}, training records "
              f"{self.train_range[0]}..{self.train_range[1] - 1}")
        self._resume()

    def _record(self) -> dict:
        return {"config": self.cfg, "student": self.model.config, "data": data_fingerprint(self.manifest),
                "data_dir": str(self.manifest.folder), "teacher": self.teacher_source,
                "holdout_indices": list(self.holdout), "train_indices": list(self.train_range)}

    def _resume(self):
        state = checkpoint.load(self.run_dir)
        if state is not None:
            checkpoint.check_same_config(state["config"], self.cfg, RUN_KEYS, self.run_dir)
            saved = json.loads(state["record"])
            if saved["data"] != data_fingerprint(self.manifest):
                raise UserError(f"{self.run_dir} was trained on other teacher data than {self.manifest.folder} "
                                f"(its manifest changed); use the original data or another d_run_dir")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        atomic.write_json(self.run_dir / "run.json", self._record())
        if state is None:
            return
        try:
            self.model.load_state_dict(state["model"])
        except RuntimeError:
            raise UserError(f"{self.run_dir / checkpoint.LATEST} holds another architecture; use another "
                            f"d_run_dir") from None
        self.step = checkpoint.restore(state, {"optimizer": self.opt, "schedule": self.schedule, "ema": self.ema,
                                               "scaler": self.scaler})
        print(f"[train_d] resumed {self.run_dir / checkpoint.LATEST} at step {self.step}")

    def save(self):
        checkpoint.save(self.run_dir, {
            "model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
            "schedule": self.schedule.state_dict(), "ema": self.ema.state_dict(), "scaler": self.scaler.state_dict(),
            "rng": checkpoint.rng_state(), "step": self.step, "config": json.dumps(self.cfg),
            "record": json.dumps(self._record())})
        self.export(self.run_dir / "student")

    def export(self, folder):
        students.save_student(ema_copy(self.model, self.ema), folder)
        atomic.write_json(folder / "run.json", dict(self._record(), step=self.step))

    def train_step(self, batch) -> dict:
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        with runtime.autocast(self.amp, self.device):
            pred = self.model(batch["x_T"])
        loss, parts, per_chunk = d_losses(self.model, pred, batch, self.cfg)
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.opt)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg["grad_clip"])
        self.scaler.step(self.opt)
        self.scaler.update()
        self.schedule.step()
        self.ema.step(self.model.parameters())
        self.step += 1
        return {"loss": loss.item(), **{f"loss_{k}": v.item() for k, v in parts.items()},
                "chunk_losses": per_chunk.tolist(), "grad_norm": float(grad_norm)}

    def run(self):
        cfg = self.cfg
        stream = teacher_data.batches(cfg, self.manifest, *self.train_range, seed=[cfg["seed"], self.step])
        if self.step == 0:
            first = next(stream)
            students.fit_rin_skips(self.model, first["rin0"].to(self.device), first["chunks"].to(self.device))
        bar = tqdm(total=cfg["d_train_steps"], initial=self.step, desc="train_d", dynamic_ncols=True)
        window, waited, started = [], 0.0, time.time()
        with checkpoint.saved_on_exit(self.save, bar):
            while self.step < cfg["d_train_steps"]:
                t0 = time.time()
                batch = next(stream)
                waited += time.time() - t0
                window.append(self.train_step(batch))
                bar.update(1)
                if self.step % LOG_EVERY == 0 or self.step == cfg["d_train_steps"]:
                    self._log(window, waited, time.time() - started, bar)
                    window, waited, started = [], 0.0, time.time()
                if self.step % cfg["d_checkpoint_every"] == 0:
                    self.save()
                if cfg["d_snapshot_every"] and self.step % cfg["d_snapshot_every"] == 0:
                    self.export(self.run_dir / "snapshots" / f"step-{self.step:06d}")
        print(f"[train_d] EMA student written to {self.run_dir / 'student'}")
        return self.run_dir / "student"

    def _log(self, window, waited, elapsed, bar):
        n = len(window)
        record = {"step": self.step, "lr": self.schedule.get_last_lr()[0],
                  "seconds_per_step": elapsed / n, "data_wait_fraction": waited / elapsed}
        for key in window[0]:
            if key == "chunk_losses":
                record[key] = [sum(w[key][j] for w in window) / n for j in range(len(window[0][key]))]
            else:
                record[key] = sum(w[key] for w in window) / n
        with open(self.run_dir / "stats.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        bar.set_postfix(loss=f"{record['loss']:.4f}", wait=f"{100 * record['data_wait_fraction']:.1f}%")


def train_d(cfg):
    return DTrainer(cfg).run()
