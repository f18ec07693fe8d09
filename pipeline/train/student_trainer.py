"""What ``train_d`` and ``binarize`` add to the shared loop: teacher data (docs/design.md §11).

The held-out split is never trained on; the shards a run will read are checked (size and sha256)
before step 1; batches stream from DataLoader workers (``teacher_data.batches``); the learning rate
follows a one-cycle schedule (cosine, warm-up share of the recipe, from lr / 1e4 up to lr and down to
lr / 1e8, as the reference). A run records which data it reads (generator fingerprint, index ranges and every shard's
sha256), and resuming on data that grew or changed is refused. The EMA student is exported at every
checkpoint, and every ``snapshot_every`` steps into ``snapshots/``.
"""

import torch

from ..core import distributed
from ..core.config import output_dir
from ..core.errors import UserError
from ..data import teacher_data
from ..students import student_d
from . import adversarial, distribution_matching
from .trainer import Recipe, Trainer, one_cycle

DATA_KEYS = ("teacher_sha256", "space", "steps", "chunks", "T", "image_shape", "latent_channels", "percentile", "seed")


def data_fingerprint(manifest) -> dict:
    generator = manifest.data["generator"]
    return {k: generator.get(k) for k in DATA_KEYS}


def batch_rows(pred: dict, n: int) -> dict:
    """The first ``n`` rows of every prediction: the batch's own, without the term's extra noise."""
    return {k: v[:n] for k, v in pred.items()}


