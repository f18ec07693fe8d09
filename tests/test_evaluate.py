"""eval_d on the tiny preset: every report field of D and B, the sample files, and refused inputs."""
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from pipeline.core import config
from pipeline.data import generate
from pipeline.evaluation import evaluate, fid, metrics, report
from pipeline.students import packed
from pipeline.train import binarize, train_d


from conftest import assert_one_sentence_error, run_cli, run_distill_in_process


@pytest.fixture(scope="module")
def trained(tmp_path_factory, small_teacher):
    """Tiny teacher data, a D trained on it for a few steps and a B binarized from that D."""
    root = tmp_path_factory.mktemp("eval")
    items = {"teacher_path": small_teacher, "data_dir": root / "data", "d_run_dir": root / "run",
             "b_run_dir": root / "b", "fid_cache_dir": root / "fid", "eval_dir": root / "out"}
    args = ["--config", "tiny", *[f"{k}={v}" for k, v in items.items()]]
    cfg = config.resolve("tiny", args[2:])
    generate.generate(cfg)
    train_d.train_d(cfg)  # in this process: the command line's own path is eval_d's, below
    binarize.binarize(cfg)
    return root, args


@pytest.fixture(scope="module")
def evaluated(trained):
    """eval_d of that D and B, once for the tests that read its report."""
    root, args = trained
    return run_cli("Main_Distill.py", "--mode", "eval_d", *args)


def test_report_holds_every_figure(trained, evaluated):
    root, args = trained
    result = evaluated
    assert result.returncode == 0, result.stderr
    assert f"report: {root / 'out' / 'report.md'}" in result.stdout
    report = json.loads((root / "out" / "report.json").read_text())
    assert report["fid_samples"] == 4 and report["held_out_records"] == [0, 3]
    kid_subsets = {"subsets": 100, "subset_size": 4, "seed": 0}  # min(1000, N = 4, 8 reference images)
    for row in ("teacher", "d", "b"):
        scores = report["scores"][row]
        assert math.isfinite(scores["fid"]) and scores["n"] == 4
        assert 0 <= scores["precision"] <= 1 and 0 <= scores["recall"] <= 1
        assert math.isfinite(scores["kid"]) and scores["kid_std"] >= 0 and scores["kid_subsets"] == kid_subsets
        assert report["fid_excess"][row] == pytest.approx(scores["fid"] - report["scores"]["real"]["fid"])
    assert math.isfinite(report["scores"]["real"]["fid"]) and math.isfinite(report["scores"]["real"]["kid"])
    assert set(report["fid_ratio"]) == set(report["fid_excess_ratio"]) == {"d_over_teacher", "b_over_teacher",
                                                                          "b_over_d"}
    speed = report["throughput"]
    assert speed["teacher_steps"] == 10
    for key in ("d", "b"):
        fidelity = report["fidelity_vs_teacher"][key]
        assert fidelity["records"] == 4
        assert fidelity["psnr_db"] >= 10 * math.log10(4 / fidelity["mse"]) - 1e-6  # mean PSNR >= PSNR of mean MSE
        assert speed[key]["speedup"] > 1 and speed[key]["images_per_s"] > 0
    size = report["size"]
    weights = root / "run" / "student" / "model.safetensors"
    assert size["d"]["fp32_bytes"] == weights.stat().st_size
    assert size["d"]["parameters"] == sum(t.numel() for t in load_file(weights).values())
    assert size["d"]["fp16_bytes"] < 0.6 * size["d"]["fp32_bytes"]
    b = size["b"]
    assert b["packed_bytes"] == (root / "b" / "packed" / "packed.safetensors").stat().st_size
    assert b["packed_bytes"] == b["sign_bytes"] + b["value_bytes"] + b["header_bytes"]
    breakdown = packed.byte_breakdown(root / "b" / "packed")
    assert {k: b[k] for k in ("sign_bytes", "value_bytes", "header_bytes", "values_by_kind")} == {
        k: breakdown[k] for k in ("sign_bytes", "value_bytes", "header_bytes", "values_by_kind")}
    assert b["sign_bytes"] == load_file(root / "b" / "packed" / "packed.safetensors")["signs"].numel()
    assert b["times_smaller_than_d_fp32"] > 4 and b["binary_weights"] < b["parameters"]
    assert {row["name"] for row in b["full_precision_layers"]} >= {"unet.conv_in", "heads.0.out"}
    markdown = (root / "out" / "report.md").read_text()
    assert "| D / teacher |" in markdown and "| B / D |" in markdown and "`unet.conv_in`" in markdown
    assert "KID ×10³" in markdown and "FID − floor" in markdown
    for folder in ("samples", "b_samples"):
        assert sorted(p.name for p in (root / "out" / folder).iterdir()) == [f"{i:06d}.png" for i in range(4)]
    with np.load(root / "out" / "samples.npz") as npz:
        assert npz["d"].shape == npz["b"].shape == npz["teacher"].shape == (4, 1, 32, 32)
        assert npz["index"].tolist() == [0, 1, 2, 3]
        for key in ("d", "b"):  # the scores are those of the saved samples
            assert report["scores"][key]["diversity"] == pytest.approx(metrics.diversity_score(npz[key]), rel=1e-6)
    for name in ("grid.png", "b_grid.png", "teacher_grid.png", "comparison.png", "latent_walk.png", "latent_walk.gif"):
        assert (root / "out" / name).stat().st_size > 100
    from PIL import Image
    walk = Image.open(root / "out" / "latent_walk.gif")
    assert walk.n_frames == 120 and walk.width == 2 * 4 * 32  # D and B side by side, 4x enlarged
    assert list((root / "data" / "eval").glob("teacher-*.json"))  # the teacher's figures are cached by the data


