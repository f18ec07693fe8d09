"""A plain launch runs stages as worker processes (key procs, pipeline/core/launch.py): how many, the same bytes as
one process, one sentence for a worker's error, and no worker outliving a killed launcher."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pipeline import cli
from pipeline.core import config, cpu, launch
from pipeline.core.errors import AlreadySaid, UserError

from conftest import ROOT, assert_one_sentence_error, run_cli, run_distill_in_process

STAGES = ("generate", "train_d", "binarize", "eval_d")


@pytest.fixture
def machine(monkeypatch):
    """The probes of launch.plan set by hand: ``machine(cores, gpu, kind)``; not under torchrun."""
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)

    def make(cores=2, gpu=False, kind=cpu.AVX2):
        monkeypatch.setattr(launch, "usable_cores", lambda: cores)
        monkeypatch.setattr(launch, "gpu_in_use", lambda cfg: gpu)
        monkeypatch.setattr(cpu, "kind", lambda cpu_flags=None: kind)
    return make


@pytest.mark.parametrize("cores, gpu, kind, procs, torchrun, expected", [
    (2, False, cpu.AVX2, 0, False, (2, 2, 2, 1)),  # auto on a 2-core CPU: eval_d stays one process
    (2, False, cpu.AMX, 0, False, (2, 2, 2, 1)),
    (2, False, cpu.OTHER, 0, False, (2, 2, 2, 1)),  # an unmeasured kind gets what paid on the measured ones
    (2, False, cpu.AVX512_BF16, 0, False, (2, 2, 2, 1)),  # the Zen 4: two workers paid at full size there too
    (16, False, cpu.AVX2, 0, False, (2, 2, 2, 1)),
    (2, False, cpu.AVX2, 1, False, (1, 1, 1, 1)),  # procs=1: one process
    (2, False, cpu.AVX2, 0, True, (1, 1, 1, 1)),  # under torchrun the ranks are already there
    (2, True, cpu.AVX2, 0, False, (1, 1, 1, 1)),  # a GPU: nothing changes
    (1, False, cpu.AVX2, 0, False, (1, 1, 1, 1)),
    (2, False, cpu.AVX2, 3, False, (3, 3, 3, 3)),  # procs=N: every stage that reads the key
])
def test_auto_gives_two_workers_on_a_cpu_only_machine_of_two_cores(machine, monkeypatch, cores, gpu,
                                                                                    kind, procs, torchrun, expected):
    machine(cores, gpu, kind)
    if torchrun:
        monkeypatch.setenv("RANK", "0")
        monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = config.resolve("fashion_mnist", [f"procs={procs}"])
    assert launch.plan(cfg, STAGES) == dict(zip(STAGES, expected))
    assert launch.plan(cfg, ("sample",)) == {"sample": 1}  # a stage that runs in one process only


def test_the_choice_is_said_in_one_line(machine):
    machine(cores=2)
    cfg = config.resolve("fashion_mnist", ["procs=0"])
    assert launch.describe(cfg, launch.plan(cfg, STAGES)) == (
        "[procs] generate, train_d and binarize run as 2 worker processes of 1 thread each (torch.distributed, "
        "2 cores), eval_d in this process; procs=1 runs every stage in this one process")
    assert launch.describe(cfg, {"generate": 1}) is None
    assert launch.describe(config.resolve("fashion_mnist", ["procs=1"]), dict.fromkeys(STAGES, 1)) is None


@pytest.mark.parametrize("flags, kind, fast_bf16", [
    ({"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}, cpu.AMX, True),
    ({"avx2", "avx512f", "avx512_bf16"}, cpu.AVX512_BF16, True),
    ({"avx2", "fma"}, cpu.AVX2, False),
    ({"asimd"}, cpu.OTHER, False),
    (set(), cpu.OTHER, False),
])
def test_the_cpu_kind_is_the_strongest_instruction_set_its_flags_name(flags, kind, fast_bf16):
    assert cpu.kind(flags) == kind
    assert cpu.has_fast_bf16(flags) == fast_bf16


def test_mode_all_runs_each_stage_as_its_own_group_and_eval_d_in_the_launcher(machine, monkeypatch, small_teacher,
                                                                             tmp_path, capsys):
    machine(cores=2)
    happened = []
    monkeypatch.setattr(launch, "run_workers", lambda cfg, script, argv, count, stage:
                        happened.append((stage, count, argv[:4])))
    modes = {"all": cli.Mode("all", STAGES, None, before=lambda cfg: happened.append("checks"))}
    modes.update({stage: cli.Mode(stage, (stage,), lambda cfg, stage=stage: happened.append(stage))
                  for stage in STAGES})
    items = {"procs": 0, "teacher_path": small_teacher, "data_dir": tmp_path / "data"}
    code = cli.main("Main_Distill.py", "", modes, default_mode="all", script=ROOT / "Main_Distill.py",
                    argv=["--config", "tiny", *[f"{k}={v}" for k, v in items.items()]])
    assert code == 0 and "eval_d in this process" in capsys.readouterr().out
    assert happened == ["checks", *[(stage, 2, ["--mode", stage, "--config", "tiny"])
                                    for stage in ("generate", "train_d", "binarize")], "eval_d"]


def test_a_refused_procs_is_one_sentence(capsys, tmp_path):
    result = run_distill_in_process(capsys, "--mode", "generate", "--config", "tiny", f"data_dir={tmp_path}",
                                    "procs=-1")
    assert_one_sentence_error(result, "config key 'procs' must be zero or positive, got -1")


def test_exit_statuses_of_workers_become_what_the_user_reads():
    said = launch.failure(1, 2, count=2, stage="generate", port=5)
    assert isinstance(said, AlreadySaid)  # rank 0 printed the sentence: the launcher adds nothing
    assert isinstance(launch.failure(0, 130, count=2, stage="generate", port=5), KeyboardInterrupt)
    joined = launch.failure(1, launch.JOIN_FAILED, count=2, stage="train_d", port=5)
    assert type(joined) is UserError and "127.0.0.1:5" in str(joined) and "procs=1" in str(joined)
    killed = launch.failure(1, -signal.SIGKILL, count=2, stage="binarize", port=5)
    assert str(killed) == ("worker process 1 of 2 (binarize) ended with signal SIGKILL (its messages are above); "
                           "rerun the same command to resume, or set procs=1 to run it in this one process")


class _Ended:
    """A worker that has already ended with ``code``."""

    def __init__(self, code):
        self.returncode = code

    def poll(self):
        return self.returncode


def test_workers_that_fail_between_two_polls_are_a_failure():
    assert launch.wait_for([_Ended(2), _Ended(2)]) == (0, 2)
    assert launch.wait_for([_Ended(0), _Ended(-signal.SIGKILL)]) == (1, -signal.SIGKILL)
    assert launch.wait_for([_Ended(0), _Ended(0)]) is None


def _generate_args(teacher, folder, **overrides):
    items = {"teacher_path": teacher, "data_dir": folder, "samples_total": 20, "shard_size": 3, "gen_batch_size": 3,
             "steps": 4, "chunks": 2, "num_threads": 0, **overrides}
    return ["--mode", "generate", "--config", "tiny", *[f"{k}={v}" for k, v in items.items()]]


def _folder_bytes(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name.startswith(("shard-", "manifest"))}


def _default_launch():
    """procs=0 (auto) where it starts two workers; procs=2 where auto would not (a machine of one core)."""
    return "procs=0" if launch.usable_cores() >= launch.AUTO_WORKERS else "procs=2"


@pytest.fixture(scope="module")
def one_process(small_teacher, tmp_path_factory):
    """The folder one process of one thread writes (procs=1): what the workers must match byte for byte. (With
    two threads one process may differ at rounding level: measured 1 of the stored values in 3 of these 7 shards,
    the same with or without workers; the teacher's convolutions then add in another order.)"""
    folder = tmp_path_factory.mktemp("one") / "data"
    result = run_cli("Main_Distill.py", *_generate_args(small_teacher, folder, procs=1, num_threads=1))
    assert result.returncode == 0, result.stderr
    return small_teacher, folder


def test_generate_on_the_default_launch_writes_the_bytes_of_one_process(one_process, tmp_path):
    teacher, one = one_process
    two = run_cli("Main_Distill.py", *_generate_args(teacher, tmp_path / "two"), _default_launch())
    assert two.returncode == 0, two.stderr
    assert "[procs] generate runs as 2 worker processes of 1 thread each" in two.stdout
    assert two.stdout.count("[config]") == 1 and "on 2 processes" in two.stdout
    assert _folder_bytes(tmp_path / "two") == _folder_bytes(one)


def test_a_user_error_in_a_worker_is_one_sentence_and_exit_status_2(tmp_path):
    (tmp_path / "teacher").mkdir()  # no weights: both workers refuse while loading the teacher
    result = run_cli("Main_Distill.py", *_generate_args(tmp_path / "teacher", tmp_path / "data"), _default_launch())
    assert "[procs] generate runs as 2 worker processes" in result.stdout
    assert result.returncode == 2
    assert_one_sentence_error(result, "no teacher weights in")


def _launch(*args):
    return subprocess.Popen([sys.executable, str(ROOT / "Main_Distill.py"), *args], cwd=ROOT,
                            env=dict(os.environ, HF_HUB_OFFLINE="1"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def _workers_of(launcher) -> list:
    return [int(pid) for pid in Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text().split()]


def _running(pid: int) -> bool:
    """The process exists and is not a zombie waiting for its reaper."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def _listed(manifest: Path) -> int:
    return len(json.loads(manifest.read_text())["shards"]) if manifest.exists() else 0


def _stop_midway(launcher, manifest: Path, how) -> list:
    """Once the workers listed two more shards, ``how`` the launcher (SIGTERM, SIGKILL); its workers' pids."""
    deadline, wanted = time.time() + 240, _listed(manifest) + 2
    while time.time() < deadline and launcher.poll() is None and _listed(manifest) < wanted:
        time.sleep(0.05)
    workers = _workers_of(launcher)
    assert len(workers) == 2, "the run was not stopped midway"
    launcher.send_signal(how)
    launcher.wait(timeout=120)
    return workers


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_sigterm_and_sigkill_of_the_launcher_stop_every_worker_and_a_rerun_resumes(one_process, tmp_path):
    teacher, one = one_process
    folder = tmp_path / "data"
    manifest = folder / "manifest.json"
    args = [*_generate_args(teacher, folder, samples_total=60), _default_launch()]
    interrupted = _launch(*args)
    workers = _stop_midway(interrupted, manifest, signal.SIGTERM)
    assert interrupted.returncode == 130 and not any(map(_running, workers))
    assert interrupted.stderr.read().count("interrupted:") == 1
    killed = _launch(*args)
    workers = _stop_midway(killed, manifest, signal.SIGKILL)
    deadline = time.time() + 10  # the kernel sends SIGKILL to each at once (PR_SET_PDEATHSIG)
    while time.time() < deadline and any(map(_running, workers)):
        time.sleep(0.05)
    assert not any(map(_running, workers))
    listed = _listed(manifest)
    assert 4 <= listed < 20
    resumed = run_cli("Main_Distill.py", *args)  # the same command
    assert resumed.returncode == 0, resumed.stderr
    assert f"{3 * listed} samples present" in resumed.stdout
    full_shards = [f"shard-{number:05d}.npz.zst" for number in range(6)]  # one's last shard holds 2 of 3
    assert [(folder / name).read_bytes() for name in full_shards] == [(one / name).read_bytes() for name in full_shards]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_sigterm_of_two_training_workers_saves_one_step_of_both_and_a_rerun_resumes(one_process, tmp_path):
    """The workers stop at the same step boundary (pipeline/core/stop_request.py), so rank 0 saves whatever the other
    rank was doing; no periodic checkpoint is due, so the checkpoint can only come from the interrupt."""
    teacher, data = one_process
    run = tmp_path / "d"
    args = ["--mode", "train_d", "--config", "tiny", f"teacher_path={teacher}", f"data_dir={data}", f"d_run_dir={run}",
            "d_train_steps=150", "d_checkpoint_every=1000", "d_batch_size=4", _default_launch()]
    launcher = _launch(*args)
    deadline = time.time() + 240
    while time.time() < deadline and launcher.poll() is None and not (run / "stats.jsonl").exists():
        time.sleep(0.05)  # the first log line: ten steps are done and both workers are in the loop
    workers = _workers_of(launcher)
    assert len(workers) == 2, "the run was not stopped midway"
    launcher.send_signal(signal.SIGTERM)
    launcher.wait(timeout=120)
    stderr = launcher.stderr.read()
    assert launcher.returncode == 130 and not any(map(_running, workers)), stderr
    assert stderr.count("interrupted:") == 1 and "Traceback" not in stderr and "terminate called" not in stderr, stderr
    saved = torch.load(run / "checkpoint.pt", weights_only=True)["step"]
    assert 10 <= saved < 150
    resumed = run_cli("Main_Distill.py", *args[:-1], "procs=1")  # the same run, resumed in one process
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed {run / 'checkpoint.pt'} at step {saved}" in resumed.stdout
