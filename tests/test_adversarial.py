"""The distribution-level term of D: its losses against NumPy, the teacher encoder, training with it, its
state in the checkpoint only, an exact resume, refused keys, no Inception anywhere near a training loss, and a
diverged run that stops with one sentence."""
import ast
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.core import checkpoint, parts
from pipeline.data import generate, teacher_data
from pipeline.students import packed, student_d
from pipeline.teacher import teachers
from pipeline.train import adversarial
from pipeline.train.binarize import BTrainer
from pipeline.train.train_d import DTrainer

from conftest import ROOT, assert_one_sentence_error, cli_args, run_distill_in_process, tiny_config


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory, small_teacher):
    folder = tmp_path_factory.mktemp("adv_data")
    generate.generate(tiny_config({"teacher_path": small_teacher, "data_dir": folder}))
    return folder


def _cfg(teacher, data, run, **overrides):
    return tiny_config({"teacher_path": teacher, "data_dir": data, "d_run_dir": run, "data_workers": 0,
                        "lambda_adv": 0.1, "lambda_feat": 1.0, **overrides})


def _logits(rng, shapes):
    return [torch.from_numpy(rng.standard_normal(s).astype(np.float32)) for s in shapes]


def test_losses_match_their_numpy_formulas():
    rng = np.random.default_rng(0)
    shapes = [(4, 1, 8, 8), (4, 1, 4, 4)]
    real, fake = _logits(rng, shapes), _logits(rng, shapes)
    hinge = np.mean([np.maximum(0, 1 - r.numpy()).mean() + np.maximum(0, 1 + f.numpy()).mean()
                     for r, f in zip(real, fake)])
    assert float(adversarial.hinge_discriminator_loss(real, fake)) == pytest.approx(hinge, rel=1e-6)
    assert float(adversarial.generator_loss(fake)) == pytest.approx(-np.mean([f.numpy().mean() for f in fake]),
                                                                     rel=1e-6)
    a, b = _logits(rng, [(2, 3, 4, 4), (2, 5, 2, 2)]), _logits(rng, [(2, 3, 4, 4), (2, 5, 2, 2)])
    feat = np.mean([((x.numpy() - y.numpy()) ** 2).mean() for x, y in zip(a, b)])
    assert float(adversarial.feature_loss(a, b)) == pytest.approx(feat, rel=1e-6)
    unit = [x.numpy() / np.sqrt((x.numpy() ** 2).sum(axis=1, keepdims=True)) for x in a + b]
    normalized = np.mean([((x - y) ** 2).sum(axis=1).mean() for x, y in zip(unit[:2], unit[2:])])
    assert float(adversarial.feature_loss(a, b, "normalized")) == pytest.approx(normalized, rel=1e-5)
    assert float(adversarial.feature_loss(a, [3 * x for x in a], "normalized")) < 1e-6  # blind to scale


def test_adaptive_weight_is_the_ratio_of_gradient_norms_at_the_output_layer():
    rng = np.random.default_rng(2)
    x, w = rng.standard_normal((5, 3)), rng.standard_normal((3, 2))
    a, b = rng.standard_normal((5, 2)), rng.standard_normal((5, 2))
    weight = torch.tensor(w, requires_grad=True)
    y = torch.tensor(x) @ weight
    regression_loss, adversarial_loss = ((y - torch.tensor(a)) ** 2).mean(), (y * torch.tensor(b)).mean()
    # d/dW mean((xW - a)^2) = 2 x^T (xW - a) / n ;  d/dW mean(xW * b) = x^T b / n
    n = a.size
    expected = np.linalg.norm(2 * x.T @ (x @ w - a) / n) / np.linalg.norm(x.T @ b / n)
    ratio = adversarial.adaptive_weight(regression_loss, adversarial_loss, [weight])
    assert float(ratio) == pytest.approx(expected, rel=1e-6) and not ratio.requires_grad


