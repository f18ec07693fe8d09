"""1-bit weights and activations (docs/design.md §4).

Each binarizer is a tiny ``torch.autograd.Function`` whose docstring states its forward q(x) and its
pseudo-gradient dq/dx side by side, with the paper it comes from; ``BINARIZERS`` names them, so a layer
is given a binarizer by name (``"scaled_sign"``, ``"lmb2"``) rather than by branches on a basis count.
sign never returns 0: sign(0) = +1. A weight binarizer has ``bases`` per-channel scales (started by
``first_scales``) and says which sign planes the packed file stores (``sign_planes``); ``from_planes``
rebuilds its binary weight from them with the same operations as its forward, so reload is bit-exact.

Scales are per output channel, start at mean|W| (and mean|R|) on the first binarized forward, are
learned, and are excluded from weight decay; the "started" flag is a buffer, so a reloaded checkpoint
keeps its learned scales.
"""
import torch

from ..core.errors import UserError


def _sign(x):
    return torch.where(x >= 0, torch.ones_like(x), -torch.ones_like(x))


def _per_channel(v, like):
    """[Cout] -> broadcastable against a weight [Cout, ...]."""
    return v.view(-1, *([1] * (like.dim() - 1)))


def _sum_but_first(x):
    return x.sum(dim=tuple(range(1, x.dim())))


