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


class ApproxSign(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return _sign(x)

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
