"""Record codecs of the teacher data (docs/design.md §3, §15).

A codec turns a batch of float trajectories into records (the reference's keys: int8 codes with
float16 scales), a shard's records into the arrays its npz stores, and those arrays back into
records; the encoder also measures how far the decoded records are from the floats.

    int8-p99.5+zstd  the reference codec: each chunk on its own, scale = the 99.5th percentile of |x| / 127;
                     the npz stores the records as they are.
    ef-int8+zstd     error feedback along the chain with a step relative to the final state's RMS; the npz
                     stores each chunk's codes, or their difference from the previous chunk's where that
                     takes fewer bits (version 3, code_layout; versions 1-2: the codes position-major), in
                     latent space the start codes as differences between rows, and neither x_T
                     (regenerated from (seed, index)) nor, in pixel space, the start codes (they follow
                     from x_T); the image is stored as its 8-bit grey levels' difference from the decoded
                     final state's (version 2 on; version 1 derived the image from the final state alone,
                     off by the codec's error).

Every codec's records dequantize the same way, so the students, ``export`` and the reference's own
reader take them unchanged.
"""
import hashlib
from dataclasses import dataclass

import numpy as np
import zstandard

from ..core.errors import UserError
from ..teacher import spaces
from . import code_layout, quant

REFERENCE_PREFIX = "int8-p"
FEEDBACK = "ef-int8+zstd"
# codec keys that decide the bytes of a shard: a folder is extended with its own values (generate.open_manifest
# refuses others, except an older version and, with zstd_level=0, another level, which go on as the folder's)
IDENTITY_KEYS = ("name", "version", "zstd_level", "step", "x_T")
X_T_MODES = ("regenerate", "store")


@dataclass
class Trajectories:
    """One batch of float32 trajectories [n, ...] in ``space`` (a spaces object): the chain starts at ``start`` (x_T
    in pixel space, Rin(x_T) in latent space) and ``start + sum(chunks) = z_final``; ``x0`` is the teacher's image."""
    x_T: np.ndarray
    start: np.ndarray
    chunks: np.ndarray
    z_final: np.ndarray
    x0: np.ndarray
    T: int
    chunk_size: int
    space: object


def decoded_start(records: dict, space) -> np.ndarray:
    """The chain's start as the students read it (a new float32 array): x_T itself where the chain starts there
    (pixel space), else the dequantised start codes (Rin(x_T) in latent space)."""
    if space.start_is_x_T:
        return records["x_T_f16"].astype(np.float32)
    return quant.dequantize(records["rin0_q"], records["rin0_scale_f16"])


def decoded_final(records: dict, space) -> np.ndarray:
    """start + every dequantised chunk: the end state the records encode."""
    chunks = quant.dequantize(records["r_chunks_q"], records["r_chunks_scale_f16"])
    return decoded_start(records, space) + chunks.sum(axis=1)


def common_records(traj: Trajectories) -> dict:
    n = len(traj.x_T)
    return {"x_T_f16": traj.x_T.astype(np.float16),
            "x0_teacher_f16": np.clip(traj.x0, -1, 1).astype(np.float16),
            "T": np.full((n, 1), traj.T, np.int16), "chunk_size": np.full((n, 1), traj.chunk_size, np.int16)}


