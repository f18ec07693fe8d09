"""The one table of configuration keys (docs/design.md §9).

Every key has its default (whose Python type is the key's type), the stages that read it, the values it accepts and
one line of help. Validation (``config.validate``), ``--help`` and ``docs/config.md`` are made from it alone."""
import dataclasses
import math
from typing import Any, Callable, Optional

# Stages, as ``--mode`` names them; "teacher_sample" is Main_Diffusion.py --mode sample.
DIFFUSION_STAGES = ("pretrain", "rectify", "teacher_sample")
DISTILL_STAGES = ("generate", "verify", "repair", "export", "import", "train_d", "binarize", "eval_d", "sample")
STAGES = DIFFUSION_STAGES + DISTILL_STAGES
EVERY = STAGES
TRAINING = ("train_d", "binarize")
DATA_READERS = ("verify", "repair", "export", "train_d", "binarize", "eval_d")
TEACHER_LOADERS = ("teacher_sample", "generate", "repair", "import", "train_d", "eval_d")
MANY_PROCESS_STAGES = ("generate", "verify", "repair", "train_d", "binarize", "eval_d")  # Main_Distill's, §8


@dataclasses.dataclass(frozen=True)
class Range:
    """An interval of accepted numbers; ``text`` is how an error message and the docs say it."""
    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False
    high_open: bool = False

    def accepts(self, value) -> bool:
        values = value if isinstance(value, list) else [value]
        return all(self._accepts(v) for v in values)

    def _accepts(self, v) -> bool:
        if isinstance(v, float) and not math.isfinite(v):
            return False
        if self.low is not None and (v <= self.low if self.low_open else v < self.low):
            return False
        return self.high is None or (v < self.high if self.high_open else v <= self.high)

    @property
    def text(self) -> str:
        if self.low == 0 and self.low_open and self.high is None:
            return "positive"
        if self.low == 0 and self.high is None:
            return "zero or positive"
        left = "(" if self.low_open else "["
        right = ")" if self.high_open else "]"
        return f"within {left}{self.low:g}, {'inf' if self.high is None else f'{self.high:g}'}{right}"


POSITIVE = Range(0, low_open=True)
NON_NEGATIVE = Range(0)
FRACTION_OPEN = Range(0, 1, low_open=True, high_open=True)
DECAY = Range(0, 1, high_open=True)


@dataclasses.dataclass(frozen=True)
class Key:
    default: Any
    stages: tuple
    help: str
    range: Optional[Range] = None
    choices: tuple = ()
    folder: Optional[str] = None  # a folder key; "" resolves to <folder>/<name> when this is not "."
    check: Optional[Callable] = None  # extra rule on the value: returns what is wrong, or None
    section: str = ""


def _non_empty(value):
    return None if value else "must list at least one value"


def _some_weight(value):
    return None if any(value) else "must give at least one depth a positive weight"


def _device_name(value):
    if value in ("auto", "cpu", "cuda") or (value.startswith("cuda:") and value[5:].isdigit()):
        return None
    return "must be auto, cpu, cuda or cuda:N"


class _Table(dict):
    """Collects keys section by section, in the order --help and the docs show them."""

    def __init__(self):
        super().__init__()
        self.section = ""

    def add(self, name, default, stages, help, **kw):
        self[name] = Key(default, tuple(stages), help, section=self.section, **kw)


def _what_to_work_on(table):
    table.section = "what to work on"
    table.add("name", "fashion_mnist", EVERY, "run name: output folders are named after it")
    table.add("dataset", "fashion_mnist", ("pretrain", "rectify", "teacher_sample") + TRAINING + ("eval_d",),
              "image dataset", choices=("fashion_mnist", "cifar10"))
    table.add("dataset_dir", "/usr/share/datasets/fashion-mnist", ("pretrain", "rectify", "teacher_sample")
              + TRAINING + ("eval_d",), "folder of the dataset's files", folder=".")
    table.add("teacher_path", "Diffusion/fashion_mnist", ("pretrain", "rectify", "teacher_sample", "generate", "repair",
                                                           "train_d", "binarize", "eval_d"),
              "teacher in diffusers layout (<path>/unet, <path>/scheduler)", folder=".")
    table.add("teacher_hub_id", "", ("rectify", "teacher_sample", "generate", "repair", "train_d", "binarize",
                                     "eval_d"), "hub id tried when teacher_path holds no weights (\"\" = never)")


