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
    tensors = load_file(tmp_path / "b" / packed.PACKED_FILE)
    layers = student_b.binary_layers(model)
    expected = sum((layer.weight.numel() + 7) // 8 * layer.basis for _, layer in layers)  # one bit a weight and basis
    assert sizes["sign_bytes"] == expected == sum(t.numel() for k, t in tensors.items() if ".sign" in k)
    assert len(layers) == sum(r["ring"] is not None for r in table)
    data = (tmp_path / "b" / packed.PACKED_FILE).read_bytes()
    header = int.from_bytes(data[:8], "little")
    assert sizes["file_bytes"] == len(data) == 8 + header + sizes["sign_bytes"] + sizes["other_bytes"]


def test_damaged_packed_files_are_one_sentence(trained_b, tmp_path):
    model, b_config, _ = trained_b
    folder = tmp_path / "b"
    packed.export_packed(model, b_config, folder)
    path = folder / packed.PACKED_FILE
    good = path.read_bytes()
    path.write_bytes(good[:len(good) // 2])
    with pytest.raises(UserError, match="truncated or damaged"):
        packed.load_packed(folder)
    tensors = load_file_from_bytes(good)
    name = next(k for k in tensors if k.endswith(".sign1"))
    save_file(dict(tensors, **{name: tensors[name][:-1]}), str(path))
    with pytest.raises(UserError, match="bytes of signs"):
        packed.load_packed(folder)
    path.write_bytes(good)
    config_path = folder / "student_config.json"
    cfg = json.loads(config_path.read_text())
    cfg["binarization"]["b_lmb"] = not cfg["binarization"]["b_lmb"]
    config_path.write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="do not belong together"):
        packed.load_packed(folder)
    cfg["binarization"]["b_lmb"] = not cfg["binarization"]["b_lmb"]
    cfg["student"]["head_channels"] = 4
    config_path.write_text(json.dumps(cfg))
    with pytest.raises(UserError):
        packed.load_packed(folder)
    with pytest.raises(UserError, match="holds no packed B"):
        packed.load_packed(tmp_path)


def load_file_from_bytes(data):
    from safetensors.torch import load
    return load(data)
