"""Training checkpoints: one file of plain tensors and numbers, loaded with ``weights_only=True``."""
import contextlib
import io
import json
from pathlib import Path

import torch

from . import atomic, jsonfile
from .config import DEFAULTS
from .errors import UserError

LATEST = "checkpoint.pt"


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(run_dir, state: dict) -> Path:
    """Atomically replace ``run_dir/checkpoint.pt``: rerunning the same command resumes from it."""
    buf = io.BytesIO()
    torch.save(state, buf)
    path = Path(run_dir) / LATEST
    atomic.write_bytes(path, buf.getvalue())
    return path


def load(run_dir):
    """The latest checkpoint in ``run_dir`` as a dict, or None when the run has not saved one yet."""
    path = Path(run_dir) / LATEST
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise UserError(f"checkpoint {path} cannot be read ({type(err).__name__}); delete it to start over "
                        f"or restore a good copy") from None
    problem = _foreign(state)
    if problem:
        raise UserError(f"{path} is not a checkpoint of this tool ({problem}); delete it to start over or use "
                        f"another run folder")
    return state


# what save() always writes, by type: a bare state_dict, a list or another tool's file lacks some of it
REQUIRED = {"model": dict, "rng": dict, "step": int, "config": str, "record": str}


def _foreign(state):
    """Why a loaded file is not one of our checkpoints, or None."""
    if not isinstance(state, dict):
        return f"it holds a {type(state).__name__}, not a dict"
    missing = next((k for k, kind in REQUIRED.items() if not isinstance(state.get(k), kind)), None)
    if missing:
        return f"its '{missing}' is missing or not a {REQUIRED[missing].__name__}"
    for key in ("config", "record"):
        try:
            if not isinstance(jsonfile.loads(state[key]), dict):
                return f"its '{key}' is not a JSON object"
        except ValueError:
            return f"its '{key}' is not readable JSON"
    return None


def check_same_config(saved_json: str, cfg: dict, keys, run_dir) -> None:
    """Refuse to resume a run whose architecture or recipe keys changed. A key the run's saved config
    lacks (added to the project after the run started) counts as its default, which is what the run had."""
    saved = json.loads(saved_json)
    saved = {k: saved.get(k, DEFAULTS.get(k)) for k in keys}
    changed = [k for k in keys if saved[k] != cfg.get(k)]
    if changed:
        k = changed[0]
        raise UserError(f"{run_dir} was started with {k}={saved[k]!r}, not {cfg.get(k)!r}; "
                        f"use the original value or another run_dir")


def restore(state: dict, objects: dict) -> int:
    """Load each object's ``state[name]`` (``load_state_dict``), the global RNG, and return the step."""
    for name, obj in objects.items():
        obj.load_state_dict(state[name])
    set_rng_state(state["rng"])
    return int(state["step"])


@contextlib.contextmanager
def saved_on_exit(save, bar):
    """Around a training loop: ``save()`` when Ctrl-C / SIGTERM stops it (then the interrupt goes on)
    and when it ends; the progress bar is closed whatever ends the loop, so that an error message
    starts its own line."""
    try:
        yield
    except KeyboardInterrupt:
        bar.close()
        save()
        raise
    except BaseException:
        bar.close()
        raise
    bar.close()
    save()