def test_eval_refuses_what_it_cannot_measure(capsys, trained, tmp_path):
    root, args = trained
    result = run_distill_in_process(capsys, "--mode", "eval_d", *args, "fid_samples=5")
    assert_one_sentence_error(result, "fid_samples=5 needs", "held-out records")
    result = run_distill_in_process(capsys, "--mode", "eval_d", *args, f"d_weights={tmp_path}")
    assert_one_sentence_error(result, "holds no student")
    result = run_distill_in_process(capsys, "--mode", "eval_d", *args, f"b_weights={tmp_path}")
    assert_one_sentence_error(result, "holds no packed B")
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    for f in (root / "b" / "packed").iterdir():
        (damaged / f.name).write_bytes(f.read_bytes())
    data = (damaged / "packed.safetensors").read_bytes()
    at = len(data) - 5  # a byte of B's values
    (damaged / "packed.safetensors").write_bytes(data[:at] + bytes([data[at] ^ 1]) + data[at + 1:])
    result = run_distill_in_process(capsys, "--mode", "eval_d", *args, f"b_weights={damaged}")
    assert_one_sentence_error(result, "checksum mismatch", "re-export")
    other = tmp_path / "data2"
    generate.generate(config.resolve("tiny", [*args[2:], f"data_dir={other}", "chunks=2"]))
    result = run_distill_in_process(capsys, "--mode", "eval_d", *args, f"data_dir={other}")
    assert_one_sentence_error(result, "chunks=5", "has 2")


def test_split_benchmark_scores_as_eval_d(trained, evaluated, tmp_path):
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
    assert evaluated.returncode == 0, evaluated.stderr
    s = json.loads((root / "out" / "report.json").read_text())["scores"]
    assert f"| W1A32: the preset's recipe | {s['b']['fid']:.2f} | {s['d']['fid']:.2f} |" in scored.stdout


KID_SUBSETS = {"subsets": 100, "subset_size": 8, "seed": 0}


def _kid(mean, std):
    return {"kid": mean, "kid_std": std, "kid_subsets": KID_SUBSETS}


