"""The one training loop that ``pretrain``, ``train_d`` and ``binarize`` share (docs/design.md §11).

A ``Recipe`` reads one stage's keys (steps, batch size, learning rate, weight decay, checkpoint
period). ``Trainer`` owns everything a run needs besides its model, its batches and
its loss: AdamW, a learning-rate schedule, EMA weights (diffusers ``EMAModel`` with warm-up, so that
short runs are not dominated by the initial weights), gradient clipping, autocast where it is fast
(fp16 on CUDA adds a GradScaler), tqdm, ``stats.jsonl`` every ``log_every`` steps (loss parts,
learning rate, data-loading stall and whatever the stage adds), ``checkpoint.pt`` (model, EMA,
optimizer, schedule, scaler, step, RNG, config, record) every ``checkpoint_every`` steps and on
Ctrl-C / SIGTERM, and resuming from it when the same command is run again. A stage subclasses it
and provides ``build_model``, ``make_schedule``, ``batches``, ``loss`` and what to write when.
"""
import contextlib
import dataclasses
import json
import math
import time

import torch
from diffusers.training_utils import EMAModel
from tqdm import tqdm

from ..core import atomic, checkpoint, config, distributed, runtime, stop_request
from ..core.errors import UserError


@dataclasses.dataclass(frozen=True)
class Recipe:
    stage: str
    # the fields are the config keys without their stage prefix (d_train_steps -> train_steps)
    train_steps: int
    batch_size: int
    lr: float
    weight_decay: float
    checkpoint_every: int

    @classmethod
    def from_config(cls, cfg, prefix: str, stage: str):
        names = [f.name for f in dataclasses.fields(cls)][1:]
        return cls(stage, *(cfg[f"{prefix}{name}"] for name in names))


def one_cycle(opt, train_steps: int, lr: float, warmup_fraction: float):
    """The reference's one-cycle schedule: cosine, from lr / 1e4 up to lr and down to lr / 1e8."""
    # torch needs at least one step in each phase: very short (test) runs get a longer warm-up share
    total = max(train_steps, 4)
    return torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=lr, total_steps=total, pct_start=max(warmup_fraction, 2.0 / total),
        anneal_strategy="cos", div_factor=1e4, final_div_factor=1e4)


