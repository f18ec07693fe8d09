"""binarize: B trained from D lowers its loss, keeps its LRM bases and progress across a resume,
exports a packed B that reloads to the same outputs, and refuses mismatched inputs in one sentence."""
import json
import re

import pytest
import torch
from safetensors.torch import load_file

from pipeline.core import checkpoint, runtime
from pipeline.data import generate
from pipeline.students import packed, student_b
from pipeline.train import train_d
from pipeline.train.binarize import BTrainer

from conftest import assert_one_sentence_error, cli_args, run_distill_in_process, tiny_config, tiny_items


def _cfg(teacher, folder, **overrides):
    return tiny_config(tiny_items(teacher, folder, **overrides))


def _args(teacher, folder, **overrides):
    return cli_args(tiny_items(teacher, folder, **overrides))


@pytest.fixture(scope="module")
def with_d(tmp_path_factory, small_teacher):
    """Tiny teacher data and a D trained on it, made once."""
    folder = tmp_path_factory.mktemp("binarize")
    cfg = _cfg(small_teacher, folder, d_train_steps=20, d_checkpoint_every=20)
    generate.generate(cfg)
    train_d.train_d(cfg)
    return folder


def test_binarize_lowers_its_loss_and_exports_a_packed_b(small_teacher, with_d, tmp_path):
    cfg = _cfg(small_teacher, with_d, b_run_dir=tmp_path / "b", b_train_steps=60, b_lr=0.01,
               b_checkpoint_every=60, b_progressive_every=1, data_workers=0)
    trainer = BTrainer(cfg)
    folder = trainer.run()
    stats = [json.loads(line) for line in (tmp_path / "b" / "stats.jsonl").read_text().splitlines()]
    assert stats[-1]["loss"] < 0.8 * stats[0]["loss"]
    assert all(0 <= s["sign_flip_fraction"] <= 1 for s in stats) and any(s["sign_flip_fraction"] > 0 for s in stats)
    assert stats[0]["binary_layers_active"] < stats[-1]["binary_layers_active"] == len(trainer.binary_layers)
    # the packed file is the EMA B, fully binary (values rounded to fp16), and reloads to the same outputs
    ema_b = trainer.ema_b()
    packed.export_packed(ema_b, trainer.b_config, tmp_path / "again")
    again, saved = (load_file(f / packed.PACKED_FILE) for f in (tmp_path / "again", folder))
    assert all(torch.equal(again[k], saved[k]) for k in ("signs", "values"))
    loaded = packed.load_packed(folder)
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(ema_b(x)["chunks"], loaded(x)["chunks"])
    run = json.loads((folder / "run.json").read_text())
    assert run["step"] == 60 and run["bytes"]["file_bytes"] == (folder / packed.PACKED_FILE).stat().st_size
    kinds = {row["kind"] for row in run["layers"]}
    assert "full precision" in kinds and any(kind.startswith("binary") for kind in kinds)


def test_resume_keeps_the_lrm_bases_and_the_learned_scales(small_teacher, with_d, tmp_path):
    cfg = _cfg(small_teacher, with_d, b_run_dir=tmp_path / "b", b_train_steps=4, b_checkpoint_every=2,
               data_workers=0)
    first = BTrainer(cfg)
    first.run()
    again = BTrainer(cfg)
    assert again.step == 4
    for name, basis in first.bases.state_dict().items():
        assert torch.equal(basis, again.bases.state_dict()[name])
    for (_, a), (_, b) in zip(student_b.binary_layers(first.model), student_b.binary_layers(again.model)):
        assert torch.equal(a.scale1, b.scale1) and bool(b.started)


def _losses(folder):
    return [json.loads(line)["loss"] for line in (folder / "stats.jsonl").read_text().splitlines()]


def test_d_outputs_kept_in_memory_give_b_the_loss_d_run_in_the_step_would(small_teacher, with_d, tmp_path):
    """The kept store serves a batch what D computes for those records in the step, so B's loss is the one D run
    live would give, to float rounding (D's kernels may sum in another order for another batch). Whole runs are not
    compared: in fp32 such a rounding difference flips the sign of a real-valued weight near 0 and two B runs part."""
    cfg = _cfg(small_teacher, with_d, b_run_dir=tmp_path / "b", b_train_steps=4, b_checkpoint_every=4,
               data_workers=0, b_cache_d_mb=4096)
    trainer = BTrainer(cfg)
    trainer.run()
    assert trainer.d_outputs is not None
    batch = next(iter(trainer.batches()))
    pred, feats = trainer.d_outputs.lookup(batch["index"], trainer.device)
    with torch.no_grad(), runtime.autocast(trainer.amp, trainer.device):  # as the step would run D
        live = trainer.d(batch["x_T"])
    live_feats = trainer.taps_d.take()
    def assert_rounding_apart(kept, computed):  # fp32 sums in another order differ by ~1e-7 of the tensor's scale
        torch.testing.assert_close(kept, computed, rtol=1e-5, atol=1e-5 * float(computed.abs().max()))
    assert_rounding_apart(pred["chunks"], live["chunks"])
    assert feats.keys() == live_feats.keys()
    for name in feats:
        assert_rounding_apart(feats[name], live_feats[name])
    with torch.no_grad():
        kept_loss, kept_parts = trainer.loss(batch)
        trainer.d_outputs = None  # D now runs in the step
        live_loss, live_parts = trainer.loss(batch)
    assert kept_parts.keys() == live_parts.keys() and "loss_spd" in kept_parts
    assert float(kept_loss) == pytest.approx(float(live_loss), rel=1e-5)


