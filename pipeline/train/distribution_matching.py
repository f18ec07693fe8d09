"""Distribution matching: the second distribution-level term of the one-step students (docs/design.md §4).

The paired terms (regression, teacher features) teach a student the teacher's image of each x_T it was
given; they cannot say whether the student's images, as a set, look like the teacher's. Distribution
matching distillation (DMD, Yin et al. 2024; DMD2, 2024) can: it moves each student image along the
difference between two denoisers of the same noised image, the frozen teacher (which knows the
teacher's distribution) and a "fake" copy of it trained all along on the student's own images (which
knows the student's). Where the two disagree, the student's distribution differs from the teacher's,
and the difference points from the one towards the other.

    t ~ U{round(dm_t_min (T-1)) .. round(dm_t_max (T-1))},  eps ~ N(0, I)          one draw per image
    x_t = sqrt(abar_t) x + sqrt(1 - abar_t) eps
    x0_real, x0_fake = the teacher's and the fake denoiser's x0 estimates of x_t    (no gradient)
    g = (x0_fake - x0_real) / mean |x - x0_real|                                    (per image, DMD's normalisation)
    L_dm = 0.5 MSE(x, sg(x - g))                          so that dL_dm/dx = g / numel: the student follows -g
    L_fake = MSE(fake(x_t', t'), eps')  on sg(x), t' drawn as t       (the fake denoiser's loss, after each step)

The fake denoiser starts as a copy of the teacher and learns only at the noise levels where it is asked; it and its
optimizer live in the run's checkpoint, never in the exported student. Both run in eval mode (no dropout), so a step
is a function of its draws, which come from a generator seeded by (seed, rank, step): a resumed run sees what an
uninterrupted one would.
"""
import copy

import torch
import torch.nn.functional as F

from ..core import distributed, runtime
from ..core.errors import UserError
from .adversarial import step_generator, with_fresh_x_T

# The keys of the term: a run trained with other values is another experiment.
RUN_KEYS = ("lambda_dm", "dm_lr", "dm_t_min", "dm_t_max", "dm_fake_updates", "dm_batch_size", "dm_noise")


def x0_estimate(unet, x_t, t, abar, amp, device) -> torch.Tensor:
    """An epsilon-predicting UNet's x0 estimate of x_t, in fp32: (x_t - sqrt(1 - abar) eps) / sqrt(abar)."""
    with runtime.autocast(amp, device):
        eps = unet(x_t, t).sample
    return (x_t - (1 - abar).sqrt() * eps.float()) / abar.sqrt()


def matching_direction(x, x0_real, x0_fake) -> torch.Tensor:
    """DMD's per-image step g = (x0_fake - x0_real) / mean |x - x0_real|: the normaliser makes its size
    comparable across noise levels, where the x0 estimates of the noisiest images are far from x."""
    scale = (x - x0_real).abs().mean(dim=tuple(range(1, x.dim())), keepdim=True)
    return torch.nan_to_num((x0_fake - x0_real) / scale.clamp_min(1e-8))


def matching_loss(x, direction) -> torch.Tensor:
    """0.5 MSE(x, sg(x - g)): a loss whose gradient with respect to x is g / numel."""
    return 0.5 * F.mse_loss(x.float(), (x - direction).detach().float())


