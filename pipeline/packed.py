"""Packed export of student B (DESIGN §4): sign bits 8 per byte, everything else in full precision.

A packed folder holds ``student_config.json`` (D's constructor arguments plus the binarization
settings) and ``packed.safetensors``: for every binary layer ``<layer>.sign1`` (and ``.sign2`` for a
two-basis layer) as uint8, the signs of its n weights in C order packed by ``numpy.packbits``
(ceil(n / 8) bytes, 1 = +1), plus its per-channel scales; every other tensor (full-precision layers,
norms, folded time constants, biases, W1A1 thresholds, k filters, shortcut convolutions) as float32
under its state-dict name. ``load_packed`` rebuilds B with the same operations as training, so its
outputs equal the trained B's exactly.
"""
import json
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from . import atomic, student_b, students
from .errors import UserError

KIND = "one-step-student-b-packed"
PACKED_FILE = "packed.safetensors"
BINARIZATION_KEYS = ("b_full_precision", "b_lmb", "b_centre", "b_activations")
SKIPPED_BUFFERS = ("started", "active")


def b_config(d_config: dict, cfg: dict) -> dict:
    return {"kind": KIND, "student": {k: v for k, v in d_config.items() if k != "kind"},
            "binarization": {k: cfg[k] for k in BINARIZATION_KEYS}}


def build_b(config: dict):
    """An untrained B of this config (D's architecture, folded and binarized)."""
    model = students.StudentD(**config["student"])
    student_b.to_binary(model, config["binarization"])
    return model


def _pack(bits: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.packbits(bits.flatten().cpu().numpy().astype(np.uint8)))


def _unpack(packed: torch.Tensor, shape, name) -> torch.Tensor:
    n = int(np.prod(shape))
    if packed.dtype != torch.uint8 or packed.numel() != (n + 7) // 8:
        raise UserError(f"layer {name} holds {packed.numel()} bytes of signs but its {n} weights need {(n + 7) // 8}; "
                        f"the packed file does not belong to this config (re-export B)")
    bits = np.unpackbits(packed.numpy(), count=n).reshape(shape)
    return torch.from_numpy(np.where(bits == 1, 1.0, -1.0).astype(np.float32))


def pack_tensors(model) -> dict:
    tensors = {}
    binary = dict(student_b.binary_layers(model))
    for name, layer in binary.items():
        sign1, sign2 = layer.signs()
        tensors[f"{name}.sign1"] = _pack(sign1)
        if sign2 is not None:
            tensors[f"{name}.sign2"] = _pack(sign2)
    for key, value in model.state_dict().items():
        layer, _, leaf = key.rpartition(".")
        if (layer in binary and leaf == "weight") or leaf in SKIPPED_BUFFERS or value is None:
            continue
        tensors[key] = value.detach().float().cpu().contiguous()
    return tensors


def export_packed(model, config: dict, folder) -> dict:
    """Write the packed folder; returns the byte breakdown {sign_bytes, other_bytes, file_bytes}."""
    folder = Path(folder)
    tensors = pack_tensors(model)
    data = save(tensors, metadata={"format": KIND, "version": "1"})
    atomic.write_bytes(folder / PACKED_FILE, data)
    atomic.write_json(folder / students.CONFIG_FILE, config)
    signs = sum(t.numel() for k, t in tensors.items() if k.endswith((".sign1", ".sign2")))
    return {"sign_bytes": signs, "other_bytes": sum(t.numel() * t.element_size() for t in tensors.values()) - signs,
            "file_bytes": len(data)}


def load_packed(folder):
    folder = Path(folder)
    config_path, packed_path = folder / students.CONFIG_FILE, folder / PACKED_FILE
    if not config_path.is_file() or not packed_path.is_file():
        raise UserError(f"{folder} holds no packed B (expected {students.CONFIG_FILE} and {PACKED_FILE}); export one "
                        f"with '--mode binarize'")
    try:
        config = json.loads(config_path.read_text())
        assert config["kind"] == KIND
        model = build_b(config)
    except (ValueError, AssertionError, KeyError, TypeError):
        raise UserError(f"{config_path} is not a packed-B config; restore it or re-export B") from None
    try:
        tensors = load_file(packed_path)
    except (SafetensorError, OSError, ValueError) as err:
        raise UserError(f"{packed_path} cannot be read ({type(err).__name__}: truncated or damaged); re-export B") from None
    binary = dict(student_b.binary_layers(model))
    for name, layer in binary.items():
        if f"{name}.sign1" not in tensors or (layer.basis == 2) != (f"{name}.sign2" in tensors):
            raise UserError(f"{packed_path} has no signs of layer {name} in the bases its config asks for; "
                            f"the file and {config_path.name} do not belong together (re-export B)")
        shape = layer.weight.shape
        sign2 = _unpack(tensors.pop(f"{name}.sign2"), shape, name) if layer.basis == 2 else None
        layer.freeze_signs(_unpack(tensors.pop(f"{name}.sign1"), shape, name), sign2)
    expected = {k for k in model.state_dict() if k.rpartition(".")[2] not in SKIPPED_BUFFERS
                and not (k.rpartition(".")[0] in binary and k.endswith(".weight"))}
    if set(tensors) != expected:
        odd = sorted(set(tensors) ^ expected)[0]
        raise UserError(f"{packed_path} and {config_path.name} disagree about tensor {odd}; re-export B")
    state = model.state_dict()
    for key, value in tensors.items():
        if value.shape != state[key].shape:
            raise UserError(f"{packed_path} holds {key} with shape {list(value.shape)}, the config needs "
                            f"{list(state[key].shape)}; re-export B")
        state[key].copy_(value)
    return model.eval()
