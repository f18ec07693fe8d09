"""The distribution-level term of the one-step students (docs/design.md §4, "Beyond regression").

A student trained only to reproduce teacher pairs regresses to their conditional mean and stays
blurry. Beside its regression losses it is therefore also trained against a discriminator, in the
manner of latent adversarial distillation (Sauer et al. 2024, LADD): the discriminator reads the
**frozen teacher UNet's** encoder features of lightly noised images through one small head per level,
real images on one side (the teacher's images of the batch, or the dataset's training split) and the
student's one-step images on the other. The teacher knows the data already, so its features separate
texture from blur after a few hundred steps where a discriminator trained from scratch would need
thousands. A paired feature term (the same features of the student's and the teacher's image of the
same x_T, noised alike) is offered beside it. No network trained on ImageNet appears here.

    t ~ U{0 .. round(adv_t_max (T - 1))},  eps ~ N(0, I)      one draw per row, shared by its real and fake image
    x_t = sqrt(abar_t) x + sqrt(1 - abar_t) eps                F_l(x_t, t): encoder level l of the frozen teacher
    L_disc = mean_l [ mean relu(1 - h_l(F_l(real_t))) + mean relu(1 + h_l(F_l(fake_t))) ]    (hinge)
    L_adv  = -mean_l mean h_l(F_l(fake_t))                                                 (the student's)
    L_feat = mean_l MSE(F_l(fake_t), F_l(teacher_t))                                       (paired)

The heads are the only trainable part (spectral-norm convolutions, Adam with beta1 = 0 as GAN
discriminators usually are); they and their optimizer live in the run's checkpoint, never in the
exported student. Each step's draws come from a generator seeded by (seed, step), so a resumed run
sees the same noise as an uninterrupted one.
"""
import copy

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from ..core import distributed, runtime
from ..core.errors import UserError


# The keys of the term and of the output losses' distance: a run trained with other values is another experiment.
RUN_KEYS = ("loss_metric", "lambda_adv", "lambda_feat", "adv_real", "adv_t_max", "adv_lr", "adv_extra_noise",
            "adv_weighting", "adv_ramp_steps", "feat_metric")


def hinge_discriminator_loss(real_logits: list, fake_logits: list) -> torch.Tensor:
    """mean over levels of mean relu(1 - real) + mean relu(1 + fake)."""
    per_level = [F.relu(1 - r.float()).mean() + F.relu(1 + f.float()).mean() for r, f in zip(real_logits, fake_logits)]
    return torch.stack(per_level).mean()


def generator_loss(fake_logits: list) -> torch.Tensor:
    """The student's adversarial loss: minus the mean logit of its images, averaged over levels."""
    return -torch.stack([f.float().mean() for f in fake_logits]).mean()