class ReferenceCodec:
    """The reference's codec, bit-compatible with its writer: every value is quantized on its own."""

    version = 1
    DEFAULT_LEVEL = 10  # the reference writer's

    def __init__(self, percentile: float, zstd_level: int):
        self.percentile, self.zstd_level = percentile, zstd_level
        self.name = f"{REFERENCE_PREFIX}{percentile:g}+zstd"

    @classmethod
    def from_config(cls, cfg):
        return cls(cfg["percentile"], zstd_level(cfg, cls))

    @staticmethod
    def reads(name: str, version) -> bool:
        return name.startswith(REFERENCE_PREFIX) and name.endswith("+zstd") and version <= ReferenceCodec.version

    @classmethod
    def from_manifest(cls, described: dict, where):
        return cls(described.get("percentile", 99.5), described.get("zstd_level", 10))

    def describe(self) -> dict:
        return {"name": self.name, "version": self.version,
                "quantizer": "per-channel symmetric int8, zero point 0, clip at the percentile of |x|, float16 scales",
                "percentile": self.percentile, "container": "uncompressed npz in one zstd frame",
                "zstd_level": self.zstd_level, "zstandard_version": zstandard.__version__}

    def encode(self, traj: Trajectories) -> dict:
        rin0_q, rin0_scale = quant.quantize(traj.start, self.percentile)
        chunks_q, chunks_scale = quant.quantize(traj.chunks, self.percentile)
        return dict(common_records(traj), rin0_q=rin0_q, rin0_scale_f16=rin0_scale, r_chunks_q=chunks_q,
                    r_chunks_scale_f16=chunks_scale)

    def stored_spec(self, spec: dict, space) -> dict:
        return spec

    def pack(self, records: dict, space):
        """(arrays to store, fields for the shard's manifest entry)."""
        return records, {}

    def unpack(self, stored: dict, generator: dict, entry: dict) -> dict:
        return stored


