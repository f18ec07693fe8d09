import json

import pytest
import torch
from safetensors.torch import load_file

from pipeline.core import config
from pipeline.teacher import teachers
from pipeline.train.pretrain import PretrainTrainer, learning_rate

from conftest import assert_one_sentence_error, run_cli


def _cfg(tmp_path, **extra):
    items = {"run_dir": tmp_path / "run", "teacher_path": tmp_path / "teacher", **extra}
    return config.resolve("tiny", [f"{k}={v}" for k, v in items.items()])


def test_pretrain_resumes_and_writes_a_loadable_teacher(tmp_path):
    PretrainTrainer(_cfg(tmp_path, train_steps=2)).run()
    first = load_file(tmp_path / "teacher" / "unet" / "diffusion_pytorch_model.safetensors")
    trainer = PretrainTrainer(_cfg(tmp_path, train_steps=4, overwrite_teacher="true"))
    assert trainer.step == 2  # resumed from checkpoint.pt
    trainer.run()
    stats = [json.loads(line) for line in (tmp_path / "run" / "stats.jsonl").read_text().splitlines()]
    assert [r["step"] for r in stats] == [2, 4]  # the shared loop's log, with its gradient norm and data stall
    assert all(r["grad_norm"] > 0 and 0 <= r["data_wait_fraction"] < 1 for r in stats)
    unet, scheduler, _ = teachers.load_teacher(_cfg(tmp_path))
    assert list(unet.config.block_out_channels) == [16, 32] and scheduler.config.num_train_timesteps == 1000
    second = unet.state_dict()
    assert any(not torch.equal(first[k], second[k]) for k in first)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["train_steps"] == 4
    assert json.loads((tmp_path / "teacher" / "pretrain_config.json").read_text())["train_steps"] == 4


class _InterruptedAfterStep3(PretrainTrainer):
    def periodic(self):
        if self.step == 3:
            raise KeyboardInterrupt  # as Ctrl-C / SIGTERM reach the loop


def test_an_interrupted_and_resumed_run_equals_an_uninterrupted_one(tmp_path):
    straight = PretrainTrainer(_cfg(tmp_path / "a", train_steps=5))
    straight.run()
    with pytest.raises(KeyboardInterrupt):
        _InterruptedAfterStep3(_cfg(tmp_path / "b", train_steps=5)).run()
    resumed = PretrainTrainer(_cfg(tmp_path / "b", train_steps=5))
    assert resumed.step == 3
    resumed.run()
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_pretrain_refuses_to_replace_an_existing_teacher(small_teacher, tmp_path):
    result = run_cli("Main_Diffusion.py", "--mode", "pretrain", "--config", "tiny", f"teacher_path={small_teacher}",
                     f"run_dir={tmp_path}")
    assert_one_sentence_error(result, "already exists", "overwrite_teacher=true")


def test_resume_with_another_architecture_is_refused(tmp_path):
    PretrainTrainer(_cfg(tmp_path, train_steps=1)).run()
    result = run_cli("Main_Diffusion.py", "--mode", "pretrain", "--config", "tiny", f"run_dir={tmp_path / 'run'}",
                     f"teacher_path={tmp_path / 'other'}", "unet_channels=8,16")
    assert_one_sentence_error(result, "unet_channels")


def test_learning_rate_warms_up_then_decays():
    cfg = config.resolve("fashion_mnist")
    assert learning_rate(cfg, 0) < learning_rate(cfg, cfg["lr_warmup_steps"]) == cfg["lr"]
    assert abs(learning_rate(cfg, cfg["train_steps"]) - 0.1 * cfg["lr"]) < 1e-12


def test_snapshots_are_teachers_that_load_with_their_step(tmp_path):
    PretrainTrainer(_cfg(tmp_path, train_steps=4, snapshot_every=2)).run()
    snapshots = sorted((tmp_path / "run" / "snapshots").iterdir())
    assert [s.name for s in snapshots] == ["step-000002", "step-000004"]
    first, _, _ = teachers.load_teacher(_cfg(tmp_path, teacher_path=snapshots[0]))
    last, _, _ = teachers.load_teacher(_cfg(tmp_path, teacher_path=snapshots[1]))
    exported, _, _ = teachers.load_teacher(_cfg(tmp_path))
    assert teachers.weights_sha256(last) == teachers.weights_sha256(exported) != teachers.weights_sha256(first)
    assert json.loads((snapshots[0] / "pretrain_config.json").read_text())["snapshot_step"] == 2
