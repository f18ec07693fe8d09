"""torchrun: two gloo processes on this CPU give the same data as one, stop together with one sentence,
and resume after a rank is killed."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from pipeline.core import config, distributed, launch
from pipeline.core.errors import UserError
from pipeline.data import generate

from conftest import ROOT

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def _torchrun(*args, timeout=300, script="Main_Distill.py"):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    return subprocess.run([*TORCHRUN, str(ROOT / script), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _generate_args(teacher, folder, **overrides):
    items = {"teacher_path": teacher, "data_dir": folder, "samples_total": 20, "shard_size": 3, "gen_batch_size": 3,
             "steps": 4, "chunks": 2, **overrides}
    return ["--mode", "generate", "--config", "tiny", *[f"{k}={v}" for k, v in items.items()]]


def _folder_bytes(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name.startswith(("shard-", "manifest"))}


@pytest.fixture(scope="module")
def one_process(small_teacher, tmp_path_factory):
    """The folder one process writes, made once: what every run on two ranks must reproduce byte for byte."""
    folder = tmp_path_factory.mktemp("one") / "data"
    generate.generate(config.resolve("tiny", _generate_args(small_teacher, folder)[4:]))
    return small_teacher, folder


def test_two_ranks_write_the_same_folder_as_one(one_process, tmp_path):
    teacher, one = one_process
    two = _torchrun(*_generate_args(teacher, tmp_path / "two"))
    assert two.returncode == 0, two.stderr
    assert "on 2 processes" in two.stdout and two.stdout.count("[generate] 20 samples in 7 shard(s)") == 1
    assert _folder_bytes(tmp_path / "two") == _folder_bytes(one)
    verify = _torchrun("--mode", "verify", "--config", "tiny", f"data_dir={tmp_path / 'two'}")
    assert verify.returncode == 0 and verify.stdout.count("[verify] OK: 7 shard(s)") == 1, verify.stderr


def test_refusals_stop_every_rank_with_one_sentence(small_teacher, tmp_path):
    for args, sentence in [
            (_generate_args(small_teacher, tmp_path / "data", steps=7),
             "error: chunks=2 does not divide steps=7; pick chunks among [1, 7]"),
            (["--mode", "sample", "--config", "tiny", f"data_dir={tmp_path}"],
             "error: --mode sample runs in one process so far (docs/design.md §8); launch it with python, or torchrun "
             "--nproc_per_node=1")]:
        result = _torchrun(*args)
        errors = [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("error: ")]
        assert result.returncode != 0 and errors == [sentence]
        assert "/pipeline/" not in result.stderr  # no frame of ours: only torchrun's own report of a failed child


def _kill_a_rank_once(launcher, ready) -> None:
    """Wait until ``ready()`` (or the launcher ends), then SIGKILL one of torchrun's workers."""
    deadline = time.time() + 120
    while time.time() < deadline and launcher.poll() is None and not ready():
        time.sleep(0.05)
    workers = Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text().split()
    os.kill(int(workers[-1]), signal.SIGKILL)  # one rank dies; torchrun stops the other
    launcher.wait(timeout=120)