class DistributionMatchingTerm:
    """What a student trainer adds when ``lambda_dm`` is positive: ``student_loss`` in the step's loss,
    ``after_step`` (the fake denoiser's update on the step's detached images), ``state_dict`` in the checkpoint."""

    def __init__(self, cfg, teacher_unet, alphas_cumprod, device, amp):
        if teacher_unet.config.get("class_embed_type") is not None or teacher_unet.class_embedding is not None:
            raise UserError("distribution matching queries an unconditional teacher, and this one is class-"
                            "conditional; set lambda_dm=0")
        self.cfg, self.device, self.amp = cfg, device, amp
        self.real = copy.deepcopy(teacher_unet).requires_grad_(False).eval().to(device)
        self.fake = copy.deepcopy(teacher_unet).requires_grad_(True).eval().to(device)
        self.opt = torch.optim.AdamW(self.fake.parameters(), lr=cfg["dm_lr"], weight_decay=0.0)
        self.alphas_cumprod = alphas_cumprod.float().to(device)
        last = len(alphas_cumprod) - 1
        self.t_range = (round(cfg["dm_t_min"] * last), round(cfg["dm_t_max"] * last))
        if self.t_range[0] > self.t_range[1]:
            raise UserError(f"dm_t_min={cfg['dm_t_min']:g} is above dm_t_max={cfg['dm_t_max']:g}; "
                            f"set dm_t_min below dm_t_max")
        if cfg["dm_noise"] == "fresh" and cfg["dm_batch_size"] == 0:
            raise UserError("dm_noise=fresh draws dm_batch_size new x_T per step, and dm_batch_size is 0; set it "
                            "(e.g. dm_batch_size=16)")
        self._pending = None

    @classmethod
    def from_config(cls, cfg, teacher_unet, alphas_cumprod, device, amp):
        """The term the config asks for, or None when ``lambda_dm`` is 0."""
        return cls(cfg, teacher_unet, alphas_cumprod, device, amp) if cfg["lambda_dm"] > 0 else None

    def _generator(self, step: int, stream: int) -> torch.Generator:
        return step_generator(self.cfg["seed"] + 7919 * distributed.rank(), step, stream)

    def _noise_levels(self, count: int, g) -> torch.Tensor:
        return torch.randint(self.t_range[0], self.t_range[1] + 1, (count,), generator=g).to(self.device)

    def _noised(self, x, t, g):
        eps = torch.randn(x.shape, generator=g).to(self.device)
        abar = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        return abar.sqrt() * x + (1 - abar).sqrt() * eps, eps, abar

    def fresh_noise(self, x_T, step: int) -> torch.Tensor:
        """``x_T`` followed, with ``dm_noise=fresh``, by this process's share of ``dm_batch_size`` new x_T (rounded to
        float16 as generate rounds the records'). The term then reads only the student's images of those: x_T that no
        teacher pair covers, so it shapes D where regression cannot, beyond the records (docs/design.md §4)."""
        if self.cfg["dm_noise"] != "fresh":
            return x_T
        return with_fresh_x_T(x_T, self._rows(self.cfg["dm_batch_size"]), self._generator(step, 0xF5E5))

    def _rows(self, available: int) -> int:
        """How many of this process's images the term reads: its share of ``dm_batch_size`` (0 = all). Both teacher
        calls and the fake denoiser's update scale with it, so a share of the batch buys most of the term's cost."""
        share = self.cfg["dm_batch_size"] // distributed.world()
        return available if share == 0 else max(1, min(share, available))

    def student_loss(self, images, weight: float, step: int):
        """(weighted loss, {name: scalar tensor}) for the student's images (with their graph); ``weight`` is
        ``lambda_dm`` times the shared ramp."""
        g = self._generator(step, 0xD3D)
        if self.cfg["dm_noise"] == "fresh":  # the images of its own x_T, which come last (fresh_noise)
            x = images[-self._rows(self.cfg["dm_batch_size"]):].float()
        else:
            x = images[:self._rows(len(images))].float()
        t = self._noise_levels(len(x), g)
        x_t, _, abar = self._noised(x.detach(), t, g)
        with torch.no_grad():
            x0_real = x0_estimate(self.real, x_t, t, abar, self.amp, self.device)
            x0_fake = x0_estimate(self.fake, x_t, t, abar, self.amp, self.device)
            direction = matching_direction(x.detach(), x0_real, x0_fake)
        loss = matching_loss(x, direction)
        self._pending = x.detach()
        return weight * loss, {"dm": loss.detach(), "dm_direction_rms": direction.pow(2).mean().sqrt()}

    def after_step(self, step: int) -> dict:
        """``dm_fake_updates`` denoising steps of the fake denoiser on the last batch's student images."""
        if self._pending is None:
            return {}
        x, self._pending = self._pending, None
        g = self._generator(step, 0xFA4E)
        losses = []
        for _ in range(self.cfg["dm_fake_updates"]):
            t = self._noise_levels(len(x), g)
            x_t, eps, _ = self._noised(x, t, g)
            with runtime.autocast(self.amp, self.device):
                pred = self.fake(x_t, t).sample
            loss = F.mse_loss(pred.float(), eps)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            distributed.average_gradients(self.fake)
            self.opt.step()
            losses.append(loss.item())
        return {"loss_fake_denoiser": sum(losses) / len(losses)}

    def describe(self) -> str:
        cfg = self.cfg
        return (f"distribution matching x{cfg['lambda_dm']:g} (a fake denoiser copied from the teacher, "
                f"{sum(p.numel() for p in self.fake.parameters()):,} parameters, lr {cfg['dm_lr']:g}, "
                f"{cfg['dm_fake_updates']} update(s) per step on "
                + (f"{cfg['dm_batch_size']} images" if cfg["dm_batch_size"] else "every image")
                + (" of fresh x_T" if cfg["dm_noise"] == "fresh" else " of the batch")
                + f"; t in {self.t_range[0]}..{self.t_range[1]})")

    def state_dict(self) -> dict:
        return {"fake_denoiser": self.fake.state_dict(), "fake_denoiser_optimizer": self.opt.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.fake.load_state_dict(state["fake_denoiser"])
        self.opt.load_state_dict(state["fake_denoiser_optimizer"])
