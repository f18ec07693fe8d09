"""The reference's one-file-per-sample layout, both ways (docs/design.md §3).

Each sample is ``sample_{i:08d}.zst``: the same keys as a shard without the sample axis (``T`` and
``chunk_size`` are int16 arrays of shape [1]), packed with uncompressed ``np.savez`` and compressed
with zstd level 10. The reference compresses through a zstd stream writer, whose frame does not
record its content size; import reads both kinds. Import checks every file on its own (keys, dtypes,
shapes that agree with each other, chunks = T // chunk_size) before comparing it with the first one,
and writes into ``<data_dir>.importing``, renamed to ``data_dir`` only once complete.
"""
import os
import re
import shutil
import stat
from pathlib import Path
from typing import NamedTuple

import numpy as np
from tqdm import tqdm

from ..core import atomic, config
from ..core.config import output_dir, project_path
from ..core.errors import UserError
from ..teacher import spaces
from . import codec as codecs, quant, store

REFERENCE_ZSTD_LEVEL = codecs.ReferenceCodec.DEFAULT_LEVEL  # the reference writer's
SAMPLE_NAME = re.compile(r"sample_(\d{8})\.zst")
# Decoded bytes of one sample file: far above any real sample, so that a damaged one cannot exhaust memory.
SAMPLE_MAX_BYTES = 1 << 28
DTYPES = {key: dtype for key, (dtype, _) in store.record_spec(1, 1, 1, 1).items()}
FLOAT_KEYS = store.FLOAT_KEYS


class Layout(NamedTuple):
    """What every sample file of one folder must share."""
    image_channels: int
    size: int
    latent_channels: int
    chunks: int
    T: int
    chunk_size: int

    def spec(self) -> dict:
        return store.record_spec(self.image_channels, self.size, self.latent_channels, self.chunks)

    def text(self) -> str:
        return (f"{self.image_channels}x{self.size}x{self.size} images, {self.latent_channels} latent channels, "
                f"{self.chunks} chunks, T={self.T}, chunk_size={self.chunk_size}")


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
    config.validate(cfg, ["export"])  # callers from Python skip the CLI's check
    manifest = store.load_manifest(cfg)
    problem = store.layout_problem(manifest)
    if problem:
        raise UserError(f"{manifest.folder / store.MANIFEST} {problem}; run '--mode verify' for details")
    target = reference_dir(cfg, must_exist=False)
    if target.is_symlink():  # export into the folder it names; the link stays as it is
        target = target.resolve()
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise UserError(f"{target} is not an empty folder; export into a new or empty folder")
    staging = target.with_name(target.name + ".partial")
    atomic.claim_staging(staging, "export")
    atomic.empty_staging(staging)
    # a bar used as a context is closed before an error is printed, so the error stays on its own line
    rin0_miss = 0.0
    with tqdm(total=sum(s["count"] for s in manifest.shards), desc="export", unit="sample", dynamic_ncols=True) as bar:
        for entry in manifest.shards:
            arrays = manifest.read_shard(entry)
            rin0_miss = max(rin0_miss, _rin0_miss(arrays, manifest))
            for row, index in enumerate(arrays["index"]):
                sample = {key: arrays[key][row] for key in manifest.spec}
                (staging / sample_name(int(index))).write_bytes(store.encode_npz(sample, REFERENCE_ZSTD_LEVEL))
                bar.update(1)
    atomic.write_json(staging / "config.json", cfg)
    (staging / atomic.STAGING_MARKER).unlink()
    if target.exists():
        target.rmdir()
    staging.rename(target)
    print(f"[export] {manifest.data['totals']['samples']} files written to {target}")
    if not isinstance(manifest.codec, codecs.ReferenceCodec):
        print(f"[export] the records were written as codec {manifest.data['codec']['name']} made them, not "
              f"re-quantized: they are per-channel int8 codes with float16 scales already, which the reference's "
              f"reader dequantizes as its own")
    print(f"[export] {_sum_note(manifest, rin0_miss)}")


def _rin0_miss(arrays: dict, manifest) -> float:
    """Where the chain starts at x_T (pixel space): the largest |dequantised rin0 - x_T| of a shard's records, else 0."""
    if not manifest.space.start_is_x_T:
        return 0.0
    rin0 = quant.dequantize(arrays["rin0_q"], arrays["rin0_scale_f16"])
    return float(np.abs(rin0 - arrays["x_T_f16"].astype(np.float32)).max(initial=0.0))


