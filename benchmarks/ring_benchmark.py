"""Where the ring sampler departs from the teacher: one-step error, drift and read-out, step by step.

    .venv/bin/python benchmarks/ring_benchmark.py --rnet <RNet folder> [--samples 64] [key=value ...]

The ring (z_0 = Rin(x_T, τ_0), z_{i+1} = R(z_i, τ_i), image X0out(z_steps, 0)) is meant to follow the
teacher's latents ẑ_i = Rin(x_i, τ_i) along a DDIM chain x_0 = x_T, x_1, ... on the ring's own grid.
For the same x_T it runs two such chains: the frozen teacher UNet's (ε prediction) and the RNet's own
(Rout∘Rin, the chain ``rect_teacher=self`` trains on), and prints, per band of ring steps:

- one-step error: ‖R(ẑ_i) − ẑ_{i+1}‖² / ‖ẑ_{i+1} − ẑ_i‖², R's error against the motion it should make
  (1 = no better than standing still);
- drift: ‖z_i − ẑ_i‖² / ‖ẑ_i‖², how far the unrolled ring has moved off the teacher's latents, beside
  ‖ẑ_i − ẑ_0‖² / ‖ẑ_0‖², how far the teacher's latent itself has moved since Rin(x_T);

and the images' PSNR against the teacher's DDIM image on this grid: the ring's, the RNet's own DDIM
chain's, and the read-out of the teacher's final latent, X0out(Rin(x_final, 0), 0) (the autoencoder
bound: what a perfect ring could reach).
"""
import argparse

import torch

from pipeline.core import config, runtime
from pipeline.core.config import project_path
from pipeline.core.errors import UserError
from pipeline.evaluation import metrics
from pipeline.teacher import ring, rnet_files, teachers
from pipeline.teacher.trajectory import draw_x_T


def squared_norm(x) -> torch.Tensor:
    return x.pow(2).flatten(1).sum(1)


def relative(a, b) -> torch.Tensor:
    """‖a − b‖² / ‖b‖² per sample."""
    return squared_norm(a - b) / squared_norm(b).clamp_min(1e-12)


@torch.inference_mode()
def ddim_chain(predict, kind: str, x_T, grid, alphas_cumprod) -> list:
    """x at every grid step (η = 0, x0 clipped as the DDIM teacher and rectify's chain clip it), from
    ``predict(x, t)`` of prediction type ``kind``."""
    xs, x = [x_T], x_T
    for i in range(len(grid) - 1):
        t = grid[i].expand(len(x))
        eps, x0 = ring.chain_estimates(kind, predict(x, t).float(), x, alphas_cumprod, t, clip_x0=True)
        x = ring.ddim_step(x0, eps, alphas_cumprod, grid[i + 1].expand(len(x)))
        xs.append(x)
    return xs


@torch.inference_mode()
def measure(net, unet, meta, alphas_cumprod, x_T) -> dict:
    grid = ring.ring_timesteps(net.T, meta["steps"])
    teacher_xs = ddim_chain(lambda x, t: unet(x, t).sample, "eps", x_T, grid, alphas_cumprod)
    own_xs = ddim_chain(net, meta["prediction"], x_T, grid, alphas_cumprod)
    batch = len(x_T)
    targets = [net.rin(x, grid[i].expand(batch)) for i, x in enumerate(teacher_xs)]
    ring_z = []
    ring.ring_latents(net, x_T, grid, callback=lambda i, z: ring_z.append(z))
    one_step = [squared_norm(net.r(targets[i], grid[i].expand(batch)) - targets[i + 1])
                / squared_norm(targets[i + 1] - targets[i]).clamp_min(1e-12) for i in range(len(grid) - 1)]
    drift = [relative(z, target) for z, target in zip(ring_z, targets)]
    moved = [relative(target, targets[0]) for target in targets]
    reference = teacher_xs[-1].clamp(-1, 1)
    return {"one_step": torch.stack(one_step, 1), "drift": torch.stack(drift[1:], 1), "moved": torch.stack(moved[1:], 1),
            "psnr_ring": metrics.fidelity(ring.read_out(net, ring_z[-1]), reference)["psnr_db"],
            "psnr_own_chain": metrics.fidelity(own_xs[-1].clamp(-1, 1), reference)["psnr_db"],
            "psnr_readout_bound": metrics.fidelity(ring.read_out(net, targets[-1]), reference)["psnr_db"]}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="fashion_mnist")
    parser.add_argument("--rnet", required=True, help="an RNet folder (rectify's <rect_run_dir>/rnet)")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--bands", type=int, default=5, help="groups of ring steps in the table")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args()
    cfg = config.resolve(args.config, args.overrides)
    try:
        device = runtime.configure(cfg)
        unet, ddpm, source = teachers.load_teacher(cfg)
        net, meta = rnet_files.load_rnet(project_path(args.rnet), unet, teachers.weights_sha256(unet))
    except UserError as err:
        raise SystemExit(f"error: {err}") from None
    net, unet = net.to(device), unet.to(device)
    shape = [unet.config.in_channels] + [unet.config.sample_size] * 2
    x_T = draw_x_T(cfg["seed"], range(args.samples), shape).to(device)
    out = measure(net, unet, meta, ddpm.alphas_cumprod.to(device), x_T)
    steps = out["one_step"].shape[1]
    print(f"\nteacher {source}; RNet {args.rnet} ({meta['steps']} ring steps, {meta['prediction']}); "
          f"{args.samples} x_T of seed {cfg['seed']}; torch threads {torch.get_num_threads()}\n")
    print("| ring steps | one-step error (R vs teacher latent motion) | drift of the ring at band end | teacher latent "
          "moved since Rin(x_T) |\n|---|---|---|---|")
    bounds = torch.linspace(0, steps, args.bands + 1).round().long().tolist()
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        print(f"| {lo}-{hi} | {out['one_step'][:, lo:hi].mean():.3f} | {out['drift'][:, hi - 1].mean():.3f} | "
              f"{out['moved'][:, hi - 1].mean():.3f} |")
    print(f"\nPSNR against the teacher's DDIM image on the ring's grid: ring {out['psnr_ring']:.2f} dB; the RNet's own "
          f"DDIM chain {out['psnr_own_chain']:.2f} dB; read-out of the teacher's final latent {out['psnr_readout_bound']:.2f} dB")


if __name__ == "__main__":
    main()
