"""Distillation losses of student D (docs/design.md §4).

    L = lambda_rin * MSE(rin, rin0) + lambda_chunks * MSE(chunks, r_chunks) + lambda_x0 * MSE(readout(z_hat), x0)

with z_hat = rin + sum_j chunk_j and elementwise means, as the reference. In pixel space rin is x_T
itself, so its term is absent. The x0 term compares the unclamped readout, so that it keeps a gradient
where the prediction leaves [-1, 1].
"""
import torch.nn.functional as F

from .students import readout


def d_losses(student, pred: dict, batch: dict, cfg):
    """(total loss, {name: scalar tensor}, per-chunk MSE [chunks], the unclamped one-step images) for one batch."""
    per_chunk = (pred["chunks"].float() - batch["chunks"]).pow(2).mean(dim=(0, 2, 3, 4))
    images = readout(student, pred["rin"].float() + pred["chunks"].float().sum(dim=1))
    parts = {"chunks": per_chunk.mean(), "x0": F.mse_loss(images, batch["x0"])}
    total = cfg["lambda_chunks"] * parts["chunks"] + cfg["lambda_x0"] * parts["x0"]
    if student.predicts_rin:
        if pred["rin"].shape != batch["rin0"].shape:  # mse_loss would broadcast a wrong target silently
            raise ValueError(f"rin {list(pred['rin'].shape)} and its target {list(batch['rin0'].shape)} differ")
        parts["rin"] = F.mse_loss(pred["rin"].float(), batch["rin0"])
        total = total + cfg["lambda_rin"] * parts["rin"]
    return total, parts, per_chunk.detach(), images
