"""D on the records it was trained on against records it never saw: how much of its gap to the teacher is over-fitting.

    .venv/bin/python benchmarks/generalization_benchmark.py --config fashion_mnist_bench \\
        d_run_dir=Checkpoints/distill/bench_nfeat0.3_s1

For N = ``fid_samples`` held-out records (the run's split, as eval_d reads them) and the first N training records,
it prints D's FID and KID against the test split, the teacher's on the same records, and D's PSNR / MSE against
the teacher's images of those x_T. A D that scores far better on its training records than on held-out ones has
learned its pairs rather than the teacher's map: more teacher data (or a term on x_T beyond the pairs), not another
loss on the same pairs, is the lever then. The teacher's row shows what each set of x_T allows (its own images of
them). Scoring only: no training, nothing written.
"""
import argparse
import os

import torch

from pipeline.core import config, cpu, run_record
from pipeline.data import datasets, teacher_data
from pipeline.evaluation import evaluate, fid, metrics
from pipeline.students import student_d, student_folders


def scores(features, real, images, batch_size, label) -> dict:
    feats = fid.extract(features, datasets.to_uint8(images), batch_size, f"inception: {label}")
    mean, _ = fid.kernel_distance(real, feats)
    return {"fid": fid.frechet_distance(real, feats), "kid": mean}


def score_records(cfg, model, features, real, manifest, lo, n) -> dict:
    """D against the teacher on records lo .. lo + n - 1: both FIDs, both KIDs, D's fidelity to the teacher."""
    records = teacher_data.read_range(manifest, lo, lo + n)
    batch = cfg["fid_batch_size"]
    with torch.no_grad():
        images = evaluate.one_step_images(model, records["x_T"], batch)
    return {"indices": f"{lo}..{lo + n - 1}", "d": scores(features, real, images, batch, f"D {lo}.."),
            "teacher": scores(features, real, records["x0"], batch, f"teacher {lo}.."),
            **metrics.fidelity(images, records["x0"])}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="fashion_mnist_bench")
    parser.add_argument("overrides", nargs="*", help="key=value overrides (d_run_dir / d_weights name the D)")
    args = parser.parse_args()
    cfg = config.resolve(args.config, args.overrides)
    folder = student_folders.d_folder(cfg)
    model = student_d.load_student(folder).eval()
    manifest = teacher_data.open_data(cfg)
    n = cfg["fid_samples"]
    run = run_record.read(folder, student_d.REWRITE)
    held_lo, _ = evaluate.held_out_range(cfg, folder, manifest, n)
    train_lo = run["train_indices"][0] if run is not None else cfg["holdout_samples"]
    features = fid.InceptionFeatures(cfg["channels_last"])
    _, _, real, _ = fid.reference_features(cfg, features, n)
    rows = {"held-out": score_records(cfg, model, features, real, manifest, held_lo, n),
            "trained on": score_records(cfg, model, features, real, manifest, train_lo, n)}
    print(f"# {folder}, N = {n} against the {cfg['dataset']} test split; CPU {cpu.model_name()} ({cpu.kind()}), "
          f"{os.cpu_count()} cores, torch {torch.__version__}")
    print("| records | indices | D FID | teacher FID | D / teacher | D KID x1e3 | teacher KID x1e3 | PSNR dB | MSE |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['indices']} | {r['d']['fid']:.2f} | {r['teacher']['fid']:.2f} | "
              f"{r['d']['fid'] / r['teacher']['fid']:.2f} | {r['d']['kid'] * 1e3:.1f} | "
              f"{r['teacher']['kid'] * 1e3:.1f} | {r['psnr_db']:.2f} | {r['mse']:.4f} |")


if __name__ == "__main__":
    main()
