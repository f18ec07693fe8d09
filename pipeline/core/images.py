"""Image files: grids and single images as PNG, written atomically."""
import io
import math

import numpy as np
from PIL import Image

from . import atomic


def grid(images_uint8: np.ndarray, nrow: int = 8, pad: int = 2) -> np.ndarray:
    """[N, C, H, W] uint8 -> one [H', W', C] image with ``nrow`` images per row."""
    n, c, h, w = images_uint8.shape
    rows = math.ceil(n / nrow)
    canvas = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i, img in enumerate(images_uint8):
        r, k = divmod(i, nrow)
        y, x = pad + r * (h + pad), pad + k * (w + pad)
        canvas[y:y + h, x:x + w] = img.transpose(1, 2, 0)
    return canvas


def png_bytes(image_hwc: np.ndarray, scale: int = 1) -> bytes:
    img = Image.fromarray(image_hwc[..., 0] if image_hwc.shape[-1] == 1 else image_hwc)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def save_grid(images_uint8: np.ndarray, path, nrow: int = 8, scale: int = 2) -> None:
    atomic.write_bytes(path, png_bytes(grid(images_uint8, nrow), scale))


def interleave_rows(*sets: np.ndarray, per_row: int) -> np.ndarray:
    """Several [N, C, H, W] sets -> rows of each set in turn, ``per_row`` images each (same x_T per column)."""
    rows = []
    for lo in range(0, min(len(s) for s in sets), per_row):
        rows += [s[lo:lo + per_row] for s in sets]
    return np.concatenate(rows)
