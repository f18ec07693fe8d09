"""Binarizers: forward values and gradients against a NumPy statement of each STE."""
import re

import numpy as np
import pytest
import torch

from pipeline.core.errors import UserError
from pipeline.students import binary

from conftest import small_student


def _np_sign(x):
    return np.where(x >= 0, 1.0, -1.0)


def _weights(seed=0):
    rng = np.random.default_rng(seed)
    w = rng.normal(0, 0.7, size=(4, 3, 3, 3))
    w[0, 0, 0, 0] = 0.0   # sign(0) = +1
    w[1, 0, 0, 0] = 1.5   # outside the clip range: no gradient
    return w


def _reference(name, w, s1, s2, g):
    """(forward, grad_w, grad_s1, grad_s2) written out with NumPy, for every registered binarizer."""
    a, b = s1[:, None, None, None], s2[:, None, None, None]
    m1 = (np.abs(w) <= 1).astype(float)
    if name == "ste_sign":
        return _np_sign(w), g * m1, None, None
    if name == "approx_sign":  # Bi-Real's piecewise-linear derivative of sign
        slope = np.where(w < 0, 2 + 2 * w, 2 - 2 * w) * (np.abs(w) < 1)
        return _np_sign(w), g * slope, None, None
    if name == "scaled_sign":
        return a * _np_sign(w), g * a * m1, (g * _np_sign(w)).sum((1, 2, 3)), None
    if name == "lmb2":
        r = w - a * _np_sign(w)
        m2 = (np.abs(r) <= 1).astype(float)
        return (a * _np_sign(w) + b * _np_sign(r), g * (a * m1 + b * m2 * (1 - a * m1)),
                (g * _np_sign(w) * (1 - b * m2)).sum((1, 2, 3)), (g * _np_sign(r)).sum((1, 2, 3)))
    raise KeyError(f"no NumPy reference for the binarizer {name}: write one")


@pytest.mark.parametrize("name", sorted(binary.BINARIZERS))
def test_binarizer_forward_and_gradient_match_numpy(name):
    fn = binary.get(name)
    w = _weights()
    s1, s2 = np.array([0.5, 0.3, 0.8, 0.1]), np.array([0.2, 0.05, 0.4, 0.0])
    g = np.random.default_rng(1).normal(size=w.shape)
    tw, ts1, ts2 = (torch.tensor(v, requires_grad=True) for v in (w, s1, s2))
    out = fn.apply(tw, *(ts1, ts2)[:fn.bases])
    out.backward(torch.tensor(g))
    forward, grad_w, grad_s1, grad_s2 = _reference(name, w, s1, s2, g)
    np.testing.assert_allclose(out.detach().numpy(), forward)
    np.testing.assert_allclose(tw.grad.numpy(), grad_w)
    for scale, expected in zip((ts1, ts2), (grad_s1, grad_s2)):
        if expected is None:
            assert scale.grad is None
        else:
            np.testing.assert_allclose(scale.grad.numpy(), expected)


@pytest.mark.parametrize("name", sorted(binary.BINARIZERS))
def test_every_binarizer_states_its_formula_and_paper(name):
    doc = binary.BINARIZERS[name].__doc__ or ""
    assert "q(" in doc and "dq/d" in doc, doc  # forward and pseudo-gradient side by side
    assert re.search(r"et al\. (19|20)\d\d", doc), doc


@pytest.mark.parametrize("name", binary.WEIGHT_BINARIZERS)
def test_stored_sign_planes_rebuild_the_binary_weight_exactly(name):
    """What the packed file stores (sign planes and scales) gives the very weight training used."""
    fn = binary.get(name)
    w = torch.tensor(_weights(4), dtype=torch.float32)
    scales = [torch.tensor([0.5, 0.3, 0.8, 0.1]), torch.tensor([0.2, 0.05, 0.4, 0.3])][:fn.bases]
    planes = fn.sign_planes(w, *scales)
    assert len(planes) == fn.bases and all(set(p.unique().tolist()) <= {-1.0, 1.0} for p in planes)
    assert torch.equal(binary.from_planes(planes, scales), fn.apply(w, *scales))


def test_binarizers_are_picked_by_name():
    with pytest.raises(UserError, match="unknown binarizer 'lmb3'.*lmb2"):
        binary.get("lmb3")
    conv = torch.nn.Conv2d(2, 4, 3)
    assert binary.BinaryConv2d.from_conv(conv, "lmb2").basis == 2
    assert binary.BinaryConv2d.from_conv(conv, "scaled_sign").basis == 1
    with pytest.raises(UserError, match="activations, not weights"):
        binary.BinaryConv2d.from_conv(conv, "approx_sign")


