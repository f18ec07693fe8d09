"""train_d: the streaming data, the loss going down, resume after SIGKILL, and refused inputs."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from pipeline.core import checkpoint
from pipeline.data import generate, teacher_data
from pipeline.students import student_d
from pipeline.train.train_d import DTrainer

from conftest import ROOT, assert_one_sentence_error, cli_args, run_cli, run_distill_in_process, tiny_config


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory, small_teacher):
    """12 records (5 chunks of a 10-step chain) from the small random teacher, made once."""
    folder = tmp_path_factory.mktemp("tiny_data")
    generate.generate(_cfg(small_teacher, folder))
    return folder


def _cfg(teacher, data, **overrides):
    return tiny_config({"teacher_path": teacher, "data_dir": data, **overrides})


def _args(teacher, data, run, **overrides):
    return cli_args({"teacher_path": teacher, "data_dir": data, "d_run_dir": run, **overrides})


def test_stream_never_yields_held_out_records_and_covers_the_rest(small_teacher, tiny_data):
    cfg = _cfg(small_teacher, tiny_data, holdout_samples=4, d_batch_size=4, shuffle_buffer=4, data_workers=2)
    manifest = teacher_data.open_data(cfg)
    holdout, train = teacher_data.split(cfg, manifest)
    assert holdout == (0, 4) and train == (4, 12)
    seen = []
    stream = teacher_data.batches(cfg, manifest, *train, seed=[0, 0], batch_size=cfg["d_batch_size"])
    for _ in range(12):
        batch = next(stream)
        assert batch["chunks"].shape == (4, 5, 1, 32, 32) and batch["x_T"].dtype == torch.float32
        seen += batch["index"].tolist()
    assert min(seen) >= 4 and set(seen) == set(range(4, 12))
    held = teacher_data.read_range(manifest, *holdout)
    assert held["index"].tolist() == [0, 1, 2, 3]
    # the residual chunks telescope to the teacher's image (up to int8 quantization)
    z = held["rin0"] + held["chunks"].sum(dim=1)
    assert (z.clamp(-1, 1) - held["x0"]).abs().mean() < 0.05


def test_loss_goes_down_on_a_tiny_dataset(small_teacher, tiny_data, tmp_path):
    cfg = _cfg(small_teacher, tiny_data, d_run_dir=tmp_path / "run", d_train_steps=80, d_lr=0.003,
               d_checkpoint_every=80, data_workers=0)
    DTrainer(cfg).run()
    stats = [json.loads(line) for line in (tmp_path / "run" / "stats.jsonl").read_text().splitlines()]
    assert [s["step"] for s in stats] == list(range(10, 81, 10))
    assert stats[-1]["loss"] < 0.7 * stats[0]["loss"]
    assert len(stats[0]["chunk_losses"]) == 5 and 0 <= stats[0]["data_wait_fraction"] <= 1
    assert (tmp_path / "run" / "student" / "model.safetensors").is_file()
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["holdout_indices"] == [0, 4] and run["train_indices"] == [4, 12]


def test_a_run_can_start_from_a_trained_d_and_a_d_of_another_layout_is_refused(capsys, small_teacher, tiny_data,
                                                                               tmp_path):
    first = tmp_path / "first"
    DTrainer(_cfg(small_teacher, tiny_data, d_run_dir=first, d_train_steps=20, d_lr=0.003, d_checkpoint_every=20,
                  data_workers=0)).run()
    trained = student_d.load_student(first / "student")
    cfg = _cfg(small_teacher, tiny_data, d_run_dir=tmp_path / "second", d_init_from=str(first / "student"),
               d_train_steps=1, d_checkpoint_every=1, data_workers=0)
    started = DTrainer(cfg).model
    assert all(torch.equal(a, b) for a, b in zip(started.state_dict().values(), trained.state_dict().values()))
    teacher_started = DTrainer(_cfg(small_teacher, tiny_data, d_run_dir=tmp_path / "third", data_workers=0)).model
    assert not torch.equal(teacher_started.heads[0].rin_skip.weight, trained.heads[0].rin_skip.weight)
    result = run_distill_in_process(capsys, "--mode", "train_d", *_args(
        small_teacher, tiny_data, tmp_path / "fourth", d_init_from=first / "student", d_head_channels=8))
    assert_one_sentence_error(result, "has another layout", "head_channels")
    result = run_distill_in_process(capsys, "--mode", "train_d", *_args(
        small_teacher, tiny_data, tmp_path / "fifth", d_init_from=tmp_path / "none"))
    assert_one_sentence_error(result, "holds no student")


def test_resume_after_sigkill_continues_from_the_saved_step(small_teacher, tiny_data, tmp_path):
    run = tmp_path / "run"
    args = _args(small_teacher, tiny_data, run, d_train_steps=100, d_checkpoint_every=5)
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.Popen([sys.executable, str(ROOT / "Main_Distill.py"), "--mode", "train_d", *args], cwd=ROOT,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and not (run / checkpoint.LATEST).is_file():
        time.sleep(0.2)
    time.sleep(0.3)  # killed between checkpoints, long before the last step
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved = torch.load(run / checkpoint.LATEST, weights_only=True)["step"]
    assert 0 < saved < 100
    result = run_cli("Main_Distill.py", "--mode", "train_d", *args)
    assert result.returncode == 0, result.stderr
    assert f"at step {saved}" in result.stdout
    assert torch.load(run / checkpoint.LATEST, weights_only=True)["step"] == 100


def test_bad_inputs_are_one_sentence(capsys, small_teacher, tiny_data, tmp_path):
    run = tmp_path / "run"
    result = run_distill_in_process(capsys, "--mode", "train_d", *_args(small_teacher, tiny_data, run, holdout_samples=0))
    assert_one_sentence_error(result, "'holdout_samples' must be positive")
    result = run_distill_in_process(capsys, "--mode", "train_d", *_args(small_teacher, tiny_data, run, holdout_samples=12))
    assert_one_sentence_error(result, "leaves no training records")
    result = run_distill_in_process(capsys, "--mode", "train_d", *_args(small_teacher, tmp_path / "none", run))
    assert_one_sentence_error(result, "has no manifest.json", "generate data there first")

    assert run_distill_in_process(capsys, "--mode", "train_d", *_args(small_teacher, tiny_data, run,
                                                                   d_train_steps=2)).returncode == 0
    result = run_distill_in_process(capsys, "--mode", "train_d", *_args(small_teacher, tiny_data, run, d_train_steps=2,
                                                                     d_head_channels=8))
    assert_one_sentence_error(result, "d_head_channels")
    (run / checkpoint.LATEST).write_bytes(b"not a checkpoint")
    result = run_distill_in_process(capsys, "--mode", "train_d", *_args(small_teacher, tiny_data, run, d_train_steps=2))
    assert_one_sentence_error(result, "cannot be read")

    other = tmp_path / "other_teacher"
    from pipeline.teacher import teachers
    torch.manual_seed(1)
    cfg = _cfg(small_teacher, tiny_data)
    teachers.save_teacher(teachers.new_unet(cfg, channels=1), teachers.new_scheduler(cfg), other)
    result = run_distill_in_process(capsys, "--mode", "train_d", *_args(other, tiny_data, tmp_path / "run2"))
    assert_one_sentence_error(result, "is not the one that made")


def _copy_of(folder, tmp_path):
    import shutil
    copy = tmp_path / "data"
    shutil.copytree(folder, copy)
    return copy


def test_resume_on_data_that_grew_is_refused(small_teacher, tiny_data, tmp_path):
    data = _copy_of(tiny_data, tmp_path)
    args = _args(small_teacher, data, tmp_path / "run", d_train_steps=2)
    assert run_cli("Main_Distill.py", "--mode", "train_d", *args).returncode == 0
    generate.generate(_cfg(small_teacher, data, samples_total=14))
    result = run_cli("Main_Distill.py", "--mode", "train_d", *args)
    assert_one_sentence_error(result, "grew or changed", "another run folder")


def test_a_damaged_shard_stops_training_before_step_1(small_teacher, tiny_data, tmp_path):
    data = _copy_of(tiny_data, tmp_path)
    shard = sorted(data.glob("shard-*.npz.zst"))[-1]
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    shard.write_bytes(bytes(raw))
    result = run_cli("Main_Distill.py", "--mode", "train_d", *_args(small_teacher, data, tmp_path / "run"))
    assert_one_sentence_error(result, shard.name)
    assert not (tmp_path / "run" / checkpoint.LATEST).exists()
