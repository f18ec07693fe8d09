"""Student D: a one-step network that predicts a teacher trajectory's residual chunks (docs/design.md §4).

The backbone is a diffusers ``UNet2DModel`` without its output convolution, always called at the fixed
timestep T-1 on x_T. Readout heads turn decoder features of several depths into the chunks: the
outputs of the up blocks (coarse) serve the noisy chunks and the final features (fine) the clean
ones, the chunk list being split into contiguous groups, noisiest first (10 chunks over 3 depths give
4/3/3, the reference's split). Every head also sees rin, the state the chain starts from, and adds a
learned linear function of it (1x1, started at the least-squares fit on the first batch), because the
noisy part of a residual is close to a multiple of the start noise. In pixel space rin0 is x_T itself
and is passed through; in latent space a head on the coarsest features predicts it, and D carries a
frozen copy of the rectified teacher's x0 head (``x0out``, docs/design.md §14) as its read-out, so the
one-step generator is D alone and its parameters, bytes and time include that head.

    z_hat = rin + sum_j chunk_j            one-step sample = readout(z_hat)  (X0out(z_hat, 0) in latent space)

The constructor's arguments are the model's config: ``save_student`` writes them as JSON beside the
safetensors weights, whose metadata holds a sha256 of both (``checksums.content_sha256``), and ``load_student``
rebuilds the model from the two after checking it, so a changed byte is refused, not silently used.
"""
import math
from pathlib import Path

import numpy as np
import torch
from diffusers import UNet2DModel
from safetensors.torch import save
from torch import nn

from ..core import atomic, jsonfile
from ..core.checksums import content_sha256, read_safetensors, verify_checksum
from ..core.errors import UserError
from ..teacher import spaces
from ..teacher.film import Readout

CONFIG_FILE = "student_config.json"
WEIGHTS_FILE = "model.safetensors"
KIND = "one-step-student-d"
REWRITE = "rerun '--mode train_d' on the run folder that wrote it to rewrite it"  # a finished run re-exports


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(channels, 8), channels)


def _conv(cin: int, cout: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, padding=1)


def chunk_groups(chunks: int, depths: int):
    """Contiguous chunk indices per decoder depth, coarsest depth (noisiest chunks) first."""
    return [list(map(int, g)) for g in np.array_split(np.arange(chunks), depths)]


class Up2x(nn.Sequential):
    def __init__(self, channels: int):
        super().__init__(_norm(channels), nn.SiLU(), nn.Upsample(scale_factor=2, mode="nearest"),
                         _conv(channels, channels))


class ReadoutHead(nn.Module):
    """Features of one decoder depth (+ rin) -> ``outputs`` maps of ``out_channels`` at full resolution."""

    def __init__(self, feature_channels, upsamplings, width, cond_channels, out_channels, outputs):
        super().__init__()
        self.proj = nn.Conv2d(feature_channels, width, 1)  # 1x1: the heads must stay cheap next to the backbone
        self.up = nn.Sequential(*[Up2x(width) for _ in range(upsamplings)])
        self.trunk = nn.Sequential(_conv(width + cond_channels, width), _norm(width), nn.SiLU())
        # one convolution for all outputs = one per output, in a single call; every prediction starts at zero
        self.outputs, self.out_channels = outputs, out_channels
        self.out = _conv(width, outputs * out_channels)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        # The noisy part of a residual is close to a multiple of the start state: a linear path from rin
        # carries it exactly, which a nonlinear trunk only approximates (the rest shows as speckle).
        self.rin_skip = nn.Conv2d(cond_channels, outputs * out_channels, 1, bias=False) if cond_channels else None
        if self.rin_skip is not None:
            nn.init.zeros_(self.rin_skip.weight)

    def forward(self, features, cond=None):
        h = self.up(self.proj(features))
        h = self.trunk(h if cond is None else torch.cat([h, cond.to(h.dtype)], dim=1))
        y = self.out(h)
        if self.rin_skip is not None:
            y = y + self.rin_skip(cond.to(y.dtype))
        return y.view(y.shape[0], self.outputs, self.out_channels, *y.shape[2:])


