"""``Main_Distill.py --mode generate``: offline teacher trajectories as INT8 + zstd shards
(docs/design.md §2-§3).

Sample i starts from x_T drawn by a generator seeded with (seed, i), so its x_T never depends on
batch, shard or process layout (its floats after the chain can, at rounding level, with another
``gen_batch_size``). Shards cover consecutive index ranges and are committed one at a time (shard
file, then manifest), so rerunning the same command after a crash resumes at the first index no
shard holds, and a larger ``samples_total`` extends the folder.
"""
import contextlib
import json
import time

import numpy as np
import torch
from tqdm import tqdm

from ..core import atomic, config, distributed, runtime
from ..core.config import output_dir, project_path
from ..core.errors import UserError
from ..teacher import rnet_files, spaces, teachers
from ..teacher.trajectory import draw_x_T
from . import codec as codecs, store

# Keys of the generator config that decide the content of a record: a folder made with other
# values cannot be extended or resumed.
CONTENT_KEYS = ("teacher_sha256", "space", "steps", "chunks", "T", "chunk_size", "percentile", "seed",
                "image_shape", "latent_channels", "scheduler", "gen_precision", "rnet_sha256")


def codec_info(cfg) -> dict:
    """The self-description of the codec that the manifest carries."""
    return codecs.from_config(cfg).describe()


def generator_info(cfg, unet, scheduler, source, rnet=None) -> dict:
    """What made the data; in latent space also the RNet (its sha256 over every weight, its folder)."""
    c, size = unet.config.in_channels, unet.config.sample_size
    T = scheduler.config.num_train_timesteps
    info = {"teacher": source, "teacher_sha256": teachers.weights_sha256(unet), "space": cfg["space"],
            "sampler": None, "steps": cfg["steps"], "chunks": cfg["chunks"],
            "T": T, "chunk_size": T // cfg["chunks"], "percentile": cfg["percentile"], "seed": cfg["seed"],
            "image_shape": [c, size, size], "latent_channels": c, "gen_precision": cfg["gen_precision"],
            "scheduler": {k: scheduler.config[k] for k in ("beta_start", "beta_end", "beta_schedule",
                                                           "num_train_timesteps", "timestep_spacing")},
            "x_T": "torch.randn(image_shape) from torch.Generator seeded by sample_seed(seed, index), rounded to float16",
            "rnet_sha256": None}
    if rnet is not None:
        info.update(latent_channels=rnet.latent_channels, rnet=cfg["rnet_path"], rnet_sha256=teachers.weights_sha256(rnet))
    info["sampler"] = spaces.of_config(cfg).manifest_sampler(info)
    return info


def open_manifest(folder, cfg, codec, generator, spec):
    """The folder's manifest after checking that it was made with the same content keys, or a new one."""
    manifest = store.Manifest.load(folder)
    if manifest is None:
        return store.Manifest.create(folder, codec, generator, spec)
    old = manifest.data["generator"]
    check_same_networks(folder, old, generator)
    for key in CONTENT_KEYS:
        if old.get(key) != generator[key]:
            raise UserError(f"{folder} holds data made with {key}={json.dumps(old.get(key))}, not "
                            f"{json.dumps(generator[key])}; use another data_dir or the original config")
    old_codec = manifest.data["codec"]
    for key in codecs.IDENTITY_KEYS:
        inherited = key == "version" or (key == "zstd_level" and not cfg["zstd_level"])  # the folder's goes on
        if not inherited and old_codec.get(key) != codec.get(key):
            raise UserError(f"{folder} holds data written with codec {key}={json.dumps(old_codec.get(key))}, not "
                            f"{json.dumps(codec.get(key))}; use another data_dir or the original config"
                            + (" (zstd_level=0 keeps the folder's level)" if key == "zstd_level" else ""))
    problem = store.layout_problem(manifest)
    if problem:
        raise UserError(f"{folder / store.MANIFEST} {problem}, so it was edited by hand; restore it or use another "
                        f"data_dir")
    return manifest


