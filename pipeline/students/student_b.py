"""Student B: student D with 1-bit convolutions and linears (docs/design.md §4).

``to_binary`` first folds the time path: at D's fixed t the time-embedding MLP and every block's
projection of it are constants, so they become per-channel full-precision biases. It then replaces
every ``nn.Conv2d`` / ``nn.Linear`` of D by its binary counterpart, except the layers whose name
matches a pattern of ``b_full_precision`` (by default the first convolution and the heads' output
convolutions and rin paths) and the layers D keeps frozen (in latent space its copy of the rectified
teacher's x0 head, ``x0out``), which B keeps frozen and in full precision. Layers whose input is at least ``b_lmb_min_size`` times the image size
(default one half) use the two-basis binarizer ``lmb2`` when ``b_lmb`` is on (BinaryDM puts its LMB on
the first and last layers); the others the one-basis ``scaled_sign`` (``binary.BINARIZERS``). Norms,
activations and the attention softmax are not weights and stay in full precision.

Progressive binarization switches rings of blocks on from the middle outwards: ring 0 is the UNet's
mid block, ring i the i-th down block from the bottom together with the i-th up block from the
bottom, and the last ring everything else (the readout heads). Ring r becomes binary at step
r * ``b_progressive_every`` (0 = all at once).
"""
import dataclasses
import fnmatch
import re

import torch

from ..core.errors import UserError
from . import binary


@dataclasses.dataclass(frozen=True)
class Binarization:
    """What makes B from D: the layers kept in full precision (fnmatch patterns), LMB's two bases and where, centred
    signs, binary activations. Made from the ``b_*`` keys of a config or of a packed B's stored config."""
    full_precision: tuple
    lmb: bool
    lmb_min_size: float
    centre: bool
    binary_activations: bool

    @classmethod
    def from_config(cls, cfg) -> "Binarization":
        patterns = tuple(p.strip() for p in cfg["b_full_precision"].split(",") if p.strip())
        return cls(patterns, bool(cfg["b_lmb"]), float(cfg["b_lmb_min_size"]), bool(cfg["b_centre"]),
                   cfg["b_activations"] == "binary")


def _input_sizes(model, image_shape):
    """The spatial size of the input of every conv / linear in one forward pass; a linear gets the
    size of the last feature map seen before it (attention runs on that map's pixels)."""
    sizes, last = {}, [image_shape[-1]]
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
            def hook(mod, args, name=name):
                x = args[0]
                if x.dim() == 4:
                    last[0] = x.shape[-1]
                sizes[name] = last[0]
            hooks.append(module.register_forward_pre_hook(hook))
    with torch.no_grad():
        model(torch.zeros(1, *image_shape, device=next(model.parameters()).device))
    for h in hooks:
        h.remove()
    return sizes


def ring_of(name: str, levels: int) -> int:
    """Progressive-binarization ring of a layer (0 = the middle, binarized first)."""
    if name.startswith("unet.mid_block"):
        return 0
    down = re.match(r"unet\.down_blocks\.(\d+)\.", name)
    if down:
        return levels - int(down.group(1))
    up = re.match(r"unet\.up_blocks\.(\d+)\.", name)
    if up:
        return int(up.group(1)) + 1
    return levels + 1


class ConstantVector(torch.nn.Module):
    """A per-channel vector that no longer depends on its input: the time path at the fixed t."""

    def __init__(self, value: torch.Tensor):
        super().__init__()
        self.value = torch.nn.Parameter(value.detach().clone())

    def forward(self, x):
        return self.value.to(x.dtype).expand(x.shape[0], -1)


class ZeroEmbedding(torch.nn.Module):
    """Stands in for the time-embedding MLP once every block's projection of it is a constant."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, x):
        return x.new_zeros(x.shape[0], self.dim)


@torch.no_grad()
def fold_time_embedding(model) -> int:
    """Replace the time-embedding MLP and every block's projection of it by the constants they give
    at D's fixed timestep (full-precision, trainable biases); returns the parameters removed."""
    unet = model.unet
    t = model.timestep.view(1)
    emb = unet.time_embedding(unet.time_proj(t).to(next(unet.parameters()).dtype))
    before = sum(p.numel() for p in model.parameters())
    for name, module in list(unet.named_modules()):
        if hasattr(module, "time_emb_proj") and module.time_emb_proj is not None:
            act = emb if getattr(module, "skip_time_act", False) else module.nonlinearity(emb)
            module.time_emb_proj = ConstantVector(module.time_emb_proj(act)[0])
    unet.time_embedding = ZeroEmbedding(emb.shape[1])
    return before - sum(p.numel() for p in model.parameters())


