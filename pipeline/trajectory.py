"""Teacher trajectories: the deterministic DDIM chain and its residual record (DESIGN §2, pixel space)."""
import torch


@torch.no_grad()
def ddim_sample(unet, scheduler, x_T, steps, *, callback=None):
    """Deterministic DDIM (Song et al. 2021, eq. 12 with eta = 0) from ``x_T`` in ``steps`` steps.

    ``scheduler`` is a diffusers ``DDIMScheduler``; ``callback(i, x)`` sees the state after step i.
    The last step lands on alpha_bar = 1, so the returned x is the clipped x0 prediction.
    """
    scheduler.set_timesteps(steps)
    x = x_T
    for i, t in enumerate(scheduler.timesteps):
        eps = unet(x, t).sample.float()
        x = scheduler.step(eps, t, x, eta=0.0).prev_sample
        if callback is not None:
            callback(i, x)
    return x


@torch.no_grad()
def pixel_residual_record(unet, scheduler, x_T, steps, chunks):
    """One DDIM chain cut into ``chunks`` equal residuals, noisiest first.

    Returns float32 tensors ``rin0`` = x_T [B,C,H,W], ``r_chunks`` [B,chunks,C,H,W] with
    r_j = x(end of chunk j) - x(start of chunk j), and ``z_final``; by construction
    rin0 + sum_j r_j = z_final (telescoping, up to float rounding).
    """
    chunk_size = steps // chunks
    boundaries = [x_T.float()]

    def snapshot(i, x):
        if (i + 1) % chunk_size == 0:
            boundaries.append(x.float())

    z_final = ddim_sample(unet, scheduler, x_T, steps, callback=snapshot).float()
    r_chunks = torch.stack([b - a for a, b in zip(boundaries[:-1], boundaries[1:])], dim=1)
    return boundaries[0], r_chunks, z_final