def test_d_outputs_over_the_budget_are_computed_in_every_step(small_teacher, with_d, tmp_path, monkeypatch, capsys):
    from pipeline.train import d_outputs
    monkeypatch.setattr(d_outputs, "MB", 1)  # the budget in bytes: smaller than any store
    cfg = _cfg(small_teacher, with_d, b_run_dir=tmp_path / "b", b_train_steps=2, b_checkpoint_every=2,
               data_workers=0, b_cache_d_mb=1000)
    trainer = BTrainer(cfg)
    trainer.run()
    said = capsys.readouterr()
    assert trainer.d_outputs is None and "D runs in every step instead" in said.out + said.err


def test_bad_inputs_are_one_sentence(capsys, small_teacher, with_d, tmp_path):
    result = run_distill_in_process(capsys, "--mode", "binarize",
                     *_args(small_teacher, with_d, d_run_dir=tmp_path / "no_d", b_run_dir=tmp_path / "b"))
    assert_one_sentence_error(result, "holds no student")
    result = run_distill_in_process(capsys, "--mode", "binarize",
                     *_args(small_teacher, with_d, d_head_channels=8, b_run_dir=tmp_path / "b"))
    assert_one_sentence_error(result, "d_head_channels=16")
    result = run_distill_in_process(capsys, "--mode", "binarize",
                     *_args(small_teacher, with_d, holdout_samples=3, b_run_dir=tmp_path / "b"))
    assert_one_sentence_error(result, "held out records")

    # D of other teacher data (5 chunks) against data of 4 chunks
    other = tmp_path / "other"
    generate.generate(_cfg(small_teacher, with_d, data_dir=other, chunks=2))
    result = run_distill_in_process(capsys, "--mode", "binarize",
                     *_args(small_teacher, with_d, data_dir=other, chunks=2, b_run_dir=tmp_path / "b"))
    assert_one_sentence_error(result, "chunks=5")

    run = tmp_path / "b"
    assert run_distill_in_process(capsys, "--mode", "binarize", *_args(small_teacher, with_d, b_run_dir=run,
                                                                    b_train_steps=2)).returncode == 0
    result = run_distill_in_process(capsys, "--mode", "binarize", *_args(small_teacher, with_d, b_run_dir=run,
                                                                      b_train_steps=2, lambda_spd=0.5))
    assert_one_sentence_error(result, "lambda_spd")
    result = run_distill_in_process(capsys, "--mode", "binarize", *_args(small_teacher, with_d, b_run_dir=run,
                                                                      b_train_steps=2, b_lmb=False))
    assert_one_sentence_error(result, "b_lmb")
    (run / checkpoint.LATEST).write_bytes(b"not a checkpoint")
    result = run_distill_in_process(capsys, "--mode", "binarize", *_args(small_teacher, with_d, b_run_dir=run,
                                                                      b_train_steps=2))
    assert_one_sentence_error(result, "cannot be read")


def _rehashed(run: dict) -> str:
    from pipeline.core import run_record
    body = {k: v for k, v in run.items() if k != "sha256"}
    return json.dumps(dict(body, sha256=run_record._digest(body)))


@pytest.mark.parametrize("damage,what", [
    (lambda text: text[:len(text) // 2], "is not readable JSON (truncated or damaged)"),
    (lambda text: json.dumps(dict(json.loads(text), holdout_indices=[4, 8])), "was changed after training wrote it"),
    (lambda text: _rehashed(dict(json.loads(text), weights_sha256="0" * 64)), "was written with other weights"),
    (lambda text: json.dumps({k: v for k, v in json.loads(text).items() if k != "sha256"}), "carries no checksum"),
])
def test_a_damaged_or_edited_run_json_beside_d_is_one_sentence(small_teacher, with_d, tmp_path, damage, what):
    """Issue 31: a truncated run.json was a JSONDecodeError; edited holdout_indices made eval_d score training
    records as held out."""
    import shutil
    from pipeline.core.errors import UserError
    from pipeline.data import store
    from pipeline.evaluation import evaluate
    from pipeline.train import binarize
    folder = shutil.copytree(with_d / "d" / "student", tmp_path / "student")
    cfg = _cfg(small_teacher, with_d, d_weights=folder)
    manifest = store.load_manifest(cfg)
    assert evaluate.held_out_range(cfg, folder, manifest, 2) == (0, 4)
    run_json = folder / "run.json"
    run_json.write_text(damage(run_json.read_text()))
    with pytest.raises(UserError, match=re.escape(what)):
        evaluate.held_out_range(cfg, folder, manifest, 2)
    with pytest.raises(UserError, match=re.escape(what)):
        binarize.load_d(cfg, manifest)
