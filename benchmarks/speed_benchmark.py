"""Where the main command's time goes, old paths against new, back to back on this machine.

    .venv/bin/python Main_Distill.py                                 # first: its data, D and B are used here
    .venv/bin/python benchmarks/speed_benchmark.py                   # precision=auto, as the main command
    .venv/bin/python benchmarks/speed_benchmark.py precision=fp32    # as a CPU without native bf16 trains

The "old" path is the code and recipe before the speed work, reached through keys that still select it
(``OLD``): contiguous memory instead of channels-last for inference (teacher sampling, one-step calls,
Inception), D run in every binarize step instead of once per record, and the old step counts. Each
stage is timed alternately old, new, old, new, ... so that a machine that speeds up or slows down
meanwhile affects both alike, and the median of each side is printed with the ratio. The stage totals
of the main command are then projected from the per-unit times and the preset's counts (samples,
steps); ``eval_d`` is timed whole (fresh feature caches, so as on a fresh clone). One process against two
workers, stage by stage, is benchmarks/workers_benchmark.py.
"""
import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.core import config, cpu, runtime
from pipeline.core.config import output_dir
from pipeline.core.errors import UserError
from pipeline.data import datasets, teacher_data
from pipeline.data.generate import Generator
from pipeline.evaluation import evaluate, fid
from pipeline.students import student_d, student_folders
from pipeline.train.binarize import BTrainer
from pipeline.train.train_d import DTrainer

# What the main command ran before the speed work (issue 12), as config keys of this version.
OLD = {"channels_last": False, "b_cache_d_mb": 0, "d_train_steps": 700, "b_train_steps": 600}


def alternate(old, new, repeats: int):
    """(old times, new times): each callable timed ``repeats`` times, interleaved."""
    times = {"old": [], "new": []}
    for _ in range(repeats):
        for side, fn in (("old", old), ("new", new)):
            started = time.perf_counter()
            fn()
            times[side].append(time.perf_counter() - started)
    return times["old"], times["new"]


def row(stage, unit, old, new, scale=1.0):
    """A table row: medians per unit (seconds / scale) and the ratio old / new."""
    o, n = statistics.median(old) / scale, statistics.median(new) / scale
    return {"stage": stage, "unit": unit, "old": o, "new": n, "ratio": o / n}


def teacher_sampling(cfgs, repeats):
    gens = {side: Generator(cfg) for side, cfg in cfgs.items()}
    index = np.arange(cfgs["new"]["gen_batch_size"])
    for gen in gens.values():  # warm-up: the first calls allocate
        gen.records(index[:2])
    old, new = alternate(lambda: gens["old"].records(index), lambda: gens["new"].records(index), repeats)
    return row("teacher sampling in generate", "s / sample", old, new, len(index))


def one_step(cfgs, x_T, repeats):
    models = {side: runtime.for_inference(student_d.load_student(student_folders.d_folder(cfg)), cfg)
              for side, cfg in cfgs.items()}

    def call(side):
        def go():
            with torch.inference_mode():
                student_d.one_step(models[side], x_T)
        return go

    for side in models:
        call(side)()
    old, new = alternate(call("old"), call("new"), repeats)
    return row("one-step inference of D (batch %d)" % len(x_T), "s / image", old, new, len(x_T))


def inception(images_uint8, repeats):
    nets = {"old": fid.InceptionFeatures(channels_last=False), "new": fid.InceptionFeatures(channels_last=True)}
    batch = torch.from_numpy(images_uint8)
    for net in nets.values():
        net(batch[:2])
    old, new = alternate(lambda: nets["old"](batch), lambda: nets["new"](batch), repeats)
    return row("Inception features (batch %d)" % len(batch), "s / image", old, new, len(batch))


def training_steps(trainer_class, cfgs, steps, repeats, label):
    """Seconds per step of two trainers, in alternating blocks of ``steps`` steps, and what the new one
    spends before its first step beyond the old one (the store of D's outputs, for B)."""
    trainers, setup = {}, {}
    for side, cfg in cfgs.items():
        trainer = trainer_class(cfg)
        started = time.perf_counter()
        stream = trainer.batches()
        setup[side] = time.perf_counter() - started
        trainer.train_step(next(stream))  # warm-up
        trainers[side] = (trainer, stream)

    def block(side):
        trainer, stream = trainers[side]
        return lambda: [trainer.train_step(next(stream)) for _ in range(steps)]

    old, new = alternate(block("old"), block("new"), repeats)
    result = row(label, "s / step", old, new, steps)
    result["setup"] = setup
    return result