def _machine(table):
    table.section = "machine"
    table.add("device", "auto", EVERY, "where to run", check=_device_name)
    table.add("precision", "auto", ("pretrain", "rectify") + TRAINING,
              "training autocast (auto: bf16 on a CPU with native bf16 or on a GPU that has it, else fp16 on "
              "CUDA, fp32 elsewhere)", choices=("auto", "fp32", "bf16", "fp16"))
    table.add("channels_last", True, ("teacher_sample", "generate", "repair", "eval_d", "sample"),
              "channels-last memory for inference: teacher sampling, one-step calls, Inception (faster on "
              "every CPU kind measured)")
    table.add("num_threads", 0, EVERY, "CPU threads for torch (0 = torch's default)", range=NON_NEGATIVE)
    table.add("procs", 0, MANY_PROCESS_STAGES, "worker processes a plain Main_Distill.py launch runs a stage on "
              "(torch.distributed, as under torchrun; ignored there). 0 = auto: 2 single-thread workers for generate, "
              "train_d and binarize on a CPU-only machine of >= 2 cores (faster on every CPU kind timed whole), "
              "else 1; 1 = one process; N = N workers for each stage reading it", range=NON_NEGATIVE)
    table.add("seed", 0, EVERY, "seed of x_T, batch order and initialisation", range=NON_NEGATIVE)


def _pretrain(table):
    table.section = "pretrain: a new teacher UNet2DModel (only where none exists)"
    pre = ("pretrain",)
    table.add("unet_channels", [32, 64, 64], pre, "channels per resolution level", range=POSITIVE, check=_non_empty)
    table.add("unet_layers_per_block", 1, pre, "ResNet layers per level", range=POSITIVE)
    table.add("unet_attention_levels", [], pre, "indices of resolution levels with self-attention", range=NON_NEGATIVE)
    table.add("unet_norm_groups", 16, pre, "GroupNorm groups (must divide every level's channels)", range=POSITIVE)
    # a teacher folder without scheduler/ gets its schedule from these keys, in every stage that loads it
    schedule = pre + ("rectify",) + TEACHER_LOADERS
    table.add("num_train_timesteps", 1000, schedule, "DDPM timesteps T (of a teacher without scheduler/)", range=POSITIVE)
    table.add("beta_start", 0.0001, schedule, "first beta of the schedule", range=FRACTION_OPEN)
    table.add("beta_end", 0.02, schedule, "last beta of the schedule", range=FRACTION_OPEN)
    table.add("beta_schedule", "linear", schedule, "beta schedule",
              choices=("linear", "scaled_linear", "squaredcos_cap_v2"))
    table.add("train_steps", 4000, pre, "optimizer steps", range=POSITIVE)
    table.add("batch_size", 64, pre, "images per step", range=POSITIVE)
    table.add("lr", 0.0005, pre, "peak learning rate (warm-up, then cosine to 10 %)", range=POSITIVE)
    table.add("lr_warmup_steps", 200, pre, "linear warm-up steps", range=NON_NEGATIVE)
    table.add("weight_decay", 0.0, pre, "AdamW weight decay", range=NON_NEGATIVE)
    table.add("ema_decay", 0.999, ("pretrain", "rectify") + TRAINING, "EMA decay of the exported weights", range=DECAY)
    table.add("grad_clip", 1.0, ("pretrain", "rectify") + TRAINING, "gradient-norm clip", range=POSITIVE)
    table.add("hflip", True, pre + ("rectify",), "random horizontal flips")
    table.add("checkpoint_every", 250, pre, "steps between checkpoints", range=POSITIVE)
    table.add("sample_every", 1000, pre, "steps between sample grids (0 = never)", range=NON_NEGATIVE)
    table.add("snapshot_every", 0, pre, "steps between EMA snapshots in teacher layout under <run_dir>/snapshots "
              "(0 = never; for FID-against-steps curves)", range=NON_NEGATIVE)
    table.add("run_dir", "", pre, "checkpoints and stats (\"\" = Checkpoints/diffusion/<name>)",
              folder="Checkpoints/diffusion")
    table.add("overwrite_teacher", False, pre, "replace an existing teacher at teacher_path")


