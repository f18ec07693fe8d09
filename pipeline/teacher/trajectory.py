"""Teacher trajectories: the start noise of every sample, the deterministic DDIM chain and its residual
record (docs/design.md §2, pixel space)."""
import numpy as np
import torch


def sample_seed(seed: int, index: int) -> int:
    """A 64-bit seed for sample ``index``: independent streams for every (seed, index) pair."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint64)[0])


def draw_x_T(seed: int, indices, shape) -> torch.Tensor:
    """x_T for the given sample indices, rounded to float16 so that the stored x_T is the chain's start;
    sample i's noise depends only on (seed, i), never on the batch it is drawn in (docs/design.md §3)."""
    noise = [torch.randn(shape, generator=torch.Generator().manual_seed(sample_seed(seed, int(i)))) for i in indices]
    return torch.stack(noise).half().float()


@torch.inference_mode()
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


@torch.inference_mode()
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
