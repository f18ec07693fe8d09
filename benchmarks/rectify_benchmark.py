"""What the rectified teacher costs on this machine, for adapter sizes to choose from.

    .venv/bin/python benchmarks/rectify_benchmark.py                              # the embedded teacher
    .venv/bin/python benchmarks/rectify_benchmark.py --sizes 0,0,1 1,1,2 4,2,4 --steps 5

For each size (``rin_blocks,r_blocks,head_blocks``) it prints the RNet's trainable and total
parameters, the FLOPs of one Rin, one R step and one head call in teacher calls (torch's
``FlopCounterMode``, batch 1), the measured seconds of one R step and of one teacher call at batch
``gen_batch_size`` (best of 5, channels-last inference as generate runs them), and the seconds per
``rectify`` training step at the preset's batch for depth s = 1 (median of ``--steps`` after one
warm-up step) with the process's peak resident memory. Everything runs in this one process, one size
after the other, so the figures compare sizes on one machine.
"""
import argparse
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from pipeline.core import config, runtime
from pipeline.core.errors import UserError
from pipeline.teacher import rnet, teachers
from pipeline.train.rectify import RectifyTrainer, rnet_settings


def flops(fn) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        fn()
    return counter.get_total_flops()


def call_costs(net, unet, cfg, device) -> dict:
    x1, t1 = torch.randn(1, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size), torch.tensor([500])
    teacher_flops = flops(lambda: unet(x1, t1))
    z1 = net.rin(x1, t1)
    batch = cfg["gen_batch_size"]
    x, t = x1.expand(batch, -1, -1, -1).contiguous().to(device), t1.expand(batch).to(device)
    net, unet = runtime.for_inference(net.to(device), cfg), runtime.for_inference(unet.to(device), cfg)
    with torch.inference_mode():
        z = net.rin(x, t)
        r_seconds = runtime.seconds_per_call(lambda: net.r(z, t), 5)
        teacher_seconds = runtime.seconds_per_call(lambda: unet(x, t), 5)
    return {"rin_flops": flops(lambda: net.rin(x1, t1)) / teacher_flops,
            "r_flops": flops(lambda: net.r(z1, t1)) / teacher_flops,
            "head_flops": flops(lambda: net.x0out(z1, t1)) / teacher_flops,
            "r_seconds": r_seconds, "teacher_seconds": teacher_seconds}


def step_seconds(cfg, steps: int) -> float:
    """Median seconds of ``rectify`` steps at depth 1 (after a warm-up step), in a scratch run folder."""
    with tempfile.TemporaryDirectory() as scratch:
        trainer = RectifyTrainer(dict(cfg, rect_run_dir=str(Path(scratch) / "run"), rect_depth_weights=[0, 1],
                                      rect_train_steps=steps + 1, rect_checkpoint_every=10 ** 9))
        stream = trainer.batches()
        times = []
        for _ in range(steps + 1):
            batch = next(stream)
            started = time.perf_counter()
            trainer.train_step(batch)
            times.append(time.perf_counter() - started)
    return statistics.median(times[1:])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="fashion_mnist")
    parser.add_argument("--sizes", nargs="+", default=["0,0,1", "1,1,2", "4,2,4"],
                        help="rin_blocks,r_blocks,head_blocks per size")
    parser.add_argument("--steps", type=int, default=5, help="timed training steps per size")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args()
    base = config.resolve(args.config, args.overrides)
    rows = []
    try:
        device = runtime.configure(base)
        for size in args.sizes:
            rin_blocks, r_blocks, head_blocks = (int(v) for v in size.split(","))
            cfg = dict(base, rect_rin_blocks=rin_blocks, rect_r_blocks=r_blocks, rect_head_blocks=head_blocks)
            unet, ddpm, _ = teachers.load_teacher(cfg)
            net = rnet.RNet(unet, **rnet_settings(cfg, ddpm.config.num_train_timesteps))
            trainable, total = rnet.parameter_counts(net)
            costs = call_costs(net, unet, cfg, device)
            seconds = step_seconds(cfg, args.steps)
            rows.append((size, trainable, total, costs, seconds,
                         resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))
    except UserError as err:
        raise SystemExit(f"error: {err}") from None
    print(f"\nteacher {base['teacher_path']}; LoRA {base['rect_lora']} rank {base['rect_lora_rank']}; rectify batch "
          f"{base['rect_batch_size']}, depth 1; torch threads {torch.get_num_threads()}\n")
    print("| blocks rin,r,head | trainable / total | Rin, R step, head (FLOPs in teacher calls) | R step / teacher "
          "call (time) | rectify step (s) | peak RSS (MiB) |\n|---|---|---|---|---|---|")
    for size, trainable, total, c, seconds, rss in rows:
        print(f"| {size} | {trainable:,} / {total:,} | {c['rin_flops']:.2f}, {c['r_flops']:.2f}, {c['head_flops']:.2f} | "
              f"{c['r_seconds'] / c['teacher_seconds']:.2f} | {seconds:.2f} | {rss:.0f} |")


if __name__ == "__main__":
    main()
