"""The method's claim, measured: does rectification make the one-step student better?

    .venv/bin/python benchmarks/latent_benchmark.py --config fashion_mnist_bench --rnet <RNet folder> [--with-b]

Same teacher, same number of teacher samples (same x_T: records i of both folders start from the same
noise), same D recipe: D on pixel DDIM trajectories (the preset as it is) against D on the RNet's latent
ring trajectories (the preset with ``space=latent``, ``rnet_path``, ``steps`` = the ring's steps and
``name`` = <name>_latent, so every folder is its own; for the demo preset that is fashion_mnist_latent's).
Each side is generated, trained and evaluated by the stages themselves (finished stages are reused);
with ``--with-b`` B is binarized from each D and evaluated too. Beside eval_d's figures (FID, precision,
recall, one-step speed-up) it prints:

- PSNR of D against its own data's ``x0_teacher`` and against the DDIM teacher's image from the same x_T
  (the pixel data's ``x0_teacher``), on every held-out record;
- predictability: D's held-out MSE per chunk divided by that chunk's variance over the held-out records;
- the teacher data's bytes per sample.
"""
import argparse

import torch

from pipeline.core import config
from pipeline.core.config import project_path
from pipeline.core.errors import UserError
from pipeline.data import generate, teacher_data
from pipeline.evaluation import evaluate, metrics
from pipeline.students import student_d, student_folders
from pipeline.teacher import rnet_files
from pipeline.train import binarize, train_d


def side_configs(base: dict, rnet: str) -> dict:
    steps = rnet_files.read_config(project_path(rnet))["steps"]
    latent = dict(base, space="latent", rnet_path=rnet, steps=steps, name=f"{base['name']}_latent")
    for cfg in (base, latent):
        config.validate(cfg, ["generate", "train_d", "binarize", "eval_d"])
    return {"pixel": base, "latent": latent}


@torch.no_grad()
def held_out_figures(cfg, ddim_x0) -> dict:
    """PSNR against both teachers' images and per-chunk predictability of the side's D."""
    manifest = teacher_data.open_data(cfg)
    (lo, hi), _ = teacher_data.split(cfg, manifest)
    records = teacher_data.read_range(manifest, lo, hi)
    d = student_d.load_student(student_folders.d_folder(cfg)).eval()
    preds = [d(records["x_T"][i:i + 64]) for i in range(0, hi - lo, 64)]
    chunks = torch.cat([p["chunks"] for p in preds]).float()
    z_hat = torch.cat([p["rin"] for p in preds]).float() + chunks.sum(1)
    images = student_d.readout(d, z_hat).clamp(-1, 1)
    target = records["chunks"]
    mse = (chunks - target).pow(2).mean(dim=(0, 2, 3, 4))
    variance = target.transpose(0, 1).reshape(target.shape[1], -1).var(dim=1)
    return {"psnr_own": metrics.fidelity(images, records["x0"])["psnr_db"],
            "psnr_ddim": metrics.fidelity(images, records["x0"] if ddim_x0 is None else ddim_x0)["psnr_db"],
            "predictability": (mse / variance).tolist(), "bytes_per_sample": manifest.data["totals"]["bytes_per_sample"],
            "x0": records["x0"]}


def run_side(cfg, with_b: bool) -> dict:
    generate.generate(cfg)
    train_d.train_d(cfg)
    if with_b:
        binarize.binarize(cfg)
    return evaluate.eval_d(dict(cfg, b_weights="" if with_b else "none"))


def print_table(results: dict, with_b: bool):
    print("\n| | FID D | precision | recall | PSNR vs own x0_teacher (dB) | PSNR vs DDIM teacher (dB) | speed-up | "
          "bytes / sample |" + (" FID B |" if with_b else "") + "\n|---|---|---|---|---|---|---|---|" +
          ("---|" if with_b else ""))
    for side, r in results.items():
        s = r["report"]["scores"]["d"]
        row = (f"| {side} | {s['fid']:.2f} | {s['precision']:.3f} | {s['recall']:.3f} | {r['psnr_own']:.2f} | "
               f"{r['psnr_ddim']:.2f} | {r['report']['throughput']['d']['speedup']:.1f} | {r['bytes_per_sample']:,.0f} |")
        print(row + (f" {r['report']['scores']['b']['fid']:.2f} |" if with_b else ""))
    print("\nHeld-out MSE / variance per chunk (noisiest first):")
    for side, r in results.items():
        print(f"- {side}: " + ", ".join(f"{v:.3f}" for v in r["predictability"]))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="fashion_mnist_bench")
    parser.add_argument("--rnet", required=True, help="the RNet folder of the preset's teacher")
    parser.add_argument("--with-b", action="store_true", help="binarize and evaluate B from each D too")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args()
    try:
        cfgs = side_configs(config.resolve(args.config, args.overrides), args.rnet)
        results = {}
        for side in ("pixel", "latent"):  # pixel first: its x0_teacher is the DDIM teacher's image
            report = run_side(cfgs[side], args.with_b)
            ddim_x0 = results["pixel"]["x0"] if side == "latent" else None
            figures = held_out_figures(cfgs[side], ddim_x0)
            results[side] = dict(figures, report=report)
    except UserError as err:
        raise SystemExit(f"error: {err}") from None
    print_table(results, args.with_b)


if __name__ == "__main__":
    main()