class SignSTE(torch.autograd.Function):
    """Sign with the clipped straight-through estimator (Binarized Neural Networks, Hubara et al. 2016).

    q(x) = sign(x) (sign(0) = +1);  dq/dx = 1[|x| <= 1].
    """

    bases = 0  # not a weight binarizer: no scales, no stored sign planes

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return _sign(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * (x.abs() <= 1).to(grad.dtype)


class ApproxSign(SignSTE):
    """Sign with a piecewise-linear pseudo-gradient, for activations (Bi-Real Net, Liu et al. 2018,
    ApproxSign).

    q(x) = sign(x);  dq/dx = 2 + 2x on [-1, 0), 2 - 2x on [0, 1), 0 elsewhere.
    """

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        slope = torch.where(x < 0, 2 + 2 * x, 2 - 2 * x) * (x.abs() < 1).to(grad.dtype)
        return grad * slope


class ScaledSign(torch.autograd.Function):
    """One basis with a learned per-output-channel scale (XNOR-Net, Rastegari et al. 2016; learned
    scale as in BinaryDM, Zheng et al. 2024).

    q(W) = alpha_o * sign(W);  dq/dW = alpha_o * 1[|W| <= 1] (clipped STE),  dq/dalpha_o = sign(W).
    alpha_o starts at mean|W_o|.
    """

    bases = 1
    label = "one basis"

    @staticmethod
    def forward(ctx, w, alpha):
        ctx.save_for_backward(w, alpha)
        return _per_channel(alpha, w) * _sign(w)

    @staticmethod
    def backward(ctx, grad):
        w, alpha = ctx.saved_tensors
        grad_w = grad * _per_channel(alpha, w) * (w.abs() <= 1).to(grad.dtype)
        return grad_w, _sum_but_first(grad * _sign(w))

    @staticmethod
    def sign_planes(w, alpha):
        """The +-1 planes the packed file stores: sign(W)."""
        return [_sign(w)]


class TwoBasisSign(torch.autograd.Function):
    """Two bases: the sign of W plus the sign of its residual (BinaryDM, Zheng et al. 2024, LMB).

    q(W) = s1 * sign(W) + s2 * sign(R),  R = W - s1 * sign(W),  with m1 = 1[|W| <= 1], m2 = 1[|R| <= 1]:
    dq/dW = s1 * m1 + s2 * m2 * (1 - s1 * m1),  dq/ds1 = sign(W) * (1 - s2 * m2),  dq/ds2 = sign(R).
    s1 starts at mean|W|, s2 at mean|R|; with s2 = 0 it is ``ScaledSign``.
    """

    bases = 2
    label = "two bases (LMB)"

    @staticmethod
    def forward(ctx, w, s1, s2):
        sign_w = _sign(w)
        r = w - _per_channel(s1, w) * sign_w
        ctx.save_for_backward(w, r, s1, s2)
        return _per_channel(s1, w) * sign_w + _per_channel(s2, w) * _sign(r)

    @staticmethod
    def backward(ctx, grad):
        w, r, s1, s2 = ctx.saved_tensors
        m1 = (w.abs() <= 1).to(grad.dtype)
        m2 = (r.abs() <= 1).to(grad.dtype)
        a, b = _per_channel(s1, w), _per_channel(s2, w)
        grad_w = grad * (a * m1 + b * m2 * (1 - a * m1))
        grad_s1 = _sum_but_first(grad * _sign(w) * (1 - b * m2))
        return grad_w, grad_s1, _sum_but_first(grad * _sign(r))

    @staticmethod
    def sign_planes(w, s1, s2):
        """The +-1 planes the packed file stores: sign(W), then sign(R) (R depends on s1)."""
        sign_w = _sign(w)
        return [sign_w, _sign(w - _per_channel(s1, w) * sign_w)]


BINARIZERS = {"ste_sign": SignSTE, "approx_sign": ApproxSign, "scaled_sign": ScaledSign, "lmb2": TwoBasisSign}
WEIGHT_BINARIZERS = tuple(name for name, fn in BINARIZERS.items() if fn.bases > 0)
ACTIVATION_BINARIZER = "approx_sign"  # W1A1, after BiDM, which takes Bi-Real's backward


def get(name: str):
    """The binarizer registered under ``name``."""
    if name not in BINARIZERS:
        raise UserError(f"unknown binarizer '{name}'; choose one of {', '.join(BINARIZERS)}")
    return BINARIZERS[name]


def from_planes(planes, scales):
    """sum_i scale_i * plane_i per output channel: the binary weight rebuilt from stored signs, with the
    same operations, in the same order, as the binarizers' forward (so the outputs are bit-identical)."""
    out = _per_channel(scales[0], planes[0]) * planes[0]
    for plane, scale in zip(planes[1:], scales[1:]):
        out = out + _per_channel(scale, plane) * plane
    return out


def first_scales(w, centre: bool):
    """(s1, s2) per output channel from a full-precision weight: mean|W| and mean|W - s1 sign(W)|."""
    w = w - w.mean(dim=tuple(range(1, w.dim())), keepdim=True) if centre else w
    s1 = w.abs().mean(dim=tuple(range(1, w.dim())))
    s2 = (w - _per_channel(s1, w) * _sign(w)).abs().mean(dim=tuple(range(1, w.dim())))
    return s1, s2


class _BinaryWeights:
    """What binary convolutions and linears share: real-valued weight -> binary weight, scales, W1A1 input."""

    def _setup_binary(self, binarizer: str, centre: bool, w1a1: bool):
        fn = get(binarizer)
        if fn.bases == 0:
            raise UserError(f"'{binarizer}' binarizes activations, not weights; choose one of "
                            f"{', '.join(WEIGHT_BINARIZERS)}")
        out = self.weight.shape[0]
        self.binarizer_name, self.binarizer, self.centre, self.w1a1 = binarizer, fn, centre, w1a1
        # scale1, scale2, ...: the names (and so the packed file's value order) do not depend on the binarizer
        for i in range(1, fn.bases + 1):
            setattr(self, f"scale{i}", torch.nn.Parameter(torch.zeros(out)))
        # persistent: a reloaded layer keeps its learned scales and its progressive state
        self.register_buffer("started", torch.tensor(False))
        self.register_buffer("active", torch.tensor(True))
        # Python copies of the two flags: reading a CUDA buffer in every forward would wait for the GPU
        self.is_started, self.is_active = False, True
        self.register_load_state_dict_post_hook(lambda module, keys: module._read_flags())
        self.frozen = False  # freeze_signs: the layer then holds exported signs, not real-valued weights
        if w1a1:
            self.threshold = torch.nn.Parameter(torch.zeros(self.weight.shape[1]))

    @property
    def basis(self) -> int:
        """How many sign planes (and scales) the layer has."""
        return self.binarizer.bases

    def scales(self):
        return [getattr(self, f"scale{i}") for i in range(1, self.basis + 1)]

    def _read_flags(self):
        self.is_started, self.is_active = bool(self.started), bool(self.active)

    def set_active(self, on: bool):
        """Progressive binarization: a layer that is not active runs in full precision."""
        self.active.fill_(on)
        self.is_active = on

    def _mark_started(self):
        self.started.fill_(True)
        self.is_started = True

    def real_weight(self):
        w = self.weight
        return w - w.mean(dim=tuple(range(1, w.dim())), keepdim=True) if self.centre else w

    def freeze_signs(self, *planes: torch.Tensor):
        """Hold exported sign planes (+-1) instead of real-valued weights: the binary weight is then rebuilt
        with the same operations as in training, so the outputs are bit-identical."""
        if len(planes) != self.basis:
            raise ValueError(f"{self.binarizer_name} needs {self.basis} sign planes, got {len(planes)}")
        self.weight.requires_grad_(False)
        self.weight.data = planes[0].to(self.weight.dtype)
        for i, plane in enumerate(planes[1:], start=2):  # buffers, so that .to(device) moves them
            self.register_buffer(f"frozen_sign{i}", plane.to(self.weight.dtype), persistent=False)
        self.frozen = True
        self.centre = False
        self._mark_started()

    def _frozen_planes(self):
        return [self.weight] + [getattr(self, f"frozen_sign{i}") for i in range(2, self.basis + 1)]

    def binary_weight(self):
        if self.frozen:
            w = self.weight
            return from_planes(self._frozen_planes(), [s.to(w.dtype) for s in self.scales()])
        if not self.is_started:
            with torch.no_grad():
                for scale, start in zip(self.scales(), first_scales(self.weight.detach().float(), self.centre)):
                    scale.copy_(start)
                self._mark_started()
        w = self.real_weight()
        return self.binarizer.apply(w, *(s.to(w.dtype) for s in self.scales()))

    def signs(self):
        """The sign planes of the current binary weight as bool tensors (True = +1), as exported."""
        if self.frozen:
            return [plane > 0 for plane in self._frozen_planes()]
        w = self.real_weight().detach()
        return [plane > 0 for plane in self.binarizer.sign_planes(w, *(s.detach().to(w.dtype) for s in self.scales()))]

    def binary_input(self, x, channel_dim):
        shape = [1] * x.dim()
        shape[channel_dim] = -1
        return BINARIZERS[ACTIVATION_BINARIZER].apply(x + self.threshold.view(shape).to(x.dtype))


class BinaryConv2d(torch.nn.Conv2d, _BinaryWeights):
    """A convolution with 1-bit weights (and, with ``w1a1``, BiDM's binary activations: a learnable
    per-input-channel threshold, a dynamic scale K = k * mean_c|x| with a learnable kh x kw filter k
    started as the box filter, and a real-valued shortcut with a learnable scale started at 0)."""

    @classmethod
    def from_conv(cls, conv: torch.nn.Conv2d, binarizer="scaled_sign", centre=False, w1a1=False):
        layer = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                    conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode)
        layer.load_state_dict(conv.state_dict())
        layer._setup_binary(binarizer, centre, w1a1)
        if w1a1:
            kh, kw = layer.kernel_size
            layer.k = torch.nn.Parameter(torch.full((1, 1, kh, kw), 1.0 / (kh * kw)))
            layer.shortcut_scale = torch.nn.Parameter(torch.zeros(()))
            same = conv.in_channels == conv.out_channels
            layer.shortcut = None if same else torch.nn.Conv2d(conv.in_channels, conv.out_channels, 1, conv.stride,
                                                               bias=False)
        return layer.to(conv.weight.device)

    def forward(self, x):
        if not self.is_active:
            return super().forward(x)
        w = self.binary_weight()
        if not self.w1a1:
            return self._conv_forward(x, w, self.bias)
        y = self._conv_forward(self.binary_input(x, 1), w, None)
        magnitude = torch.nn.functional.conv2d(x.abs().mean(dim=1, keepdim=True), self.k.to(x.dtype), None,
                                               self.stride, self.padding, self.dilation)
        y = y * magnitude
        if self.bias is not None:
            y = y + self.bias.view(1, -1, 1, 1)
        return y + self.shortcut_scale * self._shortcut(x, y.shape[-2:])

    def _shortcut(self, x, size):
        if self.shortcut is not None:
            return self.shortcut(x)
        return x if x.shape[-2:] == size else torch.nn.functional.adaptive_avg_pool2d(x, size)


class BinaryLinear(torch.nn.Linear, _BinaryWeights):
    """A linear layer with 1-bit weights (and, with ``w1a1``, sign activations with a learnable threshold)."""

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, binarizer="scaled_sign", centre=False, w1a1=False):
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None)
        layer.load_state_dict(linear.state_dict())
        layer._setup_binary(binarizer, centre, w1a1)
        return layer.to(linear.weight.device)

    def forward(self, x):
        if not self.is_active:
            return super().forward(x)
        return torch.nn.functional.linear(self.binary_input(x, -1) if self.w1a1 else x, self.binary_weight(), self.bias)


def scale_parameters(model):
    """Parameters that must not be decayed: binarizer scales, thresholds, k filters, shortcut scales."""
    names = ("scale1", "scale2", "threshold", "k", "shortcut_scale")
    return [p for m in model.modules() if isinstance(m, _BinaryWeights)
            for n, p in m.named_parameters(recurse=False) if n in names]
