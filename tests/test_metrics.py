"""Precision / recall, memorization, diversity, PSNR and FID excess against direct computations."""
import numpy as np
import pytest
import torch

from pipeline.evaluation import metrics


def test_precision_recall_follow_the_k_nn_balls():
    rng = np.random.default_rng(0)
    real = torch.from_numpy(rng.normal(size=(60, 8)))
    assert metrics.precision_recall(real, real.clone()) == (1.0, 1.0)
    far = real + 100.0
    assert metrics.precision_recall(real, far) == (0.0, 0.0)
    # half the fakes on the real manifold, half far away: precision 1/2, recall still 1 for the real set
    mixed = torch.cat([real[:30], far[30:]])
    precision, recall = metrics.precision_recall(real, mixed)
    assert precision == 0.5 and 0 < recall < 1


def test_memorization_and_diversity_match_numpy():
    rng = np.random.default_rng(1)
    samples = rng.integers(0, 256, size=(5, 1, 4, 4), dtype=np.uint8)
    train = rng.integers(0, 256, size=(40, 1, 4, 4), dtype=np.uint8)
    s, t = samples.reshape(5, -1) / 255.0, train.reshape(40, -1) / 255.0
    nearest = np.sqrt(((s[:, None] - t[None]) ** 2).sum(-1)).min(1).mean()
    pairs = np.sqrt(((s[:, None] - s[None]) ** 2).sum(-1))
    assert abs(metrics.memorization_score(samples, train) - nearest) < 1e-5
    assert abs(metrics.diversity_score(samples) - pairs.sum() / 20) < 1e-5
    assert metrics.memorization_score(train[:5], train) < 1e-3  # cdist uses the matmul form: float rounding


def test_psnr_against_the_teacher():
    teacher = torch.zeros(3, 1, 8, 8)
    student = teacher + 0.1
    fidelity = metrics.fidelity(student, teacher)
    assert abs(fidelity["mse"] - 0.01) < 1e-7
    assert abs(fidelity["psnr_db"] - 10 * np.log10(4 / 0.01)) < 1e-3  # data range 2


def test_slerp_keeps_the_ends_and_the_norm():
    from pipeline.evaluation import latent_walk
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(1, 32, 32, generator=g), torch.randn(1, 32, 32, generator=g)
    path = latent_walk.slerp(a, b, 120)
    assert path.shape == (120, 1, 32, 32)
    torch.testing.assert_close(path[0], a)
    torch.testing.assert_close(path[-1], b)
    norms = path.flatten(1).norm(dim=1)
    assert norms.min() > 0.95 * min(a.norm(), b.norm())  # a straight line would dip to about 0.7x midway


def test_fid_excess_over_the_floor_and_its_ratios():
    scores = {"teacher": {"fid": 57.25}, "d": {"fid": 108.04}, "b": {"fid": 119.02}, "real": {"fid": 46.44}}
    excess = metrics.fid_excess(scores)
    assert excess == pytest.approx({"teacher": 10.81, "d": 61.60, "b": 72.58})
    ratios = metrics.fid_ratios(scores)
    assert ratios["fid"] == pytest.approx({"d_over_teacher": 108.04 / 57.25, "b_over_teacher": 119.02 / 57.25,
                                           "b_over_d": 119.02 / 108.04})
    # the plain ratio 1.89 hides that D adds 5.7x what the teacher adds beyond the floor
    assert ratios["fid_excess"] == pytest.approx({"d_over_teacher": 61.60 / 10.81, "b_over_teacher": 72.58 / 10.81,
                                                  "b_over_d": 72.58 / 61.60})


def test_fid_ratios_of_d_alone_and_of_a_teacher_at_the_floor():
    scores = {"teacher": {"fid": 40.0}, "d": {"fid": 50.0}, "real": {"fid": 41.0}}
    assert metrics.fid_excess(scores) == pytest.approx({"teacher": -1.0, "d": 9.0})
    ratios = metrics.fid_ratios(scores)
    assert ratios["fid"] == pytest.approx({"d_over_teacher": 1.25})
    assert ratios["fid_excess"] == {"d_over_teacher": None}  # no excess to divide by: no ratio
