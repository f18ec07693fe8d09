"""``run.json`` beside an exported D or B: what its training run was (config, teacher data, held-out and
training records, step). binarize and eval_d act on it (eval_d scores the held-out records as never
trained on), so it is checked like the weights: it carries the sha256 of its own content and the stored
sha256 of the weights it was written with. A truncated, edited or moved run.json is one sentence
(docs/design.md §6).
"""
import hashlib
import json
from pathlib import Path

from safetensors import SafetensorError, safe_open

from . import atomic, jsonfile
from .errors import UserError

FILE = "run.json"
WEIGHT_FILES = ("model.safetensors", "packed.safetensors")  # student_d.WEIGHTS_FILE, packed.PACKED_FILE


def _digest(body: dict) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def weights_sha256(folder):
    """The sha256 stored in the metadata of the folder's weights (D or packed B), or None; reads the header only."""
    path = next((Path(folder) / name for name in WEIGHT_FILES if (Path(folder) / name).is_file()), None)
    if path is None:
        return None
    try:
        with safe_open(path, framework="pt") as f:
            return (f.metadata() or {}).get("sha256")
    except (OSError, ValueError, SafetensorError):
        return None  # damaged weights are the weights loader's sentence


def write(folder, record: dict) -> None:
    """Write run.json after the weights, bound to them by their stored sha256."""
    body = dict(record, weights_sha256=weights_sha256(folder))
    atomic.write_json(Path(folder) / FILE, dict(body, sha256=_digest(body)))


def read(folder, redo: str):
    """The run record beside the weights in ``folder`` (None where there is none); one sentence, ending in
    ``redo``, where it is unreadable, was changed after it was written or belongs to other weights."""
    path = Path(folder) / FILE
    if not path.is_file():
        return None
    try:
        run = jsonfile.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        run = None
    if not isinstance(run, dict):
        raise UserError(f"{path} is not readable JSON (truncated or damaged); restore it or {redo}")
    if "sha256" not in run:
        raise UserError(f"{path} carries no checksum (written by an older version); {redo}")
    body = {k: v for k, v in run.items() if k != "sha256"}
    if run["sha256"] != _digest(body):
        raise UserError(f"{path} was changed after training wrote it (checksum mismatch), e.g. its holdout_indices; "
                        f"restore it or {redo}")
    if run.get("weights_sha256") != weights_sha256(folder):
        raise UserError(f"{path} was written with other weights than those beside it; restore the folder or {redo}")
    return run