@pytest.mark.parametrize("metric", ["mse", "pseudo_huber"])
def test_output_losses_match_their_numpy_formulas(metric):
    from pipeline.train.losses import LossWeights, PSEUDO_HUBER_C, d_losses
    rng = np.random.default_rng(1)
    pred = {"rin": torch.from_numpy(rng.standard_normal((3, 1, 8, 8)).astype(np.float32)),
            "chunks": torch.from_numpy(0.1 * rng.standard_normal((3, 4, 1, 8, 8)).astype(np.float32))}
    batch = {"chunks": torch.from_numpy(0.1 * rng.standard_normal((3, 4, 1, 8, 8)).astype(np.float32)),
             "x0": torch.from_numpy(rng.uniform(-1, 1, (3, 1, 8, 8)).astype(np.float32))}
    student = student_d.StudentD(dict(sample_size=8, in_channels=1, out_channels=1, block_out_channels=[8, 8],
                                     down_block_types=["DownBlock2D"] * 2, up_block_types=["UpBlock2D"] * 2,
                                     layers_per_block=1, norm_num_groups=4), chunks=4, image_channels=1,
                                latent_channels=1, space="pixel", timestep=9, head_channels=4)
    weights = LossWeights(metric, chunks=1.0, x0=0.1, rin=1.0)
    total, parts, _, images = d_losses(student, pred, batch, weights)

    def dist(a, b, axes):
        ms = ((a - b) ** 2).mean(axis=axes)
        return ms.mean() if metric == "mse" else (np.sqrt(ms + PSEUDO_HUBER_C ** 2) - PSEUDO_HUBER_C).mean()
    p, t = {k: v.numpy() for k, v in pred.items()}, {k: v.numpy() for k, v in batch.items()}
    image = p["rin"] + p["chunks"].sum(axis=1)
    assert np.allclose(images.numpy(), image, atol=1e-6)
    expected = dist(p["chunks"], t["chunks"], (2, 3, 4)) + 0.1 * dist(image, t["x0"], (1, 2, 3))
    assert float(total) == pytest.approx(expected, rel=1e-5)
    assert float(parts["chunks"]) == pytest.approx(dist(p["chunks"], t["chunks"], (2, 3, 4)), rel=1e-5)


def test_teacher_encoder_gives_the_full_unets_own_features(small_teacher):
    unet, _, _ = teachers.load_teacher(tiny_config({"teacher_path": small_teacher}))
    encoder = adversarial.TeacherEncoder(unet)
    seen = []
    hooks = [b.resnets[0].register_forward_hook(lambda m, i, o: seen.append(o)) for b in unet.down_blocks]
    hooks.append(unet.mid_block.register_forward_hook(lambda m, i, o: seen.append(o)))
    x, t = torch.randn(3, 1, 32, 32), torch.tensor([0, 5, 900])
    with torch.no_grad():
        unet(x, t)
        levels = encoder(x, t)
    for hook in hooks:
        hook.remove()
    assert [f.shape[1] for f in levels] == encoder.channels
    assert len(levels) == len(seen) and all(torch.allclose(a, b, atol=1e-6) for a, b in zip(levels, seen))
    assert not any(p.requires_grad for p in encoder.parameters())


def test_training_with_the_term_keeps_the_heads_in_the_checkpoint_only(small_teacher, tiny_data, tmp_path):
    DTrainer(_cfg(small_teacher, tiny_data, tmp_path / "run", d_train_steps=10, d_checkpoint_every=10)).run()
    stats = [json.loads(line) for line in (tmp_path / "run" / "stats.jsonl").read_text().splitlines()]
    assert {"loss_adv", "loss_feat", "loss_disc", "disc_real_logit", "disc_fake_logit"} <= set(stats[-1])
    state = torch.load(tmp_path / "run" / checkpoint.LATEST, weights_only=True)
    assert state["adversary_heads"] and state["adversary_optimizer"]["state"]
    exported = student_d.read_safetensors(tmp_path / "run" / "student" / student_d.WEIGHTS_FILE)[0]
    plain = student_d.StudentD.from_config(student_d.load_student(tmp_path / "run" / "student").config)
    assert set(exported) == set(plain.state_dict())  # the exported D holds D's own tensors, nothing of the term