def _teacher_samples(table):
    table.section = "teacher samples and FID (Main_Diffusion.py --mode sample)"
    table.add("sample_count", 64, ("teacher_sample", "sample"), "images in the grid / images drawn", range=POSITIVE)
    table.add("fid_samples", 1000, ("teacher_sample", "eval_d"), "N of every FID (eval_d: held-out records)",
              range=Range(2))
    table.add("fid_batch_size", 100, ("teacher_sample", "eval_d", "sample"),
              "images per batch while sampling and scoring", range=POSITIVE)
    table.add("fid_cache_dir", "data/fid_stats", ("teacher_sample", "eval_d"),
              "Inception features of dataset images, computed once", folder=".")
    table.add("samples_dir", "", ("teacher_sample",), "\"\" = SampledImgs/diffusion/<name>",
              folder="SampledImgs/diffusion")
    table.add("rnet_path", "", ("teacher_sample", "generate", "repair", "train_d", "eval_d"), "an RNet folder "
              "(rectify's <rect_run_dir>/rnet): the latent-space teacher of generate, scored beside the DDIM teacher "
              "by sample (\"\" = none; train_d and eval_d default to the folder the data's manifest names)",
              folder=".")


def _generate(table):
    table.section = "generate: offline teacher data"
    gen = ("generate", "repair")
    table.add("space", "pixel", gen, "trajectory space: pixel (DDIM chains) | latent (the ring of the RNet at "
              "rnet_path; steps = its ring steps)",
              choices=("pixel", "latent"))
    table.add("steps", 100, gen + ("teacher_sample", "eval_d"),
              "deterministic DDIM steps (eta = 0); eval_d times the teacher with them on imported data", range=POSITIVE)
    table.add("chunks", 10, gen, "residual chunks per trajectory; must divide steps", range=POSITIVE)
    table.add("samples_total", 1024, ("generate",), "samples the folder holds when generate ends", range=POSITIVE)
    table.add("shard_size", 256, gen + ("import",), "samples per shard", range=POSITIVE)
    table.add("gen_batch_size", 64, gen, "trajectories computed at once", range=POSITIVE)
    table.add("gen_precision", "fp32", gen, "teacher precision while generating", choices=("fp32", "bf16", "fp16"))
    table.add("codec", "ef-int8", gen, "record codec: ef-int8 (error feedback along the chunks, at codec_step) | "
              "int8-p99.5 (the reference's, bit-compatible; clip at percentile) | int8+zstd (old name of int8-p99.5)",
              choices=("ef-int8", "int8-p99.5", "int8+zstd"))
    table.add("codec_step", 0.05, gen, "ef-int8: quantization step as a fraction of the RMS of each channel of the "
              "final state (z_final RMSE ~ step x RMS / 3.5)", range=Range(1e-4, 1))
    table.add("codec_x_T", "regenerate", gen, "ef-int8: x_T regenerated from (seed, index) on reading (checked "
              "by sha256) | stored", choices=("regenerate", "store"))
    table.add("percentile", 99.5, gen + ("import",), "clip of the per-channel INT8 scales (int8-p99.5; ef-int8 "
              "uses it for the pixel-space rin0 copy only)", range=Range(50, 100))
    table.add("zstd_level", 0, gen + ("import",), "zstd compression level (0 = the codec's own: 1 for ef-int8, "
              "10 for int8-p99.5 as the reference writes; a folder is then extended at its own level)", range=Range(0, 22))
    table.add("data_dir", "", DATA_READERS + ("generate", "import"), "teacher-data folder (\"\" = data/<name>)",
              folder="data")