def _fixed_report(with_b=True):
    """A report dict as evaluate computes it, with round numbers."""
    student = {"d": {"fid": 120.0, **_kid(0.012, 0.001), "precision": 0.25, "recall": 0.5, "memorization": 5.5,
                     "diversity": 11.0, "n": 8},
               "b": {"fid": 150.0, **_kid(0.02, 0.0015), "precision": 0.125, "recall": 0.25, "memorization": 5.25,
                     "diversity": 10.5, "n": 8}}
    r = {"students": {"d": "run/student", "b": "b/packed"}, "teacher": "teacher/", "data_dir": "data/",
         "teacher_sampler": "DDIM eta=0, 10 steps", "held_out_records": [0, 7], "fid_samples": 8,
         "fid_reference": "fashion_mnist test split, first 16 images",
         "scores": {"teacher": {"fid": 80.0, **_kid(0.005, 0.0005), "precision": 0.625, "recall": 0.75,
                                "memorization": 5.0, "diversity": 12.0, "n": 8},
                    **student, "real": {"fid": 40.0, **_kid(0.0001, 0.00005), "memorization": 3.5, "diversity": 11.5,
                                        "n": 8}},
         "fidelity_vs_teacher": {"d": {"psnr_db": 21.5, "mse": 0.04, "records": 8},
                                 "b": {"psnr_db": 20.25, "mse": 0.05, "records": 8}},
         "throughput": {"batch": 8, "device": "cpu", "threads": 2, "teacher_images_per_s": 10.0, "teacher_steps": 10,
                        "d": {"images_per_s": 400.0, "speedup": 40.0, "cost_in_teacher_calls": 1.25},
                        "b": {"images_per_s": 380.0, "speedup": 38.0, "cost_in_teacher_calls": 1.3}},
         "size": {"teacher_parameters": 1000, "teacher_file_bytes": 4100,
                  "d": {"parameters": 1200, "fp32_bytes": 5000, "fp16_bytes": 2600},
                  "b": {"parameters": 1100, "binary_weights": 1000, "two_basis_layers": 1, "binary_layers": 3,
                        "packed_bytes": 500, "sign_bytes": 150, "header_bytes": 150, "value_bytes": 200,
                        "bytes_per_value": 2, "values_by_kind": {"norms": 60, "binarizer scales": 40},
                        "full_precision_layers": [{"name": "unet.conv_in", "parameters": 40}],
                        "times_smaller_than_d_fp32": 10.0, "times_smaller_than_d_fp16": 5.2}},
         "metrics": {"psnr": "per image"}}
    if not with_b:
        for part in (r["students"], r["scores"], r["fidelity_vs_teacher"], r["throughput"], r["size"]):
            del part["b"]
    ratios = metrics.fid_ratios(r["scores"])
    r.update(fid_excess=metrics.fid_excess(r["scores"]), fid_ratio=ratios["fid"], fid_excess_ratio=ratios["fid_excess"])
    return r


def test_report_renders_every_row_of_d_and_b():
    lines = report.render_markdown(_fixed_report()).splitlines()
    for row in ("# One-step students D and B against their teacher",
                "| Teacher | DDIM eta=0, 10 steps | 80.00 | 40.00 | 5.00 ± 0.50 | 0.625 | 0.750 | 5.000 | 12.000 "
                "| 10.0 | 10 | 1,000 |",
                "| Student D (full precision) | one step | 120.00 | 80.00 | 12.00 ± 1.00 | 0.250 | 0.500 | 5.500 "
                "| 11.000 | 400.0 | 1 | 1,200 |",
                "| Student B (1-bit weights) | one step | 150.00 | 110.00 | 20.00 ± 1.50 | 0.125 | 0.250 | 5.250 "
                "| 10.500 | 380.0 | 1 | 1,100 |",
                "| real test images | – | 40.00 (floor) | – | 0.10 ± 0.05 (floor) | – | – | 3.500 | 11.500 | – | – | – |",
                "| ratio | FID | FID − floor |",
                "| D / teacher | 1.50 | **2.00** |", "| B / teacher | 1.88 | **2.75** |", "| B / D | 1.25 | **1.38** |",
                "Distillation fidelity of B on 8 held-out records (same x_T): PSNR **20.25 dB**, MSE 0.05000.",
                "| D | 1,200 | 5,000 | 2,600 | – |",
                "| B | 1,100 (1,000 binary) | – | – | **500** |",
                "| norms | 60 | 120 |", "| binarizer scales | 40 | 80 |", "| `unet.conv_in` | 40 |",
                "![B](b_grid.png)"):
        assert row in lines, row
    kid_line = next(line for line in lines if line.startswith("FID: N = 8"))
    assert "KID ×10³ is the unbiased MMD² estimate" in kid_line and "100 subsets of 8, seed 0" in kid_line
    size_line = next(line for line in lines if line.startswith("B's packed file"))
    assert size_line.startswith("B's packed file is **10.0x** smaller than D in fp32 and 5.2x smaller than D in fp16: "
                                "150 bytes of sign bits (3 binary layers, 1 of them with two bases), 200 bytes of "
                                "16-bit float values, 150 bytes of safetensors header.")
    rows = [line.split(" | ")[0] for line in lines if line.startswith("| ") and " | one step | " in line]
    assert rows == ["| Student D (full precision)", "| Student B (1-bit weights)"]  # D above B


