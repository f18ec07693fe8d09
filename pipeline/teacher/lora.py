"""Low-rank adapters on frozen teacher layers (LoRA, Hu et al. 2022, eq. 3), docs/design.md §14.

A wrapped layer computes base(x) + (alpha / rank) · up(down(x)) with the base frozen, ``down``
Kaiming-uniform and ``up`` zero, so the wrapped teacher starts exactly as the teacher. Where LoRA goes
is a named target:

- ``attention``: the query, key, value and output projections of every attention module (the
  reference's choice for the DDPM-CIFAR10 UNet: 24 Linear layers, 98,304 parameters at rank 8);
- ``resnet``: the two 3×3 convolutions of every ResNet block, for teachers without attention (the
  down projection keeps the 3×3 kernel, the up projection is 1×1);
- ``none``.
"""
import math

from torch import nn

TARGETS = ("attention", "resnet", "none")


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.down = nn.Linear(base.in_features, rank, bias=False)
        self.up = nn.Linear(rank, base.out_features, bias=False)
        self.scale = alpha / rank
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.up.weight)

    def forward(self, x):
        return self.base(x) + self.scale * self.up(self.down(x))


class LoRAConv2d(nn.Module):
    def __init__(self, base: nn.Conv2d, rank: int, alpha: float):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.down = nn.Conv2d(base.in_channels, rank, base.kernel_size, base.stride, base.padding, bias=False)
        self.up = nn.Conv2d(rank, base.out_channels, 1, bias=False)
        self.scale = alpha / rank
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.up.weight)

    def forward(self, x):
        return self.base(x) + self.scale * self.up(self.down(x))


def _layers(unet: nn.Module, target: str):
    """(parent module, attribute name) of every layer that ``target`` wraps."""
    from diffusers.models.attention_processor import Attention
    from diffusers.models.resnet import ResnetBlock2D
    for module in unet.modules():
        if target == "attention" and isinstance(module, Attention):
            yield from ((module, name) for name in ("to_q", "to_k", "to_v"))
            yield module.to_out, "0"
        elif target == "resnet" and isinstance(module, ResnetBlock2D):
            yield from ((module, name) for name in ("conv1", "conv2"))


def add_lora(unet: nn.Module, target: str, rank: int, alpha: float) -> int:
    """Wrap the target layers of ``unet`` in place; returns how many were wrapped."""
    if target not in TARGETS:
        raise ValueError(f"LoRA target {target!r} is not one of {TARGETS}")
    if target == "none":
        return 0
    wrapped = 0
    for parent, name in list(_layers(unet, target)):
        layer = getattr(parent, name)  # also for to_out, a ModuleList whose first entry is named "0"
        wrapper = LoRALinear if isinstance(layer, nn.Linear) else LoRAConv2d
        setattr(parent, name, wrapper(layer, rank, alpha).to(layer.weight.device))
        wrapped += 1
    return wrapped


def full_rank(unet: nn.Module, target: str):
    """The rank at which a LoRA reaches full rank on every layer ``target`` wraps (the largest of the layers'
    min(input width (times the kernel), output width)), or None where it wraps none: a higher rank adds
    parameters and nothing else."""
    widths = []
    for parent, name in _layers(unet, target) if target in TARGETS and target != "none" else ():
        layer = getattr(parent, name)
        if isinstance(layer, nn.Linear):
            widths.append(min(layer.in_features, layer.out_features))
        else:
            kernel = layer.kernel_size[0] * layer.kernel_size[1]
            widths.append(min(layer.in_channels * kernel, layer.out_channels))
    return max(widths, default=None)
