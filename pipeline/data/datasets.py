"""Image datasets as uint8 arrays [N, C, 32, 32], read from local files only (no downloads).

Fashion-MNIST: the four IDX ``.gz`` files (Debian's ``dataset-fashion-mnist`` puts them under
``/usr/share/datasets/fashion-mnist``), MD5-checked, padded 28 -> 32. CIFAR-10: the python pickle
batches of ``cifar-10-batches-py``, MD5-checked, read with an unpickler that admits arrays only.
"""
import gzip
import hashlib
import io
import pickle
from pathlib import Path

import numpy as np
import torch

from ..core.errors import UserError

FASHION_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
# Published MD5 of each .gz file, and of its decompressed bytes: Debian recompresses the archives,
# so either sum identifies the genuine data.
FASHION_MD5 = {
    "train-images-idx3-ubyte.gz": ("8d4fb7e6c68d591d4c3dfef9ec88bf0d", "f4a8712d7a061bf5bd6d2ca38dc4d50a"),
    "train-labels-idx1-ubyte.gz": ("25c81989df183df01b3e8a0aad5dffbe", "9018921c3c673c538a1fc5bad174d6f9"),
    "t10k-images-idx3-ubyte.gz": ("bef4ecab320f06d8554ea6380940ec79", "8181f5470baa50b63fa0f6fddb340f0a"),
    "t10k-labels-idx1-ubyte.gz": ("bb300cfdad3c16e7a12a480ee83cd310", "15d484375f8d13e6eb1aabb0c3f46965"),
}
FASHION_HOWTO = ("install Debian's package with 'apt-get install dataset-fashion-mnist' or set "
                 "dataset_dir= to a folder holding the four Fashion-MNIST IDX .gz files")
CIFAR_HOWTO = ("download and unpack cifar-10-python.tar.gz from the CIFAR-10 page and set dataset_dir= "
               "to its cifar-10-batches-py folder")
CIFAR_FILES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
CIFAR_MD5 = {
    "data_batch_1": "c99cafc152244af753f735de768cd75f", "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751", "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb", "test_batch": "40351d587109b95175f43aff81a1287e",
}


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def _read_checked_gz(path: Path, check_md5: bool) -> bytes:
    raw = path.read_bytes()
    try:
        data = gzip.decompress(raw)
    except (OSError, EOFError):
        raise UserError(f"{path} is not a readable gzip file; {FASHION_HOWTO}") from None
    if check_md5 and _md5(raw) not in FASHION_MD5[path.name] and _md5(data) not in FASHION_MD5[path.name]:
        raise UserError(f"{path} does not have the published Fashion-MNIST MD5 sum; {FASHION_HOWTO}")
    return data


def _parse_idx(data: bytes, dims: int) -> np.ndarray:
    magic = int.from_bytes(data[:4], "big")
    if magic != 0x800 + dims:
        raise UserError(f"an IDX file has magic number {magic:#x}, expected {0x800 + dims:#x}; "
                        f"{FASHION_HOWTO}")
    shape = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def load_fashion_mnist(folder, split, check_md5=True):
    """Images [N, 1, 32, 32] uint8 (zero-padded 28 -> 32, the background colour) and labels [N]."""
    folder = Path(folder)
    images_name, labels_name = FASHION_FILES[split]
    missing = [n for n in (images_name, labels_name) if not (folder / n).is_file()]
    if missing:
        raise UserError(f"Fashion-MNIST file {missing[0]} is not in {folder}; {FASHION_HOWTO}")
    images = _parse_idx(_read_checked_gz(folder / images_name, check_md5), 3)
    labels = _parse_idx(_read_checked_gz(folder / labels_name, check_md5), 1)
    images = np.pad(images, ((0, 0), (2, 2), (2, 2)))[:, None]
    return images, labels


_CIFAR_ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                  ("numpy", "ndarray"), ("numpy", "dtype")}


class _ArraysOnlyUnpickler(pickle.Unpickler):
    """CIFAR-10 batches are pickles of a dict of bytes, lists and numpy arrays; every other class is
    refused so that no code from the file can run (the MD5 check has already passed by then)."""

    def find_class(self, module, name):
        if (module, name) not in _CIFAR_ALLOWED:
            raise UserError(f"a CIFAR-10 batch refers to {module}.{name}, which a genuine batch does not; "
                            f"{CIFAR_HOWTO}")
        return super().find_class(module, name)


def _read_cifar_batch(path: Path, check_md5: bool):
    raw = path.read_bytes()
    if check_md5 and _md5(raw) != CIFAR_MD5[path.name]:
        raise UserError(f"{path} does not have the published CIFAR-10 MD5 sum; {CIFAR_HOWTO}")
    batch = _ArraysOnlyUnpickler(io.BytesIO(raw), encoding="bytes").load()
    images = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
    return images, np.asarray(batch[b"labels"], dtype=np.int64)


def load_cifar10(folder, split, check_md5=True):
    folder = Path(folder)
    for name in CIFAR_FILES[split]:
        if not (folder / name).is_file():
            raise UserError(f"CIFAR-10 file {name} is not in {folder}; {CIFAR_HOWTO}")
    parts = [_read_cifar_batch(folder / name, check_md5) for name in CIFAR_FILES[split]]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


LOADERS = {"fashion_mnist": load_fashion_mnist, "cifar10": load_cifar10}


def load_images(cfg, split):
    """uint8 images [N, C, 32, 32] of the configured dataset and split ('train' or 'test').

    ``verify_dataset_md5=false`` accepts a copy that is not byte-identical to the published files
    (a re-encoded archive, or the small stand-ins the tests fabricate)."""
    from ..core.config import project_path
    return LOADERS[cfg["dataset"]](project_path(cfg["dataset_dir"]), split, cfg["verify_dataset_md5"])[0]


def to_model_range(images_uint8) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images_uint8)).float().div(127.5).sub(1.0)


def to_uint8(images) -> np.ndarray:
    """float [-1, 1] -> uint8 [0, 255], clamped."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()


def random_batches(images: torch.Tensor, batch_size: int, hflip: bool, generator: torch.Generator):
    """Endless batches {"x0": images drawn with replacement, flipped left-right at random when ``hflip``};
    ``generator`` alone decides them, so a run that saves its state resumes the same sequence."""
    while True:
        idx = torch.randint(len(images), (batch_size,), generator=generator)
        x0 = images[idx]
        if hflip:
            flip = torch.rand(len(x0), generator=generator) < 0.5
            x0 = torch.where(flip.view(-1, 1, 1, 1), x0.flip(-1), x0)
        yield {"x0": x0}
