"""SPD and LRM against NumPy statements of their formulas; taps and PCA bases behave."""
import numpy as np
import torch

from pipeline.train import feature_losses
from conftest import small_student


def _features(seed):
    g = torch.Generator().manual_seed(seed)
    return {"a": torch.randn(2, 8, 16, 16, generator=g), "b": torch.randn(2, 16, 4, 4, generator=g),
            "c": torch.randn(2, 4, 2, 2, generator=g)}


def _numpy_spd(teacher: dict, student: dict, p=feature_losses.SPD_PATCHES) -> float:
    """SPD written out patch by patch: the mean over blocks of the mean over patches of ||A_D - A_B||."""
    def grams(f):
        _, _, h, w = f.shape
        q = max(1, min(p, h, w))
        ph, pw = h // q, w // q
        for i in range(q):
            for j in range(q):
                patch = f[:, :, i * ph:(i + 1) * ph, j * pw:(j + 1) * pw]
                a = patch @ patch.swapaxes(-1, -2)
                yield a / np.linalg.norm(a)
    return float(np.mean([np.mean([np.linalg.norm(x - y) for x, y in zip(grams(t.double().numpy()),
                                                                           grams(student[k].double().numpy()))])
                          for k, t in teacher.items()]))


def test_spd_matches_numpy_and_ignores_the_scale_of_a_feature():
    f, g = _features(0), _features(1)
    assert feature_losses.spd_loss(f, {k: v.clone() for k, v in f.items()}) == 0
    expected = _numpy_spd(f, g)
    assert expected > 0.1
    assert abs(float(feature_losses.spd_loss(f, g)) - expected) < 1e-5
    # normalised maps: a feature scaled by a constant has the same patch attention
    assert feature_losses.spd_loss(f, {k: 3 * v for k, v in f.items()}) < 1e-6


def test_lrm_bases_are_orthonormal_and_the_loss_is_the_mse_of_projections():
    model = small_student()
    taps = feature_losses.FeatureTaps(model)
    with torch.no_grad():
        model(torch.randn(4, 1, 16, 16))
    feats = taps.take()
    assert list(feats) == feature_losses.block_names(model.unet)
    bases = feature_losses.LowRankBases(model.unet)
    bases.fit(feats)
    e = bases.basis_mid_block
    assert e.shape == (16, 4)
    torch.testing.assert_close(e.T @ e, torch.eye(4), atol=1e-5, rtol=0)
    assert bases.loss(feats, {k: v.clone() for k, v in feats.items()}) == 0
    other = {k: v + 0.1 * torch.randn_like(v) for k, v in feats.items()}
    expected = np.mean([(((feats[k] - other[k]).permute(0, 2, 3, 1).double().numpy()
                          @ getattr(bases, bases._key(k)).double().numpy()) ** 2).mean() for k in feats])
    assert abs(float(bases.loss(feats, other)) - expected) < 1e-6 * max(1.0, expected)
    again = feature_losses.LowRankBases(model.unet)
    again.load_fitted(bases.state_dict())
    assert torch.equal(again.basis_mid_block, e) and bool(again.fitted)
    taps.remove()


def test_lrm_basis_starts_with_the_top_principal_direction():
    model = small_student()
    g = torch.Generator().manual_seed(0)
    u = torch.randn(16, generator=g)
    u = u / u.norm()
    # mid-block features whose channels vary mostly along u, plus a little isotropic noise
    strong = 5 * torch.randn(8, 1, 4, 4, generator=g) * u.view(1, 16, 1, 1)
    bases = feature_losses.LowRankBases(model.unet)
    bases.fit({"mid_block": strong + 0.1 * torch.randn(8, 16, 4, 4, generator=g)})
    assert abs(float(bases.basis_mid_block[:, 0] @ u)) > 0.99
