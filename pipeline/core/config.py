"""Configuration: flat ``key = value`` presets in ``configs/*.toml`` plus ``key=value`` overrides.

Every key, its type, default, accepted values and the stages that read it live in one table,
``config_keys.KEYS`` (docs/design.md §9); a preset or an override naming any other key is refused with the
closest valid key named. ``validate`` checks every key the stages about to run will read, before any of
them starts. The resolved config is a plain dict, printed and saved as JSON beside every output.
"""
import difflib
import json
import tomllib
from pathlib import Path

from . import jsonfile
from .config_keys import KEYS, STAGES, TEACHER_LOADERS
from .errors import UserError

PROJECT_ROOT = Path(__file__).resolve().parents[2]  # pipeline/core/config.py: the project is two folders up
PRESET_DIR = PROJECT_ROOT / "configs"

DEFAULTS = {name: key.default for name, key in KEYS.items()}


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
        values = jsonfile.loads(text) if path.suffix == ".json" else _toml(text)
    except (ValueError, UnicodeDecodeError) as err:
        raise UserError(f"config file {path} cannot be parsed ({err}); fix its syntax") from None
    if not isinstance(values, dict):
        raise UserError(f"config file {path} must hold an object of key = value pairs")
    return values, str(path)


def _toml(text):
    try:
        return tomllib.loads(text)
    except RecursionError:  # the parser recurses once per nesting level
        raise ValueError("TOML nested too deeply to parse") from None


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
    for key, spec in KEYS.items():
        if spec.choices and cfg[key] not in spec.choices:
            raise UserError(f"config key '{key}' must be one of {', '.join(spec.choices)}, got '{cfg[key]}'")
    return cfg


def keys_of(stages):
    """The keys that the given stages read, in table order."""
    unknown = set(stages) - set(STAGES)
    if unknown:
        raise ValueError(f"unknown stage {sorted(unknown)[0]}")
    return [name for name, spec in KEYS.items() if set(spec.stages) & set(stages)]


def validate(cfg, stages) -> None:
    """Refuse, with one sentence, the first key of these stages whose value is out of range, breaks a
    rule between keys, or names a folder where a file is; called before the first stage starts."""
    for name in keys_of(stages):
        spec, value = KEYS[name], cfg[name]
        if spec.range is not None and not spec.range.accepts(value):
            raise UserError(f"config key '{name}' must be {spec.range.text}, got {value!r}")
        problem = spec.check(value) if spec.check else None
        if problem:
            raise UserError(f"config key '{name}' {problem}, got {value!r}")
        if spec.folder is not None:
            _check_folder(cfg, name)
    for applies, rule in RULES:
        if applies(set(stages)):
            problem = rule(cfg)
            if problem:
                raise UserError(problem)


def output_dir(cfg, name) -> Path:
    """The folder a folder key names: its value, or <default parent>/<name> when it is empty."""
    parent = KEYS[name].folder
    if cfg[name] or parent == ".":
        return project_path(cfg[name])
    return project_path(Path(parent) / cfg["name"])