class StudentD(nn.Module):
    def __init__(self, backbone: dict, chunks: int, image_channels: int, latent_channels: int,
                 space: str, timestep: int, head_channels: int, x0out: dict = None):
        """``x0out`` (latent space): the rectified teacher's x0 head as ``film.Readout`` arguments
        {width, T, groups, blocks}; its groups also normalise the predicted rin as Rin does."""
        super().__init__()
        self.config = {"kind": KIND, "backbone": dict(backbone), "chunks": chunks, "image_channels": image_channels,
                       "latent_channels": latent_channels, "space": space, "timestep": timestep,
                       "head_channels": head_channels}
        if x0out is not None:
            self.config["x0out"] = dict(x0out)
        chain = spaces.SPACES[space]
        if chain.image_is_end and latent_channels != image_channels:  # the image is the chain's end state
            raise UserError(f"in {space} space latent_channels ({latent_channels}) must equal image_channels "
                            f"({image_channels})")
        self.unet = UNet2DModel(**backbone)
        self.unet.conv_out = nn.Identity()  # the decoder's last features are read out by the heads
        self.register_buffer("timestep", torch.tensor(timestep, dtype=torch.long), persistent=False)
        self.predicts_rin = not chain.start_is_x_T  # the chain's start, unless it is x_T itself

        ups = self.unet.up_blocks
        depth_channels = [blk.resnets[-1].out_channels for blk in ups[:-1]] + [self.unet.config.block_out_channels[0]]
        levels = len(ups)
        used = [(d, g) for d, g in enumerate(chunk_groups(chunks, levels)) if g]
        self.depths, self.groups = [d for d, _ in used], [g for _, g in used]
        # up block d (d < levels-1) ends at resolution size / 2**(levels-2-d); the final features are full size
        self.heads = nn.ModuleList(
            ReadoutHead(depth_channels[d], max(0, levels - 2 - d), head_channels, latent_channels, latent_channels,
                        len(g)) for d, g in zip(self.depths, self.groups))
        if self.predicts_rin:
            self.rin_head = ReadoutHead(depth_channels[0], levels - 2, head_channels, 0, latent_channels, 1)
            groups = x0out["groups"] if x0out else math.gcd(latent_channels, 32)
            self.rin_norm = nn.GroupNorm(groups, latent_channels, affine=False)
        if x0out is not None:
            self.x0out = Readout(latent_channels, x0out["width"], image_channels, x0out["T"], x0out["groups"],
                                 x0out["blocks"]).requires_grad_(False)
        self._features = []
        for blk in ups[:-1]:
            blk.register_forward_hook(self._keep_feature)  # a bound method, so deepcopy rebinds it

    @classmethod
    def from_config(cls, config: dict):
        """A new D from ``config`` (the constructor's arguments, with or without the "kind" tag)."""
        return cls(**{k: v for k, v in config.items() if k != "kind"})

    @property
    def reads_every_depth(self) -> bool:
        """False with fewer chunks than decoder depths: the unread depths' layers then get no gradient."""
        return len(self.depths) == len(self.unet.up_blocks)

    def _keep_feature(self, module, args, output):
        self._features.append(output)

    def forward(self, x_T):
        """{'rin': [B, Cl, H, W], 'chunks': [B, chunks, Cl, H, W]} in one call."""
        self._features = []
        final = self.unet(x_T, self.timestep).sample
        features = self._features + [final]
        self._features = []
        rin = self.rin_norm(self.rin_head(features[0])[:, 0]) if self.predicts_rin else x_T
        chunks = torch.cat([head(features[d], rin) for d, head in zip(self.depths, self.heads)], dim=1)
        return {"rin": rin, "chunks": chunks}


def new_student(backbone_config: dict, manifest_generator: dict, head_channels: int, rnet=None) -> StudentD:
    """A D shaped by the teacher data: chunk count, channels, space and T come from the manifest; in latent
    space it carries a frozen copy of ``rnet``'s x0 head."""
    backbone = {k: v for k, v in dict(backbone_config).items() if not k.startswith("_")}
    image_channels = manifest_generator["image_shape"][0]
    x0out = None
    if spaces.of_generator(manifest_generator).needs_rnet:
        if rnet is None:
            raise ValueError("a latent-space D needs the RNet whose x0 head reads its images out")
        net = rnet.config
        x0out = {"width": rnet.latent_channels, "T": net["T"], "groups": net["teacher"]["norm_num_groups"],
                 "blocks": net["head_blocks"]}
    student = StudentD(backbone, chunks=manifest_generator["chunks"], image_channels=image_channels,
                       latent_channels=manifest_generator["latent_channels"], space=manifest_generator["space"],
                       timestep=manifest_generator["T"] - 1, head_channels=head_channels, x0out=x0out)
    if x0out is not None:
        student.x0out.load_state_dict(rnet.x0out.state_dict())
    return student


