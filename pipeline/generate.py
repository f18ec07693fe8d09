"""``Main_Distill.py --mode generate``: offline teacher trajectories as INT8 + zstd shards
(docs/design.md §2-§3).

Sample i starts from x_T drawn by a generator seeded with (seed, i), so its x_T never depends on
batch, shard or process layout (its floats after the chain can, at rounding level, with another
``gen_batch_size``). Shards cover consecutive index ranges and are committed one at a time (shard
file, then manifest), so rerunning the same command after a crash resumes at the first index no
shard holds, and a larger ``samples_total`` extends the folder.
"""
import json
import time

import numpy as np
import torch
import zstandard
from tqdm import tqdm

from . import atomic, config, quant, ring, rnet_files, runtime, store, teachers
from .config import output_dir, project_path
from .errors import UserError
from .trajectory import draw_x_T, pixel_residual_record

# Keys of the generator config that decide the content of a record: a folder made with other
# values cannot be extended or resumed.
CONTENT_KEYS = ("teacher_sha256", "space", "steps", "chunks", "T", "chunk_size", "percentile", "seed",
                "image_shape", "latent_channels", "scheduler", "gen_precision", "rnet_sha256")
CODEC_VERSION = 1


def codec_info(cfg) -> dict:
    """The self-description of the codec that the manifest carries."""
    return {"name": f"int8-p{cfg['percentile']:g}+zstd", "version": CODEC_VERSION,
            "quantizer": "per-channel symmetric int8, zero point 0, clip at the percentile of |x|, float16 scales",
            "percentile": cfg["percentile"], "container": "uncompressed npz in one zstd frame",
            "zstd_level": cfg["zstd_level"], "zstandard_version": zstandard.__version__}


def generator_info(cfg, unet, scheduler, source, rnet=None) -> dict:
    """What made the data; in latent space also the RNet (its sha256 over every weight, its folder)."""
    c, size = unet.config.in_channels, unet.config.sample_size
    T = scheduler.config.num_train_timesteps
    info = {"teacher": source, "teacher_sha256": teachers.weights_sha256(unet), "space": cfg["space"],
            "sampler": "DDIM, eta=0 (diffusers DDIMScheduler)", "steps": cfg["steps"], "chunks": cfg["chunks"],
            "T": T, "chunk_size": T // cfg["chunks"], "percentile": cfg["percentile"], "seed": cfg["seed"],
            "image_shape": [c, size, size], "latent_channels": c, "gen_precision": cfg["gen_precision"],
            "scheduler": {k: scheduler.config[k] for k in ("beta_start", "beta_end", "beta_schedule",
                                                           "num_train_timesteps", "timestep_spacing")},
            "x_T": "torch.randn(image_shape) from torch.Generator seeded by sample_seed(seed, index), rounded to float16",
            "rnet_sha256": None}
    if rnet is not None:
        info.update(sampler=f"ring of the RNet: Rin(x_T, {T - 1}), {cfg['steps']} R steps, X0out(z, 0)",
                    latent_channels=rnet.latent_channels, rnet=cfg["rnet_path"], rnet_sha256=teachers.weights_sha256(rnet))
    return info


def quantized_record(x_T, rin0, r_chunks, x0, T, chunk_size, percentile) -> dict:
    """One batch of records with the reference keys (numpy, leading sample axis); ``x0`` is the teacher's
    image (the final state in pixel space, X0out's read-out in latent space)."""
    rin0_q, rin0_scale = quant.quantize(rin0.cpu().numpy(), percentile)
    chunks_q, chunks_scale = quant.quantize(r_chunks.cpu().numpy(), percentile)
    n = len(x_T)
    return {"x_T_f16": x_T.cpu().numpy().astype(np.float16),
            "x0_teacher_f16": x0.clamp(-1, 1).cpu().numpy().astype(np.float16),
            "rin0_q": rin0_q, "rin0_scale_f16": rin0_scale, "r_chunks_q": chunks_q, "r_chunks_scale_f16": chunks_scale,
            "T": np.full((n, 1), T, np.int16), "chunk_size": np.full((n, 1), chunk_size, np.int16)}


