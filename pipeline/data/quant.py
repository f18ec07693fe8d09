"""Per-channel symmetric INT8 quantizer of the teacher data (docs/design.md §3).

    scale_c = float32(max(P_p(|x_c|) / 127, 1e-8))   P = numpy's linear percentile, p = 99.5, in float64
    q       = clip(round_half_even(x / scale_c), -127, 127)    int8, zero point 0, -128 never used
    x_hat   = q * float16(scale_c)                 dequantization uses the stored float16 scale

This is ``torch.quantize_per_channel(x, scale, zero_point=0, axis=channel, dtype=torch.qint8)``
restricted to [-127, 127] with a percentile-clipped scale; tests check that the two agree.
"""
import numpy as np

SCALE_FLOOR = 1e-8


def channel_scales(x: np.ndarray, percentile: float) -> np.ndarray:
    """float32 scales [..., C] for ``x`` [..., C, H, W]: one per channel of every leading index.

    Bit-compatible with the reference's writer (docs/design.md §3): its percentile argument is a float64
    scalar, which makes numpy interpolate in float64, and the division by 127 stays in float64; the scale
    is rounded to float32 once, at the end. Rounding the percentile and then the quotient in float32
    moved some scales by one float32 ulp, and so a code by 1 wherever x / scale sat next to a half."""
    magnitudes = np.abs(x.reshape(*x.shape[:-2], -1)).astype(np.float32)
    clip_at = np.percentile(magnitudes, np.float64(percentile), axis=-1).astype(np.float64)
    return np.maximum(clip_at / 127.0, SCALE_FLOOR).astype(np.float32)


def quantize(x: np.ndarray, percentile: float = 99.5):
    """(q int8 like ``x``, scales float16 [..., C]) for ``x`` [..., C, H, W] float32."""
    x = np.asarray(x, dtype=np.float32)
    scale = channel_scales(x, percentile)
    q = np.clip(np.rint(x / scale[..., None, None]), -127, 127).astype(np.int8)
    return q, scale.astype(np.float16)


def dequantize(q: np.ndarray, scale_f16: np.ndarray) -> np.ndarray:
    """float32 values of ``q`` [..., C, H, W] with float16 scales [..., C]."""
    return q.astype(np.float32) * scale_f16.astype(np.float32)[..., None, None]


# The error-feedback quantizer of codec ef-int8 (docs/design.md §15).
F16_TINY = np.float32(2.0 ** -24)  # the smallest positive float16: a scale below it would be stored as 0


def fitting_scales(x: np.ndarray, step: np.ndarray) -> np.ndarray:
    """float16 scales [n, C] for ``x`` [n, C, H, W]: ``step`` [n, C] where |x| / step fits in ±127, else
    the smallest scale that fits; rounded up to float16 so the stored scale still fits."""
    absmax = np.abs(x.reshape(*x.shape[:2], -1)).max(-1) / np.float32(127)
    wanted = np.maximum(np.maximum(step, absmax), F16_TINY).astype(np.float32)
    stored = wanted.astype(np.float16)
    short = stored.astype(np.float32) < wanted
    return np.where(short, np.nextafter(stored, np.float16(np.inf)), stored)


def quantize_step(x: np.ndarray, scale_f16: np.ndarray) -> np.ndarray:
    """int8 codes of ``x`` [n, C, H, W] at the float16 scales [n, C] (round half to even)."""
    return np.clip(np.rint(x / scale_f16.astype(np.float32)[..., None, None]), -127, 127).astype(np.int8)


def feedback_quantize(start_error: np.ndarray, chunks: np.ndarray, step: np.ndarray):
    """(codes int8 [n, K, C, H, W], scales float16 [n, K, C], final error) of residual chunks [n, K, C, H, W]
    quantized one after another against the running reconstruction: chunk k is coded together with what
    the codes before it missed (``start_error`` for the first), so every partial sum is off by one rounding
    at most and the errors do not add up along the chain. ``step`` [n, C] is the wanted quantization step."""
    codes = np.empty(chunks.shape, np.int8)
    scales = np.empty(chunks.shape[:3], np.float16)
    error = start_error.astype(np.float32)
    for k in range(chunks.shape[1]):
        target = chunks[:, k] + error
        scales[:, k] = fitting_scales(target, step)
        codes[:, k] = quantize_step(target, scales[:, k])
        error = target - dequantize(codes[:, k], scales[:, k])
    return codes, scales, error