def init_from_teacher(student: StudentD, teacher_unet) -> None:
    """Copy the teacher UNet into D's backbone (all but the removed output convolution)."""
    state = {k: v for k, v in teacher_unet.state_dict().items() if not k.startswith("conv_out.")}
    try:
        student.unet.load_state_dict(state, strict=True)
    except RuntimeError:
        raise UserError("the teacher UNet does not have the student backbone's shape; use d_init=random or "
                        "the teacher's architecture") from None


@torch.no_grad()
def fit_rin_skips(student: StudentD, rin, chunks) -> None:
    """Start each chunk's linear path from rin at the least-squares multiple of rin, per chunk and
    channel, on one batch (rin [B, Cl, H, W], chunks [B, K, Cl, H, W])."""
    rin, chunks = rin.float(), chunks.float()
    scale = (chunks * rin[:, None]).sum(dim=(0, 3, 4)) / rin.pow(2).sum(dim=(0, 2, 3)).clamp_min(1e-12)  # [K, Cl]
    for group, head in zip(student.groups, student.heads):
        weight = torch.zeros_like(head.rin_skip.weight)  # [n * Cl, Cl, 1, 1]
        channels = rin.shape[1]
        for i, j in enumerate(group):
            for c in range(channels):
                weight[i * channels + c, c] = scale[j, c]
        head.rin_skip.weight.copy_(weight)


def readout(student: StudentD, z_hat):
    """The image of a predicted end state: the state itself in pixel space, X0out(z_hat, 0) in latent space."""
    return spaces.SPACES[student.config["space"]].readout(student, z_hat)


def one_step(student: StudentD, x_T):
    """Images in [-1, 1] from x_T with a single network call."""
    out = student(x_T)
    return readout(student, out["rin"] + out["chunks"].sum(dim=1)).clamp(-1, 1)


def output_parameters(student: StudentD) -> list:
    """The weights of D's last layers, the heads' output convolutions (adaptive weighting reads gradients there)."""
    heads = list(student.heads) + ([student.rin_head] if student.predicts_rin else [])
    return [head.out.weight for head in heads]


def parameter_count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def save_student(model: StudentD, folder) -> int:
    """Write ``student_config.json`` and ``model.safetensors`` (fp32, with the checksum of both); returns
    the weights' byte size."""
    folder = Path(folder)
    state = {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()}
    data = save(state, metadata={"format": KIND, "sha256": content_sha256(state, model.config)})
    atomic.write_bytes(folder / WEIGHTS_FILE, data)
    atomic.write_json(folder / CONFIG_FILE, model.config)
    return len(data)


def load_student(folder) -> StudentD:
    """D rebuilt from a folder written by ``save_student``; a wrong or damaged folder is one sentence."""
    folder = Path(folder)
    config_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    if not config_path.is_file() or not weights_path.is_file():
        raise UserError(f"{folder} holds no student (expected {CONFIG_FILE} and {WEIGHTS_FILE}); train one with "
                        f"'--mode train_d' or set d_weights= to a student folder")
    not_d = f"{config_path} is not a student D config; restore it or {REWRITE}"
    try:
        config = jsonfile.loads(config_path.read_text())
    except (OSError, ValueError):
        raise UserError(not_d) from None
    if not isinstance(config, dict) or config.get("kind") != KIND:
        raise UserError(not_d)
    try:
        state, metadata, _ = read_safetensors(weights_path)
    except (OSError, ValueError) as err:
        raise UserError(f"{weights_path} cannot be read ({err}: truncated or damaged); restore it or "
                        f"{REWRITE}") from None
    verify_checksum(weights_path, metadata, content_sha256(state, config), REWRITE)
    try:
        model = StudentD.from_config(config)
    except (ValueError, KeyError, TypeError, AttributeError):
        raise UserError(not_d) from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError:
        raise UserError(f"{weights_path} does not fit the architecture in {config_path} (a checkpoint of another "
                        f"model?); use the folder train_d wrote") from None
    return model.eval()


def check_fits(model, manifest):
    """One sentence when D was built for teacher data of another shape."""
    gen, conf = manifest.data["generator"], model.config
    wanted = {"chunks": gen["chunks"], "latent_channels": gen["latent_channels"], "space": gen["space"],
              "image_channels": gen["image_shape"][0], "timestep": gen["T"] - 1}
    for key, value in wanted.items():
        if conf[key] != value:
            raise UserError(f"the student has {key}={conf[key]} but the teacher data in {manifest.folder} has "
                            f"{value}; evaluate it on the data it was trained on (data_dir=) or retrain")