def open_manifest(folder, cfg, codec, generator, spec):
    """The folder's manifest after checking that it was made with the same content keys, or a new one."""
    manifest = store.Manifest.load(folder)
    if manifest is None:
        return store.Manifest.create(folder, codec, generator, spec)
    old = manifest.data["generator"]
    for key in CONTENT_KEYS:
        if old.get(key) != generator[key]:
            raise UserError(f"{folder} holds data made with {key}={json.dumps(old.get(key))}, not "
                            f"{json.dumps(generator[key])}; use another data_dir or the original config")
    old_codec = manifest.data["codec"]
    for key in ("name", "version", "zstd_level"):
        if old_codec.get(key) != codec[key]:
            raise UserError(f"{folder} holds data written with codec {key}={json.dumps(old_codec.get(key))}, not "
                            f"{json.dumps(codec[key])}; use another data_dir or the original config")
    problem = store.layout_problem(manifest)
    if problem:
        raise UserError(f"{folder / store.MANIFEST} {problem}, so it was edited by hand; restore it or use another "
                        f"data_dir")
    return manifest


class Generator:
    """Teacher, codec and timing of one ``generate`` run."""

    def __init__(self, cfg):
        config.validate(cfg, ["generate"])  # callers from Python skip the CLI's check
        self.cfg = cfg
        self.device = runtime.configure(cfg)
        unet, ddpm, self.source = teachers.load_teacher(cfg)
        self.unet = runtime.for_inference(unet.to(self.device), cfg)
        self.scheduler = teachers.ddim_scheduler(ddpm)
        self.amp = runtime.autocast_dtype(cfg["gen_precision"], self.device)
        if cfg["steps"] > ddpm.config.num_train_timesteps:
            raise UserError(f"steps={cfg['steps']} is more than the teacher's {ddpm.config.num_train_timesteps} "
                            f"timesteps; use at most that many")
        self.rnet = None
        if cfg["space"] == "latent":  # refused here, before any work, when it does not fit teacher or steps
            net, _ = rnet_files.load_rnet(project_path(cfg["rnet_path"]), unet, teachers.weights_sha256(unet),
                                          steps=cfg["steps"])
            self.rnet = runtime.for_inference(net.to(self.device), cfg)
            self.ring_timesteps = ring.ring_timesteps(net.T, cfg["steps"])
        self.generator = generator_info(cfg, unet, ddpm, self.source, self.rnet)
        c, size, _ = self.generator["image_shape"]
        self.spec = store.record_spec(c, size, self.generator["latent_channels"], cfg["chunks"])
        self.seconds = {"teacher": 0.0, "quantize": 0.0, "compress": 0.0, "write": 0.0}

    def records(self, indices) -> dict:
        g = self.generator
        x_T = draw_x_T(self.cfg["seed"], indices, g["image_shape"]).to(self.device)
        start = time.perf_counter()
        with runtime.autocast(self.amp, self.device):
            if self.rnet is None:
                rin0, r_chunks, z_final = pixel_residual_record(self.unet, self.scheduler, x_T, g["steps"], g["chunks"])
                x0 = z_final
            else:
                rin0, r_chunks, z_final, x0 = ring.latent_residual_record(self.rnet, x_T, self.ring_timesteps,
                                                                          g["chunks"])
        finite = bool(torch.isfinite(z_final).all() and torch.isfinite(r_chunks).all())
        middle = time.perf_counter()
        if not finite:
            raise UserError(f"the teacher produced NaN or inf for samples {indices[0]}..{indices[-1]} with "
                            f"gen_precision={self.cfg['gen_precision']}; use gen_precision=fp32")
        record = quantized_record(x_T, rin0, r_chunks, x0, g["T"], g["chunk_size"], g["percentile"])
        self.seconds["teacher"] += middle - start
        self.seconds["quantize"] += time.perf_counter() - middle
        return record

    def shard_payload(self, first, count, bar) -> bytes:
        parts = []
        for lo in range(first, first + count, self.cfg["gen_batch_size"]):
            indices = np.arange(lo, min(lo + self.cfg["gen_batch_size"], first + count))
            parts.append(self.records(indices))
            bar.update(len(indices))
        arrays = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        arrays["index"] = np.arange(first, first + count, dtype=np.int64)
        start = time.perf_counter()
        payload = store.encode_npz(arrays, self.cfg["zstd_level"])
        self.seconds["compress"] += time.perf_counter() - start
        return payload

    def write_shard(self, manifest, number, first, count, bar):
        payload = self.shard_payload(first, count, bar)
        start = time.perf_counter()
        manifest.add_shard(number, first, count, payload)
        self.seconds["write"] += time.perf_counter() - start


