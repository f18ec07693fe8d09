"""``Main_Distill.py --mode binarize``: the 1-bit student B, trained with D as its teacher (docs/design.md §4).

B starts as a copy of the D that ``d_weights`` names (by default the EMA student of the train_d run)
with its time path folded and its convolutions and linears binarized (``student_b.to_binary``). Its
loss, per batch of teacher records:

    L = d_losses(B, records) + lambda_d_outputs * d_losses(B, D's predictions)
        + lambda_spd * SPD(D, B) + lambda_lrm * LRM(D, B)  [+ the distribution-level term of D, on B's images]

The output losses are those of D (rin, chunks, x0), once against the teacher's records and once
against D's own predictions for the same x_T; SPD and LRM compare the block features of D and B
(``feature_losses``); LRM's channel-PCA bases are fitted on D's features of the first batch and kept
in the checkpoint. Progressive binarization switches rings of blocks to 1 bit from the middle
outwards every ``b_progressive_every`` steps. The statistics add the fraction of real-valued weights whose
sign flipped in each step. The training machinery is ``student_trainer.StudentTrainer``; the EMA B is
exported bit-packed to ``<b_run_dir>/packed`` at every checkpoint, beside the layer table.
"""
import torch

from ..core import distributed, run_record, runtime
from ..core.errors import UserError
from ..teacher import spaces
from ..data import teacher_data
from ..students import binary, packed, student_b, student_d, student_folders
from . import adversarial, distribution_matching
from .d_outputs import DOutputs
from .feature_losses import FeatureTaps, LowRankBases, spd_loss
from .losses import LossWeights, d_losses
from .student_trainer import StudentTrainer, batch_rows, data_fingerprint

RUN_KEYS = ("data_dir", "b_train_steps", "b_batch_size", "b_lr", "b_lr_warmup_fraction", "b_weight_decay",
            "lambda_rin", "lambda_chunks", "lambda_x0", "lambda_d_outputs", "lambda_spd", "lambda_lrm",
            "b_progressive_every", "holdout_samples", "train_samples", "ema_decay", "grad_clip", "seed",
            *adversarial.RUN_KEYS, *distribution_matching.RUN_KEYS, *packed.BINARIZATION_KEYS)
EVERYTHING = 10 ** 9  # a step after every progressive ring


def load_d(cfg, manifest):
    """The D that B starts from and learns from, checked against the teacher data and the config."""
    folder = student_folders.d_folder(cfg)
    d = student_d.load_student(folder)
    student_d.check_fits(d, manifest)
    run = run_record.read(folder, student_d.REWRITE)
    if run is not None:
        if run.get("data") != data_fingerprint(manifest):
            raise UserError(f"the student D in {folder} was trained on other teacher data than {manifest.folder}; "
                            f"binarize the D of this data (d_weights=) or point data_dir= at its data")
        holdout = list(teacher_data.split(cfg, manifest)[0])
        if run["holdout_indices"] != holdout:
            raise UserError(f"the student D in {folder} held out records {run['holdout_indices']} but this config "
                            f"holds out {holdout}; use D's holdout_samples")
    if d.config["head_channels"] != cfg["d_head_channels"]:
        raise UserError(f"the student D in {folder} has d_head_channels={d.config['head_channels']} but the config "
                        f"says {cfg['d_head_channels']}; set d_head_channels={d.config['head_channels']} or retrain D")
    return d, folder


def check_before_training(cfg) -> None:
    """The b_full_precision check of a command that trains D first (--mode all), where the teacher is local: refused
    before generate and train_d are spent on a D that B could not binarize."""
    from ..teacher.teachers import local_config
    teacher_config = local_config(cfg)
    if teacher_config is None:
        return
    backbone = {k: v for k, v in teacher_config.items() if not k.startswith("_")}
    with torch.device("meta"):
        d = student_d.StudentD(backbone, chunks=cfg["chunks"], image_channels=teacher_config["in_channels"],
                              latent_channels=spaces.of_config(cfg).chain_channels(backbone),
                              space=cfg["space"], timestep=0, head_channels=cfg["d_head_channels"])
        student_b.check_patterns_leave_binary_layers(student_b.Binarization.from_config(cfg), d)