def check_same_networks(folder, old: dict, generator: dict) -> None:
    """A folder is extended or resumed only by the teacher (and RNet) whose weights made it: the same sha256
    over every weight, so a teacher retrained or edited in place since is refused, by name (docs/design.md §3)."""
    for key, what, where, flag in (("teacher_sha256", "teacher", generator["teacher"], "teacher_path"),
                                   ("rnet_sha256", "RNet", generator.get("rnet"), "rnet_path")):
        made_by, now = old.get(key), generator.get(key)
        if made_by and now and made_by != now:
            raise UserError(f"{folder} was made by a {what} whose weights have sha256 {made_by[:12]}..., but the "
                            f"{what} in {where} has {now[:12]}... (its weights changed since, or it is another "
                            f"one); set {flag}= to the {what} that made the data or use another data_dir")


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
        self.space, self.rnet = spaces.of_config(cfg), None
        if self.space.needs_rnet:  # refused here, before any work, when it does not fit teacher or steps
            net, _ = rnet_files.load_rnet(project_path(cfg["rnet_path"]), unet, teachers.weights_sha256(unet),
                                          steps=cfg["steps"])
            self.rnet = runtime.for_inference(net.to(self.device), cfg)
        self.sample = self.space.residual_sampler(self.unet, self.scheduler, self.rnet, cfg["steps"])
        self.generator = generator_info(cfg, unet, ddpm, self.source, self.rnet)
        c, size, _ = self.generator["image_shape"]
        self.spec = store.record_spec(c, size, self.generator["latent_channels"], cfg["chunks"])
        self.codec = codecs.from_config(cfg)
        self.seconds = {"teacher": 0.0, "encode": 0.0, "compress": 0.0, "write": 0.0}

    def use_folder_codec(self, described: dict, folder) -> None:
        """Write with the codec the folder names (every rank): a folder started by an older version of the
        codec (or, with zstd_level=0, at another level) is extended or repaired with that one, so its shards
        stay alike."""
        self.codec = codecs.from_manifest(described, folder / store.MANIFEST)

    def trajectories(self, indices) -> codecs.Trajectories:
        """The float trajectories of the given sample indices (the teacher's time is counted)."""
        g = self.generator
        x_T = draw_x_T(self.cfg["seed"], indices, g["image_shape"]).to(self.device)
        start = time.perf_counter()
        with runtime.autocast(self.amp, self.device):
            rin0, r_chunks, z_final, x0 = self.sample(x_T, g["chunks"])
        finite = bool(torch.isfinite(z_final).all() and torch.isfinite(r_chunks).all())
        self.seconds["teacher"] += time.perf_counter() - start
        if not finite:
            raise UserError(f"the teacher produced NaN or inf for samples {indices[0]}..{indices[-1]} with "
                            f"gen_precision={self.cfg['gen_precision']}; {self.non_finite_advice()}")
        return codecs.Trajectories(*(t.float().cpu().numpy() for t in (x_T, rin0, r_chunks, z_final, x0)),
                                   T=g["T"], chunk_size=g["chunk_size"], space=self.space)

    def non_finite_advice(self) -> str:
        """What to do about a non-finite trajectory: fp32 helps only where the weights are finite and autocast ran."""
        networks = [self.unet] + ([self.rnet] if self.rnet is not None else [])
        if not all(torch.isfinite(p).all() for net in networks for p in net.parameters()):
            return f"the weights of {self.source} (or its RNet) hold NaN or inf themselves; restore or retrain them"
        if self.amp is not None:
            return "use gen_precision=fp32"
        return f"the teacher {self.source} overflows even in fp32; check or retrain it"

    def records(self, indices, tally) -> dict:
        """The encoded records of the given sample indices; ``tally`` measures their codec error."""
        traj = self.trajectories(indices)
        start = time.perf_counter()
        record = self.codec.encode(traj)
        tally.add(traj, record)
        self.seconds["encode"] += time.perf_counter() - start
        return record

    def shard_payload(self, first, count, bar):
        """(shard bytes, the codec's fields of its manifest entry)."""
        parts, tally = [], codecs.ErrorTally()
        for lo in range(first, first + count, self.cfg["gen_batch_size"]):
            indices = np.arange(lo, min(lo + self.cfg["gen_batch_size"], first + count))
            parts.append(self.records(indices, tally))
            bar.update(len(indices))
        arrays = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        arrays["index"] = np.arange(first, first + count, dtype=np.int64)
        start = time.perf_counter()
        stored, extra = self.codec.pack(arrays, self.space)
        # the teacher waits meanwhile, so zstd may use every thread this process has (docs/design.md §15)
        payload = store.encode_npz(stored, self.codec.zstd_level, workers=torch.get_num_threads())
        self.seconds["compress"] += time.perf_counter() - start
        return payload, dict(extra, codec_error=tally.summary())

    def write_shard_file(self, folder, number, first, count, bar) -> dict:
        """Compute, encode and write one shard file; its manifest entry, for the manifest's one writer."""
        payload, extra = self.shard_payload(first, count, bar)
        start = time.perf_counter()
        entry = store.write_shard_file(folder, number, first, count, payload, extra)
        self.seconds["write"] += time.perf_counter() - start
        return entry