def test_extra_noise_reaches_only_the_adversarial_loss(small_teacher, tiny_data, tmp_path):
    trainer = DTrainer(_cfg(small_teacher, tiny_data, tmp_path / "run", d_train_steps=2, adv_extra_noise=3,
                            adv_weighting="adaptive"))
    x_T = torch.randn(4, 1, 32, 32)
    a, b = trainer.adversary.extra_noise(x_T, 5), trainer.adversary.extra_noise(x_T, 5)
    assert a.shape == (7, 1, 32, 32) and torch.equal(a, b) and torch.equal(a[:4], x_T)
    assert not torch.equal(a[4:], trainer.adversary.extra_noise(x_T, 6)[4:])  # fresh every step
    assert torch.equal(a[4:], a[4:].half().float())  # float16 values, as the records' x_T
    seen = []
    original = trainer.adversary.student_loss
    trainer.adversary.student_loss = lambda images, *args: seen.append(len(images)) or original(images, *args)
    trainer.run()
    assert seen == [4 + 3, 4 + 3]  # the batch's records and the extra noise; the output losses saw the batch only


def test_the_ramp_grows_the_weights_linearly_then_holds_them(small_teacher, tiny_data, tmp_path):
    trainer = DTrainer(_cfg(small_teacher, tiny_data, tmp_path / "run", lambda_adv=0, lambda_feat=0.5,
                            adv_ramp_steps=4))
    images, teacher_images = torch.rand(3, 1, 32, 32) * 2 - 1, torch.rand(3, 1, 32, 32) * 2 - 1
    for step, share in [(0, 0.25), (1, 0.5), (3, 1.0), (40, 1.0)]:
        total, parts = trainer.adversary.student_loss(images, teacher_images, step)
        assert torch.allclose(total, share * 0.5 * parts["feat"]), step
    assert "ramped up over the first 4 steps" in trainer.adversary.describe()


def test_b_trains_with_the_term_and_packs_only_b(small_teacher, tiny_data, tmp_path):
    DTrainer(_cfg(small_teacher, tiny_data, tmp_path / "d", d_train_steps=2, lambda_adv=0, lambda_feat=0)).run()
    cfg = _cfg(small_teacher, tiny_data, tmp_path / "d", b_run_dir=tmp_path / "b", b_train_steps=4,
               b_checkpoint_every=4, adv_extra_noise=2)  # B's feature taps then hold extra rows, sliced away
    trainer = BTrainer(cfg)
    trainer.run()
    stats = [json.loads(line) for line in (tmp_path / "b" / "stats.jsonl").read_text().splitlines()]
    assert {"loss_adv", "loss_feat", "loss_disc", "sign_flip_fraction"} <= set(stats[-1])
    state = torch.load(tmp_path / "b" / checkpoint.LATEST, weights_only=True)
    assert state["adversary_heads"] and "lrm_bases" in state
    assert packed.load_packed(tmp_path / "b" / "packed") is not None  # built from B's config alone


def _fixed_batches(trainer):
    """Batch k is a function of k alone, so an interrupted run and an uninterrupted one read the same data."""
    rows = teacher_data.read_range(trainer.manifest, *trainer.train_range)
    size = trainer.local_batch

    def stream():
        if trainer.step == 0:
            trainer.first_batch({k: v[:size] for k, v in rows.items()})
        k = trainer.step
        while True:
            pick = [(k * size + i) % len(rows["index"]) for i in range(size)]
            yield {key: value[pick] for key, value in rows.items()}
            k += 1
    return stream()


def straight_and_resumed(make_cfg, tmp_path, monkeypatch, **cfg):
    """The last checkpoints of a run made straight through and of the same run interrupted after step 3 and resumed
    (batch k a function of k alone)."""
    monkeypatch.setattr(DTrainer, "batches", _fixed_batches)
    DTrainer(make_cfg(tmp_path / "straight", **cfg)).run()

    def stop_at_3(trainer):
        if trainer.step == 3:
            raise KeyboardInterrupt  # what cli.main turns SIGTERM into
    monkeypatch.setattr(DTrainer, "periodic", stop_at_3)
    with pytest.raises(KeyboardInterrupt):
        DTrainer(make_cfg(tmp_path / "resumed", **cfg)).run()
    monkeypatch.undo()
    monkeypatch.setattr(DTrainer, "batches", _fixed_batches)
    assert torch.load(tmp_path / "resumed" / checkpoint.LATEST, weights_only=True)["step"] == 3
    DTrainer(make_cfg(tmp_path / "resumed", **cfg)).run()
    return tuple(torch.load(tmp_path / r / checkpoint.LATEST, weights_only=True) for r in ("straight", "resumed"))


