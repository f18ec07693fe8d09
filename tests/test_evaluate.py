"""eval_d on the tiny preset: every report field of D and B, the sample files, and refused inputs."""
import json
import math

import numpy as np
import pytest

from pipeline import config, generate

from conftest import assert_one_sentence_error, run_cli


@pytest.fixture(scope="module")
def trained(tmp_path_factory, small_teacher):
    """Tiny teacher data, a D trained on it for a few steps and a B binarized from that D."""
    root = tmp_path_factory.mktemp("eval")
    items = {"teacher_path": small_teacher, "data_dir": root / "data", "d_run_dir": root / "run",
             "b_run_dir": root / "b", "fid_cache_dir": root / "fid", "eval_dir": root / "out"}
    args = ["--config", "tiny", *[f"{k}={v}" for k, v in items.items()]]
    generate.generate(config.resolve("tiny", args[2:]))
    assert run_cli("Main_Distill.py", "--mode", "train_d", *args).returncode == 0
    assert run_cli("Main_Distill.py", "--mode", "binarize", *args).returncode == 0
    return root, args


def test_report_holds_every_figure(trained):
    root, args = trained
    result = run_cli("Main_Distill.py", "--mode", "eval_d", *args)
    assert result.returncode == 0, result.stderr
    assert f"report: {root / 'out' / 'report.md'}" in result.stdout
    report = json.loads((root / "out" / "report.json").read_text())
    assert report["fid_samples"] == 4 and report["held_out_records"] == [0, 3]
    for row in ("teacher", "d", "b"):
        scores = report["scores"][row]
        assert math.isfinite(scores["fid"]) and scores["n"] == 4
        assert 0 <= scores["precision"] <= 1 and 0 <= scores["recall"] <= 1
        assert scores["memorization"] > 0 and scores["diversity"] > 0
    assert math.isfinite(report["scores"]["real"]["fid"])
    speed = report["throughput"]
    assert speed["teacher_steps"] == 10
    for key in ("d", "b"):
        assert report["fidelity_vs_teacher"][key]["records"] == 4 and report["fidelity_vs_teacher"][key]["mse"] > 0
        assert speed[key]["speedup"] > 1 and speed[key]["images_per_s"] > 0
    size = report["size"]
    assert size["d"]["fp32_bytes"] == (root / "run" / "student" / "model.safetensors").stat().st_size
    assert size["d"]["parameters"] > size["teacher_parameters"] > 0
    assert size["d"]["fp16_bytes"] < 0.6 * size["d"]["fp32_bytes"]
    b = size["b"]
    assert b["packed_bytes"] == (root / "b" / "packed" / "packed.safetensors").stat().st_size
    assert b["packed_bytes"] == b["sign_bytes"] + b["value_bytes"] + b["header_bytes"]
    assert b["times_smaller_than_d_fp32"] > 4 and b["binary_weights"] < b["parameters"]
    assert {row["name"] for row in b["full_precision_layers"]} >= {"unet.conv_in", "heads.0.out"}
    markdown = (root / "out" / "report.md").read_text()
    assert "FID ratio D / teacher" in markdown and "FID ratio B / D" in markdown and "`unet.conv_in`" in markdown
    for folder in ("samples", "b_samples"):
        assert sorted(p.name for p in (root / "out" / folder).iterdir()) == [f"{i:06d}.png" for i in range(4)]
    with np.load(root / "out" / "samples.npz") as npz:
        assert npz["d"].shape == npz["b"].shape == npz["teacher"].shape == (4, 1, 32, 32)
        assert npz["index"].tolist() == [0, 1, 2, 3]
    for name in ("grid.png", "b_grid.png", "teacher_grid.png", "comparison.png", "latent_walk.png", "latent_walk.gif"):
        assert (root / "out" / name).stat().st_size > 100
    from PIL import Image
    walk = Image.open(root / "out" / "latent_walk.gif")
    assert walk.n_frames == 120 and walk.width == 2 * 4 * 32  # D and B side by side, 4x enlarged
    assert list((root / "data" / "eval").glob("teacher-*.json"))  # the teacher's figures are cached by the data


def test_eval_refuses_what_it_cannot_measure(trained, tmp_path):
    root, args = trained
    result = run_cli("Main_Distill.py", "--mode", "eval_d", *args, "fid_samples=5")
    assert_one_sentence_error(result, "fid_samples=5 needs 5 held-out records")
    result = run_cli("Main_Distill.py", "--mode", "eval_d", *args, f"d_weights={tmp_path}")
    assert_one_sentence_error(result, "holds no student")
    result = run_cli("Main_Distill.py", "--mode", "eval_d", *args, f"b_weights={tmp_path}")
    assert_one_sentence_error(result, "holds no packed B")
    other = tmp_path / "data2"
    generate.generate(config.resolve("tiny", [*args[2:], f"data_dir={other}", "chunks=2"]))
    result = run_cli("Main_Distill.py", "--mode", "eval_d", *args, f"data_dir={other}")
    assert_one_sentence_error(result, "chunks=5", "has 2")


def test_split_benchmark_scores_as_eval_d(trained, tmp_path):
    """Images sampled on one machine (--samples-only, no Inception) and scored on another (--score)
    give the figures eval_d gives in one go."""
    root, args = trained
    bench = ["benchmarks/student_b_benchmark.py", *args, "--variants", "w1a32"]
    sampled = run_cli(*bench, "--samples-only", str(tmp_path / "samples"))
    assert sampled.returncode == 0, sampled.stderr
    with np.load(tmp_path / "samples" / "w1a32.npz") as npz:
        assert npz["d"].shape == npz["b"].shape == npz["teacher"].shape == (4, 1, 32, 32)
        assert json.loads(str(npz["meta"]))["size"]["b"]["packed_bytes"] > 0
    scored = run_cli(*bench, "--score", str(tmp_path / "samples"))
    assert scored.returncode == 0, scored.stderr
    assert run_cli("Main_Distill.py", "--mode", "eval_d", *args, f"eval_dir={tmp_path / 'eval'}").returncode == 0
    s = json.loads((tmp_path / "eval" / "report.json").read_text())["scores"]
    assert f"| W1A32: the preset's recipe | {s['b']['fid']:.2f} | {s['d']['fid']:.2f} |" in scored.stdout
