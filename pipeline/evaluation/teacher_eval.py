"""``Main_Diffusion.py --mode sample``: the teacher's own samples, a grid and its FID (docs/design.md §5).

FID of ``fid_samples`` DDIM samples against the test split, beside the floor at the same N: the FID
of N real training images against the same reference set. With ``rnet_path`` the rectified teacher's
ring sampler (docs/design.md §14) is scored beside the DDIM teacher, with the same number of steps,
the same x_T, N and reference images, and its cost per step is measured in teacher calls.
"""
import io
import json

import numpy as np
import torch
from tqdm import tqdm

from ..core import atomic, images, runtime
from ..core.config import output_dir, project_path
from ..teacher import ring, rnet_files, teachers
from ..teacher.trajectory import ddim_sample, draw_x_T
from ..data import datasets
from . import fid

TIMING_REPEATS = 5


def draw_samples(cfg, sample_fn, shape, device, count, desc="teacher samples"):
    """uint8 [count, C, H, W]; sample i starts from x_T of index i of seed ``seed``."""
    out = []
    for lo in tqdm(range(0, count, cfg["fid_batch_size"]), desc=desc, unit="batch", dynamic_ncols=True):
        x_T = draw_x_T(cfg["seed"], range(lo, min(lo + cfg["fid_batch_size"], count)), shape).to(device)
        out.append(datasets.to_uint8(sample_fn(x_T)))
    return np.concatenate(out)


def teacher_samples(cfg, unet, scheduler, device, count):
    """The DDIM teacher's samples (``steps`` steps)."""
    shape = [unet.config.in_channels, unet.config.sample_size, unet.config.sample_size]
    return draw_samples(cfg, lambda x_T: ddim_sample(unet, scheduler, x_T, cfg["steps"]), shape, device, count)


def cached_samples(path, meta: dict, count: int, draw):
    """``draw()``'s samples, reusing ``path`` when it was drawn with the same ``meta`` (an interrupted run
    keeps its samples)."""
    meta = json.dumps(meta)
    if path.is_file():
        with np.load(path) as saved:
            if str(saved["meta"]) == meta and len(saved["images"]) >= count:
                print(f"[sample] reusing {count} samples from {path}")
                return saved["images"][:count]
    samples = draw()
    buf = io.BytesIO()
    np.savez(buf, images=samples, meta=np.array(meta))
    atomic.write_bytes(path, buf.getvalue())
    return samples


def load_or_draw_samples(cfg, unet, ddpm, device, out_dir):
    n = max(cfg["fid_samples"], cfg["sample_count"])
    meta = {"teacher_sha256": teachers.weights_sha256(unet), "steps": cfg["steps"], "seed": cfg["seed"]}
    return cached_samples(out_dir / "samples.npz", meta, n,
                          lambda: teacher_samples(cfg, unet, teachers.ddim_scheduler(ddpm), device, n))


def ring_cache_key(cfg, net, rnet_meta) -> dict:
    """What the cached ring samples depend on: the RNet's config and its weights (two RNets of one config differ)."""
    return {"rnet": rnet_meta, "rnet_sha256": teachers.weights_sha256(net), "seed": cfg["seed"]}


def ring_samples(cfg, net, rnet_meta, device, out_dir):
    n = max(cfg["fid_samples"], cfg["sample_count"])
    grid = ring.ring_timesteps(net.T, rnet_meta["steps"])
    shape = [net.config["teacher"]["in_channels"]] + [net.config["teacher"]["sample_size"]] * 2
    meta = ring_cache_key(cfg, net, rnet_meta)
    return cached_samples(out_dir / "ring_samples.npz", meta, n, lambda: draw_samples(
        cfg, lambda x_T: ring.ring_sample(net, x_T, grid), shape, device, n, desc="ring samples"))


@torch.inference_mode()
def ring_step_cost(net, unet, shape, batch, device) -> float:
    """Seconds of one R step over seconds of one teacher call, same batch (each the best of several)."""
    x = torch.randn([batch] + shape, device=device)
    t = torch.full((batch,), net.T // 2, device=device)
    z = net.rin(x, t)
    return runtime.seconds_per_call(lambda: net.r(z, t), TIMING_REPEATS) / runtime.seconds_per_call(lambda: unet(x, t), TIMING_REPEATS)


def score_ring(cfg, rnet, unet, device, out_dir, features, real, n) -> dict:
    net, meta = rnet
    samples = ring_samples(cfg, net, meta, device, out_dir)
    images.save_grid(samples[:cfg["sample_count"]], out_dir / "ring_grid.png")
    fake = fid.extract(features, samples[:n], cfg["fid_batch_size"], "inception: ring samples")
    shape = [unet.config.in_channels] + [unet.config.sample_size] * 2
    return {"rnet": cfg["rnet_path"], "sampler": f"ring, {meta['steps']} R steps", "fid": fid.frechet_distance(real, fake),
            "cost_per_step_in_teacher_calls": ring_step_cost(net, unet, shape, cfg["fid_batch_size"], device)}


def sample_and_score(cfg):
    device = runtime.configure(cfg)
    unet, ddpm, source = teachers.load_teacher(cfg)
    rnet = None
    if cfg["rnet_path"]:  # refused before any sampling when it does not fit the teacher or the steps
        net, meta = rnet_files.load_rnet(project_path(cfg["rnet_path"]), unet, teachers.weights_sha256(unet),
                                         steps=cfg["steps"])
        rnet = runtime.for_inference(net.to(device), cfg), meta
    unet = runtime.for_inference(unet.to(device), cfg)
    out_dir = output_dir(cfg, "samples_dir")
    n = cfg["fid_samples"]
    samples = load_or_draw_samples(cfg, unet, ddpm, device, out_dir)
    images.save_grid(samples[:cfg["sample_count"]], out_dir / "grid.png")
    features = fid.InceptionFeatures(cfg["channels_last"])
    test, _, real, floor_feats = fid.reference_features(cfg, features, n)
    fake = fid.extract(features, samples[:n], cfg["fid_batch_size"], "inception: samples")
    report = {"teacher": source, "parameters": teachers.parameter_count(unet), "sampler": f"DDIM eta=0, {cfg['steps']} steps",
              "fid": fid.frechet_distance(real, fake), "fid_samples": n,
              "fid_reference": f"{cfg['dataset']} test split, {len(test)} images",
              "fid_floor_same_n": fid.frechet_distance(real, floor_feats), "seed": cfg["seed"]}
    if rnet is not None:
        report["ring"] = score_ring(cfg, rnet, unet, device, out_dir, features, real, n)
    atomic.write_json(out_dir / "report.json", report)
    atomic.write_json(out_dir / "config.json", cfg)
    print(f"[sample] FID {report['fid']:.2f} (N={n} vs {report['fid_reference']}; floor at same N "
          f"{report['fid_floor_same_n']:.2f}); grid {out_dir / 'grid.png'}")
    if "ring" in report:
        print(f"[sample] ring sampler FID {report['ring']['fid']:.2f} at the same steps, x_T and N; one R step costs "
              f"{report['ring']['cost_per_step_in_teacher_calls']:.2f} teacher calls; grid {out_dir / 'ring_grid.png'}")
    return report
