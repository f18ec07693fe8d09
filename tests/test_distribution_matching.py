"""Distribution matching (DMD): its direction and loss against NumPy, its gradient, the fake denoiser's training,
its state in the checkpoint only, an exact resume and a refused noise range (each key's own refusal is in
test_adversarial's table of the distribution-level keys)."""
import json

import numpy as np
import pytest
import torch

from pipeline.core import checkpoint
from pipeline.data import generate
from pipeline.students import student_d
from pipeline.train import distribution_matching as dm
from pipeline.train.train_d import DTrainer

from conftest import assert_one_sentence_error, cli_args, run_distill_in_process, tiny_config
from test_adversarial import straight_and_resumed


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory, small_teacher):
    folder = tmp_path_factory.mktemp("dm_data")
    generate.generate(tiny_config({"teacher_path": small_teacher, "data_dir": folder}))
    return folder


def _cfg(teacher, data, run, **overrides):
    return tiny_config({"teacher_path": teacher, "data_dir": data, "d_run_dir": run, "data_workers": 0,
                        "lambda_dm": 1.0, **overrides})


def test_direction_and_loss_match_their_numpy_formulas():
    rng = np.random.default_rng(0)
    x, real, fake = (rng.standard_normal((3, 2, 4, 4)).astype(np.float32) for _ in range(3))
    scale = np.abs(x - real).mean(axis=(1, 2, 3), keepdims=True)
    expected = (fake - real) / scale
    direction = dm.matching_direction(*(torch.from_numpy(a) for a in (x, real, fake)))
    np.testing.assert_allclose(direction.numpy(), expected, rtol=1e-6)
    x_t = torch.from_numpy(x).requires_grad_(True)
    loss = dm.matching_loss(x_t, direction)
    assert loss.item() == pytest.approx(0.5 * np.mean(expected ** 2), rel=1e-6)
    loss.backward()
    np.testing.assert_allclose(x_t.grad.numpy(), expected / x.size, rtol=1e-5)  # the student follows -g


def test_x0_estimate_inverts_the_forward_noising():
    class EpsilonOracle(torch.nn.Module):  # a denoiser that knows the noise: its x0 estimate is exact
        def __init__(self, eps):
            super().__init__()
            self.eps = eps

        def forward(self, x_t, t):
            return type("Out", (), {"sample": self.eps})()
    rng = np.random.default_rng(1)
    x0, eps = (torch.from_numpy(rng.standard_normal((2, 1, 4, 4)).astype(np.float32)) for _ in range(2))
    abar = torch.tensor([0.9, 0.01]).view(-1, 1, 1, 1)
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
    estimate = dm.x0_estimate(EpsilonOracle(eps), x_t, torch.tensor([1, 900]), abar, None, torch.device("cpu"))
    torch.testing.assert_close(estimate, x0, rtol=1e-4, atol=1e-4)


def test_training_updates_the_fake_denoiser_and_keeps_it_out_of_the_student(small_teacher, tiny_data, tmp_path):
    trainer = DTrainer(_cfg(small_teacher, tiny_data, tmp_path / "run", d_train_steps=3, d_checkpoint_every=3))
    before = {k: v.clone() for k, v in trainer.matching.fake.state_dict().items()}
    real_before = {k: v.clone() for k, v in trainer.matching.real.state_dict().items()}
    trainer.run()
    stats = [json.loads(line) for line in (tmp_path / "run" / "stats.jsonl").read_text().splitlines()]
    assert {"loss_dm", "loss_dm_direction_rms", "loss_fake_denoiser"} <= set(stats[-1])
    after = trainer.matching.fake.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the fake denoiser learned
    assert all(torch.equal(real_before[k], v) for k, v in trainer.matching.real.state_dict().items())  # frozen
    state = torch.load(tmp_path / "run" / checkpoint.LATEST, weights_only=True)
    assert state["fake_denoiser"] and state["fake_denoiser_optimizer"]
    exported = student_d.load_student(tmp_path / "run" / "student")
    assert student_d.parameter_count(exported) == student_d.parameter_count(trainer.model)  # no denoiser inside


