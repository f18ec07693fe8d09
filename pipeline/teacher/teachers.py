"""Teachers: a diffusers ``UNet2DModel`` (epsilon prediction) and its noise schedule.

Loaded from a local diffusers-layout folder (``<path>/unet``, ``<path>/scheduler``), else from a hub
id. A new teacher for ``pretrain`` is built from the config's ``unet_*`` keys.
"""
import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel

from ..core.config import project_path
from ..core.errors import UserError

WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


def new_unet(cfg, channels: int, image_size: int = 32) -> UNet2DModel:
    levels = len(cfg["unet_channels"])
    attention = set(cfg["unet_attention_levels"])
    if not attention <= set(range(levels)):
        raise UserError(f"unet_attention_levels {sorted(attention)} must name levels 0..{levels - 1}")
    return UNet2DModel(
        sample_size=image_size, in_channels=channels, out_channels=channels,
        block_out_channels=tuple(cfg["unet_channels"]), layers_per_block=cfg["unet_layers_per_block"],
        down_block_types=tuple("AttnDownBlock2D" if i in attention else "DownBlock2D" for i in range(levels)),
        up_block_types=tuple("AttnUpBlock2D" if levels - 1 - i in attention else "UpBlock2D"
                             for i in range(levels)),
        add_attention=bool(attention), norm_num_groups=cfg["unet_norm_groups"])


def new_scheduler(cfg) -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=cfg["num_train_timesteps"], beta_start=cfg["beta_start"],
                         beta_end=cfg["beta_end"], beta_schedule=cfg["beta_schedule"],
                         prediction_type="epsilon", clip_sample=True)


def has_weights(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any((folder / w).is_file() for w in WEIGHT_FILES)


def _unet_folder(path: Path):
    """``<path>/unet`` (pipeline layout) or ``<path>`` itself (a bare model folder)."""
    for folder in (path / "unet", path):
        if has_weights(folder):
            return folder
    return None


def local_config(cfg):
    """The teacher UNet's config.json as a dict where ``teacher_path`` holds the weights, else None (a hub
    teacher is only reached when a stage loads it)."""
    folder = _unet_folder(project_path(cfg["teacher_path"])) if cfg["teacher_path"] else None
    if folder is None:
        return None
    try:
        return dict(UNet2DModel.load_config(folder, local_files_only=True))
    except Exception as err:  # diffusers raises many types for a damaged config
        raise UserError(f"the teacher config in {folder} cannot be read ({type(err).__name__}); replace the folder "
                        f"with a complete copy") from None


def _load_local(path: Path):
    folder = _unet_folder(path)
    try:
        unet = UNet2DModel.from_pretrained(folder, local_files_only=True, low_cpu_mem_usage=False)
    except Exception as err:  # diffusers raises many types for a damaged folder
        raise UserError(f"teacher weights in {folder} cannot be loaded ({type(err).__name__}: "
                        f"{str(err).splitlines()[0][:200]}); replace the folder with a complete copy") from None
    sched_folder = next((f for f in (path / "scheduler", folder) if (f / "scheduler_config.json").is_file()), None)
    try:
        scheduler = DDPMScheduler.from_pretrained(sched_folder, local_files_only=True) if sched_folder else None
    except Exception as err:
        raise UserError(f"{sched_folder}/scheduler_config.json cannot be read ({type(err).__name__}); restore it or "
                        f"delete it to use the config's beta schedule") from None
    return unet, scheduler


def _load_hub(hub_id: str):
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
    if offline:
        raise OSError("HF_HUB_OFFLINE is set")
    unet = UNet2DModel.from_pretrained(hub_id, low_cpu_mem_usage=False)
    try:
        scheduler = DDPMScheduler.from_pretrained(hub_id)
    except Exception:
        scheduler = None
    return unet, scheduler


def _no_teacher(cfg, path) -> UserError:
    return UserError(f"no teacher weights in {path}/unet (config.json + diffusion_pytorch_model.safetensors); "
                     f"train one with 'python Main_Diffusion.py --mode pretrain --config {cfg['name']}' "
                     f"or set teacher_path= to a diffusers folder")


def check_available(cfg) -> None:
    """What load_teacher would refuse at once, without loading: no local weights and no hub id."""
    path = project_path(cfg["teacher_path"]) if cfg["teacher_path"] else None
    if (path is None or _unet_folder(path) is None) and not cfg["teacher_hub_id"]:
        raise _no_teacher(cfg, path)


def load_teacher(cfg):
    """(unet, ddpm_scheduler, source) from ``teacher_path``, else ``teacher_hub_id``, else one sentence."""
    path = project_path(cfg["teacher_path"]) if cfg["teacher_path"] else None
    if path is not None and _unet_folder(path) is not None:
        unet, scheduler = _load_local(path)
        source = str(path)
    elif cfg["teacher_hub_id"]:
        try:
            unet, scheduler = _load_hub(cfg["teacher_hub_id"])
        except Exception as err:
            where = f"{path}/unet (diffusers layout: config.json + diffusion_pytorch_model.safetensors)"
            raise UserError(
                f"no teacher weights in {where}, and the hub model '{cfg['teacher_hub_id']}' could not be "
                f"fetched ({type(err).__name__}); put the weights in that folder (for CIFAR-10, unpack "
                f"ddpm_ema_cifar10.zip from the Diff-Pruning v0.0.1 release into Diffusion/) or run once "
                f"where the hub is reachable") from None
        source = cfg["teacher_hub_id"]
    else:
        raise _no_teacher(cfg, path)
    if scheduler is None:
        scheduler = new_scheduler(cfg)
    if scheduler.config.prediction_type != "epsilon":
        raise UserError(f"the teacher scheduler predicts '{scheduler.config.prediction_type}'; only epsilon "
                        f"teachers are supported")
    unet.eval().requires_grad_(False)
    return unet, scheduler, source


def ddim_scheduler(ddpm: DDPMScheduler) -> DDIMScheduler:
    """Deterministic DDIM over the teacher's own noise schedule; the last step lands on alpha_bar = 1."""
    return DDIMScheduler.from_config(ddpm.config, set_alpha_to_one=True, clip_sample=True)


def weights_sha256(unet: UNet2DModel) -> str:
    """Hash of the teacher's parameters (names, shapes and bytes), independent of the file format."""
    digest = hashlib.sha256()
    for name, tensor in sorted(unet.state_dict().items()):
        digest.update(name.encode())
        digest.update(json.dumps(list(tensor.shape)).encode())
        digest.update(tensor.detach().float().contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()


def save_teacher(unet: UNet2DModel, scheduler: DDPMScheduler, path, extra_files=None) -> None:
    """Diffusers layout with safetensors weights (plus ``extra_files``: name -> JSON object), written
    beside the target then renamed into place."""
    path = Path(path)
    staging = path.with_name(path.name + ".partial")
    if staging.exists():
        shutil.rmtree(staging)
    unet.save_pretrained(staging / "unet", safe_serialization=True)
    scheduler.save_pretrained(staging / "scheduler")
    for name, obj in (extra_files or {}).items():
        (staging / name).write_text(json.dumps(obj, indent=2) + "\n")
    if path.exists():
        shutil.rmtree(path)
    staging.rename(path)


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def safetensors_bytes(model: torch.nn.Module) -> int:
    """Size of the model's weights as one fp32 safetensors file (what a user ships)."""
    from safetensors.torch import save
    return len(save({k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()}))