def reopen_partial_last_shard(manifest, cfg) -> None:
    """When extending, unlist a short last shard so that it is regenerated whole: the records of a
    folder then do not depend on how many runs made it (a sample's floats can depend on the batch
    it was computed in). Unlisting comes first, so a crash leaves fewer samples, never a bad shard."""
    if not manifest.shards:
        return
    last = manifest.shards[-1]
    if last["count"] < cfg["shard_size"] and manifest.next_index() < cfg["samples_total"]:
        manifest.data["shards"] = manifest.shards[:-1]
        manifest.save()


def plan(manifest, cfg):
    """(shard number, first index, count) of the shards still to write, in order."""
    number, first, todo = manifest.next_number(), manifest.next_index(), []
    while first < cfg["samples_total"]:
        count = min(cfg["shard_size"], cfg["samples_total"] - first)
        todo.append((number, first, count))
        number, first = number + 1, first + count
    return todo


def generate(cfg):
    folder = output_dir(cfg, "data_dir")
    gen = Generator(cfg)
    with atomic.folder_lock(folder, "run"):
        return _generate_locked(cfg, folder, gen)


def _generate_locked(cfg, folder, gen):
    atomic.remove_stale_temporaries(folder)
    manifest = open_manifest(folder, cfg, codec_info(cfg), gen.generator, gen.spec)
    if manifest.shards:
        problem = next(((s["file"], p) for s in manifest.shards if (p := store.shard_problem(manifest, s, deep=False))), None)
        if problem:
            raise UserError(f"{folder / problem[0]} {problem[1]}; run '--mode verify' for the full list and "
                            f"'--mode repair' to regenerate damaged shards before extending")
    atomic.write_json(folder / "config.json", cfg)
    reopen_partial_last_shard(manifest, cfg)
    todo = plan(manifest, cfg)
    done = manifest.next_index()
    print(f"[generate] {folder}: {done} samples present, {sum(c for _, _, c in todo)} to generate "
          f"in {len(todo)} shard(s) ({cfg['steps']} DDIM steps, {cfg['chunks']} chunks)")
    # as a context the bar is closed before an error is printed, which then stays on its own line
    with tqdm(total=cfg["samples_total"], initial=min(done, cfg["samples_total"]), desc="generate",
              unit="sample", dynamic_ncols=True) as bar:
        for number, first, count in todo:
            gen.write_shard(manifest, number, first, count, bar)
            log_shard(folder, number, first, count, manifest.shards, gen.seconds)
    report(folder, manifest, gen.seconds, todo)
    return folder, gen.seconds


def log_shard(folder, number, first, count, shards, seconds):
    entry = next(s for s in shards if s["file"] == store.shard_name(number))
    with open(folder / "stats.jsonl", "a") as f:
        f.write(json.dumps({"shard": entry["file"], "first_index": first, "count": count,
                            "bytes": entry["bytes"], **{f"{k}_seconds_total": round(v, 4) for k, v in seconds.items()}})
                + "\n")


def report(folder, manifest, seconds, todo):
    totals = manifest.data["totals"]
    codec = seconds["quantize"] + seconds["compress"] + seconds["write"]
    if todo and seconds["teacher"] > 0:
        print(f"[generate] teacher {seconds['teacher']:.1f}s, quantize+compress+write {codec:.2f}s "
              f"({100 * codec / seconds['teacher']:.2f}% of teacher time)")
    print(f"[generate] {totals['samples']} samples in {len(manifest.shards)} shard(s), {totals['bytes']:,} bytes "
          f"({totals['bytes_per_sample']:,.0f} bytes/sample) in {folder}")
    print(f"[generate] read it with numpy + zstandard (README, 'Teacher data format'), e.g.\n"
          f"  np.load(io.BytesIO(zstandard.ZstdDecompressor().decompress(open('{folder}/"
          f"{manifest.shards[0]['file']}', 'rb').read())))")