def _launch(*args):
    return subprocess.Popen([*TORCHRUN, str(ROOT / "Main_Distill.py"), *args], cwd=ROOT,
                            env=dict(os.environ, HF_HUB_OFFLINE="1"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def test_killing_a_rank_then_rerunning_resumes(one_process, tmp_path):
    teacher, one = one_process
    folder, manifest = tmp_path / "killed", tmp_path / "killed" / "manifest.json"
    args = _generate_args(teacher, folder)
    launcher = _launch(*args)
    _kill_a_rank_once(launcher, lambda: manifest.exists() and len(json.loads(manifest.read_text())["shards"]) >= 2)
    listed = len(json.loads(manifest.read_text())["shards"])
    assert launcher.returncode != 0 and 2 <= listed < 7, "the run was not interrupted midway"
    resumed = _torchrun(*args)
    assert resumed.returncode == 0, resumed.stderr
    assert f"{3 * listed} samples present" in resumed.stdout
    assert _folder_bytes(folder) == _folder_bytes(one)


def test_two_ranks_repair_what_one_would(one_process, tmp_path):
    import shutil
    teacher, one = one_process
    folder = shutil.copytree(one, tmp_path / "data")
    for name in ("shard-00001.npz.zst", "shard-00002.npz.zst", "shard-00006.npz.zst"):
        (folder / name).write_bytes(b"damaged")
    repaired = _torchrun(*_generate_args(teacher, folder)[2:], "--mode", "repair")
    assert repaired.returncode == 0, repaired.stderr
    assert sorted(line for line in repaired.stderr.splitlines() + repaired.stdout.splitlines()
                  if line.startswith("[repair] rewrote")) == [
        "[repair] rewrote shard-00001.npz.zst (indices 3..5)", "[repair] rewrote shard-00002.npz.zst (indices 6..8)",
        "[repair] rewrote shard-00006.npz.zst (indices 18..19)"]
    assert _folder_bytes(folder) == _folder_bytes(one)


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
    port = launch.free_port()
    mp.spawn(_fail_on_rank_one, args=(port, str(tmp_path)), nprocs=2)
    assert (tmp_path / "0").read_text() == "says: rank 1: the teacher folder is missing here"
    assert (tmp_path / "1").read_text() == "silent: rank 1: the teacher folder is missing here"


def _losses(run_dir: Path) -> list:
    return [json.loads(line)["loss"] for line in (run_dir / "stats.jsonl").read_text().splitlines()]


def test_train_d_on_two_ranks_follows_one_and_resumes_on_one_and_binarize_runs(one_process, tmp_path):
    teacher, data = one_process

    def args(run, steps=10):
        return ["--mode", "train_d", "--config", "tiny", f"teacher_path={teacher}", f"data_dir={data}",
                f"d_run_dir={tmp_path / run}", f"d_train_steps={steps}", "d_batch_size=4"]
    from pipeline.train import train_d
    train_d.train_d(config.resolve("tiny", args("one")[4:]))  # one process, in this one (no interpreter to start)
    two = _torchrun(*args("two"))
    assert two.returncode == 0, two.stderr
    assert "2 processes of batch 2" in two.stdout and (tmp_path / "two" / "student").is_dir()
    # the same global batch from other records: the losses follow each other within sampling noise
    for a, b in zip(_losses(tmp_path / "one"), _losses(tmp_path / "two"), strict=True):
        assert abs(a - b) < 0.2 * a, (a, b)
    b = _torchrun("--mode", "binarize", "--config", "tiny", f"teacher_path={teacher}", f"data_dir={data}",
                  f"d_run_dir={tmp_path / 'one'}", f"b_run_dir={tmp_path / 'b'}", "b_train_steps=4", "b_batch_size=4")
    assert b.returncode == 0 and b.stdout.count("[binarize] packed B:") == 1, b.stderr
    _assert_eval_d_on_two_ranks_reports_what_one_does(teacher, data, tmp_path)
    launcher = _launch(*args("killed", steps=20))
    _kill_a_rank_once(launcher, lambda: (tmp_path / "killed" / "checkpoint.pt").exists())
    resumed = subprocess.run([sys.executable, str(ROOT / "Main_Distill.py"), *args("killed", steps=20)], cwd=ROOT,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed" in resumed.stdout and "at step 20" not in resumed.stdout
    assert json.loads((tmp_path / "killed" / "stats.jsonl").read_text().splitlines()[-1])["step"] == 20


def _assert_eval_d_on_two_ranks_reports_what_one_does(teacher, data, tmp_path):
    """The ranks share the Inception features (each a half, gathered); rank 0 alone reports."""
    from pipeline.evaluation import evaluate
    items = {"teacher_path": teacher, "data_dir": data, "d_run_dir": tmp_path / "one", "b_run_dir": tmp_path / "b",
             "fid_cache_dir": tmp_path / "fid", "walk_frames": 0}
    args = [f"{k}={v}" for k, v in items.items()]
    one = evaluate.eval_d(config.resolve("tiny", [*args, f"eval_dir={tmp_path / 'eval1'}"]))
    (tmp_path / "fid").rename(tmp_path / "fid1")  # the two ranks compute the reference features again, shared
    two = _torchrun("--mode", "eval_d", "--config", "tiny", *args, f"eval_dir={tmp_path / 'eval2'}")
    assert two.returncode == 0 and two.stdout.count("[eval_d] report:") == 1, two.stderr
    report = json.loads((tmp_path / "eval2" / "report.json").read_text())
    for model in ("teacher", "d", "b", "real"):
        for key, value in one["scores"][model].items():
            if isinstance(value, float):  # only the grouping of the Inception batches differs
                assert report["scores"][model][key] == pytest.approx(value, rel=1e-3, abs=1e-4), (model, key)


def _weights(path: Path) -> dict:
    from safetensors.torch import load_file
    return load_file(path)


def _gap_over_move(one: dict, two: dict, start: dict) -> float:
    """How far two ends from one, against how far one moved from the start (sums of absolute differences)."""
    assert one.keys() == two.keys()
    gap = sum(float((one[k] - two[k].float()).abs().sum()) for k in one)
    moved = sum(float((one[k] - start[k].float()).abs().sum()) for k in one)
    assert moved > 0
    return gap / moved


def test_pretrain_and_rectify_on_two_ranks_train_what_one_process_trains(small_teacher, tmp_path):
    """Every rank draws the global batch alike and trains on its half: two processes end where one does (ranks
    drawing their own samples would end as far apart as the weights moved)."""
    from pipeline.train.pretrain import PretrainTrainer
    from pipeline.train.rectify import RectifyTrainer
    runs = {"pretrain": ({"train_steps": 3, "batch_size": 8, "lr_warmup_steps": 1, "precision": "fp32"},
                         lambda side: {"run_dir": tmp_path / side / "run", "teacher_path": tmp_path / side / "teacher"},
                         PretrainTrainer, Path("teacher") / "unet" / "diffusion_pytorch_model.safetensors", "batch 4"),
            "rectify": ({"teacher_path": small_teacher, "rect_steps": 5, "rect_depth_weights": "1,1",
                         "rect_batch_size": 4, "rect_train_steps": 3, "rect_rin_blocks": 0, "rect_r_blocks": 0,
                         "rect_head_blocks": 1, "rect_lora": "resnet", "rect_lora_rank": 2, "precision": "fp32"},
                        lambda side: {"rect_run_dir": tmp_path / side / "rect"},
                        RectifyTrainer, Path("rect") / "rnet" / "rnet.safetensors", "batch 2")}
    for mode, (items, folders, trainer_class, weights, batch) in runs.items():
        args = {side: [f"{k}={v}" for k, v in {**items, **folders(side)}.items()] for side in ("one", "two")}
        one = trainer_class(config.resolve("tiny", args["one"]))
        start = {k: v.detach().clone().float() for k, v in one.model.state_dict().items()}
        one.run()
        two = _torchrun("--mode", mode, "--config", "tiny", *args["two"], script="Main_Diffusion.py")
        assert two.returncode == 0 and two.stdout.count(f"2 processes of {batch}") == 1, two.stderr
        trained = _weights(tmp_path / "one" / weights)
        # measured: 5e-7 (pretrain) and 2e-6 (rectify); 0.4 when both ranks train on the same half
        assert _gap_over_move(trained, _weights(tmp_path / "two" / weights), start) < 0.01, mode


def _signal_rank_one_midway(rank, port, out):
    """Twenty steps of one all-reduce each; rank 1 alone gets SIGTERM (as cli handles it) inside step 5."""
    from pipeline import cli
    from pipeline.core import stop_request
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    signal.signal(signal.SIGTERM, cli._sigterm_as_interrupt)
    distributed.init()
    step, outcome = 0, "finished"
    try:
        with stop_request.step_boundaries():
            while step < 20:
                stop_request.check()
                if rank == 1 and step == 5:
                    os.kill(os.getpid(), signal.SIGTERM)
                torch.distributed.all_reduce(torch.ones(1))  # the step's gradients
                step += 1
    except KeyboardInterrupt:
        outcome = f"interrupted after step {step}"
    except RuntimeError as err:  # the peer left in the middle of a collective
        outcome = f"failed: {type(err).__name__}"
    Path(out, str(rank)).write_text(outcome)
    kept_handler = signal.getsignal(signal.SIGTERM) is cli._sigterm_as_interrupt
    Path(out, f"{rank}.handler").write_text(str(kept_handler))
    distributed.finish()


def test_a_signal_on_one_rank_stops_every_rank_after_the_same_step(tmp_path):
    port = launch.free_port()
    mp.spawn(_signal_rank_one_midway, args=(port, str(tmp_path)), nprocs=2)
    assert (tmp_path / "0").read_text() == (tmp_path / "1").read_text() == "interrupted after step 6"
    assert (tmp_path / "0.handler").read_text() == (tmp_path / "1.handler").read_text() == "True"