def _reference_layout(table):
    table.section = "reference layout (one file per sample), for export and import"
    table.add("reference_dir", "", ("export", "import"), "folder of sample_XXXXXXXX.zst files", folder=".")
    table.add("import_teacher", "", ("import",),
              "teacher folder that made the imported data (\"\" = unknown; training then refuses it)", folder=".")
    table.add("import_rnet", "", ("import",),
              "RNet folder that made imported latent data, around import_teacher (\"\" = none; training then "
              "refuses latent data)", folder=".")


def _recipe(table, prefix, lr, weight_decay, snapshot):
    """The keys of a student stage's training recipe (``trainer.Recipe`` and the one-cycle schedule)."""
    stage = {"d": ("train_d",), "b": ("binarize",), "rect": ("rectify",)}[prefix]
    table.add(f"{prefix}_train_steps", 500, stage, "optimizer steps", range=POSITIVE)
    table.add(f"{prefix}_batch_size", 64, stage, "records per step", range=POSITIVE)
    table.add(f"{prefix}_lr", lr, stage, "peak of the one-cycle schedule", range=POSITIVE)
    table.add(f"{prefix}_lr_warmup_fraction", 0.05, stage, "one-cycle warm-up share of the steps", range=FRACTION_OPEN)
    table.add(f"{prefix}_weight_decay", weight_decay[0], stage, weight_decay[1], range=NON_NEGATIVE)
    table.add(f"{prefix}_checkpoint_every", 100, stage, "steps between checkpoints", range=POSITIVE)
    table.add(f"{prefix}_snapshot_every", 0, stage, f"keep {snapshot} every N steps (0 = off)", range=NON_NEGATIVE)


def _student_d(table):
    table.section = "student D: train_d"
    d = ("train_d",)
    table.add("d_run_dir", "", d + ("binarize", "eval_d", "sample"), "\"\" = Checkpoints/distill/<name>",
              folder="Checkpoints/distill")
    table.add("d_init", "teacher", d, "teacher (backbone copied from the teacher UNet) | random",
              choices=("teacher", "random"))
    table.add("d_init_from", "", d, "a trained D (<run>/student) whose weights start the run instead of d_init (its "
              "data of the same layout; optimizer, schedule and EMA start afresh; \"\" = per d_init)", folder=".")
    table.add("d_head_channels", 16, d + ("binarize",), "width of the readout heads", range=POSITIVE)
    _recipe(table, "d", lr=0.0005, weight_decay=(0.0001, "AdamW weight decay"), snapshot="the EMA student")
    table.add("lambda_rin", 1.0, TRAINING, "weight of the rin0 loss (latent space only)", range=NON_NEGATIVE)
    table.add("lambda_chunks", 1.0, TRAINING, "weight of the chunk losses", range=NON_NEGATIVE)
    table.add("lambda_x0", 0.1, TRAINING, "weight of the loss on the read-out image", range=NON_NEGATIVE)
    table.add("loss_metric", "mse", TRAINING, "distance of the output losses: mse (the reference's) | pseudo_huber "
              "(improved consistency training's, per image or chunk, scaled to an RMS error)",
              choices=("mse", "pseudo_huber"))
    table.add("holdout_samples", 256, TRAINING + ("eval_d",), "records 0..N-1 are never trained on; eval_d uses them",
              range=POSITIVE)
    table.add("train_samples", 0, TRAINING, "training records after the held-out ones (0 = all)", range=NON_NEGATIVE)
    table.add("data_workers", 1, TRAINING, "DataLoader processes decoding shards (0 = in the training process)",
              range=NON_NEGATIVE)
    table.add("shuffle_buffer", 512, TRAINING, "records mixed across shards before batching", range=POSITIVE)