def test_a_share_of_the_batch_is_all_the_term_reads(small_teacher, tiny_data, tmp_path):
    trainer = DTrainer(_cfg(small_teacher, tiny_data, tmp_path / "run", dm_batch_size=2))
    images = torch.rand(5, 1, 32, 32, requires_grad=True)
    with torch.no_grad():  # the fake denoiser starts as the teacher, which gives no direction at all
        for p in trainer.matching.fake.parameters():
            p.add_(0.01 * torch.randn_like(p))
    weighted, _ = trainer.matching.student_loss(images, 1.0, step=0)
    weighted.backward()
    assert images.grad[:2].abs().sum() > 0 and images.grad[2:].abs().sum() == 0
    assert trainer.matching.after_step(1)["loss_fake_denoiser"] > 0  # it learns from those two images
    assert "on 2 images of the batch" in trainer.matching.describe()


def test_fresh_noise_is_all_the_term_reads_and_the_student_runs_on_it(small_teacher, tiny_data, tmp_path):
    trainer = DTrainer(_cfg(small_teacher, tiny_data, tmp_path / "run", dm_batch_size=2, dm_noise="fresh",
                            d_train_steps=2, d_checkpoint_every=2))
    x_T = torch.zeros(3, 1, 32, 32)
    inputs = trainer.matching.fresh_noise(x_T, step=5)
    assert inputs.shape == (5, 1, 32, 32) and torch.equal(inputs[:3], x_T) and inputs[3:].std() > 0.5
    assert torch.equal(inputs, trainer.matching.fresh_noise(x_T, step=5))  # a function of (seed, rank, step)
    assert not torch.equal(inputs[3:], trainer.matching.fresh_noise(x_T, step=6)[3:])
    images = torch.rand(5, 1, 32, 32, requires_grad=True)
    with torch.no_grad():
        for p in trainer.matching.fake.parameters():
            p.add_(0.01 * torch.randn_like(p))
    trainer.matching.student_loss(images, 1.0, step=0)[0].backward()
    assert images.grad[:3].abs().sum() == 0 and images.grad[3:].abs().sum() > 0
    assert "on 2 images of fresh x_T" in trainer.matching.describe()
    trainer.run()  # the student's batch grows by the fresh rows; the paired losses read the records' rows only
    stats = [json.loads(line) for line in (tmp_path / "run" / "stats.jsonl").read_text().splitlines()]
    assert np.isfinite(stats[-1]["loss_dm"]) and np.isfinite(stats[-1]["loss"])
    batch_only = DTrainer(_cfg(small_teacher, tiny_data, tmp_path / "run2", dm_batch_size=2))
    assert batch_only.matching.fresh_noise(x_T, step=5) is x_T


def test_resume_after_an_interrupt_is_bit_identical(small_teacher, tiny_data, tmp_path, monkeypatch):
    a, b = straight_and_resumed(lambda run, **cfg: _cfg(small_teacher, tiny_data, run, **cfg), tmp_path, monkeypatch,
                                d_train_steps=4, d_checkpoint_every=2, lambda_feat=0.5)
    for part in ("model", "fake_denoiser"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part


def test_a_reversed_noise_range_is_refused_with_one_sentence(capsys, small_teacher, tiny_data, tmp_path):
    args = cli_args({"teacher_path": small_teacher, "data_dir": tiny_data, "d_run_dir": tmp_path / "run"})
    result = run_distill_in_process(capsys, "--mode", "train_d", *args, "lambda_dm=1", "dm_t_min=0.9", "dm_t_max=0.5")
    assert_one_sentence_error(result, "dm_t_min=0.9 is above dm_t_max=0.5")


def test_fresh_noise_without_a_count_is_refused_with_one_sentence(capsys, small_teacher, tiny_data, tmp_path):
    args = cli_args({"teacher_path": small_teacher, "data_dir": tiny_data, "d_run_dir": tmp_path / "run"})
    result = run_distill_in_process(capsys, "--mode", "train_d", *args, "lambda_dm=1", "dm_noise=fresh")
    assert_one_sentence_error(result, "dm_noise=fresh draws dm_batch_size new x_T", "dm_batch_size=16")
