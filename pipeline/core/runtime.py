"""Backend switches in one place: device, threads, autocast precision. Each choice is logged once."""
import contextlib
import time

import torch

from . import cpu, distributed
from .errors import UserError


def select_device(cfg) -> torch.device:
    name = cfg["device"]
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and distributed.launched():
        name = f"cuda:{distributed.local_rank()}"  # one GPU per process
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device={cfg['device']} was asked for but torch sees no CUDA device; use device=cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UserError(f"device={name} is not a device name; use auto, cpu, cuda or cuda:N") from None


def configure(cfg) -> torch.device:
    """Apply thread count and matmul settings, return the device, and say what was chosen."""
    if cfg["num_threads"] > 0:
        torch.set_num_threads(cfg["num_threads"])
    device = select_device(cfg)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if distributed.is_main():
        print(f"[runtime] device={device} threads={torch.get_num_threads()} torch={torch.__version__} "
              f"inference memory={'channels-last' if cfg['channels_last'] else 'contiguous'}"
              + (f", {distributed.world()} processes" if distributed.world() > 1 else ""))
    return device


def autocast_dtype(precision: str, device: torch.device):
    """The autocast dtype for a precision name, or None for plain fp32."""
    if precision == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if cpu.has_fast_bf16() else None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def for_inference(model, cfg):
    """``model`` in eval mode, in channels-last memory when ``channels_last`` is on: convolutions then run
    on NHWC tensors, faster for inference on every CPU kind measured (docs/design.md §13)."""
    model.eval()
    return model.to(memory_format=torch.channels_last) if cfg["channels_last"] else model


def autocast(dtype, device: torch.device):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def seconds_per_call(fn, repeats, warm_up=True):
    """The fastest of ``repeats`` timed calls after a warm-up (first calls allocate): the least
    disturbed by other work on the machine."""
    if warm_up:
        fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)