class BTrainer(StudentTrainer):
    run_keys = RUN_KEYS
    export_name = "packed"
    ddp_unused_parameters = True  # layers not yet binary in the progressive schedule leave their scales unused

    def __init__(self, cfg):
        super().__init__(cfg, "b", "binarize")
        self.d.to(self.device)
        self.taps_b, self.taps_d = FeatureTaps(self.model), FeatureTaps(self.d)
        self.bases = LowRankBases(self.model.unet).to(self.device)
        self._signs = None  # latent signs before the step, for sign_flip_fraction
        self.d_outputs = None  # D's outputs on every training record, built when the steps start
        if distributed.is_main():
            print(f"[binarize] B from D {self.d_folder}: {self.binary_count():,} of "
                  f"{student_d.parameter_count(self.model):,} parameters binary in {len(self.binary_layers)} layers, "
                  f"{len(self.table) - len(self.binary_layers)} layers full precision ({cfg['b_full_precision']}); "
                  f"activations {cfg['b_activations']}; "
                  + (f"progressive rings every {cfg['b_progressive_every']} steps; " if cfg["b_progressive_every"]
                     else "all layers binary from step 0; ")
                  + f"autocast={self.amp or 'off (fp32)'}")
        self.loss_weights = LossWeights.from_config(cfg)
        self.start_adversary()  # the teacher that made the data is loaded only for it
        self.resume()

    # --- the model
    def build_model(self):
        self.d, self.d_folder = load_d(self.cfg, self.manifest)
        self.d.requires_grad_(False)
        self.b_config = packed.b_config(self.d.config, student_folders.binarization_settings(self.cfg))
        model = student_d.StudentD.from_config(self.d.config)
        model.load_state_dict(self.d.state_dict())
        self.table = student_b.to_binary(model, student_b.Binarization.from_config(self.cfg))
        student_b.start_scales(model)
        self.binary_layers = [layer for _, layer in student_b.binary_layers(model)]
        return model

    def binary_count(self) -> int:
        return sum(layer.weight.numel() for layer in self.binary_layers)

    def parameter_groups(self):
        scales = {id(p) for p in binary.scale_parameters(self.model)}
        return [{"params": [p for p in self.model.parameters() if id(p) not in scales]},
                {"params": [p for p in self.model.parameters() if id(p) in scales], "weight_decay": 0.0}]

    def record(self) -> dict:
        return dict(super().record(), d=str(self.d_folder), b=self.b_config, layers=self.table)

    # --- LRM bases live in the checkpoint
    def extra_state(self):
        return {**super().extra_state(), "lrm_bases": self.bases.state_dict()}

    def load_extra_state(self, state):
        super().load_extra_state(state)
        self.bases.load_fitted(state["lrm_bases"])

    def batches(self):
        if self.step < self.recipe.train_steps and self.cfg["b_cache_d_mb"] and self.d_outputs is None:
            self.d_outputs = DOutputs.build(self.d, self.taps_d, self.manifest, *self.train_range, self.cfg,
                                            self.amp, self.device)
        return super().batches()

    def first_batch(self, batch):
        self.bases.fit(self.d_forward(batch)[1])
        distributed.broadcast_module(self.bases)  # under torchrun every rank uses rank 0's bases

    def d_forward(self, batch):
        """(D's predictions, D's block features) on the batch: looked up when kept, else computed."""
        if self.d_outputs is not None:
            return self.d_outputs.lookup(batch["index"], self.device)
        with torch.no_grad(), runtime.autocast(self.amp, self.device):
            pred = self.d(batch["x_T"])
        return pred, self.taps_d.take()

    # --- one step
    def before_step(self):
        student_b.set_progress(self.model, self.step, self.cfg["b_progressive_every"])
        if self._signs is None:  # afterwards the previous step's after_step has taken them
            self._signs = self._real_weight_signs()

    def _real_weight_signs(self):
        return [layer.real_weight().detach() >= 0 for layer in self.binary_layers]

    def after_step(self):
        signs = self._real_weight_signs()
        flipped = sum(int(new.ne(old).sum()) for new, old in zip(signs, self._signs))
        self._signs = signs
        active = sum(layer.is_active for layer in self.binary_layers)
        return {**super().after_step(), "sign_flip_fraction": flipped / self.binary_count(),
                "binary_layers_active": active}

    def loss(self, batch):
        cfg = self.cfg
        pred_d, feats_d = self.d_forward(batch)
        n = len(batch["x_T"])
        with runtime.autocast(self.amp, self.device):
            pred_all = self.network(self.student_inputs(batch))
        feats_b = {name: f[:n] for name, f in self.taps_b.take().items()}  # D's features exist for the batch only
        pred_b = batch_rows(pred_all, n)
        total, parts, per_chunk, images = d_losses(self.model, pred_b, batch, self.loss_weights)
        logged = {f"loss_{k}": v.item() for k, v in parts.items()}
        if cfg["lambda_d_outputs"]:
            z_d = pred_d["rin"].float() + pred_d["chunks"].float().sum(dim=1)
            from_d = {"chunks": pred_d["chunks"].float(), "x0": student_d.readout(self.d, z_d),
                      "rin0": pred_d["rin"].float()}
            vs_d, parts_d, _, _ = d_losses(self.model, pred_b, from_d, self.loss_weights)
            total = total + cfg["lambda_d_outputs"] * vs_d
            logged.update({f"loss_{k}_vs_d": v.item() for k, v in parts_d.items()})
        if cfg["lambda_spd"]:
            spd = spd_loss(feats_d, feats_b)
            total = total + cfg["lambda_spd"] * spd
            logged["loss_spd"] = spd.item()
        if cfg["lambda_lrm"]:
            lrm = self.bases.loss(feats_d, feats_b)
            total = total + cfg["lambda_lrm"] * lrm
            logged["loss_lrm"] = lrm.item()
        return self.with_adversary(total, {**logged, "chunk_losses": per_chunk.tolist()}, images, batch, pred_all)

    # --- export
    def ema_b(self):
        """A fully binary B holding the EMA weights (the training model is untouched)."""
        copy = self.ema_model(packed.build_b(self.b_config))
        student_b.set_progress(copy, EVERYTHING, 0)
        return copy.to(self.device).eval()

    def export(self, folder):
        sizes = packed.export_packed(self.ema_b(), self.b_config, folder)
        run_record.write(folder, dict(self.record(), step=self.step, bytes=sizes))
        return sizes


def binarize(cfg):
    with distributed.together():  # under torchrun a refused set-up stops every rank with one sentence
        trainer = BTrainer(cfg)
    folder = trainer.run()
    if not distributed.is_main():
        return None
    sizes = run_record.read(folder, packed.REDO)["bytes"]
    d_bytes = (trainer.d_folder / student_d.WEIGHTS_FILE).stat().st_size
    print(f"[binarize] packed B: {sizes['file_bytes']:,} bytes ({sizes['sign_bytes']:,} of sign bits), "
          f"{d_bytes / sizes['file_bytes']:.1f}x smaller than D in fp32 ({d_bytes:,} bytes)")
    return folder