class FeedbackCodec:
    """Error feedback along the chain (quant.feedback_quantize) at a step of ``step`` times the RMS of each
    channel of the sample's final state, so the final state is off by half a step at most."""

    VERSION = 3  # the version this tool writes; a folder is extended with the version it was started with
    DEFAULT_LEVEL = 1  # version 3 at the default step: within 3 % of level 10 in a sixth of the time (design §15)
    name = FEEDBACK

    def __init__(self, step: float, x_T: str, percentile: float, zstd_level: int, version: int = None):
        self.step, self.x_T, self.percentile, self.zstd_level = step, x_T, percentile, zstd_level
        self.version = self.VERSION if version is None else version

    @classmethod
    def from_config(cls, cfg):
        return cls(cfg["codec_step"], cfg["codec_x_T"], cfg["percentile"], zstd_level(cfg, cls))

    @staticmethod
    def reads(name: str, version) -> bool:
        return name == FEEDBACK and version <= FeedbackCodec.VERSION

    @classmethod
    def from_manifest(cls, described: dict, where):
        step, x_T, percentile = described.get("step"), described.get("x_T"), described.get("percentile")
        if not (isinstance(step, (int, float)) and step > 0 and x_T in X_T_MODES and isinstance(percentile, (int, float))):
            raise UserError(f"{where} describes codec {FEEDBACK} without a positive step, an x_T mode "
                            f"({' or '.join(X_T_MODES)}) and a percentile; restore the manifest or regenerate the data")
        return cls(step, x_T, percentile, described.get("zstd_level", 10), described.get("version", 1))

    @property
    def stores_image_levels(self) -> bool:
        return self.version >= 2

    @property
    def stores_differences(self) -> bool:
        return self.version >= 3

    def describe(self) -> dict:
        return {"name": self.name, "version": self.version, "step": self.step, "x_T": self.x_T,
                "quantizer": "per-channel symmetric int8 with error feedback along the chunks; step = `step` x the RMS "
                             "of the channel's final state, widened where the codes would leave +-127; float16 scales",
                "layout": ("one array per chunk, r_chunks_q_<k> [C, H, W]: its codes or, where r_chunks_q_differenced "
                           "[chunks] says 1, their int8 difference modulo 256 from the previous chunk's; latent space: "
                           "rin0 codes as int8 differences from the row above, modulo 256"
                           if self.stores_differences else "chunk codes position-major [C, H, W, chunks]")
                          + "; pixel space: rin0 codes (the reference quantizer at `percentile`) are derived, the "
                            "image is "
                          + ("its 8-bit levels round((x + 1) * 127.5) stored as int8 differences from the clamped "
                             "decoded final state's" if self.stores_image_levels else
                             "the clamped decoded final state"),
                "percentile": self.percentile, "container": "uncompressed npz in one zstd frame",
                "zstd_level": self.zstd_level, "zstandard_version": zstandard.__version__}

    def encode(self, traj: Trajectories) -> dict:
        rms = np.sqrt(np.mean(np.square(traj.z_final.reshape(*traj.z_final.shape[:2], -1)), axis=-1))
        step = (np.float32(self.step) * rms).astype(np.float32)
        records = common_records(traj)
        if traj.space.start_is_x_T:  # rin0 is the reference's copy of x_T; the chain's own start is x_T exactly
            rin0_q, rin0_scale = self.x_T_start_codes(records["x_T_f16"])
            start_error = traj.start - records["x_T_f16"].astype(np.float32)
        else:
            rin0_scale = quant.fitting_scales(traj.start, step)
            rin0_q = quant.quantize_step(traj.start, rin0_scale)
            start_error = traj.start - quant.dequantize(rin0_q, rin0_scale)
        codes, scales, _ = quant.feedback_quantize(start_error, traj.chunks, step)
        records.update(rin0_q=rin0_q, rin0_scale_f16=rin0_scale, r_chunks_q=codes, r_chunks_scale_f16=scales)
        if traj.space.image_is_end:  # version 2 keeps the image the evaluation sees (pack stores what the chunks miss)
            records["x0_teacher_f16"] = (levels_image(image_levels(records["x0_teacher_f16"]))
                                         if self.stores_image_levels else self.end_image(records, traj.space))
        return records

    def x_T_start_codes(self, x_T_f16):
        """The reference quantizer's rin0 codes of a chain that starts at x_T (derived, never stored)."""
        return quant.quantize(x_T_f16.astype(np.float32), self.percentile)

    @staticmethod
    def end_image(records: dict, space) -> np.ndarray:
        """The image of a space whose image is the chain's end: the clamped decoded end state."""
        return np.clip(decoded_final(records, space), -1, 1).astype(np.float16)

    def image_correction(self, records: dict, space) -> np.ndarray:
        """int8 [n, C, H, W]: the image's grey levels minus those of the clamped decoded final state (a few
        levels: the final state is off by half a codec step)."""
        difference = image_levels(records["x0_teacher_f16"]) - image_levels(self.end_image(records, space))
        return np.clip(difference, -127, 127).astype(np.int8)

    def kept_keys(self, space) -> tuple:
        """Record keys stored as they are, beside the chunk codes, their scales, T and chunk_size: what does not
        follow from x_T and the chunks in ``space``."""
        return ((() if space.start_is_x_T else ("rin0_q", "rin0_scale_f16"))
                + (() if space.image_is_end else ("x0_teacher_f16",))
                + (("x_T_f16",) if self.x_T == "store" else ()))

    def stored_spec(self, spec: dict, space) -> dict:
        chunk_dtype, (k, c, h, w) = spec["r_chunks_q"]
        kept = ("r_chunks_scale_f16", "T", "chunk_size") + self.kept_keys(space)
        stored = {key: spec[key] for key in kept}
        if self.stores_differences:
            stored.update(code_layout.chunk_spec(chunk_dtype, k, [c, h, w]))
            if not space.start_is_x_T:
                stored[code_layout.RIN0_ROW_STEPS] = stored.pop("rin0_q")
        else:
            stored[CHUNKS_BY_POSITION] = (chunk_dtype, [c, h, w, k])
        if space.image_is_end and self.stores_image_levels:
            stored[IMAGE_CORRECTION] = ("int8", spec["x0_teacher_f16"][1])
        return stored

    def pack(self, records: dict, space):
        kept = ("r_chunks_scale_f16", "T", "chunk_size", "index") + self.kept_keys(space)
        stored = {key: records[key] for key in kept if key in records}
        if self.stores_differences:  # neighbours' differences often take fewer bits (docs/design.md §15)
            stored.update(code_layout.pack_chunks(records["r_chunks_q"]))
            if not space.start_is_x_T:
                stored[code_layout.RIN0_ROW_STEPS] = code_layout.wrapped_steps(stored.pop("rin0_q"), axis=2)
        else:
            stored[CHUNKS_BY_POSITION] = np.ascontiguousarray(records["r_chunks_q"].transpose(0, 2, 3, 4, 1))
        extra = {}
        if self.x_T == "regenerate":
            extra["x_T_sha256"] = hashlib.sha256(records["x_T_f16"].tobytes()).hexdigest()
        if space.image_is_end and self.stores_image_levels:
            stored[IMAGE_CORRECTION] = self.image_correction(records, space)
        return stored, extra

    def unpack(self, stored: dict, generator: dict, entry: dict) -> dict:
        """Records of a shard's stored arrays; ValueError (completing "<shard> ...") where x_T does not regenerate."""
        space = spaces.of_generator(generator)
        layout_keys = (CHUNKS_BY_POSITION, code_layout.DIFFERENCED, code_layout.RIN0_ROW_STEPS, IMAGE_CORRECTION)
        records = {key: value for key, value in stored.items()
                   if key not in layout_keys and not code_layout.is_chunk_key(key)}
        if self.stores_differences:
            records["r_chunks_q"] = code_layout.unpack_chunks(stored)
            if not space.start_is_x_T:
                records["rin0_q"] = code_layout.wrapped_sum(stored[code_layout.RIN0_ROW_STEPS], axis=2)
        else:
            records["r_chunks_q"] = np.ascontiguousarray(stored[CHUNKS_BY_POSITION].transpose(0, 4, 1, 2, 3))
        if self.x_T == "regenerate":
            records["x_T_f16"] = regenerated_x_T(stored["index"], generator, entry)
        if space.start_is_x_T:
            records["rin0_q"], records["rin0_scale_f16"] = self.x_T_start_codes(records["x_T_f16"])
        if space.image_is_end:
            records["x0_teacher_f16"] = self.end_image(records, space)
            if self.stores_image_levels:
                levels = image_levels(records["x0_teacher_f16"]) + stored[IMAGE_CORRECTION].astype(np.int16)
                records["x0_teacher_f16"] = levels_image(levels)
        return records


