import warnings

import numpy as np
import pytest
import torch

from pipeline import quant


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