def _distribution_term(table):
    table.section = ("distribution-level terms of D and B (docs/design.md §4): the frozen teacher's "
                     "features of noised images, a discriminator on them, distribution matching")
    d = TRAINING
    table.add("lambda_adv", 0.0, d, "weight of the adversarial (hinge) loss against discriminator heads on the frozen "
              "teacher's encoder features of noised images (0 = off)", range=NON_NEGATIVE)
    table.add("lambda_feat", 0.0, d, "weight of the paired feature loss: the teacher's encoder features of the student's "
              "and the teacher's image of the same x_T, noised alike (0 = off)", range=NON_NEGATIVE)
    table.add("feat_metric", "mse", d, "distance of the feature loss: mse (of the raw features) | normalized (of "
              "channel vectors scaled to unit length, per position, as LPIPS)", choices=("mse", "normalized"))
    table.add("adv_real", "teacher", d, "the discriminator's real images: teacher (the batch's teacher images) | "
              "dataset (the training split, so a student may pass its teacher)", choices=("teacher", "dataset"))
    table.add("adv_t_max", 0.01, d, "the features are read at t ~ U{0..adv_t_max*(T-1)}", range=Range(0, 1, low_open=True))
    table.add("adv_lr", 0.002, d, "learning rate of the discriminator heads (Adam, betas 0 and 0.99)", range=POSITIVE)
    table.add("adv_weighting", "fixed", d, "fixed (lambda_adv as it is) | adaptive (lambda_adv times the ratio of "
              "the regression's to the adversarial gradient norm on the student's output layers, as VQGAN)",
              choices=("fixed", "adaptive"))
    table.add("adv_ramp_steps", 0, d, "lambda_adv, lambda_feat and lambda_dm grow linearly from 0 over the first N steps, so the "
              "term reads student images the regression has brought near the teacher's (0 = full weight from step 1)",
              range=NON_NEGATIVE)
    table.add("lambda_dm", 0.0, d, "weight of distribution matching (DMD): student images move along a fake denoiser's "
              "(trained on them) minus the teacher's x0 estimate of them, noised (0 = off)", range=NON_NEGATIVE)
    table.add("dm_lr", 1e-4, d, "learning rate of the fake denoiser (AdamW, a copy of the teacher)", range=POSITIVE)
    table.add("dm_t_min", 0.02, d, "distribution matching noises the student's images at t >= dm_t_min*(T-1)",
              range=Range(0, 1))
    table.add("dm_t_max", 0.98, d, "... and at t <= dm_t_max*(T-1)", range=Range(0, 1))
    table.add("dm_fake_updates", 1, d, "denoising steps of the fake denoiser per student step", range=POSITIVE)
    table.add("dm_batch_size", 0, d, "student images per step that distribution matching reads, the first of the "
              "batch (0 = all): its cost scales with it", range=NON_NEGATIVE)
    table.add("dm_noise", "batch", d, "batch (DMD reads the batch's images) | fresh (dm_batch_size new x_T per step, "
              "no teacher pair's: it shapes D beyond the records)", choices=("batch", "fresh"))
    table.add("adv_extra_noise", 0, d, "fresh x_T per step, beyond the batch's records, whose student images only the "
              "adversarial loss sees (noise the teacher data does not cover)", range=NON_NEGATIVE)


