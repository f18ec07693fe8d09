"""The teacher's FID against DDIM steps and against its own training steps, and its cost per call.

    .venv/bin/python benchmarks/teacher_benchmark.py --teachers Diffusion/fashion_mnist --ddim-steps 25 50 100
    .venv/bin/python benchmarks/teacher_benchmark.py --snapshots Checkpoints/diffusion/<run> --ddim-steps 50

Every row is ``Main_Diffusion.py --mode sample``'s measurement: N = ``fid_samples`` DDIM samples from
x_T of indices 0..N-1 (the same x_T as records 0..N-1 of generated teacher data), FID against the
whole test split and the floor at the same N (N real training images), plus precision and recall in
the same Inception features. ``--snapshots`` scores every EMA snapshot of one pretrain run
(``snapshot_every``), so one run gives the FID-against-training-steps curve. Each teacher's cost per
call (one UNet call at batch ``gen_batch_size``, median of 7) is timed with the teachers alternated, so
they are compared side by side. Rows go to ``--out`` (JSON lines) as they are measured; rows already
there are not measured again, so an interrupted run resumes.
"""
import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from pipeline.core import config, cpu, runtime
from pipeline.core.errors import UserError
from pipeline.evaluation import fid, metrics, teacher_eval
from pipeline.teacher import teachers

TIMING_REPEATS = 7


def teacher_folders(args) -> list:
    folders = [Path(t) for t in args.teachers]
    for run in args.snapshots:
        found = sorted((Path(run) / "snapshots").glob("step-*"))
        if not found:
            raise UserError(f"{run}/snapshots holds no snapshots; train with snapshot_every= set")
        folders += found
    if not folders:
        raise UserError("name at least one teacher folder (--teachers) or pretrain run (--snapshots)")
    return folders


def training_step(folder: Path):
    """The pretrain step of a snapshot (None for an exported teacher without one)."""
    saved = folder / "pretrain_config.json"
    if not saved.is_file():
        return None
    cfg = json.loads(saved.read_text())
    return cfg.get("snapshot_step", cfg.get("train_steps"))


def seconds_per_call(cfg, folders, device) -> dict:
    """{folder: (weights sha256, median seconds of one UNet call)}, teachers alternated call by call."""
    unets = {}
    for folder in folders:
        unet, _, _ = teachers.load_teacher(dict(cfg, teacher_path=str(folder)))
        unets[folder] = runtime.for_inference(unet.to(device), cfg)
    shape = [cfg["gen_batch_size"], unets[folders[0]].config.in_channels] + [unets[folders[0]].config.sample_size] * 2
    x, t = torch.randn(shape, device=device), torch.full((shape[0],), 500, device=device)
    times = {folder: [] for folder in folders}
    hashes = {folder: teachers.weights_sha256(unet) for folder, unet in unets.items()}
    with torch.inference_mode():
        for unet in unets.values():
            unet(x, t)  # warm-up: the first call allocates
        for _ in range(TIMING_REPEATS):
            for folder, unet in unets.items():
                started = time.perf_counter()
                unet(x, t)
                times[folder].append(time.perf_counter() - started)
    return {folder: (hashes[folder], statistics.median(ts)) for folder, ts in times.items()}


def score(cfg, folder: Path, ddim_steps: int, features, reference, device) -> dict:
    point = dict(cfg, teacher_path=str(folder), steps=ddim_steps,
                 samples_dir=str(Path(cfg["samples_dir"]) / folder.name / f"ddim-{ddim_steps}"))
    unet, ddpm, _ = teachers.load_teacher(point)
    unet = runtime.for_inference(unet.to(device), point)
    started = time.time()
    samples = teacher_eval.load_or_draw_samples(point, unet, ddpm, device, config.output_dir(point, "samples_dir"))
    n = cfg["fid_samples"]
    fake = fid.extract(features, samples[:n], cfg["fid_batch_size"], "inception: samples")
    real, floor = reference
    precision, recall = metrics.precision_recall(real, fake)
    return {"teacher": str(folder), "teacher_sha256": teachers.weights_sha256(unet),
            "training_step": training_step(folder), "ddim_steps": ddim_steps, "n": n,
            "fid": fid.frechet_distance(real, fake), "floor": fid.frechet_distance(real, floor),
            "precision": float(precision), "recall": float(recall), "seconds": time.time() - started}


def done_rows(out: Path) -> list:
    return [json.loads(line) for line in out.read_text().splitlines()] if out.is_file() else []


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="fashion_mnist")
    parser.add_argument("--teachers", nargs="*", default=[], help="teacher folders (diffusers layout)")
    parser.add_argument("--snapshots", nargs="*", default=[], help="pretrain run folders with snapshots/")
    parser.add_argument("--ddim-steps", nargs="+", type=int, default=[50])
    parser.add_argument("--out", default="SampledImgs/teacher_benchmark/rows.jsonl")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args()
    cfg = config.resolve(args.config, ["fid_samples=1000", "samples_dir=SampledImgs/teacher_benchmark",
                                       *args.overrides])
    out = Path(args.out)
    try:
        folders = teacher_folders(args)
        device = runtime.configure(cfg)
        per_call = seconds_per_call(cfg, folders, device)
        features = fid.InceptionFeatures(cfg["channels_last"])
        test, _, real, floor = fid.reference_features(cfg, features, cfg["fid_samples"])
        print(f"[teacher] reference: {cfg['dataset']} test split, {len(test)} images; N = {cfg['fid_samples']}")
        rows = done_rows(out)
        for folder in folders:
            for ddim_steps in args.ddim_steps:
                sha256, seconds = per_call[folder]
                key = (sha256, ddim_steps, cfg["fid_samples"])
                if any((r["teacher_sha256"], r["ddim_steps"], r["n"]) == key for r in rows):
                    continue
                rows.append(dict(score(cfg, folder, ddim_steps, features, (real, floor), device),
                                 ms_per_call=1000 * seconds))
                out.parent.mkdir(parents=True, exist_ok=True)
                with open(out, "a") as f:
                    f.write(json.dumps(rows[-1]) + "\n")
    except UserError as err:
        raise SystemExit(f"error: {err}") from None
    print(f"\nCPU: {cpu.model_name()}; N = {cfg['fid_samples']} against the whole test split\n")
    print("| teacher | training step | DDIM steps | FID | floor | precision | recall | ms / call (batch "
          f"{cfg['gen_batch_size']}) |\n|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['teacher']} | {r['training_step'] or '–'} | {r['ddim_steps']} | {r['fid']:.2f} | {r['floor']:.2f} | "
              f"{r['precision']:.3f} | {r['recall']:.3f} | {r['ms_per_call']:.1f} |")
    print_side_by_side(per_call, cfg["gen_batch_size"])


def print_side_by_side(per_call: dict, batch: int) -> None:
    """This invocation's cost per call of every teacher named, timed alternately: the rows above keep the
    time measured when each was scored, possibly on another day's machine."""
    print(f"\nCost per call measured side by side in this run (batch {batch}, median of {TIMING_REPEATS}, "
          "alternated):\n\n| teacher | sha256 | ms / call |\n|---|---|---|")
    for folder, (sha256, seconds) in per_call.items():
        print(f"| {folder} | {sha256[:12]}… | {1000 * seconds:.1f} |")


if __name__ == "__main__":
    main()
