import numpy as np
import pytest
import torch

from pipeline.data import codec as codecs
from pipeline.teacher import spaces, teachers
from pipeline.teacher.trajectory import ddim_sample, draw_x_T, pixel_residual_record


def _teacher(small_teacher):
    from pipeline.core import config
    unet, ddpm, _ = teachers.load_teacher(config.resolve("tiny", [f"teacher_path={small_teacher}"]))
    return unet, teachers.ddim_scheduler(ddpm)


def test_telescoping_identity_and_chunk_order(small_teacher):
    unet, scheduler = _teacher(small_teacher)
    x_T = draw_x_T(0, range(3), [1, 32, 32])
    rin0, r_chunks, z_final = pixel_residual_record(unet, scheduler, x_T, steps=12, chunks=4)
    assert r_chunks.shape == (3, 4, 1, 32, 32)
    torch.testing.assert_close(rin0, x_T)
    torch.testing.assert_close(rin0 + r_chunks.sum(1), z_final, atol=1e-5, rtol=0)
    # the chain is the plain DDIM sampler, and its end is the clipped x0 prediction
    torch.testing.assert_close(z_final, ddim_sample(unet, scheduler, x_T, 12), atol=0, rtol=0)
    assert z_final.abs().max() <= 1.0


def test_x_T_depends_only_on_seed_and_index():
    a = draw_x_T(7, [0, 1, 2, 3], [1, 8, 8])
    b = draw_x_T(7, [2, 3], [1, 8, 8])
    torch.testing.assert_close(a[2:], b, atol=0, rtol=0)
    assert not torch.equal(a[0], draw_x_T(8, [0], [1, 8, 8])[0])
    assert a.dtype == torch.float32 and torch.equal(a, a.half().float())  # exactly representable in float16


@pytest.mark.parametrize("codec", [codecs.ReferenceCodec(99.5, 10), codecs.FeedbackCodec(0.05, "regenerate", 99.5, 10)])
def test_record_keys_and_dtypes(small_teacher, codec):
    unet, scheduler = _teacher(small_teacher)
    x_T = draw_x_T(0, range(2), [1, 32, 32])
    rin0, r_chunks, z_final = pixel_residual_record(unet, scheduler, x_T, 4, 2)
    rec = codec.encode(codecs.Trajectories(*(t.numpy() for t in (x_T, rin0, r_chunks, z_final, z_final)), T=1000,
                                           chunk_size=500, space=spaces.SPACES["pixel"]))
    dtypes = {k: str(v.dtype) for k, v in rec.items()}
    assert dtypes == {"x_T_f16": "float16", "x0_teacher_f16": "float16", "rin0_q": "int8", "rin0_scale_f16": "float16",
                      "r_chunks_q": "int8", "r_chunks_scale_f16": "float16", "T": "int16", "chunk_size": "int16"}
    assert rec["r_chunks_q"].shape == (2, 2, 1, 32, 32) and rec["r_chunks_scale_f16"].shape == (2, 2, 1)
    assert rec["T"].tolist() == [[1000], [1000]] and rec["chunk_size"].tolist() == [[500], [500]]
    np.testing.assert_array_equal(rec["x_T_f16"], x_T.numpy().astype(np.float16))