def _student_b(table):
    table.section = "student B: binarize (1-bit weights, started from D and trained with D as its teacher)"
    b = ("binarize",)
    table.add("b_run_dir", "", b + ("eval_d", "sample"),
              "\"\" = Checkpoints/binarize/<name>; packed B in <b_run_dir>/packed",
              folder="Checkpoints/binarize")
    _recipe(table, "b", lr=0.001, weight_decay=(0.0, "real-valued weights only; scales are never decayed"),
            snapshot="the packed EMA B")
    table.add("lambda_d_outputs", 1.0, b, "D's own predictions as a second target of B's output losses",
              range=NON_NEGATIVE)
    table.add("b_cache_d_mb", 4096, b, "memory for D's predictions and features on every training record, "
              "computed once before step 1 instead of in every step (0 = compute them in every step)",
              range=NON_NEGATIVE)
    table.add("lambda_spd", 0.01, b, "Space Patched Distillation weight", range=NON_NEGATIVE)
    table.add("lambda_lrm", 0.0001, b, "Low-rank Representation Mimicking weight", range=NON_NEGATIVE)
    table.add("b_full_precision", "unet.conv_in,heads.*.out,heads.*.rin_skip,rin_head.out", b,
              "fnmatch patterns of layers kept in full precision")
    table.add("b_lmb", True, b, "two-basis (LMB) binarizer on the high-resolution layers")
    table.add("b_lmb_min_size", 0.5, b, "LMB where a layer's input is at least this fraction of the image size",
              range=NON_NEGATIVE)
    table.add("b_centre", False, b, "subtract each output channel's mean weight before the sign")
    table.add("b_activations", "fp", b, "fp (W1A32) | binary (W1A1, BiDM's activation binarizer)",
              choices=("fp", "binary"))
    table.add("b_packed_values", "fp16", b, "precision of everything but the sign bits in the packed file",
              choices=("fp16", "fp32"))
    table.add("b_progressive_every", 0, b, "steps between progressive-binarization rings (0 = all at once)",
              range=NON_NEGATIVE)


def _rectify(table):
    table.section = "rectify: the rectified latent recurrence RNet around the teacher (docs/design.md §14)"
    rect = ("rectify",)
    table.add("rect_run_dir", "", rect, "\"\" = Checkpoints/rectify/<name>; the EMA RNet in <rect_run_dir>/rnet",
              folder="Checkpoints/rectify")
    table.add("rect_steps", 100, rect, "steps of the recurrence, on timesteps T-1 .. 0 evenly spaced (T-1 = all)",
              range=POSITIVE)
    table.add("rect_depth_weights", [0, 1], rect, "relative weights of the unroll depth s = 0, 1, 2, ... (one s "
              "per batch; the reference's step_probs)", range=NON_NEGATIVE, check=_some_weight)
    table.add("rect_prediction", "v", rect, "what Rout predicts", choices=("v", "eps", "x0"))
    table.add("rect_teacher", "self", rect, "the chain's teacher: self (the RNet being trained) | ema (its EMA "
              "weights, copied every step) | pretrained (an ablation: the frozen teacher UNet's DDIM chain and outputs are "
              "every target, k = 0 included; measured worse, docs/design.md §14)", choices=("self", "ema", "pretrained"))
    table.add("rect_lambda_consistency", 5.0, rect, "weight of the latent consistency loss", range=NON_NEGATIVE)
    table.add("rect_lambda_x0", 1.0, rect, "weight of the X0out auxiliary loss", range=NON_NEGATIVE)
    table.add("rect_depth_weight", 1.0, rect, "weight w of the unrolled steps: (L_0 + w mean_k L_k) / (1 + w)",
              range=NON_NEGATIVE)
    _recipe(table, "rect", lr=0.0002, weight_decay=(0.0001, "AdamW weight decay"), snapshot="the EMA RNet")
    table.add("rect_rin_blocks", 4, rect, "FiLM blocks of Rin's output adapter", range=NON_NEGATIVE)
    table.add("rect_r_blocks", 2, rect, "FiLM blocks of each of R's two adapters", range=NON_NEGATIVE)
    table.add("rect_head_blocks", 4, rect, "FiLM blocks of each read-out head (Rout, X0out)", range=NON_NEGATIVE)
    table.add("rect_lora", "attention", rect, "teacher layers that get LoRA: attention (q, k, v, out) | resnet "
              "(every ResNet 3x3 conv) | none", choices=("attention", "resnet", "none"))
    table.add("rect_lora_rank", 8, rect, "LoRA rank", range=POSITIVE)
    table.add("rect_lora_alpha", 16.0, rect, "LoRA alpha (scale alpha / rank)", range=POSITIVE)
    table.add("rect_gate_cap", 0.3, rect, "cap of the step gate s_t = cap * sigmoid(l_t)", range=POSITIVE)
    table.add("rect_init", "", rect, "an RNet folder of the same network whose weights start the run (the "
              "reference's second stage: a deeper unroll from the first stage's EMA RNet; optimizer, schedule and "
              "EMA start afresh; \"\" = from the teacher)", folder=".")