def whole_eval(cfgs, scratch: Path, repeats):
    """eval_d start to end with empty feature caches, as the main command's first run does."""
    def run(side):
        def go():
            cfg = dict(cfgs[side], fid_cache_dir=str(scratch / f"fid-{side}"), eval_dir=str(scratch / f"eval-{side}"))
            shutil.rmtree(scratch / f"fid-{side}", ignore_errors=True)
            shutil.rmtree(output_dir(cfg, "data_dir") / "eval", ignore_errors=True)  # the teacher's cached scores
            evaluate.Evaluation(cfg).run()
        return go

    old, new = alternate(run("old"), run("new"), repeats)
    return row("eval_d as a whole (fresh caches)", "s", old, new)


def projected(rows, cfgs):
    """Stage totals of the main command from the per-unit times and each side's counts."""
    by = {r["stage"].split(" (")[0]: r for r in rows}
    out = []
    for side in ("old", "new"):
        cfg, total = cfgs[side], {}
        total["generate"] = by["teacher sampling in generate"][side] * cfg["samples_total"]
        total["train_d"] = by["D training step"][side] * cfg["d_train_steps"]
        b = by["B training step"]
        total["binarize"] = b[side] * cfg["b_train_steps"] + max(0.0, b["setup"][side] - b["setup"]["old"])
        total["eval_d"] = by["eval_d as a whole"][side]
        out.append(total)
    return out


def check_inputs(cfg):
    d = student_folders.d_folder(cfg)
    if not (d / student_d.WEIGHTS_FILE).is_file():
        raise UserError(f"no student D in {d}; run the main command (Main_Distill.py) with the same config first")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="fashion_mnist")
    parser.add_argument("--repeats", type=int, default=3, help="old/new alternations per stage")
    parser.add_argument("--steps", type=int, default=5, help="training steps per timed block")
    parser.add_argument("--eval-repeats", type=int, default=1, help="old/new alternations of the whole eval_d")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args()
    new = config.resolve(args.config, args.overrides)
    cfgs = {"old": dict(new, **OLD), "new": new}
    try:
        check_inputs(new)
        runtime.configure(new)
        print(f"[speed] CPU {cpu.model_name()} (kind {cpu.kind()}), kernel ISA {torch.backends.cpu.get_cpu_capability()}, "
              f"torch threads {torch.get_num_threads()}, training autocast "
              f"{runtime.autocast_dtype(new['precision'], torch.device('cpu')) or 'off (fp32)'}", flush=True)
        manifest = teacher_data.open_data(new)
        held_out = teacher_data.read_range(manifest, 0, 64)
        with tempfile.TemporaryDirectory() as scratch:
            scratch = Path(scratch)
            train = {side: dict(cfg, d_run_dir=str(scratch / f"d-{side}"), b_run_dir=str(scratch / f"b-{side}"),
                                d_weights=str(student_folders.d_folder(new)))
                     for side, cfg in cfgs.items()}
            rows = [teacher_sampling(cfgs, args.repeats),
                    training_steps(DTrainer, train, args.steps, args.repeats, "D training step"),
                    training_steps(BTrainer, train, args.steps, args.repeats, "B training step"),
                    one_step(cfgs, held_out["x_T"], args.repeats),
                    inception(datasets.to_uint8(held_out["x0"]), args.repeats),
                    whole_eval(cfgs, scratch, args.eval_repeats)]
    except UserError as err:
        raise SystemExit(f"error: {err}") from None
    print("\n| stage | unit | old | new | old / new |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['stage']} | {r['unit']} | {r['old']:.4g} | {r['new']:.4g} | **{r['ratio']:.2f}×** |")
    old, new_total = projected(rows, cfgs)
    print("\nProjected stage totals of the main command (per-unit medians × the preset's counts):\n")
    print("| stage | old (s) | new (s) | old / new |\n|---|---|---|---|")
    for stage in old:
        print(f"| {stage} | {old[stage]:.0f} | {new_total[stage]:.0f} | {old[stage] / new_total[stage]:.2f}× |")
    print(f"| **all four** | {sum(old.values()):.0f} | {sum(new_total.values()):.0f} | "
          f"**{sum(old.values()) / sum(new_total.values()):.2f}×** |")


if __name__ == "__main__":
    main()
