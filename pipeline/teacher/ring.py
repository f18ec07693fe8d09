"""The rectified teacher's time grid, its prediction types and the ring sampler (docs/design.md §14).

The recurrence runs on ``steps`` + 1 DDPM timesteps τ_0 = T−1 > τ_1 > … > τ_steps = 0 (all T of them
when steps = T−1); R(z, τ_i) maps the latent at τ_i to τ_{i+1}. The ring sampler is
z = Rin(x_T, τ_0), then ``steps`` calls of R, then the image X0out(z, 0): R is never applied at t = 0,
whose successor does not exist on the grid (the reference applies one R step too many there).
"""
import torch

PREDICTIONS = ("v", "eps", "x0")


def ring_timesteps(T: int, steps: int) -> torch.Tensor:
    """[steps + 1] int64, from T−1 down to 0, evenly spaced (rounded)."""
    if not 1 <= steps <= T - 1:
        raise ValueError(f"the ring needs 1..{T - 1} steps on a {T}-step schedule, not {steps}")
    return torch.round(torch.linspace(T - 1, 0, steps + 1, dtype=torch.float64)).long()


def target(prediction: str, x0, eps, c0, c1):
    """What a head predicting ``prediction`` is trained towards: v = c0·ε − c1·x0 (Salimans & Ho 2022,
    §4), ε or x0; c0 = sqrt(ᾱ_t), c1 = sqrt(1 − ᾱ_t), broadcast [B, 1, 1, 1]."""
    return {"v": lambda: c0 * eps - c1 * x0, "eps": lambda: eps, "x0": lambda: x0}[prediction]()


def eps_and_x0(prediction: str, output, x_t, c0, c1):
    """(ε̂, x̂0) from a head's output at x_t = c0·x0 + c1·ε."""
    if prediction == "v":
        return c1 * x_t + c0 * output, c0 * x_t - c1 * output
    if prediction == "eps":
        return output, (x_t - c1 * output) / c0
    return (x_t - c0 * output) / c1, output


def coefficients(alphas_cumprod, t):
    """(c0, c1) at timesteps t, [B, 1, 1, 1]."""
    a = alphas_cumprod[t].view(-1, 1, 1, 1)
    return a.sqrt(), (1 - a).sqrt()


def chain_estimates(prediction: str, output, x_t, alphas_cumprod, t, clip_x0: bool):
    """(ε̂, x̂0) of a DDIM chain on the grid at x_t, timesteps t, from a head's ``output`` of type ``prediction``:
    the one place the chains of rectify (its self-teacher and the frozen teacher) and of the ring benchmark get
    them. ``clip_x0`` clamps x̂0 to [−1, 1] as the DDIM teacher samples; the self-teacher's chain, as the
    reference's, leaves it unclamped."""
    eps, x0 = eps_and_x0(prediction, output, x_t, *coefficients(alphas_cumprod, t))
    return eps, (x0.clamp(-1, 1) if clip_x0 else x0)


def ddim_step(x0, eps, alphas_cumprod, t_next):
    """The DDIM step (η = 0) from a (x0, ε) estimate to timesteps ``t_next``: c0·x0 + c1·ε there."""
    c0, c1 = coefficients(alphas_cumprod, t_next)
    return c0 * x0 + c1 * eps


@torch.no_grad()
def ring_latents(rnet, x_T, timesteps, *, callback=None):
    """The ring's final latent: R^steps(Rin(x_T, τ_0)). ``callback(i, z)`` sees z_i, the latent at τ_i,
    for i = 0 (Rin's output) .. steps."""
    batch = len(x_T)
    z = rnet.rin(x_T, timesteps[0].expand(batch).to(x_T.device))
    if callback is not None:
        callback(0, z)
    for i in range(len(timesteps) - 1):
        z = rnet.r(z, timesteps[i].expand(batch).to(x_T.device))
        if callback is not None:
            callback(i + 1, z)
    return z


@torch.no_grad()
def read_out(rnet, z):
    """The image of a latent at t = 0: clamp(X0out(z, 0), −1, 1)."""
    return rnet.x0out(z, torch.zeros(len(z), dtype=torch.long, device=z.device)).clamp(-1, 1)


def ring_sample(rnet, x_T, timesteps):
    """Image from x_T through the latent recurrence: X0out(R^steps(Rin(x_T, τ_0)), 0), clamped."""
    return read_out(rnet, ring_latents(rnet, x_T, timesteps))


@torch.inference_mode()
def latent_residual_record(rnet, x_T, timesteps, chunks):
    """The ring cut into ``chunks`` equal residuals, noisiest first (docs/design.md §2).

    Returns float32 ``rin0`` = Rin(x_T, T−1) [B,F,H,W], ``r_chunks`` [B,chunks,F,H,W] with r_j = z(end of
    chunk j) − z(start of chunk j), ``z_final`` and the image X0out(z_final, 0); rin0 + Σ_j r_j = z_final
    up to float rounding.
    """
    chunk_size = (len(timesteps) - 1) // chunks
    boundaries = []

    def snapshot(i, z):
        if i % chunk_size == 0:
            boundaries.append(z.float())

    z_final = ring_latents(rnet, x_T, timesteps, callback=snapshot).float()
    r_chunks = torch.stack([b - a for a, b in zip(boundaries[:-1], boundaries[1:])], dim=1)
    return boundaries[0], r_chunks, z_final, read_out(rnet, z_final).float()
