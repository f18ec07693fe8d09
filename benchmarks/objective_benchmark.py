"""The ablation table of D's training objective for BENCHMARKS.md: one full train_d + eval_d per variant.

    .venv/bin/python benchmarks/objective_benchmark.py --config fashion_mnist \\
        --variant base: --variant adv:lambda_adv=0.1 --variant adv-data:lambda_adv=0.1,adv_real=dataset

A variant is ``tag:key=value,key=value`` (overrides of the preset; ``tag:`` alone is the preset as it is). Each
trains D into ``Checkpoints/distill/<name>-<tag>`` (a finished run is only read again, an interrupted one
resumes) and scores it with eval_d (D alone, no latent walk) into ``SampledImgs/distill/<name>-<tag>``; a
report newer than its D is reused. Every row has the same held-out records, N and reference set, so the
teacher's figures are shared; the step time is the median of the run's ``stats.jsonl`` windows, so run the
script alone on the machine for it to mean something.
"""
import argparse
import json
import platform
import statistics

from pipeline.core import config, cpu, runtime
from pipeline.core.config import output_dir, project_path
from pipeline.evaluation import evaluate
from pipeline.train import train_d


def parse_variant(text: str):
    tag, _, overrides = text.partition(":")
    if not tag:
        raise SystemExit(f"--variant {text!r} needs a tag before the colon")
    return tag, [item for item in overrides.split(",") if item]


def seconds_per_step(run_dir) -> float:
    stats = [json.loads(line) for line in (run_dir / "stats.jsonl").read_text().splitlines()]
    return statistics.median(s["seconds_per_step"] for s in stats)


def run_variant(preset: str, tag: str, overrides: list) -> dict:
    cfg = config.resolve(preset, overrides)
    name = f"{cfg['name']}-{tag}"
    cfg = config.resolve(preset, overrides + [f"d_run_dir=Checkpoints/distill/{name}", "b_weights=none",
                                              "walk_frames=0", f"eval_dir=SampledImgs/distill/{name}"])
    student = train_d.train_d(cfg)
    report_path = project_path(cfg["eval_dir"]) / "report.json"
    fresh = report_path.is_file() and report_path.stat().st_mtime > (student / "model.safetensors").stat().st_mtime
    report = json.loads(report_path.read_text()) if fresh else evaluate.eval_d(cfg)
    return {"report": report, "seconds_per_step": seconds_per_step(output_dir(cfg, "d_run_dir")),
            "steps": cfg["d_train_steps"]}


def row(tag: str, overrides: list, result: dict) -> str:
    r = result["report"]
    d = r["scores"]["d"]
    return (f"| {tag} | {' '.join(overrides) or '(preset)'} | {d['fid']:.2f} | {r['fid_excess']['d']:.2f} | "
            f"{r['fid_ratio']['d_over_teacher']:.2f} | {r['fid_excess_ratio']['d_over_teacher']:.2f} | "
            f"{d['kid'] * 1e3:.2f} | "
            f"{d['precision']:.3f} | {d['recall']:.3f} | {r['fidelity_vs_teacher']['d']['psnr_db']:.2f} | "
            f"{d['memorization']:.3f} | {result['seconds_per_step']:.3f} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="fashion_mnist")
    parser.add_argument("--variant", action="append", required=True, help="tag:key=value,key=value")
    args = parser.parse_args()
    variants = [parse_variant(v) for v in args.variant]
    results = {tag: run_variant(args.config, tag, overrides) for tag, overrides in variants}
    first = next(iter(results.values()))["report"]
    s = first["scores"]
    print(f"\nCPU: {cpu.model_name()} ({platform.machine()}); preset {args.config}; N = {first['fid_samples']} "
          f"against {first['fid_reference']}; floor {s['real']['fid']:.2f} (KID x1e3 {s['real']['kid'] * 1e3:.2f}); "
          f"teacher FID {s['teacher']['fid']:.2f}, KID x1e3 {s['teacher']['kid'] * 1e3:.2f}, precision "
          f"{s['teacher']['precision']:.3f}, recall {s['teacher']['recall']:.3f}, memorization "
          f"{s['teacher']['memorization']:.3f}\n")
    print("| variant | overrides | FID | FID − floor | D / teacher | excess ratio | KID ×10³ | precision | recall | "
          "PSNR dB | memorization | s/step |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for tag, overrides in variants:
        print(row(tag, overrides, results[tag]))


if __name__ == "__main__":
    main()
