"""The reference's one-file-per-sample layout, both ways (docs/design.md §3).

Each sample is ``sample_{i:08d}.zst``: the same keys as a shard without the sample axis (``T`` and
``chunk_size`` are int16 arrays of shape [1]), packed with uncompressed ``np.savez`` and compressed
with zstd level 10, as the reference writes them.
"""
import re
import shutil
from pathlib import Path

import numpy as np
from tqdm import tqdm

from . import atomic, store
from .config import output_dir, project_path
from .errors import UserError

REFERENCE_ZSTD_LEVEL = 10
SAMPLE_NAME = re.compile(r"sample_(\d{8})\.zst")


def sample_name(index: int) -> str:
    return f"sample_{index:08d}.zst"


def reference_dir(cfg, must_exist: bool) -> Path:
    if not cfg["reference_dir"]:
        raise UserError("reference_dir is not set; pass reference_dir=<folder> for the one-file-per-sample layout")
    folder = project_path(cfg["reference_dir"])
    if must_exist and not folder.is_dir():
        raise UserError(f"reference_dir {folder} does not exist; point it at a folder of sample_XXXXXXXX.zst files")
    return folder


def export_command(cfg):
    """Write every sample into ``<reference_dir>.partial`` and rename it when complete, so an
    interrupted export never looks like a smaller finished one."""
    manifest = store.load_manifest(cfg)
    problem = store.layout_problem(manifest)
    if problem:
        raise UserError(f"{manifest.folder / store.MANIFEST} {problem}; run '--mode verify' for details")
    target = reference_dir(cfg, must_exist=False)
    if target.exists() and any(target.iterdir()):
        raise UserError(f"{target} is not empty; export into a new or empty folder")
    staging = target.with_name(target.name + ".partial")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    bar = tqdm(total=sum(s["count"] for s in manifest.shards), desc="export", unit="sample", dynamic_ncols=True)
    for entry in manifest.shards:
        arrays = manifest.read_shard(entry)
        for row, index in enumerate(arrays["index"]):
            sample = {key: arrays[key][row] for key in manifest.spec}
            (staging / sample_name(int(index))).write_bytes(store.encode_npz(sample, REFERENCE_ZSTD_LEVEL))
            bar.update(1)
    bar.close()
    atomic.write_json(staging / "config.json", cfg)
    if target.exists():
        target.rmdir()
    staging.rename(target)
    print(f"[export] {bar.n} files written to {target}")


def read_sample(path: Path) -> dict:
    try:
        return store.decode_npz(path.read_bytes())
    except ValueError as err:
        raise UserError(f"{path} cannot be decoded as a zstd-compressed npz ({err}); remove or replace it") from None


def _spec_of(sample: dict, path: Path) -> dict:
    needed = ("x_T_f16", "rin0_q", "r_chunks_q")
    missing = [k for k in needed if k not in sample]
    if missing:
        raise UserError(f"{path} has no key {missing[0]}, so it is not a reference sample file")
    c, size = sample["x_T_f16"].shape[0], sample["x_T_f16"].shape[-1]
    chunks, latent = sample["r_chunks_q"].shape[:2]
    return store.record_spec(c, size, latent, chunks)


def import_command(cfg):
    """Shards first, the manifest once at the end: an interrupted import leaves no manifest, and
    rerunning it starts over."""
    if cfg["shard_size"] <= 0:
        raise UserError(f"shard_size must be positive, got {cfg['shard_size']}")
    source = reference_dir(cfg, must_exist=True)
    folder = output_dir(cfg, "data_dir", "data")
    with atomic.folder_lock(folder, "run"):
        _import_locked(cfg, source, folder)


def _import_locked(cfg, source, folder):
    if store.Manifest.load(folder) is not None:
        raise UserError(f"{folder} already holds a manifest; import into an empty data_dir")
    files = sorted((int(m.group(1)), p) for p in source.iterdir() if (m := SAMPLE_NAME.fullmatch(p.name)))
    if not files:
        raise UserError(f"{source} holds no sample_XXXXXXXX.zst files")
    gaps = [i for i, (index, _) in enumerate(files) if index != i]
    if gaps:
        raise UserError(f"{source} has no {sample_name(gaps[0])}; the reference layout numbers samples from 0 "
                        f"without gaps")
    first = read_sample(files[0][1])
    spec = _spec_of(first, files[0][1])
    manifest = store.Manifest.create(folder, codec={
        "name": f"int8-p{cfg['percentile']:g}+zstd", "percentile": cfg["percentile"],
        "quantizer": "per-channel symmetric int8 (imported: percentile as configured, not recorded by the reference)",
        "container": "uncompressed npz in one zstd frame", "zstd_level": cfg["zstd_level"]},
        generator={"source": "imported from the reference one-file-per-sample layout", "reference_dir": str(source),
                   "T": int(first["T"][0]), "chunk_size": int(first["chunk_size"][0]),
                   "chunks": spec["r_chunks_q"][1][0], "image_shape": spec["x_T_f16"][1],
                   "latent_channels": spec["rin0_q"][1][0]},
        spec=spec)
    atomic.remove_stale_temporaries(folder)
    bar = tqdm(total=len(files), desc="import", unit="sample", dynamic_ncols=True)
    for number, lo in enumerate(range(0, len(files), cfg["shard_size"])):
        batch = files[lo:lo + cfg["shard_size"]]
        samples = []
        for index, path in batch:
            sample = read_sample(path) if index else first
            problem = store.check_arrays({k: v[None] for k, v in sample.items()}, spec, 1, with_index=False)
            if problem:
                raise UserError(f"{path}: {problem}; every sample of a folder must have the same layout")
            samples.append(sample)
            bar.update(1)
        arrays = {k: np.stack([s[k] for s in samples]) for k in spec}
        arrays["index"] = np.array([i for i, _ in batch], dtype=np.int64)
        manifest.add_shard(number, batch[0][0], len(batch), store.encode_npz(arrays, cfg["zstd_level"]), save=False)
    bar.close()
    manifest.save()
    atomic.write_json(folder / "config.json", cfg)
    print(f"[import] {len(files)} samples from {source} written as {len(manifest.shards)} shard(s) to {folder}")
