"""The teacher-data files (docs/design.md §3): shards of records plus ``manifest.json``.

A shard is the bytes of an uncompressed ``np.savez`` archive compressed as one zstd frame, named
``shard-NNNNN.npz.zst``; every key has a leading sample axis and ``index`` holds the global sample
indices; which keys it stores is the codec's (codec.py), and reading a shard returns the records.
``manifest.json`` names every shard with its index range, byte size, sha256 and codec error, the codec
and the generating config. Both are replaced atomically, the shard first, so a listed shard is
always complete. The rules of a folder's layout (names, index coverage) and the one loader of a
configured folder's manifest live here too, beside the format they describe.
"""
import hashlib
import re
from pathlib import Path

import numpy as np

from ..core import atomic, jsonfile
from ..teacher import spaces
from . import codec as codecs
from .npz_zstd import decode_npz, encode_npz, npz_bound  # noqa: F401 (the format's container, read as store.*)
from ..core.config import output_dir
from ..core.errors import UserError

FORMAT = "one-step-distill-teacher-data"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SHARD_PATTERN = "shard-*.npz.zst"
SHARD_NAME = re.compile(r"shard-(\d{5})\.npz\.zst")
# Bounds of a manifest's numbers: far above any real folder, low enough that sizes computed from them fit
# the C integers of numpy and zstd (a hand-edited count of 10**20 was an OverflowError in every reader).
MAX_RECORDS = 2 ** 40
MAX_SHARD_BYTES = 2 ** 40
IMPORTED = "imported from the reference one-file-per-sample layout"  # generator.source of imported folders


def record_spec(image_channels, size, latent_channels, chunks):
    """dtype and per-sample shape of every key of a record (the reference layout's keys)."""
    return {
        "x_T_f16": ("float16", [image_channels, size, size]),
        "x0_teacher_f16": ("float16", [image_channels, size, size]),
        "rin0_q": ("int8", [latent_channels, size, size]),
        "rin0_scale_f16": ("float16", [latent_channels]),
        "r_chunks_q": ("int8", [chunks, latent_channels, size, size]),
        "r_chunks_scale_f16": ("float16", [chunks, latent_channels]),
        "T": ("int16", [1]),
        "chunk_size": ("int16", [1]),
    }


def shard_name(number: int) -> str:
    return f"shard-{number:05d}.npz.zst"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def check_arrays(arrays: dict, spec: dict, count: int, with_index: bool = True):
    """The first way ``arrays`` differs from ``spec`` with ``count`` samples, or None."""
    expected = dict(spec, **({"index": ("int64", [])} if with_index else {}))
    missing = sorted(set(expected) - set(arrays))
    if missing:
        return f"key {missing[0]} is missing"
    for key, (dtype, shape) in expected.items():
        a = arrays[key]
        if str(a.dtype) != dtype or list(a.shape) != [count, *shape]:
            return f"{key} is {a.dtype}{list(a.shape)}, expected {dtype}{[count, *shape]}"
    return None


def _is_shard_entry(entry) -> bool:
    return (isinstance(entry, dict) and isinstance(entry.get("file"), str) and isinstance(entry.get("sha256"), str)
            and all(isinstance(entry.get(k), int) and entry[k] >= 0 for k in ("first_index", "count", "bytes")))


def _edited_shard_entry(shards):
    """What no writer lists, as text completing "<manifest> ...", or None. The one path rule of every reader
    (verify, repair, training, export, eval_d, ``Manifest.read_shard``): a listed file is a shard file of the
    folder itself, never ``../`` or an absolute path; and its numbers fit the integers sizes are computed in."""
    foreign = next((e["file"] for e in shards if not SHARD_NAME.fullmatch(e["file"])), None)
    if foreign is not None:
        return f"lists {foreign!r}, which is not a shard file of the folder (shard-NNNNN.npz.zst)"
    absurd = next((e for e in shards if e["first_index"] + e["count"] > MAX_RECORDS or e["bytes"] > MAX_SHARD_BYTES),
                  None)
    if absurd is not None:
        return (f"lists {absurd['file']!r} with {absurd['count']} records from index {absurd['first_index']} in "
                f"{absurd['bytes']} bytes, beyond the {MAX_RECORDS:,} records and bytes a folder can hold")
    return None


