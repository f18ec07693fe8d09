"""torchrun: two gloo processes on this CPU give the same data as one, stop together with one sentence,
and resume after a rank is killed."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch.multiprocessing as mp

from pipeline import distributed
from pipeline.errors import UserError

from conftest import ROOT

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def _torchrun(*args, timeout=300):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    return subprocess.run([*TORCHRUN, str(ROOT / "Main_Distill.py"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _generate_args(teacher, folder, **overrides):
    items = {"teacher_path": teacher, "data_dir": folder, "samples_total": 14, "shard_size": 3, "gen_batch_size": 3,
             "steps": 4, "chunks": 2, **overrides}
    return ["--mode", "generate", "--config", "tiny", *[f"{k}={v}" for k, v in items.items()]]


def _folder_bytes(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name.startswith(("shard-", "manifest"))}


def test_two_ranks_write_the_same_folder_as_one(small_teacher, tmp_path):
    one = subprocess.run([sys.executable, str(ROOT / "Main_Distill.py"), *_generate_args(small_teacher, tmp_path / "one")],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr
    two = _torchrun(*_generate_args(small_teacher, tmp_path / "two"))
    assert two.returncode == 0, two.stderr
    assert "on 2 processes" in two.stdout and two.stdout.count("[generate] 14 samples in 5 shard(s)") == 1
    assert _folder_bytes(tmp_path / "two") == _folder_bytes(tmp_path / "one")
    verify = _torchrun("--mode", "verify", "--config", "tiny", f"data_dir={tmp_path / 'two'}")
    assert verify.returncode == 0 and verify.stdout.count("[verify] OK: 5 shard(s)") == 1, verify.stderr


def test_a_refused_config_stops_every_rank_with_one_sentence(small_teacher, tmp_path):
    result = _torchrun(*_generate_args(small_teacher, tmp_path / "data", steps=7))
    assert result.returncode != 0
    errors = [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("error: ")]
    assert errors == ["error: chunks=2 does not divide steps=7; pick chunks among [1, 7]"]
    assert "/pipeline/" not in result.stderr  # no frame of ours: only torchrun's own report of a failed child


def test_a_stage_that_runs_in_one_process_refuses_two(tmp_path):
    result = _torchrun("--mode", "eval_d", "--config", "tiny", f"data_dir={tmp_path}")
    errors = [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("error: ")]
    assert result.returncode != 0 and errors == [
        "error: --mode eval_d runs in one process so far (docs/design.md §8); launch it with python, or torchrun "
        "--nproc_per_node=1"]


def test_killing_a_rank_then_rerunning_resumes(small_teacher, tmp_path):
    folder = tmp_path / "killed"
    args = _generate_args(small_teacher, folder, samples_total=30)
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    launcher = subprocess.Popen([*TORCHRUN, str(ROOT / "Main_Distill.py"), *args], cwd=ROOT, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    manifest = folder / "manifest.json"
    deadline = time.time() + 120
    while time.time() < deadline and launcher.poll() is None:
        if manifest.exists() and len(json.loads(manifest.read_text())["shards"]) >= 2:
            break
        time.sleep(0.05)
    workers = Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text().split()
    os.kill(int(workers[-1]), signal.SIGKILL)  # one rank dies; torchrun stops the other
    launcher.wait(timeout=120)
    listed = len(json.loads(manifest.read_text())["shards"])
    assert launcher.returncode != 0 and 2 <= listed < 10, "the run was not interrupted midway"
    resumed = _torchrun(*args)
    assert resumed.returncode == 0, resumed.stderr
    assert f"{3 * listed} samples present" in resumed.stdout
    clean = subprocess.run([sys.executable, str(ROOT / "Main_Distill.py"),
                            *_generate_args(small_teacher, tmp_path / "clean", samples_total=30)],
                           cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert clean.returncode == 0, clean.stderr
    assert _folder_bytes(folder) == _folder_bytes(tmp_path / "clean")


def _fail_on_rank_one(rank, port, out):
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    distributed.init()
    try:
        with distributed.together():
            if rank == 1:
                raise UserError("the teacher folder is missing here")
        outcome = "no error"
    except distributed.RankFailed as err:
        outcome = f"silent: {err}"
    except UserError as err:
        outcome = f"says: {err}"
    Path(out, str(rank)).write_text(outcome)
    distributed.finish()


def test_an_error_on_one_rank_reaches_every_rank(tmp_path):
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_fail_on_rank_one, args=(port, str(tmp_path)), nprocs=2)
    assert (tmp_path / "0").read_text() == "says: rank 1: the teacher folder is missing here"
    assert (tmp_path / "1").read_text() == "silent: rank 1: the teacher folder is missing here"


def test_two_ranks_repair_what_one_would(small_teacher, tmp_path):
    folder = tmp_path / "data"
    made = subprocess.run([sys.executable, str(ROOT / "Main_Distill.py"), *_generate_args(small_teacher, folder)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stderr
    before = _folder_bytes(folder)
    for name in ("shard-00001.npz.zst", "shard-00002.npz.zst", "shard-00004.npz.zst"):
        (folder / name).write_bytes(b"damaged")
    repaired = _torchrun(*_generate_args(small_teacher, folder)[2:], "--mode", "repair")
    assert repaired.returncode == 0, repaired.stderr
    assert sorted(line for line in repaired.stderr.splitlines() + repaired.stdout.splitlines()
                  if line.startswith("[repair] rewrote")) == [
        "[repair] rewrote shard-00001.npz.zst (indices 3..5)", "[repair] rewrote shard-00002.npz.zst (indices 6..8)",
        "[repair] rewrote shard-00004.npz.zst (indices 12..13)"]
    assert _folder_bytes(folder) == before


def _losses(run_dir: Path) -> list:
    return [json.loads(line)["loss"] for line in (run_dir / "stats.jsonl").read_text().splitlines()]


def test_train_d_on_two_ranks_follows_one_and_resumes_on_one_and_binarize_runs(small_teacher, tmp_path):
    data = tmp_path / "data"
    made = subprocess.run([sys.executable, str(ROOT / "Main_Distill.py"),
                           *_generate_args(small_teacher, data, samples_total=24, steps=10, chunks=5)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stderr

    def args(run, steps=20):
        return ["--mode", "train_d", "--config", "tiny", f"teacher_path={small_teacher}", f"data_dir={data}",
                f"d_run_dir={tmp_path / run}", f"d_train_steps={steps}", "d_batch_size=4"]
    one = subprocess.run([sys.executable, str(ROOT / "Main_Distill.py"), *args("one")], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    two = _torchrun(*args("two"))
    assert one.returncode == 0 and two.returncode == 0, one.stderr + two.stderr
    assert "2 processes of batch 2" in two.stdout and (tmp_path / "two" / "student").is_dir()
    # the same global batch from other records: the losses follow each other within sampling noise
    for a, b in zip(_losses(tmp_path / "one"), _losses(tmp_path / "two"), strict=True):
        assert abs(a - b) < 0.2 * a, (a, b)
    b = _torchrun("--mode", "binarize", "--config", "tiny", f"teacher_path={small_teacher}", f"data_dir={data}",
                  f"d_run_dir={tmp_path / 'one'}", f"b_run_dir={tmp_path / 'b'}", "b_train_steps=10", "b_batch_size=4")
    assert b.returncode == 0 and b.stdout.count("[binarize] packed B:") == 1, b.stderr
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    launcher = subprocess.Popen([*TORCHRUN, str(ROOT / "Main_Distill.py"), *args("killed", steps=40)], cwd=ROOT,
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and launcher.poll() is None and not (tmp_path / "killed" / "checkpoint.pt").exists():
        time.sleep(0.05)
    workers = Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text().split()
    os.kill(int(workers[-1]), signal.SIGKILL)
    launcher.wait(timeout=120)
    resumed = subprocess.run([sys.executable, str(ROOT / "Main_Distill.py"), *args("killed", steps=40)], cwd=ROOT,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed" in resumed.stdout and "at step 40" not in resumed.stdout
    assert json.loads((tmp_path / "killed" / "stats.jsonl").read_text().splitlines()[-1])["step"] == 40