def _sum_note(manifest, rin0_miss: float) -> str:
    """Which sum of a file's arrays gives the chain's final state, and how closely (docs/design.md §3): the
    codec error that generate measured, and in pixel space what rin0, a percentile-clipped copy of x_T, misses."""
    error = codecs.combined([s.get("codec_error") for s in manifest.shards])
    within = (f"to within {error['z_final_max_abs']:.3g} (the codec error '--mode verify' reports)" if error else
              "to within the codec's error (not recorded for this folder)")
    if not manifest.space.start_is_x_T:
        return f"each file's rin0 + sum(r_chunks) is the final {manifest.space.name} state {within}"
    return (f"pixel space: each file's x_T_f16 + sum(r_chunks) is the final state (the teacher's image before "
            f"clamping to [-1, 1]) {within}; rin0 is the reference quantizer's percentile-clipped copy of x_T, so "
            f"rin0 + sum(r_chunks) misses it by up to {rin0_miss:.3g} in these files")


def sample_problem(sample: dict):
    """The first way one decoded sample file disagrees with itself, or None."""
    missing = [key for key in DTYPES if key not in sample]
    if missing:
        return f"has no key {missing[0]}, so it is not a reference sample file"
    wrong = next((key for key, dtype in DTYPES.items() if str(sample[key].dtype) != dtype), None)
    if wrong:
        return f"has {wrong} of dtype {sample[wrong].dtype}, not {DTYPES[wrong]}"
    x_T, chunks = sample["x_T_f16"].shape, sample["r_chunks_q"].shape
    if len(x_T) != 3 or x_T[1] != x_T[2] or 0 in x_T:
        return f"has x_T_f16 of shape {list(x_T)}, not [channels, size, size]"
    if len(chunks) != 4 or 0 in chunks:
        return f"has r_chunks_q of shape {list(chunks)}, not [chunks, channels, size, size]"
    spec = store.record_spec(x_T[0], x_T[1], chunks[1], chunks[0])
    for key, (_, shape) in spec.items():
        if list(sample[key].shape) != shape:
            return (f"has {key} of shape {list(sample[key].shape)}, but its x_T_f16 {list(x_T)} and r_chunks_q "
                    f"{list(chunks)} make it {shape}")
    T, chunk_size = int(sample["T"][0]), int(sample["chunk_size"][0])
    if T <= 0 or chunk_size <= 0:
        return f"has T={T} and chunk_size={chunk_size}, which must both be positive"
    if T // chunks[0] != chunk_size:  # both writers store chunk_size = T // chunks
        return (f"has {chunks[0]} chunks in r_chunks_q and T={T}, which make chunk_size = T // chunks = "
                f"{T // chunks[0]}, but its chunk_size is {chunk_size}")
    bad = next((key for key in FLOAT_KEYS if not np.isfinite(sample[key]).all()), None)
    if bad:
        return f"has NaN or inf in {bad}"
    return None


def layout_of(sample: dict) -> Layout:
    """The layout of a sample that ``sample_problem`` accepted."""
    c, size = sample["x_T_f16"].shape[:2]
    chunks, latent = sample["r_chunks_q"].shape[:2]
    return Layout(c, size, latent, chunks, int(sample["T"][0]), int(sample["chunk_size"][0]))


def read_sample(path: Path) -> dict:
    """One sample file, checked on its own; one sentence naming the file where it is bad."""
    try:
        problem = _not_a_regular_file(path)
        if not problem:
            sample = store.decode_npz(path.read_bytes(), SAMPLE_MAX_BYTES)
            problem = sample_problem(sample)
    except OSError as err:
        problem = f"cannot be read ({err.strerror or err})"
    except ValueError as err:
        problem = str(err)
    if problem:
        raise UserError(f"{path} {problem}; replace it with an intact copy of that sample")
    return sample


