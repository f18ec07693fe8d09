"""What torchrun buys: generate and train_d on one process against N processes, and the projected wall time of a
full-size job (issue 16).

    .venv/bin/python benchmarks/scale_benchmark.py --config fashion_mnist shard_size=64 --procs 2    # this CPU
    python benchmarks/scale_benchmark.py --config cifar10 --random-teacher --procs 1 --samples 1024 --d-steps 200

Every launch is a subprocess, as a user starts it: ``python Main_Distill.py`` (one process, every thread) and
``torchrun --nproc_per_node=N`` for each ``--procs`` N (torchrun gives each process ``num_threads / N`` threads on a
CPU, one GPU each on a GPU machine). Each launch generates ``--samples`` samples into its own folder, then trains D
for ``--d-steps`` steps on the plain launch's folder. The figures are the stages' own, without warm-up: generate's
samples per teacher second after its first round of shards (from the folder's ``stats.jsonl``; the first round
carries CUDA's lazy start) and the median ``seconds_per_step`` of train_d's ``stats.jsonl`` without its first log
window; the wall time of each subprocess is printed beside them. ``--procs 1`` against the plain launch is
torchrun's own overhead. generate hands out whole shards, so ``--samples`` should make at least 2N shards of the
config's ``shard_size`` (a smaller ``shard_size=`` override does).

The projection multiplies the measured rates out to ``--project-samples`` samples and ``--project-epochs`` epochs of
D over the training records at the config's batch. N processes of generate are N independent streams of shards, so
their rate is measured, not assumed; a GPU count that was not launched here (8, say) is projected as the one-GPU
rate times the count, which is exact for generate and an upper bound for D (it leaves out the gradient all-reduce).
``--random-teacher`` writes a UNet with the preset's architecture and random weights (the speed of a call does not
depend on the weights), for machines without the pretrained teacher.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pipeline.core import config, cpu, runtime
from pipeline.core.errors import UserError
from pipeline.teacher import teachers

ROOT = Path(__file__).resolve().parent.parent


def launch(procs, args, log: Path) -> float:
    """Seconds of wall time of Main_Distill.py with ``args`` (plain python when ``procs`` is 0); its output to ``log``."""
    runner = [sys.executable] if procs == 0 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                   f"--nproc_per_node={procs}"]
    started = time.time()
    done = subprocess.run([*runner, str(ROOT / "Main_Distill.py"), *args], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1"))
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(done.stdout + done.stderr)
    if done.returncode:
        raise UserError(f"{' '.join(args[:2])} on {procs or 'one'} process(es) failed: {done.stderr.strip()[-400:]}")
    return time.time() - started


def steady_samples_per_s(data: Path) -> float:
    """Samples per teacher second after the first round of shards. Each line of generate's stats.jsonl holds rank
    0's running teacher seconds when a round was listed (one round: N shards with the same total)."""
    lines = [json.loads(line) for line in (data / "stats.jsonl").read_text().splitlines()]
    first = lines[0]["teacher_seconds_total"]
    later = [line for line in lines if line["teacher_seconds_total"] != first]
    if not later:
        raise UserError(f"generate made one round of shards in {data}; give --samples for at least two rounds")
    return sum(line["count"] for line in later) / (later[-1]["teacher_seconds_total"] - first)


def random_teacher(cfg, folder: Path) -> Path:
    channels = 1 if cfg["dataset"] == "fashion_mnist" else 3
    teachers.save_teacher(teachers.new_unet(cfg, channels=channels), teachers.new_scheduler(cfg), folder)
    return folder


def measure(procs, overrides, scratch: Path, samples: int, d_steps: int, data_of_plain: Path, logs: Path) -> dict:
    name = f"procs-{procs}" if procs else "plain"
    data = scratch / name / "data"
    wall = launch(procs, ["--mode", "generate", *overrides, f"data_dir={data}", f"samples_total={samples}"],
                  logs / f"{name}-generate.log")
    run = scratch / name / "d"
    d_wall = launch(procs, ["--mode", "train_d", *overrides, f"data_dir={data_of_plain or data}", f"d_run_dir={run}",
                            f"d_train_steps={d_steps}", f"d_checkpoint_every={10 ** 9}"], logs / f"{name}-train_d.log")
    windows = [json.loads(line)["seconds_per_step"] for line in (run / "stats.jsonl").read_text().splitlines()]
    return {"launch": name, "procs": procs or 1, "samples_per_s": steady_samples_per_s(data), "generate_wall": wall,
            "d_seconds_per_step": statistics.median(windows[1:] or windows), "train_d_wall": d_wall}


