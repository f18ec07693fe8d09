"""``Main_Distill.py --mode train_d``: fit the one-step student D to the offline teacher data.

D starts from the teacher's UNet (or at random, or from a trained D: ``d_init_from``) and learns rin0 and every chunk of the teacher's
trajectory from x_T in one call (``losses.d_losses``), and, with ``lambda_adv`` or ``lambda_feat``, against
a discriminator on the frozen teacher's features (``adversarial.AdversarialTerm``; its heads live in the
run's checkpoint, never in the exported D). The first batch of a fresh run is spent on the least-squares
start of the heads' linear rin paths (not when starting from a trained D). The training machinery (schedule, EMA, resume,
stats, data checks) is ``student_trainer.StudentTrainer``; the EMA student is written to ``<run>/student`` at every
checkpoint.
"""
from ..core import distributed, run_record, runtime
from ..core.config import project_path
from ..core.errors import UserError
from ..data import teacher_data
from ..students import student_d
from . import adversarial, distribution_matching
from .losses import LossWeights, d_losses
from .student_trainer import StudentTrainer, batch_rows

# Keys whose change makes a saved run a different experiment: resuming with other values is refused.
RUN_KEYS = ("data_dir", "d_init", "d_init_from", "d_head_channels", "d_train_steps", "d_batch_size", "d_lr",
            "d_lr_warmup_fraction", "d_weight_decay", "lambda_rin", "lambda_chunks", "lambda_x0",
            "holdout_samples", "train_samples", "ema_decay", "grad_clip", "seed", *adversarial.RUN_KEYS,
            *distribution_matching.RUN_KEYS)


class DTrainer(StudentTrainer):
    run_keys = RUN_KEYS

    def __init__(self, cfg):
        super().__init__(cfg, "d", "train_d")
        self.ddp_unused_parameters = not self.model.reads_every_depth
        if distributed.is_main():
            start = f"from {cfg['d_init_from']}" if cfg["d_init_from"] else f"{cfg['d_init']} init"
            print(f"[train_d] D: {student_d.parameter_count(self.model):,} parameters ({start}), "
                  f"chunk groups by decoder depth {self.model.groups}; autocast={self.amp or 'off (fp32)'}; "
                  f"held-out records {self.holdout[0]}..{self.holdout[1] - 1}, training records "
                  f"{self.train_range[0]}..{self.train_range[1] - 1}{self.processes_note()}")
        self.loss_weights = LossWeights.from_config(cfg)
        self.start_adversary(self.teacher_unet, self.alphas_cumprod)
        self.resume()

    def build_model(self):
        """D shaped by the teacher data, started from the teacher (d_init), at random, or from a trained D."""
        teacher, ddpm, self.teacher_source = teacher_data.teacher_of(self.cfg, self.manifest, "cpu")
        self.teacher_unet, self.alphas_cumprod = teacher, ddpm.alphas_cumprod  # for the adversarial term
        rnet = teacher_data.rnet_of(self.cfg, self.manifest, teacher)
        model = student_d.new_student(teacher.config, self.manifest.data["generator"], self.cfg["d_head_channels"],
                                     rnet)
        if self.cfg["d_init_from"]:
            start_from_trained(model, project_path(self.cfg["d_init_from"]))
        elif self.cfg["d_init"] == "teacher":
            student_d.init_from_teacher(model, teacher)
        return model

    def record(self) -> dict:
        return dict(super().record(), student=self.model.config, teacher=self.teacher_source)

    def first_batch(self, batch):
        if not self.cfg["d_init_from"]:  # a trained D's rin paths are already fitted
            student_d.fit_rin_skips(self.model, batch["rin0"], batch["chunks"])

    def loss(self, batch):
        with runtime.autocast(self.amp, self.device):
            pred = self.network(self.student_inputs(batch))
        loss, parts, per_chunk, images = d_losses(self.model, batch_rows(pred, len(batch["x_T"])), batch,
                                                    self.loss_weights)
        logged = {**{f"loss_{k}": v.item() for k, v in parts.items()}, "chunk_losses": per_chunk.tolist()}
        return self.with_adversary(loss, logged, images, batch, pred)

    def export(self, folder):
        student_d.save_student(self.ema_model(student_d.StudentD.from_config(self.model.config)), folder)
        run_record.write(folder, dict(self.record(), step=self.step))


def start_from_trained(model, folder):
    """Load a trained D's weights into ``model`` (before the EMA is made, so the EMA starts there too; a checkpoint of
    this run, when there is one, replaces both). Its layout must be the one this run's data and keys give."""
    start = student_d.load_student(folder)
    if start.config != model.config:
        differ = sorted(k for k in {**start.config, **model.config} if start.config.get(k) != model.config.get(k))
        raise UserError(f"the D in {folder} has another layout than this run's teacher data and keys give "
                        f"({', '.join(differ)} differ); start from a D trained on data of this layout, or without "
                        f"d_init_from")
    model.load_state_dict(start.state_dict())


def train_d(cfg):
    with distributed.together():  # under torchrun a refused set-up stops every rank with one sentence
        trainer = DTrainer(cfg)
    return trainer.run()
