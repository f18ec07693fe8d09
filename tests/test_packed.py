"""Packed export of B: bit-exact reload, the file size of the sign bits, and damaged files."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from pipeline import config, packed, student_b
from pipeline.errors import UserError
from test_binary import _small_student


@pytest.fixture(params=["fp", "binary"], ids=["W1A32", "W1A1"])
def trained_b(request):
    cfg = config.resolve("tiny", [f"b_activations={request.param}", "b_centre=true"])
    model = _small_student()
    table = student_b.to_binary(model, cfg)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x = torch.randn(4, 1, 16, 16)
    for _ in range(3):  # move latent weights and scales away from their start
        opt.zero_grad()
        model(x)["chunks"].pow(2).mean().backward()
        opt.step()
    return model.eval(), packed.b_config(model.config, cfg), table


def test_packed_export_reloads_bit_exactly_and_its_signs_take_one_bit(trained_b, tmp_path):
    model, b_config, table = trained_b
    sizes = packed.export_packed(model, b_config, tmp_path / "b")
    loaded = packed.load_packed(tmp_path / "b")
    x = torch.randn(3, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(model(x)["chunks"], loaded(x)["chunks"])
    layers = student_b.binary_layers(model)
    assert len(layers) == sum(r["ring"] is not None for r in table)
    expected = sum((layer.weight.numel() + 7) // 8 * layer.basis for _, layer in layers)  # a bit a weight and basis
    tensors = load_file(tmp_path / "b" / packed.PACKED_FILE)
    assert sizes["sign_bytes"] == expected == tensors["signs"].numel()
    data = (tmp_path / "b" / packed.PACKED_FILE).read_bytes()
    assert sizes["file_bytes"] == len(data) == sizes["sign_bytes"] + sizes["value_bytes"] + sizes["header_bytes"]
    assert sizes["header_bytes"] < 2000  # two tensors and a list of byte counts
    assert tensors["values"].dtype == torch.float16 and sizes["value_bytes"] == 2 * tensors["values"].numel()


def test_fp32_values_leave_the_model_untouched(trained_b, tmp_path):
    model, b_config, _ = trained_b
    b_config = dict(b_config, binarization=dict(b_config["binarization"], b_packed_values="fp32"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    packed.export_packed(model, b_config, tmp_path / "b")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert load_file(tmp_path / "b" / packed.PACKED_FILE)["values"].dtype == torch.float32
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(model(x)["chunks"], packed.load_packed(tmp_path / "b")(x)["chunks"])


def _rewrite(path, signs=None, values=None, counts=None):
    tensors = load_file(path)
    metadata = safe_open_metadata(path)
    if counts is not None:
        metadata["sign_bytes"] = json.dumps(counts)
    save_file({"signs": tensors["signs"] if signs is None else signs,
               "values": tensors["values"] if values is None else values}, str(path), metadata=metadata)


def safe_open_metadata(path):
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        return dict(f.metadata())


def test_damaged_packed_files_are_one_sentence(trained_b, tmp_path):
    model, b_config, _ = trained_b
    folder = tmp_path / "b"
    packed.export_packed(model, b_config, folder)
    path = folder / packed.PACKED_FILE
    good = path.read_bytes()
    path.write_bytes(good[:len(good) // 2])
    with pytest.raises(UserError, match="truncated or damaged"):
        packed.load_packed(folder)
    path.write_bytes(good)
    counts = json.loads(safe_open_metadata(path)["sign_bytes"])
    _rewrite(path, counts=[counts[0] - 1, *counts[1:]])
    with pytest.raises(UserError, match="bytes of signs"):
        packed.load_packed(folder)
    path.write_bytes(good)
    _rewrite(path, values=load_file(path)["values"][:-1])
    with pytest.raises(UserError, match="do not belong together"):
        packed.load_packed(folder)
    path.write_bytes(good)
    config_path = folder / "student_config.json"
    cfg = json.loads(config_path.read_text())
    cfg["binarization"]["b_lmb"] = not cfg["binarization"]["b_lmb"]
    config_path.write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="do not belong together"):
        packed.load_packed(folder)
    cfg["binarization"]["b_lmb"] = not cfg["binarization"]["b_lmb"]
    cfg["kind"] = "something else"
    config_path.write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="not a packed-B config"):
        packed.load_packed(folder)
    with pytest.raises(UserError, match="holds no packed B"):
        packed.load_packed(tmp_path)
