import warnings

import numpy as np
import pytest
import torch

from pipeline.data import quant


def test_golden_numbers():
    x = np.array([[[0.0, 1.0], [-2.0, 0.5]], [[10.0, -10.0], [3.0, 0.0]]], dtype=np.float32)  # [C=2, 2, 2]
    q, scale = quant.quantize(x, percentile=100.0)
    # percentile 100 = max|x|: scales 2/127 and 10/127, stored as float16
    assert scale.dtype == np.float16 and q.dtype == np.int8
    np.testing.assert_array_equal(scale, np.array([2 / 127, 10 / 127], dtype=np.float32).astype(np.float16))
    np.testing.assert_array_equal(q, [[[0, 64], [-127, 32]], [[127, -127], [38, 0]]])


def test_percentile_clips_and_uses_linear_interpolation():
    x = np.arange(100, dtype=np.float32).reshape(1, 10, 10)
    scale = quant.channel_scales(x, 99.5)
    assert scale[0] == pytest.approx(np.float32(98.505) / 127, rel=1e-6)  # numpy linear percentile of 0..99
    q, _ = quant.quantize(x, 99.5)
    assert q.max() == 127 and q.min() == 0  # the top value saturates, -128 is never used


def test_round_half_to_even():
    x = np.array([[[127.0, 0.5, 1.5], [2.5, -0.5, -1.5]]], dtype=np.float32)  # scale = 127/127 = 1
    q, scale = quant.quantize(x, percentile=100.0)
    assert scale[0] == 1.0
    np.testing.assert_array_equal(q, [[[127, 0, 2], [2, 0, -2]]])


def test_scale_floor_for_a_constant_zero_channel():
    zeros = np.zeros((2, 4, 4), dtype=np.float32)
    assert (quant.channel_scales(zeros, 99.5) == np.float32(1e-8)).all()
    q, scale = quant.quantize(zeros)
    assert (q == 0).all() and (quant.dequantize(q, scale) == 0).all()


def test_batched_scales_are_per_sample_and_per_channel():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 4, 2, 8, 8)).astype(np.float32)  # [B, chunks, C, H, W]
    q, scale = quant.quantize(x)
    assert q.shape == x.shape and scale.shape == (3, 4, 2)
    q1, s1 = quant.quantize(x[2, 1])
    np.testing.assert_array_equal(q[2, 1], q1)
    np.testing.assert_array_equal(scale[2, 1], s1)


def test_dequantize_uses_float16_scale():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((3, 16, 16)).astype(np.float32)
    q, scale = quant.quantize(x)
    # a value that is not representable in float16: dequantization must use the rounded scale
    assert np.float32(scale[0]) != quant.channel_scales(x, 99.5)[0]
    assert quant.dequantize(np.array([[[3]]], np.int8), scale[:1])[0, 0, 0] == 3 * np.float32(scale[0])
    inside = np.abs(x) <= 127 * quant.channel_scales(x, 99.5)[:, None, None]
    err = np.abs(quant.dequantize(q, scale) - x)[inside]
    assert err.max() <= 0.51 * scale.astype(np.float32).max() + 1e-3 * np.abs(x).max()


@pytest.mark.parametrize("axis_scale", [[1.0, 3.0, 0.01], [0.2, 0.2, 7.0]])
def test_agrees_with_torch_quantize_per_channel_inside_clip_range(axis_scale):
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((3, 16, 16)) * np.array(axis_scale)[:, None, None]).astype(np.float32)
    q, _ = quant.quantize(x)
    scale = quant.channel_scales(x, 99.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch deprecates the quantized tensor API
        ref = torch.quantize_per_channel(torch.from_numpy(x), torch.from_numpy(scale.astype(np.float64)),
                                         torch.zeros(3, dtype=torch.long), 0, torch.qint8).int_repr().numpy()
    inside = np.abs(x) <= 127 * scale[:, None, None]
    assert inside.mean() > 0.98
    np.testing.assert_array_equal(q[inside], ref[inside])
    # outside the clip range ours saturates at +-127 (torch at -128 / 127)
    assert (np.abs(q[~inside]) == 127).all()


def reference_writer_codes(x, percentile=99.5):
    """The reference's writer (Distill/quant_io.py) on one [C, H, W] tensor, step by step as it runs: the
    percentile argument is np.clip of a Python float (a float64 scalar, so numpy interpolates in float64),
    the quotient by 127.0 stays float64 and the scale becomes float32 once; codes are float32 x / scale,
    rounded half to even, clipped to +-127; the stored scale is float16."""
    x = x.astype(np.float32)
    flat = x.reshape(x.shape[0], -1)
    clip_at = np.percentile(np.abs(flat), np.clip(percentile, 50.0, 100.0), axis=1)
    scale = np.maximum(clip_at / 127.0, 1e-8).astype(np.float32)
    codes = np.clip(np.round(flat / scale[:, None]), -127, 127).astype(np.int8)
    return codes.reshape(x.shape), scale.astype(np.float16), scale


def on_rounding_boundaries(rng, channels=3, size=32):
    """[C, H, W] whose 12 largest magnitudes per channel fix the 99.5th percentile, and whose other values sit
    on code boundaries (k + 0.5) * scale of the reference's scale, and one or two float32 ulps to either side."""
    x = rng.uniform(-1, 1, (channels, size * size)).astype(np.float32) * rng.uniform(0.01, 20)
    x[:, :12] = rng.uniform(1.5, 2.0, (channels, 12)).astype(np.float32) * np.abs(x).max()
    _, _, scale = reference_writer_codes(x.reshape(channels, size, size))
    k = rng.integers(-126, 126, (channels, size * size - 12))
    edge = ((k + 0.5) * scale[:, None]).astype(np.float32)
    nudge = rng.integers(-2, 3, edge.shape)
    toward = np.where(nudge > 0, np.inf, -np.inf)  # (sign(nudge) * inf is nan where nudge is 0)
    for step in (1, 2):
        edge = np.where(np.abs(nudge) >= step, np.nextafter(edge, toward).astype(np.float32), edge)
    x[:, 12:] = edge
    return rng.permutation(x, axis=1).reshape(channels, size, size)


@pytest.mark.parametrize("kind", ["normal", "heavy-tailed", "on-boundaries"])
def test_codes_and_scales_are_bit_identical_to_the_reference_writer(kind):
    """Issue 31: our codes differed by 1 in about one in 10^5 (the scale rounded twice, in float32)."""
    rng = np.random.default_rng(31)
    n, chunks = 400, 5
    if kind == "on-boundaries":
        x = np.stack([on_rounding_boundaries(rng) for _ in range(n * chunks)])
    else:
        draw = rng.standard_normal if kind == "normal" else (lambda shape: rng.standard_t(2, shape))
        x = draw((n * chunks, 3, 32, 32)) * 10.0 ** rng.uniform(-4, 2, (n * chunks, 1, 1, 1))
    x = x.astype(np.float32).reshape(n, chunks, 3, 32, 32)  # batched as the codec quantizes the chunks
    q, scale = quant.quantize(x)
    for i in range(n):
        for k in range(chunks):
            ref_q, ref_scale, _ = reference_writer_codes(x[i, k])
            np.testing.assert_array_equal(q[i, k], ref_q, err_msg=f"sample {i} chunk {k}")
            np.testing.assert_array_equal(scale[i, k], ref_scale, err_msg=f"sample {i} chunk {k}")
