"""Where the stages find a trained student from the config (docs/design.md §4, §6): D's folder and the packed
B's, from ``d_weights`` / ``b_weights`` or the run folders. The model modules take folders, never the config."""
from pathlib import Path

from ..core.config import output_dir, project_path
from .packed import BINARIZATION_KEYS, PACKED_FILE
from .student_d import CONFIG_FILE


def d_folder(cfg) -> Path:
    """``d_weights`` (a student folder, or a training run holding one), else the run's EMA student."""
    if not cfg["d_weights"]:
        return output_dir(cfg, "d_run_dir") / "student"
    path = project_path(cfg["d_weights"])
    if not (path / CONFIG_FILE).is_file() and (path / "student" / CONFIG_FILE).is_file():
        return path / "student"
    return path


def packed_folder(cfg) -> Path:
    """``b_weights`` (a packed folder, or a binarize run holding one), else ``<b_run_dir>/packed``."""
    if not cfg["b_weights"]:
        return output_dir(cfg, "b_run_dir") / "packed"
    path = project_path(cfg["b_weights"])
    return path / "packed" if (path / "packed" / PACKED_FILE).is_file() else path


def binarization_settings(cfg) -> dict:
    """The binarization keys a packed B's config records (``packed.b_config``)."""
    return {key: cfg[key] for key in BINARIZATION_KEYS}
