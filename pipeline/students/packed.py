"""Packed export of student B (docs/design.md §6): sign bits 8 per byte, everything else in full precision.

A packed folder holds ``student_config.json`` (D's constructor arguments plus the binarization
settings) and ``packed.safetensors`` with two tensors, so that the file's header stays a few hundred
bytes (one tensor per layer made it 14 % of a small model's file):

* ``signs`` (uint8): for every binary layer in module order, each sign plane of its binarizer
  (``sign_planes``: sign(W), then for ``lmb2`` the sign of the residual) as its n signs in C order
  packed by ``numpy.packbits`` (ceil(n / 8) bytes, 1 = +1); the metadata ``sign_bytes`` lists each
  layer's byte count;
* ``values`` (float16 by default, ``b_packed_values=fp32`` keeps float32): every other tensor of the
  state dict (scales, full-precision layers, norms, folded time constants, biases, W1A1 thresholds,
  k filters, shortcut convolutions), flattened in state-dict order. ``export_packed`` first rounds
  the model's own values to that precision, so the model it was given and the reloaded one agree
  exactly.

The metadata ``sha256`` is ``checksums.content_sha256`` of the two tensors, the byte counts and the
config, so one changed byte in the file or in ``student_config.json`` is refused instead of silently
giving another B. The config rebuilds the model, which fixes every name, shape and offset;
``load_packed`` checks the blobs against it and rebuilds B with the same operations as training, so its
outputs equal the trained B's exactly. ``byte_breakdown`` answers how the file's bytes are spent.
"""
import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save

from ..core import atomic, checksums, jsonfile
from ..core.errors import UserError
from . import student_b, student_d

KIND = "one-step-student-b-packed"
FORMAT_VERSION = "2"  # 2: with the sha256 checksum
PACKED_FILE = "packed.safetensors"
BINARIZATION_KEYS = ("b_full_precision", "b_lmb", "b_lmb_min_size", "b_centre", "b_activations", "b_packed_values")
VALUE_DTYPES = {"fp16": torch.float16, "fp32": torch.float32}
SKIPPED_BUFFERS = ("started", "active")
REDO = "rerun '--mode binarize' on its run folder to re-export it"


def b_config(d_config: dict, binarization: dict) -> dict:
    """A packed B's config: D's constructor arguments and the values of BINARIZATION_KEYS it was made with."""
    return {"kind": KIND, "student": {k: v for k, v in d_config.items() if k != "kind"},
            "binarization": {k: binarization[k] for k in BINARIZATION_KEYS}}


def build_b(config: dict):
    """An untrained B of this config (D's architecture, folded and binarized)."""
    model = student_d.StudentD.from_config(config["student"])
    student_b.to_binary(model, student_b.Binarization.from_config(config["binarization"]))
    return model


def _value_keys(model, binary: dict):
    """State-dict keys stored in ``values``: all but binary layers' real-valued weights and bookkeeping buffers."""
    return [k for k in model.state_dict() if k.rpartition(".")[2] not in SKIPPED_BUFFERS
            and not (k.rpartition(".")[0] in binary and k.endswith(".weight"))]


def value_breakdown(model) -> dict:
    """How many full-precision values of each kind the packed file holds beside the sign bits."""
    binary = dict(student_b.binary_layers(model))
    modules, state = dict(model.named_modules()), model.state_dict()
    counts = {}
    for key in _value_keys(model, binary):
        owner, _, leaf = key.rpartition(".")
        module = modules.get(owner)
        if key.startswith("x0out."):
            kind = "x0 head (X0out, latent space)"
        elif owner in binary:
            kind = "binarizer scales" if leaf.startswith("scale") else (
                "binary-layer biases" if leaf == "bias" else "W1A1 thresholds, k filters, shortcuts")
        elif owner.rpartition(".")[0] in binary:  # a W1A1 shortcut convolution
            kind = "W1A1 thresholds, k filters, shortcuts"
        elif isinstance(module, student_b.ConstantVector):
            kind = "folded time constants"
        elif isinstance(module, torch.nn.GroupNorm):
            kind = "norms"
        else:
            kind = "full-precision layers"
        counts[kind] = counts.get(kind, 0) + state[key].numel()
    return counts


def _pack(bits: torch.Tensor) -> np.ndarray:
    return np.packbits(bits.flatten().cpu().numpy().astype(np.uint8))


def checksum(tensors: dict, counts: list, config: dict) -> str:
    """The checksum of a packed B: its tensors, its per-layer sign byte counts and its config."""
    return checksums.content_sha256(tensors, {"config": config, "sign_bytes": counts})


def _sizes(file_bytes: int, signs: torch.Tensor, values: torch.Tensor) -> dict:
    sign_bytes, value_bytes = signs.numel(), values.numel() * values.element_size()
    return {"sign_bytes": sign_bytes, "value_bytes": value_bytes,
            "header_bytes": file_bytes - sign_bytes - value_bytes, "file_bytes": file_bytes}