def _evaluation(table):
    table.section = "eval_d and sample"
    table.add("d_weights", "", ("binarize", "eval_d", "sample"), "a D folder (\"\" = <d_run_dir>/student)", folder=".")
    table.add("b_weights", "", ("eval_d", "sample"),
              "a packed B folder (\"\" = <b_run_dir>/packed when it exists; \"none\" = D only)", folder=".")
    table.add("fid_reference_count", 0, ("eval_d",), "test-split images in the FID reference set (0 = all)",
              range=NON_NEGATIVE)
    table.add("eval_dir", "", ("eval_d",), "\"\" = SampledImgs/distill/<name>", folder="SampledImgs/distill")
    table.add("throughput_batch", 64, ("eval_d",), "batch of the images/s measurement", range=POSITIVE)
    table.add("walk_frames", 120, ("eval_d",), "frames of the latent walk between the first two held-out x_T "
              "(0 = no walk)", range=NON_NEGATIVE)
    table.add("verify_dataset_md5", True, ("pretrain", "rectify", "teacher_sample") + TRAINING + ("eval_d",),
              "check the published MD5 sums of the image dataset")
    table.add("sample_student", "b", ("sample",), "b (the packed B) | d (the full-precision D)", choices=("b", "d"))
    table.add("sample_first", 0, ("sample",),
              "x_T of sample indices first..first+sample_count-1, as generate draws them",
              range=NON_NEGATIVE)
    table.add("student_samples_dir", "", ("sample",), "\"\" = SampledImgs/sample/<name>/<d|b>", folder="SampledImgs/sample")


def _key_table():
    table = _Table()
    for section in (_what_to_work_on, _machine, _pretrain, _rectify, _teacher_samples, _generate, _reference_layout,
                    _student_d, _distribution_term, _student_b, _evaluation):
        section(table)
    return dict(table)


KEYS = _key_table()


def accepted_text(spec: Key, separator=" \\| ") -> str:
    if spec.choices:
        return separator.join(spec.choices)
    if spec.range is not None:
        return spec.range.text
    return "list of int" if isinstance(spec.default, list) else type(spec.default).__name__


def markdown() -> str:
    """docs/config.md: the table as the user reads it (``python -m pipeline.core.config_keys`` prints it)."""
    lines = ["# Configuration keys", "",
             "Made from `pipeline/core/config_keys.py` by `python -m pipeline.core.config_keys > docs/config.md`; a test "
             "keeps it current. Every stage validates the keys it reads before the first stage of a command starts.",
             ""]
    section = None
    for name, spec in KEYS.items():
        if spec.section != section:
            section = spec.section
            lines += ["", f"## {section}", "", "| key | default | accepted | read by | meaning |",
                      "|---|---|---|---|---|"]
        stages = "every stage" if set(spec.stages) == set(EVERY) else ", ".join(spec.stages)
        meaning = spec.help.replace("|", "\\|")
        lines.append(f"| `{name}` | `{spec.default!r}` | {accepted_text(spec)} | {stages} | {meaning} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(markdown(), end="")
