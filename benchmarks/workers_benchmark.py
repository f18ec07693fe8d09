"""One process against two workers, stage by stage, back to back on this CPU (key ``procs``, issue 28).

    .venv/bin/python benchmarks/workers_benchmark.py                       # the demo preset, two rounds
    .venv/bin/python benchmarks/workers_benchmark.py --rounds 3 --eval     # eval_d too

Each stage runs as the main command runs it, a plain ``Main_Distill.py`` launch, once with ``procs=1`` (one
process, every core's thread) and once with ``procs=2`` (two single-thread workers of one torch.distributed group),
on the same teacher, data and D. Rounds alternate which side goes first, so a machine that speeds up or slows down
affects both alike. What is timed per stage: generate's wall time (start-up included, as a user waits for it);
train_d's and binarize's median ``seconds_per_step`` of their ``stats.jsonl`` windows after the first (which holds
the warm-up); eval_d's wall time of D alone with the reference features already cached. The first lines name the
CPU, its kind (pipeline/core/cpu.py) and torch's kernel ISA, which is what BENCHMARKS.md records.
Run it alone on the machine: anything else running is measured with it. Short runs can mislead (start-up weighs
more, long runs page differently): before changing what ``procs=0`` does, time the whole main command both ways.
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.core import config, cpu  # noqa: E402
from pipeline.core.errors import UserError  # noqa: E402

SIDES = (1, 2)


def run_stage(args: list, log: Path) -> float:
    """Seconds of wall time of ``Main_Distill.py args``; its output goes to ``log``."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, str(ROOT / "Main_Distill.py"), *args], cwd=ROOT, capture_output=True,
                          text=True, env=dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1"))
    log.write_text(done.stdout + done.stderr)
    if done.returncode:
        raise UserError(f"{' '.join(args[:2])} failed (log {log}): {done.stderr.strip().splitlines()[-1:]}")
    return time.perf_counter() - started


def median_step(run_dir: Path) -> float:
    """The median seconds per step of a run's stats.jsonl windows after the first."""
    windows = [json.loads(line)["seconds_per_step"] for line in (run_dir / "stats.jsonl").read_text().splitlines()]
    if len(windows) < 2:
        raise UserError(f"{run_dir} logged one window of steps; give more steps")
    return statistics.median(windows[1:])


def one_round(order, common, scratch: Path, r: int, args, data: Path, d_run: Path) -> dict:
    """Every stage with each procs value in ``order``; returns {stage: {procs: figure}}."""
    out = {"generate": {}, "train_d": {}, "binarize": {}, "eval_d": {}}
    for p in order:
        tag = f"r{r}-p{p}"
        fresh = scratch / f"data-{tag}"
        out["generate"][p] = run_stage(["--mode", "generate", *common, f"procs={p}", f"data_dir={fresh}",
                                        f"samples_total={args.samples}"], scratch / f"generate-{tag}.log")
        d = scratch / f"d-{tag}"
        run_stage(["--mode", "train_d", *common, f"procs={p}", f"data_dir={data}", f"d_run_dir={d}",
                   f"d_train_steps={args.d_steps}", "d_checkpoint_every=1000000"], scratch / f"train_d-{tag}.log")
        out["train_d"][p] = median_step(d)
        b = scratch / f"b-{tag}"
        run_stage(["--mode", "binarize", *common, f"procs={p}", f"data_dir={data}", f"d_run_dir={d_run}",
                   f"b_run_dir={b}", f"b_train_steps={args.b_steps}", "b_checkpoint_every=1000000"],
                  scratch / f"binarize-{tag}.log")
        out["binarize"][p] = median_step(b)
        if args.eval:
            out["eval_d"][p] = run_stage(["--mode", "eval_d", *common, f"procs={p}", f"data_dir={data}",
                                          f"d_run_dir={d_run}", "b_weights=none", "walk_frames=0",
                                          f"eval_dir={scratch / f'eval-{tag}'}"], scratch / f"eval_d-{tag}.log")
    return out


def prepare(common, scratch: Path, args) -> tuple:
    """The shared data and D (one process), and eval_d once so its reference features are cached."""
    data, d_run = scratch / "data", scratch / "d-shared"
    run_stage(["--mode", "generate", *common, "procs=1", f"data_dir={data}", f"samples_total={args.samples}"],
              scratch / "prepare-generate.log")
    run_stage(["--mode", "train_d", *common, "procs=1", f"data_dir={data}", f"d_run_dir={d_run}",
               f"d_train_steps={args.d_steps}"], scratch / "prepare-train_d.log")
    if args.eval:
        run_stage(["--mode", "eval_d", *common, "procs=1", f"data_dir={data}", f"d_run_dir={d_run}", "b_weights=none",
                   "walk_frames=0", f"eval_dir={scratch / 'eval-prepare'}"], scratch / "prepare-eval_d.log")
    return data, d_run


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="fashion_mnist")
    parser.add_argument("--rounds", type=int, default=2, help="rounds; each runs both sides, the first side alternating")
    parser.add_argument("--samples", type=int, default=384, help="records generate makes per run (whole shards)")
    parser.add_argument("--d-steps", type=int, default=80)
    parser.add_argument("--b-steps", type=int, default=40)
    parser.add_argument("--eval", action="store_true", help="time eval_d of D alone too (reference features cached)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder (logs, data, runs)")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args()
    try:
        config.resolve(args.config, args.overrides)  # a refused key is said before anything runs
    except UserError as err:
        raise SystemExit(f"error: {err}") from None
    kind = cpu.kind()
    print(f"CPU: {cpu.model_name()}, {os.cpu_count()} cores; kind {kind} ({cpu.DESCRIPTIONS[kind]}); torch "
          f"{torch.__version__}, kernel ISA {torch.backends.cpu.get_cpu_capability()}; preset {args.config}", flush=True)
    scratch = Path(tempfile.mkdtemp(prefix="workers-", dir=ROOT / "data"))
    common = ["--config", args.config, *args.overrides, f"fid_cache_dir={scratch / 'fid'}"]
    rounds = []
    try:
        data, d_run = prepare(common, scratch, args)
        for r in range(args.rounds):
            order = SIDES if r % 2 == 0 else SIDES[::-1]
            rounds.append(one_round(order, common, scratch, r + 1, args, data, d_run))
            print(f"round {r + 1} done: {json.dumps(rounds[-1])}", flush=True)
    except UserError as err:
        raise SystemExit(f"error: {err}") from None
    finally:
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)
    units = {"generate": f"wall s, {args.samples} records", "train_d": "s / step", "binarize": "s / step",
             "eval_d": "wall s, D alone"}
    print("\n| stage | unit | procs=1, each round | procs=2, each round | speed-up of two workers |\n|---|---|---|---|---|")
    for stage, unit in units.items():
        if not rounds[0][stage]:
            continue
        one = [r[stage][1] for r in rounds]
        two = [r[stage][2] for r in rounds]
        ratios = " / ".join(f"{a / b:.2f}x" for a, b in zip(one, two))
        print(f"| {stage} | {unit} | {' / '.join(f'{v:.3g}' for v in one)} | {' / '.join(f'{v:.3g}' for v in two)} "
              f"| {ratios} |")
    print("\nprocs=0 starts two workers for generate, train_d and binarize on every CPU kind; these short runs are a "
          "first look: on the Zen 4 EPYC they said 0.86-1.00x where the whole main command ran 1.1x faster with workers")


if __name__ == "__main__":
    main()
