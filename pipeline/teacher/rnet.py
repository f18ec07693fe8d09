"""The rectified teacher "RNet": a latent recurrence built around a frozen teacher UNet (docs/design.md §14).

- ``Rin(x_t, t)``: the teacher UNet without ``conv_out`` (its last feature map, after the output norm
  and activation), an output ``Adapter`` and an affine-free GroupNorm → the latent z.
- ``R(z, t)``: one step of the recurrence, t → the next (less noisy) step: an input ``Adapter`` into the
  teacher UNet without ``conv_in``/``conv_out``, its features concatenated with z, an output
  ``Adapter`` giving dy, and the gated update z' = GN(z + s_t · dy) with s_t = cap · sigmoid(ℓ_t)
  (ℓ zero at start, so s_t = cap / 2).
- ``Rout(z, t)``: the v (or eps / x0) head; ``X0out(z, t)``: the x0 head (``film.Readout`` each).

Rin and R each hold their own copy of the teacher UNet. Its weights are frozen except the time
embedding, the GroupNorm affine parameters (and Rin's ``conv_in``), plus LoRA where ``lora_target``
says (``pipeline/teacher/lora.py``). The latent has the teacher's last feature channels and GroupNorm groups
follow the teacher. With the DDPM-CIFAR10 UNet and the reference's settings (blocks 4 / 2 / 4, LoRA on
attention, rank 8, alpha 16) RNet has 16,445,806 trainable of 87,210,094 parameters (a test pins it).
"""
import copy

import torch
from diffusers import UNet2DModel
from torch import nn

from . import lora
from .film import Adapter, Readout

REFERENCE_SETTINGS = {"rin_blocks": 4, "r_blocks": 2, "head_blocks": 4, "lora_target": "attention",
                      "lora_rank": 8, "lora_alpha": 16.0, "gate_cap": 0.3}


def teacher_trunk(unet: UNet2DModel, keep_conv_in: bool, lora_target: str, rank: int, alpha: float) -> UNet2DModel:
    """A frozen copy of the teacher without ``conv_out`` (and ``conv_in``) whose time embedding,
    GroupNorm affine parameters (and ``conv_in``) train, with LoRA on ``lora_target``."""
    trunk = copy.deepcopy(unet).requires_grad_(False)
    trunk.conv_out = nn.Identity()
    if not keep_conv_in:
        trunk.conv_in = nn.Identity()
    trainable = [trunk.time_embedding, *(m for m in trunk.modules() if isinstance(m, nn.GroupNorm))]
    for module in trainable + ([trunk.conv_in] if keep_conv_in else []):
        module.requires_grad_(True)
    lora.add_lora(trunk, lora_target, rank, alpha)
    return trunk


class Rin(nn.Module):
    def __init__(self, trunk: UNet2DModel, latent_channels: int, T: int, groups: int, blocks: int):
        super().__init__()
        features = trunk.config.block_out_channels[0]
        self.unet = trunk
        self.adapter = Adapter(features, features, latent_channels, T, groups, blocks)
        self.norm = nn.GroupNorm(groups, latent_channels, affine=False)  # idempotent: no drift of scale

    def forward(self, x_t, t):
        return self.norm(self.adapter(self.unet(x_t, t).sample, t))


class R(nn.Module):
    def __init__(self, trunk: UNet2DModel, latent_channels: int, T: int, groups: int, blocks: int, gate_cap: float):
        super().__init__()
        features = trunk.config.block_out_channels[0]
        both = features + latent_channels
        self.unet = trunk
        self.adapter_in = Adapter(latent_channels, features, features, T, groups, blocks)
        self.adapter_out = Adapter(both, both, latent_channels, T, groups, blocks)
        self.gate_logits = nn.Embedding(T, 1)
        nn.init.zeros_(self.gate_logits.weight)
        self.gate_cap = gate_cap
        self.norm = nn.GroupNorm(groups, latent_channels, affine=False)

    def gate(self, t):
        """s_t, [B, 1, 1, 1]: how far one step may move the latent."""
        return (self.gate_cap * torch.sigmoid(self.gate_logits(t.long()))).view(-1, 1, 1, 1)

    def forward(self, z, t):
        features = self.unet(self.adapter_in(z, t), t).sample
        dy = self.adapter_out(torch.cat([features, z], dim=1), t)
        return self.norm(z + self.gate(t) * dy)


class RNet(nn.Module):
    """Rin, R, Rout and X0out around ``teacher`` (a diffusers ``UNet2DModel``, copied, never changed).

    The constructor's keyword arguments and the teacher's config are the network's config
    (``self.config``): ``from_config`` rebuilds it, with random teacher weights, before a state dict is
    loaded into it."""

    def __init__(self, teacher: UNet2DModel, T: int, rin_blocks: int, r_blocks: int, head_blocks: int,
                 lora_target: str, lora_rank: int, lora_alpha: float, gate_cap: float):
        super().__init__()
        teacher_config = {k: v for k, v in teacher.config.items() if not k.startswith("_")}  # no load paths
        self.config = {"teacher": teacher_config, "T": T, "rin_blocks": rin_blocks, "r_blocks": r_blocks,
                       "head_blocks": head_blocks, "lora_target": lora_target, "lora_rank": lora_rank,
                       "lora_alpha": lora_alpha, "gate_cap": gate_cap}
        features, groups = teacher.config.block_out_channels[0], teacher.config.norm_num_groups
        self.latent_channels, self.T = features, T
        image = teacher.config.out_channels
        self.rin = Rin(teacher_trunk(teacher, True, lora_target, lora_rank, lora_alpha), features, T, groups, rin_blocks)
        self.r = R(teacher_trunk(teacher, False, lora_target, lora_rank, lora_alpha), features, T, groups, r_blocks,
                   gate_cap)
        self.rout = Readout(features, features, image, T, groups, head_blocks)
        self.x0out = Readout(features, features, image, T, groups, head_blocks)

    @classmethod
    def from_config(cls, config: dict) -> "RNet":
        settings = {k: v for k, v in config.items() if k != "teacher"}
        return cls(UNet2DModel.from_config(config["teacher"]), **settings)

    def forward(self, x_t, t):
        """The v (or eps / x0) prediction at x_t, as a one-step denoiser: Rout(Rin(x_t, t), t)."""
        return self.rout(self.rin(x_t, t), t)


def parameter_counts(model: nn.Module) -> tuple:
    """(trainable, total) parameters."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
