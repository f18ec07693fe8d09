"""1-bit weights and activations (DESIGN §4, research/binarization.md §1, §2, §5).

Each binarizer is a ``torch.autograd.Function`` whose forward and backward sit side by side:

* ``SignSTE``: sign with sign(0) = +1; backward is the clipped straight-through estimator
  dL/dx = dL/dy * 1[|x| <= 1].
* ``ScaledSign`` (one basis, XNOR-Net / BinaryDM): W_b = alpha_o * sign(W) per output channel;
  dW = g * alpha * 1[|W| <= 1], dalpha = sum(g * sign(W)).
* ``TwoBasisSign`` (LMB of BinaryDM): W_b = s1 * sign(W) + s2 * sign(R), R = W - s1 * sign(W), with
  m1 = 1[|W| <= 1], m2 = 1[|R| <= 1]:
  dW = g * (s1 * m1 + s2 * m2 * (1 - s1 * m1)), ds1 = sum(g * sign(W) * (1 - s2 * m2)), ds2 = sum(g * sign(R)).
  With s2 = 0 it is ``ScaledSign``.
* ``ApproxSign`` (Bi-Real, for activations): forward sign, backward 2 + 2x on [-1, 0), 2 - 2x on
  [0, 1), 0 elsewhere.

Scales are per output channel, start at mean|W| (and mean|R|) on the first binarized forward, are
learned, and are excluded from weight decay; the "started" flag is a buffer, so a reloaded checkpoint
keeps its learned scales.
"""
import torch


def _sign(x):
    return torch.where(x >= 0, torch.ones_like(x), -torch.ones_like(x))


def _per_channel(v, like):
    """[Cout] -> broadcastable against a weight [Cout, ...]."""
    return v.view(-1, *([1] * (like.dim() - 1)))


def _sum_but_first(x):
    return x.sum(dim=tuple(range(1, x.dim())))


class SignSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return _sign(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * (x.abs() <= 1).to(grad.dtype)


class ScaledSign(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, alpha):
        ctx.save_for_backward(w, alpha)
        return _per_channel(alpha, w) * _sign(w)

    @staticmethod
    def backward(ctx, grad):
        w, alpha = ctx.saved_tensors
        grad_w = grad * _per_channel(alpha, w) * (w.abs() <= 1).to(grad.dtype)
        return grad_w, _sum_but_first(grad * _sign(w))


class TwoBasisSign(torch.autograd.Function):
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


class ApproxSign(SignSTE):
    """SignSTE's forward with Bi-Real's piecewise-linear backward."""

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        slope = torch.where(x < 0, 2 + 2 * x, 2 - 2 * x) * (x.abs() < 1).to(grad.dtype)
        return grad * slope


def first_scales(w, centre: bool):
    """(s1, s2) per output channel from a full-precision weight: mean|W| and mean|W - s1 sign(W)|."""
    w = w - w.mean(dim=tuple(range(1, w.dim())), keepdim=True) if centre else w
    s1 = w.abs().mean(dim=tuple(range(1, w.dim())))
    s2 = (w - _per_channel(s1, w) * _sign(w)).abs().mean(dim=tuple(range(1, w.dim())))
    return s1, s2


class _BinaryWeights:
    """What binary convolutions and linears share: latent weight -> binary weight, scales, W1A1 input."""

    def _setup_binary(self, basis: int, centre: bool, w1a1: bool):
        out = self.weight.shape[0]
        self.basis, self.centre, self.w1a1 = basis, centre, w1a1
        self.scale1 = torch.nn.Parameter(torch.zeros(out))
        self.scale2 = torch.nn.Parameter(torch.zeros(out)) if basis == 2 else None
        # persistent: a reloaded layer keeps its learned scales and its progressive state
        self.register_buffer("started", torch.tensor(False))
        self.register_buffer("active", torch.tensor(True))
        # Python copies of the two flags: reading a CUDA buffer in every forward would wait for the GPU
        self.is_started, self.is_active = False, True
        self.register_load_state_dict_post_hook(lambda module, keys: module._read_flags())
        self.frozen = False  # freeze_signs: the layer then holds exported signs, not latent weights
        self.register_buffer("frozen_sign2", None, persistent=False)
        if w1a1:
            self.threshold = torch.nn.Parameter(torch.zeros(self.weight.shape[1]))

    def _read_flags(self):
        self.is_started, self.is_active = bool(self.started), bool(self.active)

    def set_active(self, on: bool):
        """Progressive binarization: a layer that is not active runs in full precision."""
        self.active.fill_(on)
        self.is_active = on

    def _mark_started(self):
        self.started.fill_(True)
        self.is_started = True

    def latent(self):
        w = self.weight
        return w - w.mean(dim=tuple(range(1, w.dim())), keepdim=True) if self.centre else w

    def freeze_signs(self, sign1: torch.Tensor, sign2=None):
        """Hold exported signs (+-1) instead of latent weights: the binary weight is then rebuilt with
        the same operations as in training, so the outputs are bit-identical."""
        self.weight.requires_grad_(False)
        self.weight.data = sign1.to(self.weight.dtype)
        self.frozen = True
        self.frozen_sign2 = None if sign2 is None else sign2.to(self.weight.dtype)
        self.centre = False
        self._mark_started()

    def binary_weight(self):
        if self.frozen:
            return self._frozen_weight()
        if not self.is_started:
            with torch.no_grad():
                s1, s2 = first_scales(self.weight.detach().float(), self.centre)
                self.scale1.copy_(s1)
                if self.scale2 is not None:
                    self.scale2.copy_(s2)
                self._mark_started()
        w = self.latent()
        if self.basis == 2:
            return TwoBasisSign.apply(w, self.scale1.to(w.dtype), self.scale2.to(w.dtype))
        return ScaledSign.apply(w, self.scale1.to(w.dtype))

    def _frozen_weight(self):
        w = self.weight
        out = _per_channel(self.scale1.to(w.dtype), w) * w
        if self.basis == 2:
            out = out + _per_channel(self.scale2.to(w.dtype), w) * self.frozen_sign2
        return out

    def signs(self):
        """(sign1, sign2 or None) as bool tensors (True = +1) of the current binary weight."""
        if self.frozen:
            return self.weight > 0, None if self.frozen_sign2 is None else self.frozen_sign2 > 0
        w = self.latent().detach()
        sign_w = _sign(w)
        if self.basis == 1:
            return sign_w > 0, None
        r = w - _per_channel(self.scale1.detach().to(w.dtype), w) * sign_w
        return sign_w > 0, _sign(r) > 0

    def binary_input(self, x, channel_dim):
        shape = [1] * x.dim()
        shape[channel_dim] = -1
        return ApproxSign.apply(x + self.threshold.view(shape).to(x.dtype))


class BinaryConv2d(torch.nn.Conv2d, _BinaryWeights):
    """A convolution with 1-bit weights (and, with ``w1a1``, BiDM's binary activations: a learnable
    per-input-channel threshold, a dynamic scale K = k * mean_c|x| with a learnable kh x kw filter k
    started as the box filter, and a real-valued shortcut with a learnable scale started at 0)."""

    @classmethod
    def from_conv(cls, conv: torch.nn.Conv2d, basis=1, centre=False, w1a1=False):
        layer = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                    conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode)
        layer.load_state_dict(conv.state_dict())
        layer._setup_binary(basis, centre, w1a1)
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
    def from_linear(cls, linear: torch.nn.Linear, basis=1, centre=False, w1a1=False):
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None)
        layer.load_state_dict(linear.state_dict())
        layer._setup_binary(basis, centre, w1a1)
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
