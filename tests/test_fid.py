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