def print_rows(rows, cfg):
    print(f"\nDevice: {cfg['device_name']}; config {cfg['name']}, batch {cfg['d_batch_size']}, {cfg['steps']}-step chains")
    print("\n| launch | processes | generate samples/s | generate wall (s) | D s/step | D steps/s | train_d wall (s) |"
          "\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['launch']} | {r['procs']} | {r['samples_per_s']:.2f} | {r['generate_wall']:.1f} | "
              f"{r['d_seconds_per_step']:.3f} | {1 / r['d_seconds_per_step']:.2f} | {r['train_d_wall']:.1f} |")


def print_projection(rows, cfg, samples: int, epochs: int, gpus: list):
    train_records = samples - cfg["holdout_samples"]
    steps = epochs * train_records / cfg["d_batch_size"]
    print(f"\nProjected: {samples:,} teacher samples, then {epochs} epochs of D over {train_records:,} records "
          f"({steps:,.0f} steps at batch {cfg['d_batch_size']}); measured rates, or the one-process rate times the "
          "count where marked (exact for generate, an upper bound for D)\n\n| processes | generate | D | total |"
          "\n|---|---|---|---|")
    base = next(r for r in rows if r["launch"] == "plain")
    measured = {r["procs"]: r for r in rows if r["launch"] != "plain"}
    for count in sorted(set(measured) | set(gpus)):
        r = measured.get(count)
        rate_g = r["samples_per_s"] if r else base["samples_per_s"] * count
        rate_d = 1 / r["d_seconds_per_step"] if r else count / base["d_seconds_per_step"]
        hours = [samples / rate_g / 3600, steps / rate_d / 3600]
        mark = "" if r else (" (plain python)" if count == 1 else " (× count)")
        print(f"| {count}{mark} | {hours[0]:.2f} h | {hours[1]:.2f} h | {sum(hours):.2f} h |")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="fashion_mnist")
    parser.add_argument("--procs", type=int, nargs="+", default=[2], help="torchrun process counts to launch")
    parser.add_argument("--samples", type=int, default=128, help="samples each launch generates")
    parser.add_argument("--d-steps", type=int, default=40, help="train_d steps each launch trains")
    parser.add_argument("--random-teacher", action="store_true", help="a random-weight teacher of the preset's shape")
    parser.add_argument("--logs", type=Path, help="keep every launch's output here (default: thrown away)")
    parser.add_argument("--project-samples", type=int, default=10_000)
    parser.add_argument("--project-epochs", type=int, default=500)
    parser.add_argument("--project-gpus", type=int, nargs="*", default=[1, 8])
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args()
    try:
        cfg = config.resolve(args.config, args.overrides)
        cfg["device_name"] = f"{runtime.select_device(cfg)} ({cpu.model_name()})"
        with tempfile.TemporaryDirectory() as scratch:
            scratch = Path(scratch)
            # a few held-out records, so that D trains on most of the small sample; the projection keeps the preset's
            overrides = ["--config", args.config, *args.overrides, f"holdout_samples={max(1, args.samples // 8)}"]
            if args.random_teacher:
                overrides.append(f"teacher_path={random_teacher(cfg, scratch / 'teacher')}")
            logs = args.logs or scratch / "logs"
            rows = [measure(0, overrides, scratch, args.samples, args.d_steps, None, logs)]
            plain_data = scratch / "plain" / "data"
            rows += [measure(n, overrides, scratch, args.samples, args.d_steps, plain_data, logs) for n in args.procs]
    except UserError as err:
        raise SystemExit(f"error: {err}") from None
    print_rows(rows, cfg)
    print_projection(rows, cfg, args.project_samples, args.project_epochs, args.project_gpus)


if __name__ == "__main__":
    main()