def feature_loss(fake_features: list, teacher_features: list, metric: str = "mse") -> torch.Tensor:
    """mean over levels of the elementwise MSE between paired feature maps; with ``metric="normalized"``, of the
    per-position squared distance between channel vectors scaled to unit length (LPIPS's form without its learned
    channel weights): every level then weighs alike, whatever its activations' scale, and only the direction of a
    position's features counts."""
    if metric == "normalized":
        def unit(x):
            x = x.float()
            return x / (x.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
        per_level = [(unit(f) - unit(t)).pow(2).sum(dim=1).mean() for f, t in zip(fake_features, teacher_features)]
        return torch.stack(per_level).mean()
    return torch.stack([F.mse_loss(f.float(), t.float()) for f, t in zip(fake_features, teacher_features)]).mean()


class TeacherEncoder(nn.Module):
    """A frozen copy of a diffusers ``UNet2DModel``'s encoder: [F_l(x_t, t)] for every down block (its
    first ResNet output, at the block's full resolution) and the mid block. The decoder is never run."""

    def __init__(self, unet):
        super().__init__()
        if unet.class_embedding is not None or any(hasattr(b, "skip_conv") for b in unet.down_blocks):
            raise UserError("the adversarial term reads a plain UNet2DModel's encoder, and this teacher is class-"
                            "conditional or has skip-sample blocks; set lambda_adv=0 and lambda_feat=0")
        self.unet = copy.deepcopy(unet).requires_grad_(False).eval()
        size, channels = unet.config.sample_size, unet.config.in_channels
        size = size if isinstance(size, int) else size[0]
        with torch.no_grad():
            levels = self(torch.zeros(1, channels, size, size), torch.zeros(1, dtype=torch.long))
        self.channels = [f.shape[1] for f in levels]
        self.strides = [2 if f.shape[-1] >= size else 1 for f in levels]  # full-resolution levels are read at half

    def train(self, mode: bool = True):
        return super().train(False)  # frozen: its norms and dropout never switch to training behaviour

    def forward(self, x_t, t) -> list:
        unet = self.unet
        emb = unet.time_embedding(unet.time_proj(t).to(x_t.dtype))
        h = unet.conv_in(2 * x_t - 1 if unet.config.center_input_sample else x_t)
        levels = []
        for block in unet.down_blocks:
            h, res = block(hidden_states=h, temb=emb)
            levels.append(res[0])
        levels.append(unet.mid_block(h, emb))
        return levels


HEAD_WIDTH = 64


class Head(nn.Sequential):
    """One level's patch logits: two spectral-norm 3x3 convolutions of ``HEAD_WIDTH`` channels with LeakyReLU, then a
    spectral-norm 1x1 to one logit per position. ``stride`` 2 on a full-resolution level keeps its cost down."""

    def __init__(self, channels: int, stride: int = 1):
        super().__init__(spectral_norm(nn.Conv2d(channels, HEAD_WIDTH, 3, stride=stride, padding=1)), nn.LeakyReLU(0.2),
                         spectral_norm(nn.Conv2d(HEAD_WIDTH, HEAD_WIDTH, 3, padding=1)), nn.LeakyReLU(0.2),
                         spectral_norm(nn.Conv2d(HEAD_WIDTH, 1, 1)))


class Discriminator(nn.Module):
    def __init__(self, channels: list, strides: list):
        super().__init__()
        self.heads = nn.ModuleList(Head(c, s) for c, s in zip(channels, strides))

    def forward(self, levels: list) -> list:
        return [head(f) for head, f in zip(self.heads, levels)]


def step_generator(seed: int, step: int, stream: int = 0xAD7) -> torch.Generator:
    """The generator of one step's draws: a function of (seed, step, stream) alone, so resuming changes nothing."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, step, stream]).generate_state(1)[0]))


def with_fresh_x_T(x_T, count: int, g: torch.Generator) -> torch.Tensor:
    """``x_T`` followed by ``count`` new x_T drawn from ``g``, rounded to float16 as generate rounds the records'."""
    fresh = torch.randn((count, *x_T.shape[1:]), generator=g).half().float()
    return torch.cat([x_T, fresh.to(x_T.device)])


def ramp_share(ramp_steps: int, step: int) -> float:
    """The share of the distribution-level weights at this (0-based) step: a student started from the teacher's
    backbone makes images far from the teacher's for its first steps, and a feature loss at full weight then holds it
    in a degenerate state the regression never leaves (docs/design.md §4); ``adv_ramp_steps`` lets the regression
    lead first."""
    return 1.0 if ramp_steps == 0 else min(1.0, (step + 1) / ramp_steps)


def adaptive_weight(regression, adversarial, output_params, cap: float = 1e4) -> torch.Tensor:
    """||grad_W regression|| / ||grad_W adversarial|| over the student's output layers W, detached (Esser et al.
    2021, VQGAN, eq. 7): the adversarial gradient then keeps a fixed share of the regression's at the output,
    however far the regression loss falls over the schedule."""
    def norm(loss):
        grads = torch.autograd.grad(loss, output_params, retain_graph=True, allow_unused=True)
        return torch.sqrt(sum(g.float().pow(2).sum() for g in grads if g is not None))
    return (norm(regression) / (norm(adversarial) + 1e-8)).clamp(max=cap).detach()


def _mean_logit(logits: list) -> float:
    return float(torch.stack([x.detach().float().mean() for x in logits]).mean())


class AdversarialTerm:
    """What a student trainer adds when ``lambda_adv`` or ``lambda_feat`` is positive: ``student_loss`` in
    the step's loss, ``update_discriminator`` after the student's update, ``state_dict`` in the checkpoint.

    ``real_images`` (uint8 [N, C, H, W]) makes the dataset the real side; None takes the teacher's images
    of the batch. The discriminator learns from the features the student's loss computed (detached), so
    its update costs its heads alone, not another teacher call."""

    def __init__(self, cfg, teacher_unet, alphas_cumprod, device, amp, real_images=None):
        self.cfg, self.device, self.amp = cfg, device, amp
        self.encoder = TeacherEncoder(teacher_unet).to(device)
        self.alphas_cumprod = alphas_cumprod.float().to(device)
        self.t_max = round(cfg["adv_t_max"] * (len(alphas_cumprod) - 1))
        self.real_images = real_images
        self.discriminator, self.opt, self._pending = None, None, None
        if cfg["lambda_adv"] > 0:
            with torch.random.fork_rng(devices=[]):  # the heads start alike on every rank and in every rerun
                torch.manual_seed(cfg["seed"])
                self.discriminator = Discriminator(self.encoder.channels, self.encoder.strides).to(device)
            self.opt = torch.optim.Adam(self.discriminator.parameters(), lr=cfg["adv_lr"], betas=(0.0, 0.99))

    @classmethod
    def from_config(cls, cfg, teacher_unet, alphas_cumprod, device, amp):
        """The term the config asks for, or None when both of its weights are 0."""
        if cfg["lambda_adv"] == 0 and cfg["lambda_feat"] == 0:
            return None
        real = None
        if cfg["lambda_adv"] > 0 and cfg["adv_real"] == "dataset":
            from ..data.datasets import load_images
            real = torch.from_numpy(load_images(cfg, "train"))  # the training split only: the test split is eval's
        return cls(cfg, teacher_unet, alphas_cumprod, device, amp, real)

    def extra_noise(self, x_T, step: int) -> torch.Tensor:
        """``x_T`` followed by ``adv_extra_noise`` fresh x_T (this process's share), rounded to float16 as generate
        rounds the records' x_T. They have no teacher image: only the distribution-level term sees the student's
        images of them, so it shapes the student on noise beyond the teacher data (the held-out records' x_T are
        drawn from other streams, so never among them)."""
        count = self.cfg["adv_extra_noise"] // distributed.world()
        if count == 0 or self.discriminator is None:  # the paired feature loss has no use for unpaired noise
            return x_T
        return with_fresh_x_T(x_T, count, step_generator(self.cfg["seed"] + 7919 * distributed.rank(), step,
                                                         stream=0xF2E5))

    def _draws(self, images, step):
        g = step_generator(self.cfg["seed"] + 7919 * distributed.rank(), step)
        t = torch.randint(0, self.t_max + 1, (len(images),), generator=g)
        eps = torch.randn(images.shape, generator=g)
        real = None
        if self.real_images is not None:
            rows = torch.randint(len(self.real_images), (len(images),), generator=g)
            real = self.real_images[rows].float().div(127.5).sub(1.0)
        return t.to(self.device), eps.to(self.device), real

    def _features(self, images, t, eps, grad: bool):
        abar = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        with torch.set_grad_enabled(grad), runtime.autocast(self.amp, self.device):
            return self.encoder(abar.sqrt() * images + (1 - abar).sqrt() * eps, t)

    def ramp(self, step: int) -> float:
        return ramp_share(self.cfg["adv_ramp_steps"], step)

    def student_loss(self, images, teacher_images, step: int, regression=None, output_params=()):
        """(weighted total, {name: scalar tensor}) for the student's images (with their graph) of one batch and of
        its extra noise (``extra_noise``), and the teacher's images of the batch (its first rows). With
        ``adv_weighting=adaptive`` the adversarial weight is ``lambda_adv · adaptive_weight`` against the
        ``regression`` loss on ``output_params``."""
        cfg, n = self.cfg, len(teacher_images)
        ramp = self.ramp(step)
        t, eps, dataset_real = self._draws(images, step)
        fake = self._features(images, t, eps, grad=True)
        teacher = None
        if cfg["lambda_feat"] > 0 or (self.discriminator is not None and dataset_real is None):
            teacher = self._features(teacher_images, t[:n], eps[:n], grad=False)
        parts, total = {}, 0.0
        if cfg["lambda_feat"] > 0:
            parts["feat"] = feature_loss([f[:n] for f in fake], teacher, cfg["feat_metric"])
            total = total + ramp * cfg["lambda_feat"] * parts["feat"]
        if self.discriminator is not None:
            real = teacher if dataset_real is None else self._features(dataset_real.to(self.device), t, eps, False)
            self.discriminator.requires_grad_(False)  # the student's loss trains the student only
            with runtime.autocast(self.amp, self.device):
                parts["adv"] = generator_loss(self.discriminator(fake))
            self.discriminator.requires_grad_(True)
            weight = ramp * cfg["lambda_adv"]
            if cfg["adv_weighting"] == "adaptive":
                parts["adv_weight"] = weight = weight * adaptive_weight(regression, parts["adv"], list(output_params))
            total = total + weight * parts["adv"]
            self._pending = ([f.detach() for f in fake], real)
        return total, parts

    def update_discriminator(self) -> dict:
        """One hinge step of the heads on the last batch's real and (detached) student features; what to log."""
        if self._pending is None:
            return {}
        fake, real = self._pending
        self._pending = None
        with runtime.autocast(self.amp, self.device):
            real_logits, fake_logits = self.discriminator(real), self.discriminator(fake)
        loss = hinge_discriminator_loss(real_logits, fake_logits)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        distributed.average_gradients(self.discriminator)
        self.opt.step()
        return {"loss_disc": loss.item(), "disc_real_logit": _mean_logit(real_logits),
                "disc_fake_logit": _mean_logit(fake_logits)}

    def describe(self) -> str:
        """For the stage's first line: which terms are on, with what."""
        cfg, terms = self.cfg, []
        if cfg["lambda_feat"] > 0:
            terms.append(f"teacher-feature loss ({cfg['feat_metric']}) x{cfg['lambda_feat']:g}")
        if self.discriminator is not None:
            terms.append(f"adversarial loss x{cfg['lambda_adv']:g} (real = {cfg['adv_real']}, discriminator heads "
                         f"{sum(p.numel() for p in self.discriminator.parameters()):,} parameters, lr "
                         f"{cfg['adv_lr']:g}"
                         + (f", {cfg['adv_extra_noise']} extra x_T per step" if cfg["adv_extra_noise"] else "") + ")")
        ramp = f", ramped up over the first {cfg['adv_ramp_steps']} steps" if cfg["adv_ramp_steps"] else ""
        return f"{' and '.join(terms)} on the frozen teacher's encoder features at t <= {self.t_max}{ramp}"

    def state_dict(self) -> dict:
        if self.discriminator is None:
            return {}
        return {"adversary_heads": self.discriminator.state_dict(), "adversary_optimizer": self.opt.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if self.discriminator is not None:
            self.discriminator.load_state_dict(state["adversary_heads"])
            self.opt.load_state_dict(state["adversary_optimizer"])