IMAGE_CORRECTION = "x0_level_correction"
CHUNKS_BY_POSITION = "r_chunks_q_by_position"  # versions 1-2


def image_levels(image: np.ndarray) -> np.ndarray:
    """int16 grey levels of an image in [-1, 1], as the evaluation's uint8 conversion computes them."""
    return np.rint((np.clip(image.astype(np.float32), -1, 1) + 1) * np.float32(127.5)).astype(np.int16)


def levels_image(levels: np.ndarray) -> np.ndarray:
    """float16 image [-1, 1] whose grey levels are ``levels`` (float16 keeps them: its spacing is < 1/4 level)."""
    return (levels.astype(np.float32) / np.float32(127.5) - 1).astype(np.float16)


def regenerated_x_T(index, generator: dict, entry: dict) -> np.ndarray:
    from ..teacher.trajectory import draw_x_T  # torch: imported only where x_T is regenerated (readers of other codecs skip it)
    x_T = draw_x_T(generator["seed"], index, generator["image_shape"]).numpy().astype(np.float16)
    if hashlib.sha256(x_T.tobytes()).hexdigest() != entry.get("x_T_sha256"):
        raise ValueError("holds records whose x_T does not regenerate bit-exactly from (seed, index) on this machine "
                         "(torch.randn's CPU kernels with and without AVX2, e.g. on ARM, differ in rare float16 "
                         "values); read it on a CPU with AVX2 or regenerate the data with codec_x_T=store")
    return x_T


def zstd_level(cfg, codec_class) -> int:
    """The configured zstd level; 0 means the codec's own."""
    return cfg["zstd_level"] or codec_class.DEFAULT_LEVEL


# The codec key's values (config_keys' choices for `codec`; a test keeps the two equal) and the class each one
# writes with; a manifest's codec is the first class that ``reads`` its name and version. A new codec is a class
# with ``from_config``, ``reads``, ``from_manifest``, ``encode``, ``pack`` and ``unpack``, and a line here.
CODECS = {"ef-int8": FeedbackCodec, "int8-p99.5": ReferenceCodec, "int8+zstd": ReferenceCodec}


