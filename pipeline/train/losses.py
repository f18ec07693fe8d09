"""Distillation losses of student D (docs/design.md §4).

    L = lambda_rin * dist(rin, rin0) + lambda_chunks * dist(chunks, r_chunks) + lambda_x0 * dist(readout(z_hat), x0)

with z_hat = rin + sum_j chunk_j. ``dist`` is the elementwise MSE, as the reference (``loss_metric=mse``),
or the pseudo-Huber distance of improved consistency training (Song & Dhariwal 2023, §3.3), per item
(a sample's image, or one chunk of a sample), divided by sqrt(d) so that its scale is an RMS error:

    pseudo_huber(x, y) = sqrt(||x - y||^2 / d + c^2) - c,   c = 0.00054   (iCT's c = 0.00054 sqrt(d), over sqrt(d))

It weighs large errors linearly instead of quadratically, so a few hard records pull less. In pixel
space rin is x_T itself, so its term is absent. The x0 term compares the unclamped readout, so that it
keeps a gradient where the prediction leaves [-1, 1]. The logged per-chunk losses are MSE whatever the metric.
"""
import dataclasses

import torch

from ..students.student_d import readout

PSEUDO_HUBER_C = 0.00054


def distance(pred, target, metric: str, item_dims: tuple) -> torch.Tensor:
    """Mean over items of the per-item distance over ``item_dims``: MSE or pseudo-Huber (see the module)."""
    mean_square = (pred - target).pow(2).mean(dim=item_dims)
    if metric == "mse":
        return mean_square.mean()
    return (torch.sqrt(mean_square + PSEUDO_HUBER_C ** 2) - PSEUDO_HUBER_C).mean()


@dataclasses.dataclass(frozen=True)
class LossWeights:
    """The output losses' distance (``loss_metric``) and weights (``lambda_chunks``, ``lambda_x0``, ``lambda_rin``)."""
    metric: str
    chunks: float
    x0: float
    rin: float

    @classmethod
    def from_config(cls, cfg) -> "LossWeights":
        return cls(cfg["loss_metric"], cfg["lambda_chunks"], cfg["lambda_x0"], cfg["lambda_rin"])


def d_losses(student, pred: dict, batch: dict, weights: LossWeights):
    """(total loss, {name: scalar tensor}, per-chunk MSE [chunks], the unclamped one-step images) for one batch."""
    metric = weights.metric
    chunks = pred["chunks"].float()
    per_chunk = (chunks - batch["chunks"]).pow(2).mean(dim=(0, 2, 3, 4))
    images = readout(student, pred["rin"].float() + chunks.sum(dim=1))
    parts = {"chunks": distance(chunks, batch["chunks"], metric, (2, 3, 4)),
             "x0": distance(images, batch["x0"], metric, (1, 2, 3))}
    total = weights.chunks * parts["chunks"] + weights.x0 * parts["x0"]
    if student.predicts_rin:
        if pred["rin"].shape != batch["rin0"].shape:  # a wrong target would broadcast silently
            raise ValueError(f"rin {list(pred['rin'].shape)} and its target {list(batch['rin0'].shape)} differ")
        parts["rin"] = distance(pred["rin"].float(), batch["rin0"], metric, (1, 2, 3))
        total = total + weights.rin * parts["rin"]
    return total, parts, per_chunk.detach(), images