class StudentTrainer(Trainer):
    """Subclasses set ``run_keys`` and implement ``build_model``, ``loss`` and ``export``; one that calls
    ``start_adversary`` adds ``with_adversary`` to its loss."""

    export_name = "student"  # the EMA student is written to <run>/<export_name> at every checkpoint
    adversary = None  # the teacher-feature / adversarial term (adversarial.AdversarialTerm), when the config asks for it
    matching = None  # the distribution-matching term (distribution_matching.DistributionMatchingTerm), likewise
    adversary_rows = None  # the student's rows the adversarial term reads (student_inputs sets it; None = all)

    def __init__(self, cfg, prefix: str, stage: str):
        self.prefix = prefix
        self.manifest = teacher_data.open_data(cfg)
        self.holdout, self.train_range = teacher_data.split(cfg, self.manifest)
        teacher_data.check_shards(self.manifest, *self.train_range)
        super().__init__(cfg, Recipe.from_config(cfg, f"{prefix}_", stage), output_dir(cfg, f"{prefix}_run_dir"))

    # --- what a student stage provides
    def export(self, folder):
        raise NotImplementedError

    def first_batch(self, batch):
        """Called once on a fresh run with the first batch, which is then not trained on."""

    # --- the distribution-level term (docs/design.md §4)
    def start_adversary(self, teacher=None, alphas_cumprod=None):
        """Build the terms ``lambda_adv`` / ``lambda_feat`` and ``lambda_dm`` ask for (before ``resume``, which loads
        their state); the teacher that made the data is loaded when not given."""
        cfg = self.cfg
        if cfg["lambda_adv"] == 0 and cfg["lambda_feat"] == 0 and cfg["lambda_dm"] == 0:
            return
        if teacher is None:
            teacher, ddpm, _ = teacher_data.teacher_of(cfg, self.manifest, "cpu")
            alphas_cumprod = ddpm.alphas_cumprod
        self.adversary = adversarial.AdversarialTerm.from_config(cfg, teacher, alphas_cumprod, self.device, self.amp)
        self.matching = distribution_matching.DistributionMatchingTerm.from_config(cfg, teacher, alphas_cumprod,
                                                                                  self.device, self.amp)
        if distributed.is_main():
            for term in (self.adversary, self.matching):
                if term is not None:
                    print(f"[{self.recipe.stage}] distribution-level term: {term.describe()}")

    def student_inputs(self, batch):
        """What the student runs on this step: the batch's x_T, then the adversarial term's extra noise, then
        distribution matching's fresh x_T (none without them)."""
        x_T = batch["x_T"] if self.adversary is None else self.adversary.extra_noise(batch["x_T"], self.step)
        self.adversary_rows = len(x_T)  # the rows the adversarial term reads
        return x_T if self.matching is None else self.matching.fresh_noise(x_T, self.step)

    def with_adversary(self, loss, logged: dict, images, batch, pred=None):
        """The step's loss and log with the terms' parts added (unchanged without them). ``images`` are the student's
        images of the batch; ``pred``, its whole prediction, adds the images of the extra noise's rows."""
        if self.adversary is None and self.matching is None:
            return loss, logged
        n = len(batch["x_T"])
        if pred is not None and len(pred["chunks"]) > n:
            extra = student_d.readout(self.model, pred["rin"][n:].float() + pred["chunks"][n:].float().sum(dim=1))
            images = torch.cat([images, extra])
        parts, total = {}, loss
        if self.adversary is not None:
            weighted, more = self.adversary.student_loss(images[:self.adversary_rows], batch["x0"], self.step, loss,
                                                         student_d.output_parameters(self.model))
            total, parts = total + weighted, {**parts, **more}
        if self.matching is not None:
            weighted, more = self.matching.student_loss(
                images, adversarial.ramp_share(self.cfg["adv_ramp_steps"], self.step) * self.cfg["lambda_dm"], self.step)
            total, parts = total + weighted, {**parts, **more}
        return total, {**logged, **{f"loss_{k}": v.item() for k, v in parts.items()}}

    def after_step(self) -> dict:
        logged = self.adversary.update_discriminator() if self.adversary is not None else {}
        if self.matching is not None:
            logged.update(self.matching.after_step(self.step))
        return logged

    def extra_state(self) -> dict:
        return {**(self.adversary.state_dict() if self.adversary is not None else {}),
                **(self.matching.state_dict() if self.matching is not None else {})}

    def load_extra_state(self, state: dict):
        if self.adversary is not None:
            self.adversary.load_state_dict(state)
        if self.matching is not None:
            self.matching.load_state_dict(state)

    # --- the loop's hooks
    def make_schedule(self):
        return one_cycle(self.opt, self.recipe.train_steps, self.recipe.lr,
                         self.cfg[f"{self.prefix}_lr_warmup_fraction"])

    def batches(self):
        stream = teacher_data.batches(self.cfg, self.manifest, *self.train_range, seed=[self.cfg["seed"], self.step],
                                      batch_size=self.local_batch, rank=distributed.rank(), ranks=distributed.world())
        if self.step == 0:
            self.first_batch({k: v.to(self.device) for k, v in next(stream).items()})
            distributed.broadcast_module(self.model)  # every rank starts from rank 0's fit
        return stream

    def record(self) -> dict:
        return {"config": self.cfg, "data": data_fingerprint(self.manifest), "data_dir": str(self.manifest.folder),
                "data_read": teacher_data.data_identity(self.manifest, *self.train_range),
                "holdout_indices": list(self.holdout), "train_indices": list(self.train_range)}

    def check_resume(self, saved: dict):
        if saved["data"] != data_fingerprint(self.manifest):
            raise UserError(f"{self.run_dir} was trained on teacher data made by another generator config than "
                            f"{self.manifest.folder}; use the original data or another run folder")
        if saved.get("data_read") != teacher_data.data_identity(self.manifest, *self.train_range):
            raise UserError(f"the teacher data in {self.manifest.folder} grew or changed since {self.run_dir} "
                            f"started (it trained on records {saved['train_indices'][0]}.."
                            f"{saved['train_indices'][1] - 1} of other shards); resume on the original data or "
                            f"start another run folder")

    def on_checkpoint(self):
        self.export(self.run_dir / self.export_name)

    def periodic(self):
        every = self.cfg[f"{self.prefix}_snapshot_every"]
        if every and self.step % every == 0:
            self.export(self.run_dir / "snapshots" / f"step-{self.step:06d}")

    def finish(self):
        print(f"[{self.recipe.stage}] EMA student written to {self.run_dir / self.export_name}")
        return self.run_dir / self.export_name