def from_config(cfg):
    """The codec that ``generate`` writes with."""
    return CODECS[cfg["codec"]].from_config(cfg)


def from_manifest(described: dict, where) -> object:
    """The codec a manifest names; one sentence where this tool does not know it."""
    name, version = described.get("name"), described.get("version", 1)
    reader = next((c for c in dict.fromkeys(CODECS.values())
                   if isinstance(name, str) and isinstance(version, int) and c.reads(name, version)), None)
    if reader is None:
        raise UserError(f"{where} names codec {name!r} version {version}, which this tool does not read; update the "
                        f"tool or regenerate the data")
    return reader.from_manifest(described, where)


class ErrorTally:
    """How far the decoded records of one shard are from the floats they encode: the final state (start +
    every chunk, as the students read it), each chunk, and the image."""

    def __init__(self):
        self.samples, self.sums, self.max_abs = 0, {}, {}

    def add(self, traj: Trajectories, records: dict) -> None:
        # chunk by chunk: a latent batch's dequantised chunks at once would be a fresh 84 MB array per batch,
        # whose page faults cost more than the arithmetic (docs/design.md §15)
        final = decoded_start(records, traj.space)
        for k in range(records["r_chunks_q"].shape[1]):
            chunk = quant.dequantize(records["r_chunks_q"][:, k], records["r_chunks_scale_f16"][:, k])
            final += chunk
            self._add(f"chunk_{k}", np.subtract(chunk, traj.chunks[:, k], out=chunk))
        self._add("z_final", final - traj.z_final)
        self._add("x0", records["x0_teacher_f16"].astype(np.float32) - np.clip(traj.x0, -1, 1))
        self.samples += len(traj.x_T)

    def _add(self, key: str, error: np.ndarray) -> None:
        # float32 sums of one sample's values (tens of thousands at most), pooled in float64 across samples:
        # exact enough for 4 digits without a float64 copy of the batch (docs/design.md §15)
        flat = error.reshape(len(error), -1)
        squares = np.einsum("ni,ni->n", flat, flat).astype(np.float64).sum() / flat.shape[1]
        self.sums[key] = self.sums.get(key, 0.0) + float(squares)
        self.max_abs[key] = max(self.max_abs.get(key, 0.0), float(max(flat.max(), -flat.min())))

    def summary(self) -> dict:
        """Per-sample mean squared errors as RMSE (values per sample are equal within a folder)."""
        rmse = {key: float(np.sqrt(total / self.samples)) for key, total in self.sums.items()}
        chunks = sorted((key for key in rmse if key.startswith("chunk_")), key=lambda key: int(key[6:]))
        return {"samples": self.samples, "z_final_rmse": _round(rmse["z_final"]),
                "z_final_max_abs": _round(self.max_abs["z_final"]), "x0_rmse": _round(rmse["x0"]),
                "x0_max_abs": _round(self.max_abs["x0"]), "chunk_rmse": [_round(rmse[key]) for key in chunks]}


def _round(value: float) -> float:
    return float(f"{value:.4g}")


def combined(summaries: list):
    """One summary of several shards' error summaries (None where none has one)."""
    summaries = [s for s in summaries if isinstance(s, dict) and s.get("samples")]
    if not summaries:
        return None
    total = sum(s["samples"] for s in summaries)

    def pooled(values):
        return _round(float(np.sqrt(sum(v * v * s["samples"] for v, s in zip(values, summaries)) / total)))
    return {"samples": total, "z_final_rmse": pooled([s["z_final_rmse"] for s in summaries]),
            "z_final_max_abs": max(s["z_final_max_abs"] for s in summaries),
            "x0_rmse": pooled([s["x0_rmse"] for s in summaries]), "x0_max_abs": max(s["x0_max_abs"] for s in summaries),
            "chunk_rmse": [pooled(column) for column in zip(*(s["chunk_rmse"] for s in summaries))]}
