"""Configuration: flat ``key = value`` presets in ``configs/*.toml`` plus ``key=value`` overrides.

Every key, its type and its default live in ``DEFAULTS``; a preset or an override naming any other key
is refused with the closest valid key named. The resolved config is a plain dict, printed and saved as
JSON beside every output.
"""
import difflib
import json
import tomllib
from pathlib import Path

from .errors import UserError

PROJECT_ROOT = Path(__file__).resolve().parent.parent
PRESET_DIR = PROJECT_ROOT / "configs"

DEFAULTS = {
    # --- what to work on
    "name": "fashion_mnist",            # run name: output folders are named after it
    "dataset": "fashion_mnist",         # fashion_mnist | cifar10
    "dataset_dir": "/usr/share/datasets/fashion-mnist",
    "teacher_path": "Diffusion/fashion_mnist",  # diffusers layout: <path>/unet, <path>/scheduler
    "teacher_hub_id": "",               # tried when teacher_path holds no weights ("" = never)
    # --- machine
    "device": "auto",                   # auto | cpu | cuda | cuda:N
    "precision": "auto",                # training autocast: auto | fp32 | bf16 | fp16
    "num_threads": 0,                   # CPU threads for torch (0 = torch's default)
    "seed": 0,
    # --- pretrain: a new teacher UNet2DModel (only when none exists)
    "unet_channels": [32, 64, 64],
    "unet_layers_per_block": 1,
    "unet_attention_levels": [],        # indices of resolution levels with self-attention
    "unet_norm_groups": 16,
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "train_steps": 4000,
    "batch_size": 64,
    "lr": 0.0005,
    "lr_warmup_steps": 200,
    "weight_decay": 0.0,
    "ema_decay": 0.999,
    "grad_clip": 1.0,
    "hflip": True,
    "checkpoint_every": 250,
    "sample_every": 1000,
    "run_dir": "",                      # "" = Checkpoints/diffusion/<name>
    "overwrite_teacher": False,
    # --- teacher sampling and FID (Main_Diffusion.py --mode sample)
    "sample_count": 64,
    "fid_samples": 1000,
    "fid_batch_size": 100,
    "fid_cache_dir": "data/fid_stats",  # Inception features of dataset images, computed once
    "samples_dir": "",                  # "" = SampledImgs/diffusion/<name>
    # --- generate: offline teacher data
    "space": "pixel",                   # pixel | latent
    "steps": 100,                       # deterministic DDIM steps (eta = 0)
    "chunks": 10,                       # residual chunks; must divide steps
    "samples_total": 1024,
    "shard_size": 256,
    "gen_batch_size": 64,
    "gen_precision": "fp32",            # teacher precision while generating: fp32 | bf16 | fp16
    "codec": "int8+zstd",
    "percentile": 99.5,
    "zstd_level": 10,
    "data_dir": "",                     # "" = data/<name>
    # --- reference layout (one file per sample), for export and import
    "reference_dir": "",
    "import_teacher": "",               # teacher folder that made the imported data ("" = unknown; train_d then refuses)
    # --- student D: train_d (uses ema_decay, grad_clip, precision and seed above)
    "d_run_dir": "",                    # "" = Checkpoints/distill/<name>
    "d_init": "teacher",                # teacher (backbone copied from the teacher UNet) | random
    "d_head_channels": 16,              # width of the readout heads
    "d_train_steps": 500,
    "d_batch_size": 64,
    "d_lr": 0.0005,                     # peak of the one-cycle schedule
    "d_lr_warmup_fraction": 0.05,       # one-cycle warm-up share of the steps
    "d_weight_decay": 0.0001,
    "lambda_rin": 1.0,                  # latent space only: in pixel space rin0 = x_T is passed through
    "lambda_chunks": 1.0,
    "lambda_x0": 0.1,
    "holdout_samples": 256,             # records 0..N-1 are never trained on; eval_d measures D on them
    "train_samples": 0,                 # training records after the held-out ones (0 = all)
    "data_workers": 1,                  # DataLoader processes decoding shards (0 = in the training process)
    "shuffle_buffer": 512,              # records mixed across shards before batching
    "d_checkpoint_every": 100,
    "d_snapshot_every": 0,              # keep the EMA student every N steps for learning curves (0 = off)
    # --- student B: binarize (1-bit weights, started from the D that d_weights names, trained with D as its teacher)
    "b_run_dir": "",                    # "" = Checkpoints/binarize/<name>; the packed B goes to <b_run_dir>/packed
    "b_train_steps": 500,
    "b_batch_size": 64,
    "b_lr": 0.001,                      # peak of the one-cycle schedule (latent weights and scales alike)
    "b_lr_warmup_fraction": 0.05,
    "b_weight_decay": 0.0,              # latent weights only; scales, thresholds and k are never decayed
    "b_checkpoint_every": 100,
    "b_snapshot_every": 0,              # keep the packed EMA B every N steps (0 = off)
    "lambda_d_outputs": 1.0,            # D's own predictions as a second target of B's output losses
    "lambda_spd": 0.01,                 # Space Patched Distillation (BiDM's code value)
    "lambda_lrm": 0.0001,               # Low-rank Representation Mimicking (BinaryDM's code value)
    "b_full_precision": "unet.conv_in,heads.*.out,heads.*.rin_skip,rin_head.out",  # fnmatch patterns
    "b_lmb": True,                      # the two-basis (LMB) binarizer on the high-resolution layers
    "b_lmb_min_size": 0.5,              # LMB where a layer's input is at least this fraction of the image size
    "b_centre": False,                  # subtract each output channel's mean weight before the sign
    "b_activations": "fp",              # fp (W1A32) | binary (W1A1, BiDM's activation binarizer)
    "b_packed_values": "fp16",          # precision of everything but the sign bits in the packed file: fp16 | fp32
    "b_progressive_every": 0,           # steps between progressive-binarization rings (0 = all at once)
    # --- eval_d (uses fid_samples as N and fid_batch_size)
    "d_weights": "",                    # a student folder ("" = <d_run_dir>/student, the EMA weights)
    "b_weights": "",                    # a packed B folder ("" = <b_run_dir>/packed when it exists; "none" = D only)
    "fid_reference_count": 0,           # test-split images in the FID reference set (0 = all)
    "eval_dir": "",                     # "" = SampledImgs/distill/<name>
    "throughput_batch": 64,
    "verify_dataset_md5": True,
    # --- sample: one-step images of a trained student, no teacher data needed (uses seed, d_weights, b_weights)
    "sample_student": "b",              # b (the packed B) | d (the full-precision D)
    "sample_first": 0,                  # x_T of sample indices first..first+sample_count-1, as generate draws them
    "student_samples_dir": "",          # "" = SampledImgs/sample/<name>         # check the published MD5 sums of the image dataset
}

