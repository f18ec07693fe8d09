"""Sample-quality figures besides FID (docs/design.md §5).

* precision / recall: the k-nearest-neighbour manifold estimate of Kynkäänniemi et al. (2019), k = 3,
  in the Inception feature space FID uses: precision is the share of generated samples inside some
  real sample's k-NN ball, recall the share of real samples inside some generated sample's ball.
* memorization score: mean L2 distance from each sample to its nearest training image; diversity
  score: mean L2 distance over all pairs of distinct samples; both on pixels scaled to [0, 1]. Higher
  memorization score = less copying.
* PSNR / MSE of a student against the teacher's image from the same x_T (distillation fidelity).
* FID excess: a model's FID minus the floor (N real training images against the same reference), and the
  ratios of excesses beside those of plain FIDs. A large floor (small N) is part of every FID at that N and
  pulls a plain ratio towards 1; the excess is the part of FID the model itself adds.
"""
import numpy as np
import torch
from torchmetrics.functional.image import peak_signal_noise_ratio

PR_NEIGHBOURS = 3
RATIO_PAIRS = (("d", "teacher"), ("b", "teacher"), ("b", "d"))  # (numerator, denominator) rows of the report


def _kth_neighbour_radius(feats: torch.Tensor, k: int) -> torch.Tensor:
    d = torch.cdist(feats, feats)
    return d.kthvalue(k + 1, dim=1).values  # +1: the point itself is its own nearest neighbour


def _inside_any_ball(points, centres, radii, block=1024) -> torch.Tensor:
    inside = []
    for lo in range(0, len(points), block):
        d = torch.cdist(points[lo:lo + block], centres)
        inside.append((d <= radii[None]).any(dim=1))
    return torch.cat(inside)


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = PR_NEIGHBOURS):
    """(precision, recall); k shrinks to N - 1 for sets too small to have k other members."""
    k = max(1, min(k, len(real) - 1, len(fake) - 1))
    real, fake = real.double(), fake.double()
    precision = _inside_any_ball(fake, real, _kth_neighbour_radius(real, k)).double().mean()
    recall = _inside_any_ball(real, fake, _kth_neighbour_radius(fake, k)).double().mean()
    return float(precision), float(recall)


def _unit_pixels(images_uint8) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images_uint8)).reshape(len(images_uint8), -1).float() / 255.0


def memorization_score(samples_uint8, train_uint8, block=256) -> float:
    """Mean over samples of the L2 distance to the nearest training image."""
    samples, train = _unit_pixels(samples_uint8), _unit_pixels(train_uint8)
    nearest = torch.full((len(samples),), float("inf"))
    for lo in range(0, len(train), 8192):
        d = torch.cdist(samples, train[lo:lo + 8192])
        nearest = torch.minimum(nearest, d.min(dim=1).values)
    return float(nearest.mean())


def diversity_score(samples_uint8) -> float:
    """Mean L2 distance over all pairs of distinct samples."""
    x = _unit_pixels(samples_uint8)
    d = torch.cdist(x, x)
    n = len(x)
    return float(d.sum() / (n * (n - 1)))


def fidelity(student_images: torch.Tensor, teacher_images: torch.Tensor) -> dict:
    """Mean per-image PSNR (dB, data range [-1, 1]) and MSE of the student against the teacher."""
    psnr = peak_signal_noise_ratio(student_images.float(), teacher_images.float(), data_range=(-1.0, 1.0),
                                   reduction="none", dim=(1, 2, 3))
    mse = (student_images.float() - teacher_images.float()).pow(2).mean(dim=(1, 2, 3))
    return {"psnr_db": float(psnr.mean()), "mse": float(mse.mean()), "records": len(mse)}


def fid_excess(scores: dict) -> dict:
    """FID - floor of every model row (teacher, d, b) of eval_d's ``scores``; the floor is ``scores["real"]``."""
    floor = scores["real"]["fid"]
    return {key: row["fid"] - floor for key, row in scores.items() if key != "real"}


def _ratio(numerator: float, denominator: float):
    # a model at or below the floor has no excess to compare with: None (null in report.json, "–" in report.md)
    return numerator / denominator if denominator > 0 else None


def fid_ratios(scores: dict) -> dict:
    """{"fid": plain FID ratios, "fid_excess": ratios of FID - floor}, each keyed "d_over_teacher",
    "b_over_teacher", "b_over_d" for the pairs whose rows exist."""
    excess = fid_excess(scores)
    pairs = [(top, bottom) for top, bottom in RATIO_PAIRS if top in scores and bottom in scores]
    return {"fid": {f"{top}_over_{bottom}": _ratio(scores[top]["fid"], scores[bottom]["fid"]) for top, bottom in pairs},
            "fid_excess": {f"{top}_over_{bottom}": _ratio(excess[top], excess[bottom]) for top, bottom in pairs}}
