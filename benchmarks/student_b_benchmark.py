"""Student B figures for BENCHMARKS.md: FID of the 1-bit student against D's, its fidelity, speed and
packed size, for the preset's recipe and its ablations.

    .venv/bin/python benchmarks/student_b_benchmark.py --config fashion_mnist_bench
    .venv/bin/python benchmarks/student_b_benchmark.py --config fashion_mnist --variants w1a32,no_spd,no_lrm

D is the preset's train_d run (trained here if it is not finished). Every variant is a binarize run
of its own from that D (the preset's recipe is the preset's run ``<b_run_dir>``, the others
``<b_run_dir>-<variant>``; each resumed or reused if it exists), then a full eval_d of D and
that B (same held-out records, same N, same reference set), so the D and teacher figures of every row
come from the same run as its B.

Split across two machines (say, a GPU without the FID Inception weights, then this CPU):
``--samples-only DIR`` trains and writes ``DIR/<variant>.npz`` (the teacher's, D's and B's first N
held-out images as uint8, with fidelity, speed and sizes measured there); ``--score DIR`` scores
those files here and prints the same table.
"""
import argparse
import io
import json
from pathlib import Path

import numpy as np

from pipeline.core import atomic, config
from pipeline.core.config import output_dir
from pipeline.evaluation import evaluate, fid
from pipeline.train import binarize, train_d

VARIANTS = {
    "w1a32": ("W1A32: the preset's recipe", {}),
    "w1a1": ("W1A1: binary activations too", {"b_activations": "binary"}),
    "no_spd": ("without SPD", {"lambda_spd": 0.0}),
    "no_lrm": ("without LRM", {"lambda_lrm": 0.0}),
    "no_progressive": ("without progressive binarization", {"b_progressive_every": 0}),
    "rings_20": ("progressive rings every 20 steps", {"b_progressive_every": 20}),
    "no_lmb": ("without LMB (one basis everywhere)", {"b_lmb": False}),
    "lmb_full_res": ("LMB only at full resolution", {"b_lmb_min_size": 1.0}),
    "no_d_outputs": ("without D's outputs as targets", {"lambda_d_outputs": 0.0}),
    "lr_1e-3": ("peak learning rate 1e-3 (5x)", {"b_lr": 0.001}),
    "lrm_1e-2": ("LRM weight 1e-2 (100x)", {"lambda_lrm": 0.01}),
}


def variant_config(cfg, key):
    """The config of one variant: its overrides, its own binarize run and evaluation folders."""
    _, overrides = VARIANTS[key]
    b_root = output_dir(cfg, "b_run_dir")
    eval_root = output_dir(cfg, "eval_dir")
    suffix = "" if key == "w1a32" else f"-{key}"  # the preset's recipe is the preset's own binarize run
    return dict(cfg, **overrides, b_run_dir=f"{b_root}{suffix}", eval_dir=f"{eval_root}-b-{key}", b_weights="")


def run_variant(cfg, key):
    point = variant_config(cfg, key)
    binarize.binarize(point)
    return evaluate.eval_d(point)


def sample_variant(cfg, key, folder: Path):
    """Train the variant and save its images and measured figures, without any FID."""
    point = variant_config(cfg, key)
    binarize.binarize(point)
    run = evaluate.Evaluation(point, with_fid=False)
    records, fidelity, uint8, teacher_uint8 = run.samples()
    meta = {"variant": key, "fid_samples": run.n, "held_out_records": [run.lo, run.hi - 1],
            "b_train_steps": point["b_train_steps"], "fidelity_vs_teacher": fidelity, "throughput": run.speed(records),
            "size": run.student_sizes()}
    buf = io.BytesIO()
    np.savez(buf, teacher=teacher_uint8, d=uint8["d"], b=uint8["b"], meta=np.array(json.dumps(meta)))
    atomic.write_bytes(folder / f"{key}.npz", buf.getvalue())
    print(f"[benchmark] {key}: images and figures in {folder / f'{key}.npz'}", flush=True)