def _check_folder(cfg, name) -> None:
    if not cfg[name] and KEYS[name].folder == "." or cfg[name] == "none":
        return
    path = output_dir(cfg, name)
    blocker = next((p for p in (path, *path.parents) if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        where = "" if blocker == path else f" (its parent {blocker} is a file)"
        raise UserError(f"config key '{name}' names {path}, which is not a folder{where}; point {name}= at a folder")


def _divisors(n):
    return [d for d in range(1, n + 1) if n % d == 0][:12]


def _chunks_divide_steps(cfg):
    if cfg["steps"] % cfg["chunks"]:
        return (f"chunks={cfg['chunks']} does not divide steps={cfg['steps']}; pick chunks among "
                f"{_divisors(cfg['steps'])}")
    return None


def _latent_needs_rnet(cfg):
    if cfg["space"] == "latent" and not cfg["rnet_path"]:
        return ("space=latent needs the rectified teacher: train one with 'Main_Diffusion.py --mode rectify' and set "
                "rnet_path= to its rnet folder")
    return None


def _ring_fits_the_schedule(cfg):
    T = cfg["num_train_timesteps"]
    if cfg["rect_steps"] > T - 1:
        return f"rect_steps={cfg['rect_steps']} must be at most num_train_timesteps - 1 = {T - 1} (the ring ends at t = 0)"
    if len(cfg["rect_depth_weights"]) - 1 > cfg["rect_steps"]:
        return (f"rect_depth_weights={cfg['rect_depth_weights']} reaches depth {len(cfg['rect_depth_weights']) - 1}, "
                f"beyond the rect_steps={cfg['rect_steps']} of the ring")
    return None


def _beta_order(cfg):
    if cfg["beta_start"] >= cfg["beta_end"]:
        return f"beta_start={cfg['beta_start']} must be below beta_end={cfg['beta_end']}"
    return None


def _unet_shape(cfg):
    channels, groups = cfg["unet_channels"], cfg["unet_norm_groups"]
    if any(c % groups for c in channels):
        return f"unet_norm_groups={groups} must divide every entry of unet_channels={channels}"
    if any(level >= len(channels) for level in cfg["unet_attention_levels"]):
        return (f"unet_attention_levels={cfg['unet_attention_levels']} names a level beyond the "
                f"{len(channels)} of unet_channels; use indices 0..{len(channels) - 1}")
    return None


def _holdout_before_fid(cfg):
    if cfg["fid_samples"] > cfg["holdout_samples"]:
        return (f"fid_samples={cfg['fid_samples']} needs that many held-out records but holdout_samples="
                f"{cfg['holdout_samples']}; lower fid_samples or raise holdout_samples")
    return None


TEST_SPLIT_IMAGES = {"fashion_mnist": 10_000, "cifar10": 10_000}  # the published test splits (MD5-checked)


def _reference_fits_fid(cfg):
    """fid_reference_count, checked before --mode all spends generate, train_d and binarize on it."""
    count, n = cfg["fid_reference_count"], cfg["fid_samples"]
    if 0 < count < n:
        return f"fid_reference_count={count} is smaller than fid_samples={n}; raise it (0 = all)"
    published = TEST_SPLIT_IMAGES[cfg["dataset"]]
    if cfg["verify_dataset_md5"] and count > published:  # an unchecked copy may hold any number of images
        return (f"fid_reference_count={count} is more than the {published} images of the {cfg['dataset']} test "
                f"split; lower it (0 = all)")
    return None


def _split_fits_the_data_to_be_made(cfg):
    total, holdout, train = cfg["samples_total"], cfg["holdout_samples"], cfg["train_samples"]
    if holdout >= total:
        return (f"holdout_samples={holdout} leaves no training records of the samples_total={total} that generate "
                f"makes; lower holdout_samples or raise samples_total")
    if holdout + train > total:
        return (f"holdout_samples={holdout} + train_samples={train} is more than the samples_total={total} that "
                f"generate makes; lower train_samples or raise samples_total")
    return None


def _any_of(*names):
    return lambda stages: bool(stages & set(names))


# Rules between keys: (does it apply to the stages of this command, rule returning what is wrong or None).
RULES = (
    (_any_of("generate", "repair"), _chunks_divide_steps),
    (_any_of("generate", "repair"), _latent_needs_rnet),
    (_any_of("pretrain", "rectify", *TEACHER_LOADERS), _beta_order),
    (_any_of("rectify"), _ring_fits_the_schedule),
    (_any_of("pretrain"), _unet_shape),
    (_any_of("eval_d"), _holdout_before_fid),
    (_any_of("eval_d"), _reference_fits_fid),
    # a command that generates and then trains (--mode all): the split must fit the data it will make
    (lambda stages: "generate" in stages and bool(stages & {"train_d", "binarize"}), _split_fits_the_data_to_be_made),
)


def project_path(path):
    """Relative paths in a config are relative to the project root, wherever the command runs."""
    path = Path(path)
    return path if path.is_absolute() else PROJECT_ROOT / path




def to_json(cfg):
    return json.dumps(cfg, indent=2)
