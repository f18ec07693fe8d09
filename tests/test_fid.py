import numpy as np
import torch

from pipeline.data import datasets
from pipeline.evaluation import fid


def test_inception_features_and_fid_of_a_set_against_itself(tmp_path):
    features = fid.InceptionFeatures()
    images = datasets.load_fashion_mnist("/usr/share/datasets/fashion-mnist", "test")[0][:6]
    feats = fid.cached_features(features, images, tmp_path / "f.safetensors", batch_size=3, desc="test")
    assert feats.shape == (6, 2048) and torch.isfinite(feats).all()
    again = fid.cached_features(features, images, tmp_path / "f.safetensors", batch_size=3, desc="test")
    torch.testing.assert_close(again, feats)  # served from the cache
    assert abs(fid.frechet_distance(feats, feats)) < 1e-2
    noise = np.random.default_rng(0).integers(0, 256, size=(6, 1, 32, 32), dtype=np.uint8)
    assert fid.frechet_distance(feats, fid.extract(features, noise, 3, "noise")) > 10


def test_the_fast_inception_path_gives_the_plain_networks_features():
    """Frozen + channels-last (the default) against the network as published, on the same images."""
    images = datasets.load_fashion_mnist("/usr/share/datasets/fashion-mnist", "test")[0][:4]
    fast = fid.extract(fid.InceptionFeatures(channels_last=True), images, 4, "fast")
    plain = fid.extract(fid.InceptionFeatures(channels_last=False), images, 4, "plain")
    assert fid.InceptionFeatures(channels_last=True).memory_format == torch.channels_last
    torch.testing.assert_close(fast, plain, atol=1e-4, rtol=1e-4)


def _numpy_frechet(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2), unbiased covariances."""
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(sa)
    root_a = (v * np.sqrt(w.clip(0))) @ v.T
    cross = np.linalg.eigvalsh(root_a @ sb @ root_a).clip(0)
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(sa) + np.trace(sb) - 2 * np.sqrt(cross).sum())


def test_frechet_distance_is_the_gaussian_formula():
    """Features that live in 6 of the 2048 dimensions: torchmetrics' FID must equal the closed form there."""
    rng = np.random.default_rng(0)
    real, fake = np.zeros((50, 2048)), np.zeros((40, 2048))
    real[:, :6] = rng.normal(size=(50, 6)) @ rng.normal(size=(6, 6))
    fake[:, :6] = 1.5 * rng.normal(size=(40, 6)) + 0.7
    expected = _numpy_frechet(real[:, :6], fake[:, :6])
    got = fid.frechet_distance(torch.from_numpy(real).float(), torch.from_numpy(fake).float())
    assert expected > 5 and abs(got - expected) < 1e-3 * expected


def test_a_damaged_feature_cache_is_computed_again(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (6, 1, 8, 8), dtype=np.uint8)
    calls = []

    def features(batch):
        calls.append(len(batch))
        return batch.float().mean(dim=(2, 3))
    cache = tmp_path / "cache.safetensors"
    first = fid.cached_features(features, images, cache, 4, "test")
    assert fid.cached_features(features, images, cache, 4, "test").equal(first) and calls == [4, 2]
    cache.write_bytes(cache.read_bytes()[:20])
    assert fid.cached_features(features, images, cache, 4, "test").equal(first) and calls == [4, 2, 4, 2]


def _numpy_unbiased_kid(a: np.ndarray, b: np.ndarray) -> float:
    """Unbiased MMD² with k(x, y) = (x·y / d + 1)³: the means of k over distinct pairs within each set, minus
    twice the mean of k over all cross pairs."""
    d, m, n = a.shape[1], len(a), len(b)
    k_aa, k_bb, k_ab = ((x @ y.T / d + 1) ** 3 for x, y in ((a, a), (b, b), (a, b)))
    within_a = (k_aa.sum() - np.trace(k_aa)) / (m * (m - 1))
    within_b = (k_bb.sum() - np.trace(k_bb)) / (n * (n - 1))
    return float(within_a + within_b - 2 * k_ab.mean())


def _features(rng, n, shift=0.0) -> torch.Tensor:
    """Non-negative, like Inception pool features after their ReLU."""
    return torch.from_numpy(np.abs(rng.normal(size=(n, 2048)) * 0.3 + shift))


def test_kid_is_the_unbiased_polynomial_mmd():
    """Equal set sizes make every subset a permutation of the whole set: one deterministic estimate, std 0."""
    rng = np.random.default_rng(0)
    real, fake = _features(rng, 40), _features(rng, 40, shift=0.1)
    assert fid.kid_settings(40, 40) == {"subsets": fid.KID_SUBSETS, "subset_size": 40, "seed": fid.KID_SEED}
    mean, std = fid.kernel_distance(real, fake)
    expected = _numpy_unbiased_kid(real.numpy(), fake.numpy())
    assert expected > 0 and abs(mean - expected) < 1e-9 * abs(expected) + 1e-12 and std < 1e-12


def test_kid_of_a_set_against_itself_and_its_own_distribution_is_about_zero():
    """Against another sample of its own distribution KID is ~0 (unbiased); against itself the off-diagonal
    means leave -2 (mean k(x, x) - mean k(x, x')) / N, which shrinks as 1/N."""
    rng = np.random.default_rng(1)
    real, same, shifted = (_features(rng, 100, shift).float() for shift in (0.0, 0.0, 0.3))
    against_shifted = fid.kernel_distance(real, shifted)[0]
    assert against_shifted > 0.01
    assert abs(fid.kernel_distance(real, real.clone())[0]) < 0.05 * against_shifted
    assert abs(fid.kernel_distance(real, same)[0]) < 0.01 * against_shifted


def test_kid_subsets_are_reproducible_and_leave_the_global_rng_alone():
    rng = np.random.default_rng(2)
    real, fake = _features(rng, 50).float(), _features(rng, 20, shift=0.05).float()
    assert fid.kid_settings(50, 20)["subset_size"] == 20 and fid.kid_settings(5000, 3000)["subset_size"] == 1000
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    first = fid.kernel_distance(real, fake)
    assert torch.rand(3).equal(expected_next)  # the subsets came from a fork of the global generator
    second = fid.kernel_distance(real, fake)
    assert first == second and first[1] > 0  # random subsets of the 50 real features: a spread, the same each run