def _not_a_regular_file(path: Path):
    """Why ``path`` (or what a symlink there points at) is not a regular file, or None. Checked before the
    file is opened: a device such as /dev/zero never ends and a FIFO blocks the open itself (docs/design.md §3)."""
    info = os.stat(path)
    mode = info.st_mode
    if stat.S_ISREG(mode):
        if info.st_size > SAMPLE_MAX_BYTES:  # zstd never grows data by this much: not a sample, do not read it
            return f"is {info.st_size} bytes, more than any sample file (at most {SAMPLE_MAX_BYTES} decoded)"
        return None
    kinds = [(stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a device"),
             (stat.S_ISBLK, "a device"), (stat.S_ISSOCK, "a socket")]
    kind = next((name for test, name in kinds if test(mode)), "something else")
    via = f" (the symlink points to {os.path.realpath(path)})" if path.is_symlink() else ""
    return f"is {kind}{via}, not a regular file, so import does not read it"


def sample_files(source: Path) -> list:
    """The sample files of a reference folder in index order, refused where the numbering has a gap."""
    files = sorted((int(m.group(1)), p) for p in source.iterdir() if (m := SAMPLE_NAME.fullmatch(p.name)))
    if not files:
        raise UserError(f"{source} holds no sample_XXXXXXXX.zst files; point reference_dir at a folder of them")
    gap = next((i for i, (index, _) in enumerate(files) if index != i), None)
    if gap is not None:
        raise UserError(f"{source / sample_name(gap)} is missing although {files[gap][1].name} exists; the "
                        f"reference layout numbers samples from 0 without gaps, so restore it")
    return [path for _, path in files]


def import_command(cfg):
    """Every file is checked and written as shards into ``<data_dir>.importing``, which becomes
    ``data_dir`` only when complete: a failed or interrupted import leaves nothing that looks like data."""
    config.validate(cfg, ["import"])  # callers from Python skip the CLI's check
    source = reference_dir(cfg, must_exist=True)
    target = output_dir(cfg, "data_dir")
    _check_target(target)
    files = sample_files(source)
    teacher = _import_teacher(cfg)
    rnet = _import_rnet(cfg, teacher)
    staging = target.with_name(target.name + ".importing")
    atomic.claim_staging(staging, "import")  # before the cleanup below, which deletes the folder on failure
    with atomic.folder_lock(staging, "import"):
        try:
            manifest = _import_into(cfg, source, files, staging, teacher, rnet)
            with atomic.folder_lock(target, "run"):  # no generate may start on the empty target meanwhile
                _check_target(target)
                (target / ".lock").unlink()
                target.rmdir()
                (staging / atomic.STAGING_MARKER).unlink()
                os.rename(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    named = ("" if teacher and (rnet or not manifest.space.needs_rnet) else
             " (no import_rnet named: name the RNet that made this latent data to train on it)" if teacher else
             " (no import_teacher named: name it to train on this data)")
    print(f"[import] {len(files)} samples from {source} written as {len(manifest.shards)} shard(s) to "
          f"{target}{named}")


def _check_target(target: Path):
    if (target / store.MANIFEST).exists():
        raise UserError(f"{target} already holds a manifest; import into a new or empty data_dir")
    if target.exists() and (not target.is_dir() or any(p.name != ".lock" for p in target.iterdir())):
        raise UserError(f"{target} is not empty; import into a new or empty data_dir")


class Teacher(NamedTuple):
    unet: object
    ddpm: object
    where: str
    sha256: str


def _import_teacher(cfg):
    """The teacher named by ``import_teacher``, or None."""
    if not cfg["import_teacher"]:
        return None
    from ..teacher import teachers  # diffusers takes seconds to import: only an import that names a teacher pays
    path = project_path(cfg["import_teacher"])
    if not any(teachers.has_weights(folder) for folder in (path / "unet", path)):
        raise UserError(f"import_teacher={cfg['import_teacher']}: no teacher weights in {path}/unet (diffusers "
                        f"layout); point import_teacher at the folder of the teacher that made the data")
    unet, ddpm, where = teachers.load_teacher(dict(cfg, teacher_path=str(path), teacher_hub_id=""))
    return Teacher(unet, ddpm, where, teachers.weights_sha256(unet))


def _import_into(cfg, source, files, staging, teacher, rnet) -> store.Manifest:
    atomic.empty_staging(staging)  # what an import that was killed left
    first = read_sample(files[0])
    layout = layout_of(first)
    manifest = store.Manifest.create(staging, codec=_codec(cfg), generator=imported_generator(source, layout, teacher, rnet),
                                     spec=layout.spec())
    with tqdm(total=len(files), desc="import", unit="sample", dynamic_ncols=True) as bar:
        for number, lo in enumerate(range(0, len(files), cfg["shard_size"])):
            batch = files[lo:lo + cfg["shard_size"]]
            samples = [first if path == files[0] else _read_like(path, layout, files[0]) for path in batch]
            arrays = {key: np.stack([s[key] for s in samples]) for key in layout.spec()}
            arrays["index"] = np.arange(lo, lo + len(batch), dtype=np.int64)
            manifest.add_shard(number, lo, len(batch), store.encode_npz(arrays, codecs.zstd_level(cfg, codecs.ReferenceCodec)), save=False)
            bar.update(len(batch))
    manifest.save()
    atomic.write_json(staging / "config.json", cfg)
    return manifest


def _read_like(path: Path, layout: Layout, first: Path) -> dict:
    sample = read_sample(path)
    if layout_of(sample) != layout:
        raise UserError(f"{path} has {layout_of(sample).text()} but {first.name} has {layout.text()}; every "
                        f"sample of a folder must have the same layout, so import them separately")
    return sample


def _codec(cfg) -> dict:
    return {"name": f"int8-p{cfg['percentile']:g}+zstd", "percentile": cfg["percentile"],
            "quantizer": "per-channel symmetric int8 (imported: the percentile is the configured one, the "
                         "reference does not record it)",
            "container": "uncompressed npz in one zstd frame", "zstd_level": codecs.zstd_level(cfg, codecs.ReferenceCodec)}


class ImportedRNet(NamedTuple):
    net: object
    where: str
    sha256: str


def _import_rnet(cfg, teacher):
    """The RNet named by ``import_rnet`` (built around the named teacher, which it must have been trained
    on), or None: latent data is read through its x0 head, so training needs it (docs/design.md §3)."""
    if not cfg["import_rnet"]:
        return None
    if teacher is None:
        raise UserError(f"import_rnet={cfg['import_rnet']} needs import_teacher= too: an RNet is rebuilt around "
                        f"the teacher it was trained on; name that teacher")
    from ..teacher import rnet_files, teachers
    folder = project_path(cfg["import_rnet"])
    net, _ = rnet_files.load_rnet(folder, teacher.unet, teacher.sha256)
    return ImportedRNet(net, str(folder), teachers.weights_sha256(net))


def imported_generator(source, layout: Layout, teacher, rnet=None) -> dict:
    """The manifest's generator block of imported records: what the files and the named teacher tell.
    What the reference layout does not record (sampler, steps, seed, percentile) is null; without a
    teacher, training refuses the data (``teacher_sha256`` null) and says how to name it."""
    generator = {
        "source": store.IMPORTED, "reference_dir": str(source), "teacher": None, "teacher_sha256": None,
        "space": spaces.of_reference_files(layout.image_channels, layout.latent_channels).name,
        "sampler": None, "steps": None, "chunks": layout.chunks, "T": layout.T, "chunk_size": layout.chunk_size,
        "percentile": None, "seed": None, "image_shape": [layout.image_channels, layout.size, layout.size],
        "latent_channels": layout.latent_channels, "gen_precision": None, "scheduler": None,
        "x_T": "as stored in the imported files"}
    if teacher is not None:
        _check_teacher_fits(teacher, layout, spaces.of_generator(generator))
        generator.update(teacher=teacher.where, teacher_sha256=teacher.sha256, scheduler={
            k: teacher.ddpm.config[k] for k in ("beta_start", "beta_end", "beta_schedule", "num_train_timesteps",
                                                "timestep_spacing")})
    if rnet is not None:
        _check_rnet_fits(rnet, layout, spaces.of_generator(generator))
        generator.update(rnet=rnet.where, rnet_sha256=rnet.sha256)
    return generator


def _check_rnet_fits(rnet: ImportedRNet, layout: Layout, space):
    if not space.needs_rnet:
        raise UserError(f"import_rnet={rnet.where} names an RNet, but the imported files hold pixel-space data "
                        f"({layout.text()}); import them without import_rnet")
    found = {"latent channels": (rnet.net.latent_channels, layout.latent_channels), "T": (rnet.net.T, layout.T)}
    for what, (rnet_value, data_value) in found.items():
        if rnet_value != data_value:
            raise UserError(f"the RNet in {rnet.where} has {what} {rnet_value} but the imported files have "
                            f"{data_value}, so it did not make them; set import_rnet= to the RNet that did")


def _check_teacher_fits(teacher: Teacher, layout: Layout, space):
    unet, ddpm = teacher.unet, teacher.ddpm
    size = unet.config.sample_size
    size = size if isinstance(size, int) else size[0]
    latent = space.chain_channels(unet.config)
    found = {"image channels": (unet.config.in_channels, layout.image_channels), "image size": (size, layout.size),
             "T": (ddpm.config.num_train_timesteps, layout.T), "latent channels": (latent, layout.latent_channels)}
    for what, (teacher_value, data_value) in found.items():
        if teacher_value != data_value:
            raise UserError(f"the teacher in {teacher.where} has {what} {teacher_value} but the imported files have "
                            f"{data_value}, so it did not make them; set import_teacher= to the teacher that did")