def test_approx_sign_has_the_bi_real_slope():
    x = torch.tensor([-1.5, -0.5, 0.0, 0.25, 0.9, 2.0], dtype=torch.float64, requires_grad=True)
    y = binary.ApproxSign.apply(x)
    y.sum().backward()
    assert y.tolist() == [-1, -1, 1, 1, 1, 1]
    np.testing.assert_allclose(x.grad.numpy(), [0.0, 1.0, 2.0, 1.5, 0.2, 0.0])


def test_two_basis_with_a_zero_second_scale_is_the_one_basis_binarizer():
    w = torch.tensor(_weights(2), requires_grad=True)
    s1 = torch.tensor([0.5, 0.3, 0.8, 0.1], dtype=torch.float64, requires_grad=True)
    g = torch.randn(w.shape, dtype=torch.float64)
    two = binary.TwoBasisSign.apply(w, s1, torch.zeros(4, dtype=torch.float64))
    two.backward(g)
    grads_two = (w.grad.clone(), s1.grad.clone())
    w.grad, s1.grad = None, None
    one = binary.ScaledSign.apply(w, s1)
    one.backward(g)
    assert torch.equal(two, one)
    assert torch.equal(grads_two[0], w.grad) and torch.equal(grads_two[1], s1.grad)


def test_first_scales_are_mean_absolute_values():
    w = torch.tensor(_weights(3))
    s1, s2 = binary.first_scales(w, centre=False)
    torch.testing.assert_close(s1, w.abs().mean(dim=(1, 2, 3)))
    torch.testing.assert_close(s2, (w - s1.view(-1, 1, 1, 1) * torch.where(w >= 0, 1.0, -1.0).double()).abs()
                               .mean(dim=(1, 2, 3)))
    centred, _ = binary.first_scales(w + 5.0, centre=True)
    torch.testing.assert_close(centred, binary.first_scales(w - w.mean(dim=(1, 2, 3), keepdim=True), False)[0])


def test_to_binary_keeps_the_configured_layers_in_full_precision_and_reloads_its_scales():
    from pipeline.core import config
    from pipeline.students import student_b
    cfg = config.resolve("tiny")
    model = small_student()
    table = student_b.to_binary(model, student_b.Binarization.from_config(cfg))
    kept = {row["name"] for row in table if row["ring"] is None}
    assert "unet.conv_in" in kept and "heads.0.out" in kept
    assert isinstance(model.unet.mid_block.resnets[0].time_emb_proj, student_b.ConstantVector)
    assert isinstance(model.unet.conv_in, torch.nn.Conv2d) and not isinstance(model.unet.conv_in, binary.BinaryConv2d)
    assert isinstance(model.unet.mid_block.resnets[0].conv1, binary.BinaryConv2d)
    # LMB only where the input is at least half the image size (16 px here: 16 and 8 qualify, 4 not)
    assert model.unet.down_blocks[0].resnets[0].conv1.binarizer_name == "lmb2"
    assert model.unet.mid_block.resnets[0].conv1.binarizer_name == "scaled_sign"
    assert {row["kind"] for row in table if row["ring"] is not None} == {"binary, two bases (LMB)", "binary, one basis"}
    x = torch.randn(2, 1, 16, 16)
    out = model(x)["chunks"]
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    again = small_student()
    student_b.to_binary(again, student_b.Binarization.from_config(cfg))
    again.load_state_dict(trained)
    assert torch.equal(again(x)["chunks"], out)  # the learned scales are not re-initialised on reload


def test_progressive_binarization_goes_from_the_middle_outwards():
    from pipeline.core import config
    from pipeline.students import student_b
    model = small_student()
    student_b.to_binary(model, student_b.Binarization.from_config(config.resolve("tiny")))
    order = []
    for step in range(0, 500, 100):
        student_b.set_progress(model, step, every=100)
        active = {name for name, layer in student_b.binary_layers(model) if bool(layer.active)}
        order.append(active - set().union(*order) if order else active)
    assert order[0] and all(name.startswith("unet.mid_block") for name in order[0])
    assert {n.split(".")[1] + n.split(".")[2] for n in order[1]} == {"down_blocks2", "up_blocks0"}
    assert {n.split(".")[1] + n.split(".")[2] for n in order[2]} == {"down_blocks1", "up_blocks1"}
    assert {n.split(".")[1] + n.split(".")[2] for n in order[3]} == {"down_blocks0", "up_blocks2"}
    assert order[4] and all(n.startswith("heads.") for n in order[4])
    assert student_b.set_progress(model, 0, every=0) == len(student_b.binary_layers(model))