def score_variants(cfg, folder: Path, keys):
    """FID and the other sample scores of files written by ``--samples-only``; one report per variant."""
    files = [folder / f"{key}.npz" for key in keys if (folder / f"{key}.npz").is_file()]
    if not files:
        raise SystemExit(f"no <variant>.npz in {folder}; write them with --samples-only first")
    features, reports = fid.InceptionFeatures(), []
    n = len(np.load(files[0])["d"])
    _, train, real, floor = fid.reference_features(cfg, features, n, cfg["fid_reference_count"])
    fixed = {}  # the teacher's and D's images are the same in every file of one run: score them once
    for path in files:
        data, scores = np.load(path), {}
        meta = json.loads(str(data["meta"]))
        for name in ("teacher", "d", "b"):
            images_ = data[name]
            if name != "b" and name in fixed and np.array_equal(fixed[name][0], images_):
                scores[name] = fixed[name][1]
                continue
            scores[name] = evaluate.sample_scores(features, images_, real, train, n, cfg["fid_batch_size"],
                                                  f"inception: {meta['variant']} {name}")
            fixed[name] = (images_, scores[name])
        scores["real"] = {"fid": fid.frechet_distance(real, floor)}
        reports.append(dict(meta, scores=scores, fid_reference=f"{cfg['dataset']} test split, first {len(real)} images"))
    return reports


def row(label, report):
    s, t, size, fidelity = report["scores"], report["throughput"], report["size"], report["fidelity_vs_teacher"]
    b = size["b"]
    return (f"| {label} | {s['b']['fid']:.2f} | {s['d']['fid']:.2f} | **{s['b']['fid'] / s['d']['fid']:.2f}** | "
            f"{s['b']['precision']:.3f} / {s['b']['recall']:.3f} | {fidelity['b']['psnr_db']:.2f} | "
            f"{fidelity['d']['psnr_db']:.2f} | {b['packed_bytes']:,} | {b['times_smaller_than_d_fp32']:.1f} | "
            f"{t['b']['images_per_s']:.1f} / {t['d']['images_per_s']:.1f} / {t['teacher_images_per_s']:.1f} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="fashion_mnist_bench")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from {', '.join(VARIANTS)}")
    parser.add_argument("--samples-only", metavar="DIR", type=Path,
                        help="train and write DIR/<variant>.npz (images, fidelity, speed, sizes); no FID")
    parser.add_argument("--score", metavar="DIR", type=Path, help="score the DIR/<variant>.npz files of --samples-only")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args()
    cfg = config.resolve(args.config, args.overrides)
    keys = [k for k in args.variants.split(",") if k]
    unknown = [k for k in keys if k not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant {unknown[0]}; choose from {', '.join(VARIANTS)}")
    if args.score:
        print_table(cfg, ((VARIANTS[r["variant"]][0], r) for r in score_variants(cfg, args.score, keys)))
        return
    train_d.train_d(cfg)
    if args.samples_only:
        for key in keys:
            sample_variant(cfg, key, args.samples_only)
        return
    print_table(cfg, ((VARIANTS[key][0], run_variant(cfg, key)) for key in keys))


def print_table(cfg, labelled_reports):
    header = ["| B variant | FID B | FID D | B / D | precision / recall B | PSNR B (dB) | PSNR D (dB) | packed bytes | "
              "x smaller than D fp32 | images/s B / D / teacher |", "|---|---|---|---|---|---|---|---|---|---|"]
    rows, last = [], None
    for label, last in labelled_reports:  # a generator of runs: the table so far is printed after each
        rows.append(row(label, last))
        print("\n".join(header + rows), flush=True)
    t = last["throughput"]
    print(f"\nFID N={last['fid_samples']} against {last['fid_reference']}; floor {last['scores']['real']['fid']:.2f}; "
          f"teacher {last['scores']['teacher']['fid']:.2f}; {cfg['b_train_steps']} binarize steps per variant; "
          f"speed on {t['device']}, {t['threads']} threads, batch {t['batch']}.")
    print("\n".join(header + rows))


if __name__ == "__main__":
    main()