def _replace(model, name, new):
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def weight_binarizer(settings: Binarization, input_size: int, image_size: int) -> str:
    """The binarizer of a layer whose input is ``input_size`` pixels wide: LMB's two bases where the
    feature maps are large (``b_lmb``, ``b_lmb_min_size``), one basis elsewhere."""
    return "lmb2" if settings.lmb and input_size >= settings.lmb_min_size * image_size else "scaled_sign"


def to_binary(model, settings: Binarization):
    """Turn D (in place) into B; returns the layer table [{name, kind, parameters, bits, ring}]."""
    fold_time_embedding(model)
    patterns = settings.full_precision
    image_shape = [model.config["image_channels"], model.unet.config.sample_size, model.unet.config.sample_size]
    sizes = _input_sizes(model, image_shape)
    levels = len(model.unet.up_blocks)
    w1a1 = settings.binary_activations
    table = []
    for name, module in list(model.named_modules()):
        if not isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
            continue
        params = sum(p.numel() for p in module.parameters(recurse=False))
        if not any(p.requires_grad for p in module.parameters(recurse=False)):
            # a teacher part D carries frozen (latent space: the RNet's x0 head) stays as it is in B
            table.append({"name": name, "kind": "full precision (frozen)", "parameters": params, "bits": 32,
                          "ring": None})
            continue
        if _kept_by(name, patterns):
            table.append({"name": name, "kind": "full precision", "parameters": params, "bits": 32, "ring": None})
            continue
        binarizer = weight_binarizer(settings, sizes[name], image_shape[-1])
        if isinstance(module, torch.nn.Conv2d):
            new = binary.BinaryConv2d.from_conv(module, binarizer, settings.centre, w1a1)
        else:
            new = binary.BinaryLinear.from_linear(module, binarizer, settings.centre, w1a1)
        _replace(model, name, new)
        table.append({"name": name, "kind": f"binary, {new.binarizer.label}", "parameters": params,
                      "bits": new.basis, "ring": ring_of(name, levels)})
    if not any(row["ring"] is not None for row in table):
        raise _nothing_to_binarize()
    return table


def _kept_by(name: str, patterns) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _nothing_to_binarize() -> UserError:
    return UserError("b_full_precision keeps every layer in full precision; name fewer layers")


def check_patterns_leave_binary_layers(settings: Binarization, d) -> None:
    """Refuse ``b_full_precision`` patterns that would keep every layer of this D (built on the meta device: layer
    names, no memory) in full precision; its frozen latent x0 head is left out, as B keeps it in full precision
    anyway."""
    fold_time_embedding(d)
    names = [name for name, module in d.named_modules() if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear))]
    if all(_kept_by(name, settings.full_precision) for name in names):
        raise _nothing_to_binarize()


@torch.no_grad()
def start_scales(model):
    """Set every binary layer's scales from its current real-valued weights (mean|W|, mean|R|), so that
    a layer that progressive binarization has not reached yet is still exported correctly."""
    for _, layer in binary_layers(model):
        layer.binary_weight()


def binary_layers(model):
    return [(name, m) for name, m in model.named_modules() if isinstance(m, binary._BinaryWeights)]


def rings(model):
    levels = len(model.unet.up_blocks)
    return {name: ring_of(name, levels) for name, _ in binary_layers(model)}


def set_progress(model, step: int, every: int) -> int:
    """Binarize the rings that are due at ``step``; returns how many layers are binary."""
    levels = len(model.unet.up_blocks)
    due = levels + 1 if every <= 0 else step // every
    count = 0
    for name, layer in binary_layers(model):
        on = ring_of(name, levels) <= due
        layer.set_active(on)
        count += on
    return count