def test_resume_after_an_interrupt_is_bit_identical(small_teacher, tiny_data, tmp_path, monkeypatch):
    a, b = straight_and_resumed(lambda run, **cfg: _cfg(small_teacher, tiny_data, run, **cfg), tmp_path, monkeypatch,
                                d_train_steps=6, d_checkpoint_every=2)
    for part in ("model", "adversary_heads"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part


@pytest.mark.parametrize("key, value, fragment", [
    ("lambda_adv", "-1", "'lambda_adv' must be zero or positive"),
    ("lambda_feat", "nan", "'lambda_feat' must be zero or positive"),
    ("adv_real", "test", "'adv_real'"),
    ("adv_t_max", "0", "'adv_t_max' must be within (0, 1]"),
    ("adv_lr", "0", "'adv_lr' must be positive"),
    ("adv_weighting", "auto", "'adv_weighting'"),
    ("adv_extra_noise", "-2", "'adv_extra_noise' must be zero or positive"),
    ("adv_ramp_steps", "-1", "'adv_ramp_steps' must be zero or positive"),
    ("loss_metric", "l1", "'loss_metric'"),
    ("feat_metric", "lpips", "'feat_metric'"),
    ("lambda_dm", "-1", "'lambda_dm' must be zero or positive"),
    ("dm_lr", "0", "'dm_lr' must be positive"),
    ("dm_t_min", "1.5", "'dm_t_min' must be within [0, 1]"),
    ("dm_t_max", "nan", "'dm_t_max' must be within [0, 1]"),
    ("dm_fake_updates", "0", "'dm_fake_updates' must be positive"),
    ("dm_batch_size", "-4", "'dm_batch_size' must be zero or positive"),
    ("dm_noise", "new", "'dm_noise'"),
])
def test_each_new_key_is_refused_with_one_sentence(capsys, small_teacher, tiny_data, tmp_path, key, value, fragment):
    args = cli_args({"teacher_path": small_teacher, "data_dir": tiny_data, "d_run_dir": tmp_path / "run"})
    result = run_distill_in_process(capsys, "--mode", "train_d", *args, f"{key}={value}")
    assert_one_sentence_error(result, fragment)
    assert not (tmp_path / "run").exists()


def _imported_modules(path: Path) -> set:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            names.add((node.module or "").split(".")[-1] if node.level else node.module)
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def test_no_training_loss_reaches_the_inception_network(small_teacher, tiny_data, tmp_path, monkeypatch):
    # statically: no module a training stage imports for its loss reads the FID network
    training = ["train_d", "binarize", "losses", "adversarial", "feature_losses", "student_trainer", "trainer"]
    for name in training:
        assert not {"fid", "InceptionFeatures", "torchmetrics"} & _imported_modules(parts.files()[name])
    # and at run time: a D step with every loss term on never builds or calls it

    def refuse(*args, **kwargs):
        raise AssertionError("the Inception network was loaded during training")
    monkeypatch.setattr(torch.jit, "load", refuse)
    from pipeline.evaluation import fid
    monkeypatch.setattr(fid.InceptionFeatures, "__init__", refuse)
    DTrainer(_cfg(small_teacher, tiny_data, tmp_path / "run", d_train_steps=2, adv_real="dataset",
                  verify_dataset_md5=False)).run()


def test_a_diverged_run_stops_with_one_sentence_and_keeps_its_last_checkpoint(capsys, small_teacher, tiny_data,
                                                                            tmp_path):
    args = cli_args({"teacher_path": small_teacher, "data_dir": tiny_data, "d_run_dir": tmp_path / "run",
                     "d_train_steps": 8, "d_checkpoint_every": 2, "d_lr": 1e4, "d_lr_warmup_fraction": 0.01})
    result = run_distill_in_process(capsys, "--mode", "train_d", *args)
    assert_one_sentence_error(result, "diverged at step", "lower the learning rate")
    saved = torch.load(tmp_path / "run" / checkpoint.LATEST, weights_only=True) if (
        tmp_path / "run" / checkpoint.LATEST).exists() else None
    if saved is not None:  # whatever was kept holds finite weights only
        assert all(torch.isfinite(v).all() for v in saved["model"].values() if v.is_floating_point())
    weights = tmp_path / "run" / "student" / student_d.WEIGHTS_FILE
    if weights.exists():
        assert all(torch.isfinite(v).all() for v in student_d.read_safetensors(weights)[0].values())
