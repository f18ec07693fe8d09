import gzip
import shutil

import numpy as np
import pytest

from pipeline.core.errors import UserError
from pipeline.data import datasets

from conftest import assert_one_sentence_error, run_cli

SYSTEM_DIR = "/usr/share/datasets/fashion-mnist"


def test_fashion_mnist_is_padded_to_32_and_in_range():
    images, labels = datasets.load_fashion_mnist(SYSTEM_DIR, "test")
    assert images.shape == (10000, 1, 32, 32) and images.dtype == np.uint8
    assert (images[:, :, :2] == 0).all() and (images[:, :, :, -2:] == 0).all()
    assert labels.shape == (10000,) and set(np.unique(labels)) == set(range(10))
    x = datasets.to_model_range(images[:4])
    assert x.min() >= -1 and x.max() <= 1
    np.testing.assert_array_equal(datasets.to_uint8(x), images[:4])


def test_folder_with_the_four_files_is_accepted(tmp_path):
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        shutil.copy(f"{SYSTEM_DIR}/{name}", tmp_path / name)
    assert datasets.load_fashion_mnist(tmp_path, "test")[0].shape == (10000, 1, 32, 32)


def test_folder_without_idx_files_says_how_to_get_them(tmp_path):
    with pytest.raises(UserError, match="apt-get install dataset-fashion-mnist"):
        datasets.load_fashion_mnist(tmp_path, "train")
    result = run_cli("Main_Diffusion.py", "--mode", "pretrain", "--config", "tiny", f"dataset_dir={tmp_path}",
                     f"teacher_path={tmp_path / 't'}", f"run_dir={tmp_path / 'run'}")
    assert_one_sentence_error(result, "train-images-idx3-ubyte.gz", "dataset-fashion-mnist")


def test_wrong_md5_is_refused(tmp_path):
    shutil.copy(f"{SYSTEM_DIR}/t10k-labels-idx1-ubyte.gz", tmp_path / "t10k-labels-idx1-ubyte.gz")
    raw = bytearray(gzip.decompress(open(f"{SYSTEM_DIR}/t10k-images-idx3-ubyte.gz", "rb").read()))
    raw[5000] ^= 1
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(bytes(raw)))
    with pytest.raises(UserError, match="MD5"):
        datasets.load_fashion_mnist(tmp_path, "test")


def test_missing_cifar10_says_how_to_get_it(tmp_path):
    with pytest.raises(UserError, match="cifar-10-batches-py"):
        datasets.load_cifar10(tmp_path, "test")
