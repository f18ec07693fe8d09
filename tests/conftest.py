import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"  # tests never reach a network
torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def small_teacher(tmp_path_factory):
    """A randomly initialised 1-channel UNet2DModel in diffusers layout (fast, deterministic)."""
    from pipeline import config, teachers
    cfg = config.resolve("tiny")
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("teacher")
    teachers.save_teacher(teachers.new_unet(cfg, channels=1), teachers.new_scheduler(cfg), path)
    return path


@pytest.fixture
def tiny_cfg(small_teacher, tmp_path):
    """The tiny preset pointed at the small random teacher and a fresh data folder."""
    from pipeline import config

    def make(**overrides):
        items = {"teacher_path": str(small_teacher), "data_dir": str(tmp_path / "data"), **overrides}
        return config.resolve("tiny", [f"{k}={v}" for k, v in items.items()])
    return make


def run_cli(script, *args, timeout=300):
    """Run an entry point as a user would; returns the CompletedProcess."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, str(ROOT / script), *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def assert_one_sentence_error(result, *fragments):
    """Non-zero exit, an 'error:' line naming the fragments, and no traceback."""
    assert result.returncode != 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def tiny_items(teacher, root, **overrides):
    """The tiny preset's folder keys, all under ``root``, with ``teacher`` as the teacher."""
    root = Path(root)
    return {"teacher_path": teacher, "data_dir": root / "data", "d_run_dir": root / "d", "b_run_dir": root / "b",
            "fid_cache_dir": root / "fid", "eval_dir": root / "eval", "student_samples_dir": root / "samples",
            **overrides}


def tiny_config(items: dict):
    """The tiny preset with ``items`` as overrides, resolved as the command line would."""
    from pipeline import config
    return config.resolve("tiny", [f"{k}={v}" for k, v in items.items()])


def cli_args(items: dict) -> list:
    """The same overrides as command-line arguments of the tiny preset."""
    return ["--config", "tiny", *[f"{k}={v}" for k, v in items.items()]]
