"""Teacher data for training and evaluation: held-out split, shard checks before training, streaming
shard reader, record tensors.

The held-out split is the first ``holdout_samples`` indices: it stays the same when a folder is
extended. Training streams the other records (optionally only the first ``train_samples`` of them):
every epoch visits the shards in a fresh order, decodes them in DataLoader worker processes and mixes
samples from several shards in a bounded shuffle buffer, so memory does not grow with the dataset.
"""
import itertools
import signal

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..core.config import project_path
from ..core.errors import UserError
from ..teacher import spaces, teachers
from ..teacher.rnet_files import load_rnet
from . import codec as codecs, quant, store

ERROR_KEY = "user_error"  # the key of the one item a stream yields after a UserError


def open_data(cfg) -> store.Manifest:
    """The manifest of the configured teacher-data folder, refused when it holds nothing usable."""
    manifest = store.load_manifest(cfg)
    folder = manifest.folder
    if not manifest.shards:
        raise UserError(f"{folder} holds no teacher data; run '--mode generate' with the same config first")
    if not manifest.data["generator"].get("teacher_sha256"):
        if store.is_imported(manifest):
            raise UserError(f"{folder} was imported without naming the teacher that made it; import it again "
                            f"(into a new or emptied data_dir) with import_teacher=<folder of that teacher>")
        raise UserError(f"{folder / store.MANIFEST} names no teacher (teacher_sha256); regenerate the folder")
    gen = manifest.data["generator"]
    if manifest.space.needs_rnet and not gen.get("rnet_sha256"):
        if store.is_imported(manifest):
            raise UserError(f"{folder} holds latent-space data imported without naming the RNet that made it; D "
                            f"reads its images through the RNet's x0 head, so import it again (into a new or emptied "
                            f"data_dir) with import_rnet=<folder of that RNet> beside import_teacher=")
        raise UserError(f"{folder} holds latent-space data that names no RNet; D reads its images through the "
                        f"RNet's x0 head, so generate the data here with space=latent rnet_path=<RNet>")
    return manifest


def teacher_of(cfg, manifest, device):
    """(unet, ddpm scheduler, source) of the configured teacher, refused unless it made the data."""
    unet, ddpm, source = teachers.load_teacher(cfg)
    made_by = manifest.data["generator"]["teacher_sha256"]
    if teachers.weights_sha256(unet) != made_by:
        raise UserError(f"the teacher in {source} is not the one that made {manifest.folder} (sha256 "
                        f"{made_by[:12]}...); set teacher_path= to that teacher or regenerate the data")
    return unet.to(device).eval(), ddpm, source


def rnet_of(cfg, manifest, teacher):
    """The RNet that made latent data (None in pixel space): ``rnet_path``, else the folder the manifest
    names, refused unless its weights are the ones that made the data."""
    gen = manifest.data["generator"]
    if not manifest.space.needs_rnet:
        return None
    folder = project_path(cfg["rnet_path"] or gen["rnet"])
    net, _ = load_rnet(folder, teacher, gen["teacher_sha256"], steps=gen["steps"])
    if teachers.weights_sha256(net) != gen["rnet_sha256"]:
        raise UserError(f"the RNet in {folder} is not the one that made {manifest.folder} (sha256 "
                        f"{gen['rnet_sha256'][:12]}...); set rnet_path= to that RNet or regenerate the data")
    return net


def split(cfg, manifest):
    """(held-out index range, training index range) as half-open (lo, hi) pairs."""
    total = manifest.next_index()
    holdout = cfg["holdout_samples"]
    if holdout <= 0:
        raise UserError(f"holdout_samples must be positive (the held-out split measures D against the teacher), "
                        f"got {holdout}")
    if holdout >= total:
        raise UserError(f"holdout_samples={holdout} leaves no training records: {manifest.folder} holds {total}; "
                        f"lower holdout_samples or generate more samples")
    hi = total if cfg["train_samples"] <= 0 else holdout + cfg["train_samples"]
    if hi > total:
        raise UserError(f"train_samples={cfg['train_samples']} is more than the {total - holdout} training records "
                        f"in {manifest.folder}; lower it or generate more samples")
    return (0, holdout), (holdout, hi)


def to_tensors(arrays: dict, rows=slice(None), space=spaces.SPACES["pixel"]) -> dict:
    """Model inputs and targets of decoded records (float32): x_T, rin0, chunks, x0, index. rin0 is the chain's
    start as ``space`` decodes it: in pixel space x_T exactly (its stored int8 copy is the reference's format
    only), in latent space the dequantised Rin(x_T)."""
    x_T = torch.from_numpy(arrays["x_T_f16"][rows].astype(np.float32))
    chunks = quant.dequantize(arrays["r_chunks_q"][rows], arrays["r_chunks_scale_f16"][rows])
    rin0 = x_T if space.start_is_x_T else torch.from_numpy(codecs.decoded_start(  # x_T decoded once, shared
        {k: arrays[k][rows] for k in ("rin0_q", "rin0_scale_f16")}, space))
    return {"x_T": x_T, "rin0": rin0, "chunks": torch.from_numpy(chunks),
            "x0": torch.from_numpy(arrays["x0_teacher_f16"][rows].astype(np.float32)),
            "index": torch.from_numpy(arrays["index"][rows].astype(np.int64))}