class Manifest:
    """The manifest of one data folder, kept in memory and rewritten atomically on every change."""

    def __init__(self, folder, data: dict):
        self.folder = Path(folder)
        self.data = data

    @classmethod
    def create(cls, folder, codec: dict, generator: dict, spec: dict):
        return cls(folder, {"format": FORMAT, "format_version": FORMAT_VERSION, "codec": codec,
                            "generator": generator, "record": {k: {"dtype": d, "shape": s} for k, (d, s) in spec.items()},
                            "shards": [], "totals": {"samples": 0, "bytes": 0, "bytes_per_sample": 0.0}})

    @classmethod
    def load(cls, folder):
        """The folder's manifest, or None where there is none; a damaged one is one sentence."""
        path = Path(folder) / MANIFEST
        if not path.is_file():
            return None
        try:
            data = jsonfile.loads(path.read_text())
            ok = (data.get("format") == FORMAT and isinstance(data.get("format_version"), int)
                  and isinstance(data.get("shards"), list) and all(map(_is_shard_entry, data["shards"]))
                  and all(isinstance(data.get(k), dict) for k in ("codec", "generator", "record"))
                  and all(isinstance(v, dict) and isinstance(v.get("dtype"), str) and np.dtype(v["dtype"]).kind in "iuf"
                          and isinstance(v.get("shape"), list)
                          and all(isinstance(n, int) and n >= 0 for n in v["shape"]) for v in data["record"].values())
                  and len(data["record"]["r_chunks_q"]["shape"]) == 4)
        except (ValueError, UnicodeDecodeError, AttributeError, TypeError, SyntaxError, KeyError):
            ok = False
        if not ok:
            raise UserError(f"{path} is not a readable teacher-data manifest; restore it or regenerate the folder")
        edited = _edited_shard_entry(data["shards"])
        if edited:
            raise UserError(f"{path} {edited}, so it was edited by hand; restore it or regenerate the folder")
        if data["format_version"] > FORMAT_VERSION:
            raise UserError(f"{path} has format version {data['format_version']}, newer than this tool "
                            f"({FORMAT_VERSION}); update the tool")
        codecs.from_manifest(data["codec"], path)  # an unknown codec is refused before any shard is read
        data["shards"].sort(key=lambda s: s["first_index"])
        return cls(folder, data)

    @property
    def shards(self):
        return self.data["shards"]

    @property
    def codec(self):
        return codecs.from_manifest(self.data["codec"], self.folder / MANIFEST)

    @property
    def space(self):
        """The trajectory space of the records (a spaces object)."""
        return spaces.of_generator(self.data["generator"])

    @property
    def spec(self):
        return {k: (v["dtype"], v["shape"]) for k, v in self.data["record"].items()}

    def next_number(self) -> int:
        """The number of the next new shard file: after every name in use."""
        numbers = [int(m.group(1)) for s in self.shards if (m := SHARD_NAME.fullmatch(s["file"]))]
        return max(numbers, default=-1) + 1

    def next_index(self) -> int:
        return max((s["first_index"] + s["count"] for s in self.shards), default=0)

    def add_shard(self, number: int, first_index: int, count: int, payload: bytes, save: bool = True,
                  extra: dict = None) -> None:
        """Write the shard file, then (unless ``save`` is False) the manifest that lists it; ``extra`` holds the
        codec's fields of the entry (its measured error, the sha256 of a regenerated x_T)."""
        self.list_shard(write_shard_file(self.folder, number, first_index, count, payload, extra), save)

    def list_shard(self, entry: dict, save: bool = True) -> None:
        """List a shard file already written (replacing an entry of the same name), then save unless told not to."""
        self.data["shards"] = [s for s in self.shards if s["file"] != entry["file"]]
        self.shards.append(entry)
        self.shards.sort(key=lambda s: s["first_index"])
        if save:
            self.save()

    def save(self) -> None:
        samples = sum(s["count"] for s in self.shards)
        total = sum(s["bytes"] for s in self.shards)
        self.data["totals"] = {"samples": samples, "bytes": total,
                               "bytes_per_sample": round(total / samples, 1) if samples else 0.0}
        atomic.write_json(self.folder / MANIFEST, self.data)

    def read_shard(self, entry: dict) -> dict:
        """A listed shard's arrays after checking size, sha256, decodability, shapes and indices."""
        problem, arrays = _inspect_shard(self, entry, deep=True)
        if problem:
            raise self.shard_error(entry, problem)
        return arrays

    def shard_error(self, entry: dict, problem: str) -> UserError:
        """The one sentence for a damaged listed shard: which file, what is wrong, what to do; or, where the
        folder's manifest now lists other bytes for it, that the data changed under the reader."""
        try:
            now = Manifest.load(self.folder)
        except UserError:
            now = None
        listed = next((s for s in now.shards if s["file"] == entry["file"]), None) if now else None
        if listed is not None and listed["sha256"] != entry["sha256"]:
            return UserError(f"the teacher data in {self.folder} changed while this run was reading it "
                             f"({entry['file']} was rewritten, e.g. by generate extending the folder); rerun on "
                             f"data that no one writes meanwhile")
        return UserError(f"{self.folder / entry['file']} {problem}; run '--mode verify' to list every damaged "
                         f"shard, then {damage_advice(self)}")


