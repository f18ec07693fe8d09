import numpy as np
import torch

from pipeline import datasets, fid


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