def shards_overlapping(manifest, lo, hi):
    return [s for s in manifest.shards if s["first_index"] < hi and s["first_index"] + s["count"] > lo]


def check_shards(manifest, lo, hi) -> None:
    """Before a run's first step: the shards hold every record of [lo, hi), and each shard that holds
    some is present with the size and sha256 the manifest lists; one sentence naming the first bad one."""
    problem = store.layout_problem(manifest)
    if problem:
        raise UserError(f"{manifest.folder / store.MANIFEST} {problem}; run '--mode verify' for details")
    if hi > manifest.next_index():
        raise UserError(f"{manifest.folder} holds records up to {manifest.next_index() - 1}, not {hi - 1}; "
                        f"generate more samples or train on fewer")
    for entry in shards_overlapping(manifest, lo, hi):
        problem = store.shard_problem(manifest, entry, deep=False)
        if problem:
            raise manifest.shard_error(entry, problem)


def data_identity(manifest, lo, hi) -> dict:
    """Exactly which data a run over records [lo, hi) reads: the range and the (file, sha256) of every
    shard that holds some of it (JSON-able), so that a resumed run can refuse data that grew or changed."""
    return {"indices": [lo, hi],
            "shards": [[s["file"], s["sha256"]] for s in shards_overlapping(manifest, lo, hi)]}


def read_range(manifest, lo, hi) -> dict:
    """Every record with index in [lo, hi), as tensors in index order."""
    parts = []
    for entry in shards_overlapping(manifest, lo, hi):
        arrays = manifest.read_shard(entry)
        rows = (arrays["index"] >= lo) & (arrays["index"] < hi)
        parts.append(to_tensors(arrays, rows, manifest.space))
    if not parts or sum(len(p["index"]) for p in parts) != hi - lo:
        raise UserError(f"{manifest.folder} does not hold every record of {lo}..{hi - 1}; run '--mode verify'")
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


class ShardStream(IterableDataset):
    """An endless stream of shuffled training batches; each worker decodes its own share of the shards."""

    def __init__(self, manifest, lo, hi, batch_size, buffer_size, seed, rank=0, ranks=1):
        self.manifest, self.lo, self.hi = manifest, lo, hi
        self.batch_size, self.buffer_size, self.seed = batch_size, max(buffer_size, batch_size), seed
        self.rank, self.ranks = rank, ranks
        self.entries = shards_overlapping(manifest, lo, hi)

    def _records(self, part, parts):
        """Every epoch, one permutation of the shards that all ranks and workers share (seeded by the epoch),
        of which this reader takes every ``parts``-th: the readers' shards are disjoint and an epoch reads
        each shard once."""
        for epoch in itertools.count():
            order = np.random.default_rng([*self.seed, epoch]).permutation(len(self.entries))
            for k in order[part::parts]:
                arrays = self.manifest.read_shard(self.entries[k])
                keep = np.flatnonzero((arrays["index"] >= self.lo) & (arrays["index"] < self.hi))
                tensors = to_tensors(arrays, keep, self.manifest.space)
                for i in range(len(keep)):
                    yield {key: value[i] for key, value in tensors.items()}

    def __iter__(self):
        try:
            yield from self._batches()
        except UserError as err:  # a worker's traceback would wrap it: pass the sentence on as data
            yield {ERROR_KEY: str(err)}

    def _batches(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        rng = np.random.default_rng([*self.seed, self.rank, worker])  # this reader's picks from its buffer
        part, parts = self.rank * workers + worker, self.ranks * workers
        if len(self.entries) < parts:  # more readers than shards: some read the same shards
            part, parts = part % len(self.entries), len(self.entries)
        buffer = []
        for record in self._records(part, parts):
            buffer.append(record)
            if len(buffer) < self.buffer_size:
                continue
            picks = set(rng.choice(len(buffer), self.batch_size, replace=False).tolist())
            batch = [r for i, r in enumerate(buffer) if i in picks]
            buffer = [r for i, r in enumerate(buffer) if i not in picks]
            yield {key: torch.stack([r[key] for r in batch]) for key in batch[0]}


def _quiet_worker(_):
    torch.set_num_threads(1)  # decoding is numpy work; leave the cores to the training step
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is handled once, by the training process
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def batches(cfg, manifest, lo, hi, seed, batch_size, rank=0, ranks=1):
    """An endless iterator over training batches of records [lo, hi), decoded by ``data_workers``
    processes (0 = in the training process); ``seed`` is a list of ints that fixes the order; each of
    ``ranks`` processes reads its own share of the shards."""
    stream = ShardStream(manifest, lo, hi, batch_size, cfg["shuffle_buffer"], seed, rank, ranks)
    workers = cfg["data_workers"]
    loader = DataLoader(stream, batch_size=None, num_workers=workers, worker_init_fn=_quiet_worker,
                        prefetch_factor=4 if workers else None)
    return Batches(loader)


class Batches:
    """The loader's batches in the training process: a damaged shard met by a worker ends as the
    worker's one sentence (``UserError``), not as a worker traceback."""

    def __init__(self, loader):
        self._batches = iter(loader)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        batch = next(self._batches)
        if ERROR_KEY in batch:
            self._batches = iter(())  # dropping the loader's iterator stops its workers
            raise UserError(batch[ERROR_KEY])
        return batch
