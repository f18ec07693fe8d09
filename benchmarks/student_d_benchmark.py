"""Student D figures for BENCHMARKS.md: FID against training steps and against the number of teacher
samples, PSNR against the teacher, one-step speed-up, and the data-loading stall.

    .venv/bin/python benchmarks/student_d_benchmark.py --config fashion_mnist_bench
    .venv/bin/python benchmarks/student_d_benchmark.py --config fashion_mnist_bench \\
        --train-samples 1024,2048,4096 --curve-steps 1000

The main run is the preset's own train_d run (trained here if it is not finished; snapshots every
d_snapshot_every steps give the step curve). Each --train-samples entry trains a separate run of
--curve-steps steps on the first N training records. Every point is a full eval_d (same held-out
records, same N, same reference set), so the teacher's figures are shared.
"""
import argparse
import json

from pipeline.core import config
from pipeline.core.config import output_dir
from pipeline.evaluation import evaluate
from pipeline.train import train_d


def evaluate_point(cfg, weights, eval_dir):
    point = dict(cfg, d_weights=str(weights), b_weights="none", eval_dir=str(eval_dir))
    return evaluate.eval_d(point)


def stall(run_dir) -> float:
    stats = [json.loads(line) for line in (run_dir / "stats.jsonl").read_text().splitlines()]
    waited = sum(s["data_wait_fraction"] * s["seconds_per_step"] for s in stats)
    return waited / sum(s["seconds_per_step"] for s in stats)


def row(label, report):
    s, t = report["scores"], report["throughput"]
    return (f"| {label} | {s['d']['fid']:.2f} | {s['teacher']['fid']:.2f} | {s['d']['fid'] / s['teacher']['fid']:.2f} | "
            f"{s['d']['precision']:.3f} | {s['d']['recall']:.3f} | {report['fidelity_vs_teacher']['d']['psnr_db']:.2f} | "
            f"{t['d']['speedup']:.1f} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="fashion_mnist_bench")
    parser.add_argument("--train-samples", default="", help="comma-separated training-record counts for the data curve")
    parser.add_argument("--curve-steps", type=int, default=1000, help="train_d steps of each data-curve run")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args()
    cfg = config.resolve(args.config, args.overrides)
    run_dir = output_dir(cfg, "d_run_dir")
    eval_root = output_dir(cfg, "eval_dir")
    train_d.train_d(cfg)

    header = ["| point | FID D | FID teacher | ratio | precision D | recall D | PSNR D vs teacher (dB) | speed-up |",
              "|---|---|---|---|---|---|---|---|"]
    steps_rows = []
    for snapshot in sorted((run_dir / "snapshots").glob("step-*")):
        if int(snapshot.name[5:]) >= cfg["d_train_steps"]:
            continue  # the final student is evaluated below
        report = evaluate_point(cfg, snapshot, eval_root / "curve" / snapshot.name)
        steps_rows.append(row(f"{int(snapshot.name[5:])} steps", report))
    final = evaluate_point(cfg, run_dir / "student", eval_root)
    steps_rows.append(row(f"{cfg['d_train_steps']} steps (EMA, final)", final))

    data_rows = []
    for n in [int(v) for v in args.train_samples.split(",") if v]:
        point = dict(cfg, train_samples=n, d_train_steps=args.curve_steps, d_snapshot_every=0,
                     d_run_dir=str(run_dir.with_name(f"{run_dir.name}-records{n}")))
        student = train_d.train_d(point)
        data_rows.append(row(f"{n} records, {args.curve_steps} steps", evaluate_point(point, student,
                                                                                  eval_root / "data" / f"records{n}")))

    print(f"\nFID N={final['fid_samples']} against {final['fid_reference']}; floor at the same N "
          f"{final['scores']['real']['fid']:.2f}; held-out records {final['held_out_records']}.")
    print("\nFID against training steps:\n" + "\n".join(header + steps_rows))
    if data_rows:
        print("\nFID against the number of teacher samples:\n" + "\n".join(header + data_rows))
    t = final["throughput"]
    print(f"\nspeed ({t['device']}, {t['threads']} threads, batch {t['batch']}): D {t['d']['images_per_s']:.1f} "
          f"images/s, teacher {t['teacher_images_per_s']:.1f} images/s ({t['teacher_steps']} steps): "
          f"{t['d']['speedup']:.1f}x; D = {t['d']['cost_in_teacher_calls']:.2f} teacher calls")
    print(f"data-loading stall of the main run: {100 * stall(run_dir):.2f} % of step time")


if __name__ == "__main__":
    main()
