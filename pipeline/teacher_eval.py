"""``Main_Diffusion.py --mode sample``: the teacher's own samples, a grid and its FID (docs/design.md §5).

FID of ``fid_samples`` DDIM samples against the test split, beside the floor at the same N: the FID
of N real training images against the same reference set.
"""
import io
import json

import numpy as np
from tqdm import tqdm

from . import atomic, datasets, fid, images, runtime, teachers
from .config import output_dir
from .trajectory import ddim_sample, draw_x_T


def teacher_samples(cfg, unet, scheduler, device, count):
    """uint8 [count, C, H, W] DDIM samples; sample i starts from x_T of index i of seed ``seed``."""
    shape = [unet.config.in_channels, unet.config.sample_size, unet.config.sample_size]
    out = []
    for lo in tqdm(range(0, count, cfg["fid_batch_size"]), desc="teacher samples", unit="batch", dynamic_ncols=True):
        x_T = draw_x_T(cfg["seed"], range(lo, min(lo + cfg["fid_batch_size"], count)), shape).to(device)
        out.append(datasets.to_uint8(ddim_sample(unet, scheduler, x_T, cfg["steps"])))
    return np.concatenate(out)


def load_or_draw_samples(cfg, unet, ddpm, device, out_dir):
    """The teacher's samples, reusing ``samples.npz`` when it was drawn from the same teacher and
    settings (an interrupted run keeps its samples)."""
    n = max(cfg["fid_samples"], cfg["sample_count"])
    meta = json.dumps({"teacher_sha256": teachers.weights_sha256(unet), "steps": cfg["steps"], "seed": cfg["seed"]})
    path = out_dir / "samples.npz"
    if path.is_file():
        with np.load(path) as saved:
            if str(saved["meta"]) == meta and len(saved["images"]) >= n:
                print(f"[sample] reusing {n} samples from {path}")
                return saved["images"][:n]
    samples = teacher_samples(cfg, unet, teachers.ddim_scheduler(ddpm), device, n)
    buf = io.BytesIO()
    np.savez(buf, images=samples, meta=np.array(meta))
    atomic.write_bytes(path, buf.getvalue())
    return samples


def sample_and_score(cfg):
    device = runtime.configure(cfg)
    unet, ddpm, source = teachers.load_teacher(cfg)
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
    atomic.write_json(out_dir / "report.json", report)
    atomic.write_json(out_dir / "config.json", cfg)
    print(f"[sample] FID {report['fid']:.2f} (N={n} vs {report['fid_reference']}; floor at same N "
          f"{report['fid_floor_same_n']:.2f}); grid {out_dir / 'grid.png'}")
    return report
