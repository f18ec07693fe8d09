"""SPD and LRM: zero for identical features, positive otherwise; taps and bases behave."""
import torch

from pipeline import feature_losses
from test_binary import _small_student


def _features(seed):
    g = torch.Generator().manual_seed(seed)
    return {"a": torch.randn(2, 8, 16, 16, generator=g), "b": torch.randn(2, 16, 4, 4, generator=g),
            "c": torch.randn(2, 4, 2, 2, generator=g)}


def test_spd_is_zero_for_identical_features_and_positive_otherwise():
    f, g = _features(0), _features(1)
    assert feature_losses.spd_loss(f, {k: v.clone() for k, v in f.items()}) == 0
    assert feature_losses.spd_loss(f, g) > 0
    # normalised maps: a feature scaled by a constant has the same patch attention
    assert feature_losses.spd_loss(f, {k: 3 * v for k, v in f.items()}) < 1e-6


def test_lrm_bases_are_orthonormal_and_the_loss_is_zero_only_for_identical_features():
    model = _small_student()
    taps = feature_losses.FeatureTaps(model)
    model(torch.randn(4, 1, 16, 16))
    feats = taps.take()
    assert list(feats) == feature_losses.block_names(model.unet)
    bases = feature_losses.LowRankBases(model.unet)
    bases.fit(feats)
    e = bases.basis_mid_block
    assert e.shape == (16, 4)
    torch.testing.assert_close(e.T @ e, torch.eye(4), atol=1e-5, rtol=0)
    assert bases.loss(feats, {k: v.clone() for k, v in feats.items()}) == 0
    assert bases.loss(feats, {k: v + 0.1 * torch.randn_like(v) for k, v in feats.items()}) > 0
    again = feature_losses.LowRankBases(model.unet)
    again.load_fitted(bases.state_dict())
    assert torch.equal(again.basis_mid_block, e) and bool(again.fitted)
    taps.remove()