def test_report_of_d_alone_has_no_b_rows():
    text = report.render_markdown(_fixed_report(with_b=False))
    assert text.startswith("# One-step student D against its teacher\n")
    assert "| ratio | FID | FID − floor |\n|---|---|---|\n| D / teacher | 1.50 | **2.00** |\n\n" in text
    for absent in ("Student B", "| B / D |", "| B / teacher |", "b_grid.png", "packed file", "| B |"):
        assert absent not in text, absent


def test_console_lines_name_the_report_and_the_figures(tmp_path):
    lines = report.console_lines(_fixed_report(), tmp_path)
    assert lines == [
        "[eval_d] FID D 120.00 vs teacher 80.00 (N=8, floor 40.00): ratio 1.50, over the floor 80.00 vs 40.00, "
        "excess ratio 2.00; KID x1e3 12.00 vs teacher 5.00 (floor 0.10); PSNR vs teacher 21.50 dB; 40.0x faster than "
        "the 10-step teacher",
        "[eval_d] FID B 150.00 vs teacher 80.00 (N=8, floor 40.00): ratio 1.88, over the floor 110.00 vs 40.00, "
        "excess ratio 2.75; KID x1e3 20.00 vs teacher 5.00 (floor 0.10); PSNR vs teacher 20.25 dB; 38.0x faster than "
        "the 10-step teacher",
        "[eval_d] packed B: 500 bytes, 10.0x smaller than D in fp32; FID ratio B / D 1.25, excess ratio B / D 1.38",
        f"[eval_d] report: {tmp_path / 'report.md'}",
        f"[eval_d] sample grids: {tmp_path / 'grid.png'}, {tmp_path / 'b_grid.png'}"]


def test_a_teacher_cache_from_before_kid_is_scored_again(tmp_path, monkeypatch):
    """An older cached teacher row (no KID) or one with other KID subsets is recomputed and rewritten; a current
    one is served as it is."""
    real = torch.zeros(16, 3)
    fresh = {"fid": 80.0, "kid": 0.005, "kid_std": 0.0005, "kid_subsets": fid.kid_settings(16, 4), "n": 4}
    calls = []
    monkeypatch.setattr(evaluate, "sample_scores", lambda *args: calls.append(args) or dict(fresh))
    evaluation = SimpleNamespace(lo=0, n=4, cache_dir=tmp_path, features=None, train_images=None,
                                 cfg={"fid_batch_size": 2})
    path = tmp_path / "teacher-records0-3-ref16.json"
    for stale in ({"fid": 79.0, "n": 4}, {**fresh, "kid_subsets": {**fresh["kid_subsets"], "subsets": 10}}, [1, 2]):
        path.write_text(json.dumps(stale))
        assert evaluate.Evaluation.teacher_scores(evaluation, None, real) == fresh
        assert json.loads(path.read_text()) == fresh
    assert len(calls) == 3
    assert evaluate.Evaluation.teacher_scores(evaluation, None, real) == fresh and len(calls) == 3  # served cached
