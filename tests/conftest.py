import io
import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import zstandard

os.environ["HF_HUB_OFFLINE"] = "1"  # tests never reach a network
torch.set_num_threads(1)
if os.environ.get("PYTEST_XDIST_WORKER"):
    # pytest-xdist runs one worker per core (pyproject's addopts): the commands a test starts get one thread too,
    # or two workers' subprocesses would each take every core
    os.environ["OMP_NUM_THREADS"] = "1"

ROOT = Path(__file__).resolve().parent.parent
MAX_WORKERS = 4  # a cap: every worker loads its own teachers and Inception network, so memory grows with them


def pytest_xdist_auto_num_workers(config):
    """``-n auto``: the cores this process may run on (its affinity mask, not the host's count that psutil would
    give inside a container), at most MAX_WORKERS."""
    return max(1, min(len(os.sched_getaffinity(0)), MAX_WORKERS))


@pytest.fixture(scope="session")
def small_teacher(tmp_path_factory):
    """A randomly initialised 1-channel UNet2DModel in diffusers layout (fast, deterministic)."""
    from pipeline.core import config
    from pipeline.teacher import teachers
    cfg = config.resolve("tiny")
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("teacher")
    teachers.save_teacher(teachers.new_unet(cfg, channels=1), teachers.new_scheduler(cfg), path)
    return path


@pytest.fixture
def tiny_cfg(small_teacher, tmp_path):
    """The tiny preset pointed at the small random teacher and a fresh data folder."""
    from pipeline.core import config

    def make(**overrides):
        items = {"teacher_path": str(small_teacher), "data_dir": str(tmp_path / "data"), **overrides}
        return config.resolve("tiny", [f"{k}={v}" for k, v in items.items()])
    return make


def run_cli(script, *args, timeout=300):
    """Run an entry point as a user would; returns the CompletedProcess."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, str(ROOT / script), *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def run_distill_in_process(capsys, *args):
    """``Main_Distill.py`` with ``args`` through the same front end (cli.main), in this process: what the
    user would read, without the seconds of a fresh interpreter; for tests that try many refusals."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("main_distill", ROOT / "Main_Distill.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    capsys.readouterr()
    code = script.cli.main("Main_Distill.py", script.__doc__, script.MODES, default_mode="all", argv=list(args))
    out = capsys.readouterr()
    return subprocess.CompletedProcess(["Main_Distill.py", *args], code, out.out, out.err)


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
    from pipeline.core import config
    return config.resolve("tiny", [f"{k}={v}" for k, v in items.items()])


def cli_args(items: dict) -> list:
    """The same overrides as command-line arguments of the tiny preset."""
    return ["--config", "tiny", *[f"{k}={v}" for k, v in items.items()]]


def read_folder(folder):
    """Every stored array of a data folder, read with nothing but numpy + zstandard, in index order (the
    records themselves with codec int8-p99.5)."""
    manifest = json.loads((Path(folder) / "manifest.json").read_text())
    parts = []
    for shard in manifest["shards"]:
        raw = zstandard.ZstdDecompressor().decompress((Path(folder) / shard["file"]).read_bytes())
        with np.load(io.BytesIO(raw)) as npz:
            parts.append({k: npz[k] for k in npz.files})
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def read_records(folder):
    """Every record of a data folder through the tool's reader (any codec), in index order."""
    from pipeline.data import store
    manifest = store.Manifest.load(folder)
    parts = [manifest.read_shard(entry) for entry in manifest.shards]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def flip_a_bit(path, mask=0x10):
    """Damage a file the way a bad disk or transfer does: one bit in its middle byte."""
    data = bytearray(Path(path).read_bytes())
    data[len(data) // 2] ^= mask
    Path(path).write_bytes(bytes(data))


def npz_with_absurd_header(arrays, key):
    """``arrays`` as npz bytes whose member ``key`` claims 10**12 elements in its npy header but stores
    its real bytes."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as archive:
        for name, array in arrays.items():
            member = io.BytesIO()
            if name == key:
                header = dict(np.lib.format.header_data_from_array_1_0(array), shape=(10 ** 12,))
                np.lib.format.write_array_header_1_0(member, header)
                member.write(array.tobytes())
            else:
                np.lib.format.write_array(member, array)
            archive.writestr(f"{name}.npy", member.getvalue())
    return buf.getvalue()


SMALL_BACKBONE = {"sample_size": 16, "in_channels": 1, "out_channels": 1, "block_out_channels": [8, 16, 16],
                  "layers_per_block": 1, "norm_num_groups": 4,
                  "down_block_types": ["DownBlock2D"] * 3, "up_block_types": ["UpBlock2D"] * 3}


def student_generator(chunks, channels, space="pixel", latent=None, size=16):
    """The manifest's generator block that a student of these shapes is built from."""
    return {"image_shape": [channels, size, size], "latent_channels": latent or channels, "chunks": chunks,
            "space": space, "T": 1000}


def small_student():
    """A 3-chunk, 1-channel student D on a 16x16 backbone, seeded."""
    from pipeline.students import student_d
    torch.manual_seed(0)
    return student_d.new_student(SMALL_BACKBONE, student_generator(3, 1), head_channels=8)


def reader_snippet(marker="reader"):
    """The python block that follows ``<!-- {marker}: this block is run by tests/... -->`` in the README."""
    text = (ROOT / "README.md").read_text()
    block = re.split(rf"<!-- {re.escape(marker)}: this block is run by tests/\w+\.py -->", text, maxsplit=1)[1]
    return re.search(r"```python\n(.*?)```", block, re.S).group(1)