def check_existing_folder(cfg) -> None:
    """For --dry-run: a data folder that already holds a manifest is checked as generate checks it before
    writing (teacher and RNet weights, content keys, codec), so the plan of a resume or an extension refuses
    what the run would; a new folder costs no teacher load."""
    folder = output_dir(cfg, "data_dir")
    if store.Manifest.load(folder) is not None:
        gen = Generator(cfg)
        open_manifest(folder, cfg, codec_info(cfg), gen.generator, gen.spec)


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
    """Write the shards the configured folder lacks. Under torchrun every rank writes its own shards and rank 0
    alone holds the folder's lock and writes the manifest, so the folder is the same as one process makes."""
    folder = output_dir(cfg, "data_dir")
    with contextlib.ExitStack() as held:
        with distributed.together():
            gen = Generator(cfg)
            manifest, todo, done = None, None, 0
            if distributed.is_main():
                held.enter_context(atomic.folder_lock(folder, "run"))
                manifest, todo, done = prepare(cfg, folder, gen)
        todo, described = distributed.broadcast((todo, manifest.data["codec"] if manifest else None))
        gen.use_folder_codec(described, folder)
        # as a context the bar is closed before an error is printed, which then stays on its own line
        with tqdm(total=cfg["samples_total"], initial=min(done, cfg["samples_total"]), desc="generate",
                  unit="sample", dynamic_ncols=True, disable=manifest is None) as bar:
            write_rounds(folder, gen, manifest, todo, bar)
        if manifest is not None:
            report(folder, manifest, gen.seconds, todo)
    return folder, gen.seconds


def prepare(cfg, folder, gen):
    """(manifest, shards to write, samples present) after checking what the folder holds."""
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
          f"in {len(todo)} shard(s) ({cfg['steps']} {spaces.of_config(cfg).step_name} steps, "
          f"{cfg['chunks']} chunks)"
          + (f" on {distributed.world()} processes" if distributed.world() > 1 else ""))
    return manifest, todo, done


def write_rounds(folder, gen, manifest, todo, bar, on_listed=None):
    """In each round every rank writes the next shard of ``todo`` (number, first index, count) that is its own;
    then rank 0 (the one holding ``manifest``) lists the round's shards, which exist by then, in one save."""
    world, rank = distributed.world(), distributed.rank()
    for start in range(0, len(todo), world):
        mine = todo[start + rank] if start + rank < len(todo) else None
        with distributed.together():
            entry = gen.write_shard_file(folder, *mine, bar) if mine else None
        entries = [e for e in distributed.gather(entry) if e is not None]
        if manifest is None:
            continue
        for e in entries:
            manifest.list_shard(e, save=False)
        manifest.save()
        for e in entries:
            (on_listed or log_shard)(folder, e, gen.seconds)
        bar.update(sum(e["count"] for e in entries) - (mine[2] if mine else 0))


def error_text(error: dict) -> str:
    return (f"z_final RMSE {error['z_final_rmse']:.3g} (max abs {error['z_final_max_abs']:.3g}), image RMSE "
            f"{error['x0_rmse']:.3g}, chunk RMSE {min(error['chunk_rmse']):.3g}..{max(error['chunk_rmse']):.3g} "
            f"over {error['samples']} samples")


def log_shard(folder, entry, seconds):
    with open(folder / "stats.jsonl", "a") as f:
        f.write(json.dumps({"shard": entry["file"], "first_index": entry["first_index"], "count": entry["count"],
                            "bytes": entry["bytes"], **{f"{k}_seconds_total": round(v, 4) for k, v in seconds.items()}})
                + "\n")


def report(folder, manifest, seconds, todo):
    totals = manifest.data["totals"]
    codec = seconds["encode"] + seconds["compress"] + seconds["write"]
    if todo and seconds["teacher"] > 0:
        print(f"[generate] teacher {seconds['teacher']:.1f}s, encode+compress+write {codec:.2f}s "
              f"({100 * codec / seconds['teacher']:.2f}% of teacher time)")
    print(f"[generate] {totals['samples']} samples in {len(manifest.shards)} shard(s), {totals['bytes']:,} bytes "
          f"({totals['bytes_per_sample']:,.0f} bytes/sample) in {folder}")
    error = codecs.combined([s.get("codec_error") for s in manifest.shards])
    if error:
        print(f"[generate] codec {manifest.data['codec']['name']}: {error_text(error)}")
    if manifest.data["codec"]["name"] == codecs.FEEDBACK:
        print("[generate] read its records with pipeline.data.store.Manifest.load(folder).read_shard(entry) (README, "
              "'Teacher data format'), or write the reference layout with '--mode export'")
    else:
        print(f"[generate] read it with numpy + zstandard (README, 'Teacher data format'), e.g.\n"
              f"  np.load(io.BytesIO(zstandard.ZstdDecompressor().decompress(open('{folder}/"
              f"{manifest.shards[0]['file']}', 'rb').read())))")
