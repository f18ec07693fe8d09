"""``Main_Distill.py --mode sample``: a trained student's one-step images, in seconds (docs/design.md §5).

The student is D (``sample_student=d``: ``d_weights``, by default ``<d_run_dir>/student``) or the packed
1-bit B (``sample_student=b``: ``b_weights``, by default ``<b_run_dir>/packed``); both files carry a
checksum, so a damaged one is refused rather than sampled. It turns the x_T of sample indices
``sample_first`` .. ``sample_first + sample_count - 1``, drawn exactly as generate draws them
(``trajectory.draw_x_T`` with ``seed``), into images with one network call each, so image k is the
student's answer to the x_T of generated teacher record k (imported records keep the x_T they came with). No teacher, no teacher data, no Inception network.

Into ``student_samples_dir`` (by default ``SampledImgs/sample/<name>/<d|b>``) go one PNG per image named
by its index (``000007.png``), ``grid.png`` (the first 64), ``config.json``, and last ``samples.npz``
(``images`` uint8 [N, C, H, W], ``index`` int64 [N]), which lists exactly what this run wrote.
"""
import io
import time
from pathlib import Path

import numpy as np

from ..core import atomic, config, images, runtime
from ..core.config import output_dir, project_path
from ..core.errors import UserError
from ..students import packed, student_d, student_folders
from . import api

GRID_IMAGES = 64
NAMES = {"d": "D", "b": "B"}
LOADERS = {"d": student_d.load_student, "b": packed.load_packed}  # each checks the file's checksum


def student_folder(cfg) -> Path:
    """The folder of the student that ``sample_student`` names."""
    if cfg["sample_student"] == "d":
        return student_folders.d_folder(cfg)
    if cfg["b_weights"] == "none":
        raise UserError("sample_student=b but b_weights=none; set b_weights= to a packed B folder or sample "
                        "D with sample_student=d")
    return student_folders.packed_folder(cfg)


def out_folder(cfg) -> Path:
    """``student_samples_dir`` as given, else ``SampledImgs/sample/<name>/<d|b>``."""
    if cfg["student_samples_dir"]:
        return project_path(cfg["student_samples_dir"])
    return output_dir(cfg, "student_samples_dir") / cfg["sample_student"]


def indices(cfg) -> list:
    return list(range(cfg["sample_first"], cfg["sample_first"] + cfg["sample_count"]))


def load_student(cfg):
    """The student to sample, after the key checks; its loader refuses a missing or damaged file."""
    config.validate(cfg, ["sample"])
    return LOADERS[cfg["sample_student"]](student_folder(cfg))


def plan(cfg) -> list:
    """What --dry-run prints, after the same checks as a run (the student is loaded, not run)."""
    load_student(cfg)
    first, last = indices(cfg)[0], indices(cfg)[-1]
    return [f"would write {cfg['sample_count']} one-step images of {NAMES[cfg['sample_student']]} "
            f"({student_folder(cfg)}) from the x_T of sample indices {first}..{last} (seed {cfg['seed']}) "
            f"to {out_folder(cfg)}"]


def write(out: Path, images_uint8: np.ndarray, index: list, cfg) -> None:
    """PNGs, grid and config first, ``samples.npz`` last: a complete npz means complete PNGs."""
    (out / "samples.npz").unlink(missing_ok=True)  # a stale npz must not vouch for a half-written run
    for i, img in zip(index, images_uint8):
        atomic.write_bytes(out / f"{i:06d}.png", images.png_bytes(img.transpose(1, 2, 0)))
    images.save_grid(images_uint8[:GRID_IMAGES], out / "grid.png")
    atomic.write_json(out / "config.json", cfg)
    buf = io.BytesIO()
    np.savez(buf, images=images_uint8, index=np.asarray(index, dtype=np.int64))
    atomic.write_bytes(out / "samples.npz", buf.getvalue())


def sample_command(cfg) -> Path:
    """Sample, write and say where the files are; returns the output folder."""
    model = load_student(cfg)
    device = runtime.configure(cfg)
    student = api.Student(runtime.for_inference(model.to(device), cfg), student_folder(cfg),
                          NAMES[cfg["sample_student"]])
    index = indices(cfg)
    started = time.perf_counter()
    images_uint8 = student(index, seed=cfg["seed"], batch_size=cfg["fid_batch_size"])
    seconds = time.perf_counter() - started
    out = out_folder(cfg)
    write(out, images_uint8, index, cfg)
    name = NAMES[cfg["sample_student"]]
    print(f"[sample] {len(index)} one-step images of {name} ({student_folder(cfg)}) from the x_T of sample indices "
          f"{index[0]}..{index[-1]} (seed {cfg['seed']}) in {seconds:.2f} s")
    print(f"[sample] images: {out / f'{index[0]:06d}.png'} .. {out / f'{index[-1]:06d}.png'}\n"
          f"[sample] grid: {out / 'grid.png'}\n[sample] all of them: {out / 'samples.npz'} (keys images, index)")
    return out