CHOICES = {
    "dataset": ("fashion_mnist", "cifar10"),
    "precision": ("auto", "fp32", "bf16", "fp16"),
    "gen_precision": ("fp32", "bf16", "fp16"),
    "space": ("pixel", "latent"),
    "beta_schedule": ("linear", "scaled_linear", "squaredcos_cap_v2"),
    "codec": ("int8+zstd",),
    "d_init": ("teacher", "random"),
    "b_activations": ("fp", "binary"),
    "b_packed_values": ("fp16", "fp32"),
    "sample_student": ("b", "d"),
}


def source_of(config_name) -> str:
    return str(_load_preset(config_name)[1])


def preset_names():
    return sorted(p.stem for p in PRESET_DIR.glob("*.toml"))


def closest_key(key):
    match = difflib.get_close_matches(key, DEFAULTS, n=1, cutoff=0.0)
    return match[0] if match else None


def _check_key(key, where):
    if key not in DEFAULTS:
        raise UserError(f"unknown config key '{key}' in {where}; did you mean '{closest_key(key)}'?")


def _coerce(key, value, where):
    """Give ``value`` the type of the key's default, or refuse it."""
    default = DEFAULTS[key]
    if isinstance(default, bool):
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        if isinstance(value, bool):
            return value
    elif isinstance(default, int):
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        elif isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(default, float):
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif isinstance(default, list):
        if isinstance(value, str):
            try:
                value = [int(v) for v in value.strip("[]").split(",") if v.strip()]
            except ValueError:
                value = None
        if isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return list(value)
    elif isinstance(value, str):
        return value
    kind = "a comma-separated list of integers" if isinstance(default, list) else type(default).__name__
    raise UserError(f"config key '{key}' in {where} must be {kind}, got {value!r}")


def _load_preset(name_or_path):
    path = Path(name_or_path)
    if not path.suffix:
        path = PRESET_DIR / f"{name_or_path}.toml"
    if not path.is_file():
        raise UserError(f"config '{name_or_path}' is neither a preset ({', '.join(preset_names())}) "
                        f"nor a .toml/.json file; pass one of those to --config")
    try:
        text = path.read_text()
        values = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (ValueError, UnicodeDecodeError) as err:
        raise UserError(f"config file {path} cannot be parsed ({err}); fix its syntax") from None
    if not isinstance(values, dict):
        raise UserError(f"config file {path} must hold an object of key = value pairs")
    return values, str(path)


def parse_overrides(items):
    pairs = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"override '{item}' is not of the form key=value")
        pairs.append((key.strip(), value.strip()))
    return pairs


def resolve(config_name, overrides=()):
    """Defaults, then the preset, then ``key=value`` overrides; every value validated.

    A saved ``config.json`` is itself a valid ``config_name``, so any run can be repeated."""
    values, where = _load_preset(config_name)
    cfg = dict(DEFAULTS)
    for key, value in values.items():
        _check_key(key, where)
        cfg[key] = _coerce(key, value, where)
    for key, value in parse_overrides(overrides):
        _check_key(key, "the command line")
        cfg[key] = _coerce(key, value, "the command line")
    for key, allowed in CHOICES.items():
        if cfg[key] not in allowed:
            raise UserError(f"config key '{key}' must be one of {', '.join(allowed)}, got '{cfg[key]}'")
    return cfg


def project_path(path):
    """Relative paths in a config are relative to the project root, wherever the command runs."""
    path = Path(path)
    return path if path.is_absolute() else PROJECT_ROOT / path


def output_dir(cfg, key, default_parent):
    return project_path(cfg[key] or Path(default_parent) / cfg["name"])


def to_json(cfg):
    return json.dumps(cfg, indent=2)