def write_shard_file(folder, number: int, first_index: int, count: int, payload: bytes, extra: dict = None) -> dict:
    """Write one shard file atomically; its manifest entry, for the one writer of the manifest to list."""
    name = shard_name(number)
    atomic.write_bytes(Path(folder) / name, payload)
    return {"file": name, "first_index": first_index, "count": count, "bytes": len(payload),
            "sha256": sha256(payload), **(extra or {})}


def shard_problem(manifest: Manifest, entry: dict, deep: bool = True):
    """What is wrong with one listed shard, or None; ``deep=False`` checks presence, size and
    sha256 only (enough to trust a shard this tool wrote), ``deep`` also decodes and checks content."""
    return _inspect_shard(manifest, entry, deep)[0]


def _inspect_shard(manifest: Manifest, entry: dict, deep: bool):
    """(problem or None, decoded arrays or None) of one listed shard, reading its file once."""
    path = manifest.folder / entry["file"]
    if not path.is_file():
        return "is missing", None
    data = path.read_bytes()
    if len(data) != entry["bytes"]:
        return f"has {len(data)} bytes, the manifest says {entry['bytes']} (truncated or replaced)", None
    if sha256(data) != entry["sha256"]:
        return "does not match its sha256 in the manifest (corrupted)", None
    if not deep:
        return None, None
    codec = manifest.codec
    stored_spec = codec.stored_spec(manifest.spec, manifest.space)
    try:
        stored = decode_npz(data, npz_bound(stored_spec, entry["count"]))
    except ValueError as err:
        return str(err), None
    problem = check_arrays(stored, stored_spec, entry["count"])
    if problem:
        return problem, None
    expected = np.arange(entry["first_index"], entry["first_index"] + entry["count"])
    if not np.array_equal(stored["index"], expected):
        return f"holds indices other than {entry['first_index']}..{expected[-1]}", None
    try:
        arrays = codec.unpack(stored, manifest.data["generator"], entry)
    except ValueError as err:
        return str(err), None
    return records_problem(arrays, manifest.data["generator"]), arrays


