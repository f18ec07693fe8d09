"""Per-channel symmetric INT8 quantizer of the teacher data (docs/design.md §3).

    scale_c = max(P_p(|x_c|) / 127, 1e-8)         float32, P = numpy's linear percentile, p = 99.5
    q       = clip(round_half_even(x / scale_c), -127, 127)    int8, zero point 0, -128 never used
    x_hat   = q * float16(scale_c)                 dequantization uses the stored float16 scale

This is ``torch.quantize_per_channel(x, scale, zero_point=0, axis=channel, dtype=torch.qint8)``
restricted to [-127, 127] with a percentile-clipped scale; tests check that the two agree.
"""
import numpy as np

SCALE_FLOOR = 1e-8


def channel_scales(x: np.ndarray, percentile: float) -> np.ndarray:
    """float32 scales [..., C] for ``x`` [..., C, H, W]: one per channel of every leading index."""
    magnitudes = np.abs(x.reshape(*x.shape[:-2], -1)).astype(np.float32)
    clip_at = np.percentile(magnitudes, percentile, axis=-1).astype(np.float32)
    return np.maximum(clip_at / np.float32(127), np.float32(SCALE_FLOOR))


def quantize(x: np.ndarray, percentile: float = 99.5):
    """(q int8 like ``x``, scales float16 [..., C]) for ``x`` [..., C, H, W] float32."""
    x = np.asarray(x, dtype=np.float32)
    scale = channel_scales(x, percentile)
    q = np.clip(np.rint(x / scale[..., None, None]), -127, 127).astype(np.int8)
    return q, scale.astype(np.float16)


def dequantize(q: np.ndarray, scale_f16: np.ndarray) -> np.ndarray:
    """float32 values of ``q`` [..., C, H, W] with float16 scales [..., C]."""
    return q.astype(np.float32) * scale_f16.astype(np.float32)[..., None, None]
