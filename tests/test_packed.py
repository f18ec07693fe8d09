"""Packed export of B: bit-exact reload, the file's byte breakdown, its checksum, and damaged files."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from pipeline.core import config
from pipeline.core.errors import UserError
from pipeline.students import packed, student_b
from conftest import small_student


@pytest.fixture(params=["fp", "binary"], ids=["W1A32", "W1A1"])
def trained_b(request):
    cfg = config.resolve("tiny", [f"b_activations={request.param}", "b_centre=true"])
    model = small_student()
    table = student_b.to_binary(model, student_b.Binarization.from_config(cfg))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x = torch.randn(4, 1, 16, 16)
    for _ in range(3):  # move real-valued weights and scales away from their start
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
    assert sizes["header_bytes"] == 8 + int.from_bytes(data[:8], "little") < 2000  # two tensors, counts, checksum
    assert tensors["values"].dtype == torch.float16 and sizes["value_bytes"] == 2 * tensors["values"].numel()


def test_byte_breakdown_is_the_files_own(trained_b, tmp_path):
    model, b_config, _ = trained_b
    sizes = packed.export_packed(model, b_config, tmp_path / "b")
    parts = packed.byte_breakdown(tmp_path / "b")
    assert {k: parts[k] for k in sizes} == sizes
    assert parts["bytes_per_value"] == 2
    counts = parts["values_by_kind"]
    assert sum(counts.values()) * 2 == parts["value_bytes"]
    assert counts["binarizer scales"] == sum(layer.weight.shape[0] * layer.basis
                                             for _, layer in student_b.binary_layers(model))
    assert "norms" in counts and "full-precision layers" in counts


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
    assert packed.byte_breakdown(tmp_path / "b")["bytes_per_value"] == 4


def _header(data: bytes) -> dict:
    return json.loads(data[8:8 + int.from_bytes(data[:8], "little")])


def _flip_byte(data: bytes, region: str) -> bytes:
    """``data`` with one byte changed in the middle of a tensor's bytes or of the stored checksum."""
    start = 8 + int.from_bytes(data[:8], "little")
    if region == "checksum":
        at = data.index(_header(data)["__metadata__"]["sha256"].encode()) + 10
        return data[:at] + (b"0" if data[at:at + 1] != b"0" else b"1") + data[at + 1:]
    lo, hi = _header(data)[region]["data_offsets"]
    at = start + (lo + hi) // 2
    return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1:]


@pytest.mark.parametrize("region", ["signs", "values", "checksum"])
def test_one_changed_byte_in_the_file_is_refused(trained_b, tmp_path, region):
    model, b_config, _ = trained_b
    folder = tmp_path / "b"
    packed.export_packed(model, b_config, folder)
    path = folder / packed.PACKED_FILE
    good = path.read_bytes()
    path.write_bytes(_flip_byte(good, region))
    with pytest.raises(UserError, match="checksum mismatch") as refused:
        packed.load_packed(folder)
    assert str(refused.value).count(". ") == 0 and "re-export" in str(refused.value)  # one sentence, what to do
    path.write_bytes(good)
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():  # the untouched file still reloads bit-exactly
        assert torch.equal(model(x)["chunks"], packed.load_packed(folder)(x)["chunks"])


@pytest.mark.parametrize("change", [("student", "timestep", 998), ("binarization", "b_centre", False)])
def test_one_changed_config_value_is_refused(trained_b, tmp_path, change):
    """Neither change alters a tensor's shape, so only the checksum can tell (timestep would shift every output)."""
    model, b_config, _ = trained_b
    folder = tmp_path / "b"
    packed.export_packed(model, b_config, folder)
    config_path = folder / "student_config.json"
    config = json.loads(config_path.read_text())
    section, key, value = change
    assert config[section][key] != value
    config[section][key] = value
    config_path.write_text(json.dumps(config, indent=2))
    with pytest.raises(UserError, match="student_config.json.*checksum mismatch"):
        packed.load_packed(folder)


def safe_open_metadata(path):
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        return dict(f.metadata())


def _rewrite(path, config, signs=None, values=None, counts=None, signed=True):
    """Rewrite a packed file as a faulty exporter would: with a checksum that matches what it wrote."""
    tensors = load_file(path)
    metadata = safe_open_metadata(path)
    counts = json.loads(metadata["sign_bytes"]) if counts is None else counts
    tensors = {"signs": tensors["signs"] if signs is None else signs,
               "values": tensors["values"] if values is None else values}
    metadata["sign_bytes"] = json.dumps(counts)
    metadata["sha256"] = packed.checksum(tensors, counts, config)
    if not signed:
        del metadata["sha256"]
    save_file(tensors, str(path), metadata=metadata)


def test_damaged_or_mismatched_packed_files_are_one_sentence(trained_b, tmp_path):
    model, b_config, _ = trained_b
    folder = tmp_path / "b"
    packed.export_packed(model, b_config, folder)
    path, config_path = folder / packed.PACKED_FILE, folder / "student_config.json"
    good = path.read_bytes()
    path.write_bytes(good[:len(good) // 2])
    with pytest.raises(UserError, match="truncated or damaged"):
        packed.load_packed(folder)
    path.write_bytes(good)
    _rewrite(path, b_config, signed=False)
    with pytest.raises(UserError, match="carries no checksum.*re-export"):
        packed.load_packed(folder)
    path.write_bytes(good)
    counts = json.loads(safe_open_metadata(path)["sign_bytes"])
    _rewrite(path, b_config, counts=[counts[0] - 1, *counts[1:]])
    with pytest.raises(UserError, match="bytes of signs"):
        packed.load_packed(folder)
    path.write_bytes(good)
    _rewrite(path, b_config, values=load_file(path)["values"][:-1])
    with pytest.raises(UserError, match="do not belong together"):
        packed.load_packed(folder)
    path.write_bytes(good)
    other = dict(b_config, binarization=dict(b_config["binarization"], b_lmb=not b_config["binarization"]["b_lmb"]))
    config_path.write_text(json.dumps(other))
    _rewrite(path, other)
    with pytest.raises(UserError, match="do not belong together"):
        packed.load_packed(folder)
    config_path.write_text(json.dumps(dict(b_config, kind="something else")))
    with pytest.raises(UserError, match="not a packed-B config"):
        packed.load_packed(folder)
    config_path.write_text("{not json")
    with pytest.raises(UserError, match="not a packed-B config"):
        packed.load_packed(folder)
    with pytest.raises(UserError, match="holds no packed B"):
        packed.load_packed(tmp_path)