FLOAT_KEYS = ("x_T_f16", "x0_teacher_f16", "rin0_scale_f16", "r_chunks_scale_f16")
SCALE_KEYS = ("rin0_scale_f16", "r_chunks_scale_f16")


def records_problem(records: dict, generator: dict):
    """What no writer of records can produce (a non-finite float, a negative scale, a T or chunk_size other
    than the generator's), as text completing "<shard> ...", or None: a shard whose sha256 was recomputed
    after such an edit passes every checksum, and training on it would give an all-NaN student."""
    bad = next((key for key in FLOAT_KEYS if not np.isfinite(records[key]).all()), None)
    if bad:
        return f"holds NaN or inf in {bad}"
    bad = next((key for key in SCALE_KEYS if (records[key] < 0).any()), None)
    if bad:
        return f"holds a negative quantization scale in {bad}"
    if (records["T"] <= 0).any() or (records["chunk_size"] <= 0).any():
        return "holds a T or chunk_size that is not positive"
    T, chunk_size = generator.get("T"), generator.get("chunk_size")
    if isinstance(T, int) and T > 0 and not (records["T"] == T).all():
        return f"holds T={_first_other(records['T'], T)}, but the folder's teacher has T={T}"
    if isinstance(chunk_size, int) and chunk_size > 0 and not (records["chunk_size"] == chunk_size).all():
        return (f"holds chunk_size={_first_other(records['chunk_size'], chunk_size)}, but the folder's T and "
                f"chunks make it {chunk_size}")
    return None


def _first_other(values: np.ndarray, expected: int) -> int:
    return int(values[values != expected].flat[0])


def index_text(first, count):
    return f"indices {first}..{first + count - 1}"


def coverage_problems(shards):
    """[(file, indices, what is wrong)] for the gaps and overlaps of the shards' index ranges against 0..N-1."""
    problems, expected = [], 0
    for s in sorted(shards, key=lambda s: s["first_index"]):
        if s["first_index"] > expected:
            problems.append(("-", index_text(expected, s["first_index"] - expected), "are in no shard"))
        elif s["first_index"] < expected:
            overlap = min(expected, s["first_index"] + s["count"]) - s["first_index"]
            problems.append((s["file"], index_text(s["first_index"], overlap), "are also in an earlier shard"))
        expected = max(expected, s["first_index"] + s["count"])
    return problems


def layout_problem(manifest: Manifest):
    """The first problem of the shard list itself (gaps, overlaps, a name listed twice), as text, or None; names
    that are not shard files never get this far (``Manifest.load``)."""
    problems = coverage_problems(manifest.shards)
    if problems:
        return f"lists shards whose {problems[0][1]} {problems[0][2]}"
    names = [s["file"] for s in manifest.shards]
    if len(set(names)) != len(names):
        return "lists a shard file more than once"
    return None


def stray_files(manifest: Manifest):
    """Shard files in the folder that the manifest does not list (left by an interrupted run)."""
    listed = {s["file"] for s in manifest.shards}
    return sorted(p.name for p in manifest.folder.glob(SHARD_PATTERN) if p.name not in listed)


def load_manifest(cfg) -> Manifest:
    """The manifest of the configured ``data_dir``; one sentence where there is none."""
    folder = output_dir(cfg, "data_dir")
    manifest = Manifest.load(folder)
    if manifest is None:
        raise UserError(f"{folder} has no {MANIFEST}; generate data there first or set data_dir=")
    return manifest


def is_imported(manifest: Manifest) -> bool:
    return manifest.data["generator"].get("source") == IMPORTED


def damage_advice(manifest: Manifest) -> str:
    """What to do about a damaged shard: imported records cannot be regenerated, only imported again."""
    if is_imported(manifest):
        return "import the reference folder again into a new data_dir to restore it"
    return "run '--mode repair' with the generating config to regenerate damaged shards"