def export_packed(model, config: dict, folder) -> dict:
    """Write the packed folder; returns the byte breakdown (signs, values, header, file)."""
    folder = Path(folder)
    binary = dict(student_b.binary_layers(model))
    state, keys = model.state_dict(), _value_keys(model, binary)
    dtype = VALUE_DTYPES[config["binarization"].get("b_packed_values", "fp32")]
    values = torch.cat([state[k].detach().float().cpu().flatten() for k in keys]).to(dtype)
    if not torch.isfinite(values).all():
        raise UserError(f"a full-precision value of B does not fit {dtype}; export with b_packed_values=fp32")
    # the model now holds exactly what is stored; signs come after, since a residual's sign depends on sigma_I
    _load_values(state, keys, values)
    parts, counts = [], []
    for layer in binary.values():
        planes = [_pack(plane) for plane in layer.signs()]
        parts += planes
        counts.append(sum(len(p) for p in planes))
    tensors = {"signs": torch.from_numpy(np.concatenate(parts)), "values": values.contiguous()}
    data = save(tensors, metadata={"format": KIND, "version": FORMAT_VERSION, "sign_bytes": json.dumps(counts),
                                   "sha256": checksum(tensors, counts, config)})
    atomic.write_bytes(folder / PACKED_FILE, data)
    atomic.write_json(folder / student_d.CONFIG_FILE, config)
    return _sizes(len(data), tensors["signs"], values)


def _read_config(config_path) -> dict:
    try:
        config = jsonfile.loads(config_path.read_text())
        if isinstance(config, dict) and config.get("kind") == KIND:
            return config
    except (OSError, ValueError):
        pass
    raise UserError(f"{config_path} is not a packed-B config; restore it or {REDO}")


def _read(packed_path, config: dict):
    """(signs as uint8 numpy, values, per-layer sign byte counts), checked against the checksum."""
    try:
        tensors, metadata, _ = checksums.read_safetensors(packed_path)
        counts = jsonfile.loads(metadata["sign_bytes"])
        signs, values = tensors["signs"], tensors["values"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UserError(f"{packed_path} cannot be read ({type(err).__name__}: truncated or damaged); "
                        f"restore it or {REDO}") from None
    if set(tensors) != {"signs", "values"} or signs.dtype != torch.uint8 or values.dtype not in VALUE_DTYPES.values():
        raise UserError(f"{packed_path} does not hold a packed B (tensors {sorted(tensors)}); {REDO}")
    checksums.verify_checksum(packed_path, metadata, checksum(tensors, counts, config), REDO)
    return signs.numpy(), values, counts


def load_packed(folder):
    """B rebuilt from a packed folder; a missing, damaged or mismatched folder is one sentence."""
    folder = Path(folder)
    config_path, packed_path = folder / student_d.CONFIG_FILE, folder / PACKED_FILE
    if not config_path.is_file() or not packed_path.is_file():
        raise UserError(f"{folder} holds no packed B (expected {student_d.CONFIG_FILE} and {PACKED_FILE}); export one "
                        f"with '--mode binarize'")
    config = _read_config(config_path)
    signs, values, counts = _read(packed_path, config)
    try:
        model = build_b(config)
    except (ValueError, KeyError, TypeError, AttributeError):
        raise UserError(f"{config_path} is not a packed-B config; restore it or {REDO}") from None
    binary = dict(student_b.binary_layers(model))
    mismatch = f"the file and the config do not belong together ({REDO})"
    if len(counts) != len(binary):
        raise UserError(f"{packed_path} holds signs of {len(counts)} layers but {config_path.name} builds "
                        f"{len(binary)} binary layers; {mismatch}")
    offset = 0
    for (name, layer), count in zip(binary.items(), counts):
        n, planes = layer.weight.numel(), layer.basis
        if count != planes * ((n + 7) // 8):
            raise UserError(f"layer {name} has {count} bytes of signs in {packed_path} but its {n} weights in "
                            f"{planes} sign plane(s) need {planes * ((n + 7) // 8)}; {mismatch}")
        per_plane = count // planes
        layer.freeze_signs(*(_unpack(signs[offset + i * per_plane: offset + (i + 1) * per_plane], layer.weight.shape)
                             for i in range(planes)))
        offset += count
    state, keys = model.state_dict(), _value_keys(model, binary)
    needed = sum(state[k].numel() for k in keys)
    if offset != len(signs) or needed != values.numel():
        raise UserError(f"{packed_path} holds {len(signs)} sign bytes and {values.numel()} values, the config needs "
                        f"{offset} and {needed}; {mismatch}")
    _load_values(state, keys, values)
    return model.eval()


def byte_breakdown(folder, model=None) -> dict:
    """How a packed folder's file spends its bytes: sign bits, values (their count by kind and bytes per
    value), safetensors header, whole file. ``model`` is the B loaded from it (loaded and checked here
    when not given)."""
    folder = Path(folder)
    model = load_packed(folder) if model is None else model
    tensors, _, file_bytes = checksums.read_safetensors(folder / PACKED_FILE)
    values = tensors["values"]
    return {**_sizes(file_bytes, tensors["signs"], values), "bytes_per_value": values.element_size(),
            "values_by_kind": value_breakdown(model)}


@torch.no_grad()
def _load_values(state: dict, keys, values: torch.Tensor):
    at = 0
    for key in keys:
        target = state[key]
        target.copy_(values[at:at + target.numel()].view(target.shape))
        at += target.numel()


def _unpack(packed: np.ndarray, shape) -> torch.Tensor:
    bits = np.unpackbits(packed, count=int(np.prod(shape))).reshape(shape)
    return torch.from_numpy(np.where(bits == 1, 1.0, -1.0).astype(np.float32))
