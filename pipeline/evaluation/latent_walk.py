"""Latent walks (docs/design.md §5): a student's images along a spherical interpolation between two
x_T, saved as an animated GIF and as a strip of evenly spaced frames."""
import io

import numpy as np
import torch
from PIL import Image

from ..core import atomic, images

STRIP_FRAMES = 12


def slerp(a: torch.Tensor, b: torch.Tensor, steps: int) -> torch.Tensor:
    """[steps, ...] points on the great circle from a to b (their norms interpolated linearly), so
    every frame has the norm of a Gaussian sample, which a straight line would shrink midway."""
    fa, fb = a.flatten().double(), b.flatten().double()
    omega = torch.arccos((fa @ fb / (fa.norm() * fb.norm())).clamp(-1, 1))
    t = torch.linspace(0, 1, steps, dtype=torch.float64)
    if omega.abs() < 1e-6:
        path = (1 - t)[:, None] * fa + t[:, None] * fb
    else:
        path = (torch.sin((1 - t) * omega)[:, None] * fa + torch.sin(t * omega)[:, None] * fb) / torch.sin(omega)
    return path.to(a.dtype).view(steps, *a.shape)


def _frame(image_chw: np.ndarray, scale: int) -> Image.Image:
    img = Image.fromarray(image_chw[0] if image_chw.shape[0] == 1 else image_chw.transpose(1, 2, 0))
    return img.resize((img.width * scale, img.height * scale), Image.NEAREST)


def save_walk(frames_by_model: dict, gif_path, strip_path, scale: int = 4, frame_ms: int = 50):
    """``frames_by_model``: name -> uint8 [frames, C, H, W]; models side by side in every frame, and
    one strip row per model."""
    rows = list(frames_by_model.values())
    joined = [np.concatenate([r[i] for r in rows], axis=-1) for i in range(len(rows[0]))]  # side by side
    gif = [_frame(f, scale) for f in joined]
    buf = io.BytesIO()
    gif[0].save(buf, format="GIF", save_all=True, append_images=gif[1:], duration=frame_ms, loop=0)
    atomic.write_bytes(gif_path, buf.getvalue())
    picks = np.linspace(0, len(rows[0]) - 1, STRIP_FRAMES).round().astype(int)
    strip = np.concatenate([r[picks] for r in rows])
    images.save_grid(strip, strip_path, nrow=STRIP_FRAMES)
