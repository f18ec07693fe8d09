"""Checksummed safetensors files (docs/design.md §7): the sha256 that every exported model carries in its metadata
(the teacher's RNet, student D, the packed B), reading such a file, and the one sentence when the sum is wrong.
A base module: the teacher's files and the students' both use it, so neither reaches into the other."""
import hashlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load

from . import jsonfile
from .errors import UserError


def content_sha256(tensors: dict, config: dict) -> str:
    """sha256 over the canonical JSON of ``config`` and every tensor's name, dtype, shape and bytes, in
    name order: what a student file's checksum covers (D here, the packed B in ``packed``)."""
    digest = hashlib.sha256()

    def add(part: bytes):
        digest.update(len(part).to_bytes(8, "little") + part)  # length-prefixed: no two inputs hash alike

    add(json.dumps(config, sort_keys=True, separators=(",", ":")).encode())
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        add(json.dumps([name, str(t.dtype), list(t.shape)]).encode())
        add(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def read_safetensors(path):
    """(tensors, metadata, file bytes) of a safetensors file; ValueError when it is truncated or damaged."""
    data = Path(path).read_bytes()
    try:
        tensors = load(data)
        metadata = jsonfile.loads(data[8:8 + int.from_bytes(data[:8], "little")]).get("__metadata__") or {}
    except (SafetensorError, ValueError, AttributeError) as err:
        raise ValueError(type(err).__name__) from None
    return tensors, metadata, len(data)


def verify_checksum(path, metadata: dict, expected: str, redo: str, config_name: str = "student_config.json") -> None:
    """One sentence unless the file's stored checksum is ``expected``."""
    stored = metadata.get("sha256")
    if stored is None:
        raise UserError(f"{path} carries no checksum (written by an older version); {redo}")
    if stored != expected:
        raise UserError(f"{path} or the {config_name} beside it was changed or damaged after it was written "
                        f"(checksum mismatch); restore the folder or {redo}")