class Trainer:
    """Subclasses set ``run_keys`` and implement the stage's hooks below."""

    run_keys: tuple = ()  # keys whose change makes a saved run another experiment: resuming is refused
    ddp_unused_parameters = False  # True where some trainable parameters may get no gradient in a step
    log_every = 10
    ema_power = 2 / 3

    def __init__(self, cfg, recipe: Recipe, run_dir):
        config.validate(cfg, [recipe.stage])  # callers from Python skip the CLI's check
        self.cfg, self.recipe, self.run_dir = cfg, recipe, run_dir
        self.device = runtime.configure(cfg)
        self.amp = runtime.autocast_dtype(cfg["precision"], self.device)
        torch.manual_seed(cfg["seed"])
        self.model = self.build_model().to(self.device).train()
        self.network = self.forward_module()  # what the loss calls: in DistributedDataParallel under torchrun (run)
        if recipe.batch_size % distributed.world():
            raise UserError(f"the batch size {recipe.batch_size} does not split evenly over {distributed.world()} "
                            f"processes; use a multiple of {distributed.world()}")
        self.local_batch = recipe.batch_size // distributed.world()  # the config's batch is the global batch
        self.opt = torch.optim.AdamW(self.parameter_groups(), lr=recipe.lr, weight_decay=recipe.weight_decay)
        self.schedule = self.make_schedule()
        self.ema = EMAModel(self.ema_parameters(self.model), decay=cfg["ema_decay"], use_ema_warmup=True,
                            power=self.ema_power)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp == torch.float16)
        self.step = 0  # a subclass calls resume() once its own state exists
        self.saved_step = 0  # the step of the checkpoint on disk (0: none yet)

    # --- what a stage provides
    def build_model(self):
        raise NotImplementedError

    def parameter_groups(self):
        return self.model.parameters()

    def ema_parameters(self, model) -> list:
        """The parameters the EMA averages (a frozen teacher inside the model need not be copied)."""
        return list(model.parameters())

    def make_schedule(self):
        raise NotImplementedError

    def forward_module(self) -> torch.nn.Module:
        """What the loss calls forward on (wrapped in DistributedDataParallel under torchrun)."""
        return self.model

    def processes_note(self) -> str:
        """For a stage's first line: how the global batch is shared (nothing in one process)."""
        return f"; {distributed.world()} processes of batch {self.local_batch}" if distributed.world() > 1 else ""

    def share(self, tensor: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a global batch that every rank drew alike, from generators in the same state:
        N processes then train on exactly the samples one process would (docs/design.md §16)."""
        return tensor.chunk(distributed.world())[distributed.rank()]

    def batches(self):
        """An endless iterator of batches (dicts of tensors), started at ``self.step``."""
        raise NotImplementedError

    def loss(self, batch) -> tuple:
        """(total loss, {name: float or list} to log)."""
        raise NotImplementedError

    def record(self) -> dict:
        """What the run folder's run.json says about the run; checked again on resume."""
        return {"config": self.cfg}

    def check_resume(self, saved_record: dict) -> None:
        """Refuse a checkpoint whose record says it belongs to another experiment."""

    def extra_state(self) -> dict:
        """Tensors the stage keeps in its checkpoint beside the common ones."""
        return {}

    def load_extra_state(self, state: dict):
        pass

    def before_step(self):
        pass

    def after_step(self) -> dict:
        return {}

    def on_checkpoint(self):
        """Called after every checkpoint (students export their EMA weights here)."""

    def periodic(self):
        """Called after every step (snapshots, sample grids)."""

    def finish(self):
        """Called once the last step is saved; returns what the stage produced."""

    # --- the shared machinery
    def resume(self):
        # held until the process ends: a second run writing the same folder is refused at once (rank 0 alone
        # writes the run folder; every rank resumes from the same checkpoint)
        self._lock = contextlib.ExitStack()
        main = distributed.is_main()
        if main:
            self._lock.enter_context(atomic.folder_lock(self.run_dir, f"{self.recipe.stage} run"))
        state = checkpoint.load(self.run_dir)
        if state is not None:
            checkpoint.check_same_config(state["config"], self.cfg, self.run_keys, self.run_dir)
            self.check_resume(json.loads(state["record"]))
        if main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            # after the checks: a refused resume leaves the record alone
            atomic.write_json(self.run_dir / "run.json", self.record())
            atomic.write_json(self.run_dir / "config.json", self.cfg)
        if state is None:
            return
        try:
            self.model.load_state_dict(state["model"])
            self.load_extra_state(state)
            self.step = checkpoint.restore(state, {"optimizer": self.opt, "schedule": self.schedule,
                                                   "ema": self.ema, "scaler": self.scaler})
            self.ema.to(device=self.device)  # its shadow weights load where the checkpoint was read (the CPU)
            self.saved_step = self.step
        except (RuntimeError, KeyError, ValueError, TypeError, AttributeError):
            raise UserError(f"{self.run_dir / checkpoint.LATEST} holds another model or an older checkpoint "
                            f"format; use another run folder") from None
        if main:
            print(f"[{self.recipe.stage}] resumed {self.run_dir / checkpoint.LATEST} at step {self.step}")

    def save(self):
        """Rank 0 writes the checkpoint (every rank holds the same weights) and what follows it."""
        if not distributed.is_main():
            return
        checkpoint.save(self.run_dir, {
            "model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
            "schedule": self.schedule.state_dict(), "ema": self.ema.state_dict(), "scaler": self.scaler.state_dict(),
            "rng": checkpoint.rng_state(), "step": self.step, "config": json.dumps(self.cfg),
            "record": json.dumps(self.record()), **self.extra_state()})
        self.saved_step = self.step
        self.on_checkpoint()

    def ema_model(self, fresh_model):
        """``fresh_model`` (same architecture, not the training model) holding the EMA weights."""
        fresh_model.load_state_dict(self.model.state_dict())
        self.ema.copy_to(self.ema_parameters(fresh_model))
        return fresh_model.eval()

    def train_step(self, batch) -> dict:
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        self.before_step()
        loss, logged = self.loss(batch)
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.opt)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg["grad_clip"]))
        loss_value = loss.item()
        self.stop_if_diverged(loss_value, grad_norm)  # before the update: the weights stay the last good ones
        self.scaler.step(self.opt)
        self.scaler.update()
        self.schedule.step()
        self.ema.step(self.ema_parameters(self.model))
        self.step += 1
        return {"loss": loss_value, **logged, "grad_norm": grad_norm, **self.after_step()}

    def stop_if_diverged(self, loss: float, grad_norm: float) -> None:
        """One sentence, and no checkpoint of the broken weights, when the loss or the gradient is not finite. Under
        torchrun every rank sees the same averaged gradient, so all stop together. fp16's GradScaler skips
        steps with inf gradients by design, so there only the loss counts."""
        grad_ok = math.isfinite(grad_norm) or self.scaler.is_enabled()
        if math.isfinite(loss) and grad_ok:
            return
        kept = (f"{self.run_dir / checkpoint.LATEST} keeps step {self.saved_step}" if self.saved_step
                else "no checkpoint was written")
        raise UserError(f"{self.recipe.stage} diverged at step {self.step + 1}: the loss is {loss:.4g} and the "
                        f"gradient norm {grad_norm:.4g}; the run stopped and {kept}; lower the learning rate or "
                        f"check the teacher data with '--mode verify'")

    def run(self):
        recipe, main = self.recipe, distributed.is_main()
        self.network = distributed.wrap(self.network, self.device, self.ddp_unused_parameters)
        stream = self.batches()
        bar = tqdm(total=recipe.train_steps, initial=self.step, desc=recipe.stage, dynamic_ncols=True, disable=not main)
        window, waited, started = [], 0.0, time.time()
        with self._lock, stop_request.step_boundaries(), checkpoint.saved_on_exit(self.save, bar):
            while self.step < recipe.train_steps:
                stop_request.check()  # several ranks stop together, after the same step
                t0 = time.time()
                batch = next(stream)
                waited += time.time() - t0
                window.append(self.train_step(batch))
                bar.update(1)
                if self.step % self.log_every == 0 or self.step == recipe.train_steps:
                    self._log(window, waited, time.time() - started, bar)
                    window, waited, started = [], 0.0, time.time()
                if self.step % recipe.checkpoint_every == 0:
                    self.save()
                if main:
                    self.periodic()
        return self.finish() if main else None

    def _log(self, window, waited, elapsed, bar):
        n = len(window)
        record = {"step": self.step, "lr": self.schedule.get_last_lr()[0],
                  "seconds_per_step": elapsed / n, "data_wait_fraction": waited / elapsed}
        for key in window[0]:
            if isinstance(window[0][key], list):
                record[key] = [sum(w[key][j] for w in window) / n for j in range(len(window[0][key]))]
            else:
                record[key] = sum(w[key] for w in window) / n
        record = distributed.mean_over_ranks(record)  # every rank calls this: it is a collective
        if not distributed.is_main():
            return
        with open(self.run_dir / "stats.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        bar.set_postfix(loss=f"{record['loss']:.4f}", wait=f"{100 * record['data_wait_fraction']:.1f}%")
