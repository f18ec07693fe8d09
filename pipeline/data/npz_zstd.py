"""The container of a shard and of a reference-layout file (docs/design.md §3): the bytes of an uncompressed
``np.savez`` archive as one zstd frame. Decoding bounds every allocation by what the records can take, so
damaged or hostile bytes are refused before numpy or zstd allocate what a header claims.
"""
import io
import math
import tokenize
import zipfile

import numpy as np
import zstandard

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
NPY_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


def encode_npz(arrays: dict, level: int, workers: int = 0) -> bytes:
    """Uncompressed ``np.savez`` bytes as one zstd frame (the frame records its content size). ``workers`` >= 1
    compresses on that many threads in zstd's multi-threaded mode, whose bytes are the same for every count
    >= 1 (so shards do not depend on the machine); 0 is the single-threaded mode (the reference's files)."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return zstandard.ZstdCompressor(level=level, threads=workers).compress(buf.getvalue())


def npz_bound(spec: dict, count: int) -> int:
    """An upper bound of the decoded bytes of ``count`` records of ``spec`` plus ``index``: the arrays and
    ample room for the zip and npy headers, so that damaged data never makes us allocate more."""
    arrays = sum(count * math.prod(shape) * np.dtype(dtype).itemsize for dtype, shape in spec.values())
    return arrays + 8 * count + (len(spec) + 1) * 70_000 + 65_536


def decode_npz(data: bytes, max_bytes: int) -> dict:
    """The arrays of a zstd-compressed npz of at most ``max_bytes`` decoded bytes, with or without the
    content size in its frame header (the reference's stream writer leaves it out). Damage raises
    ``ValueError`` whose text completes the sentence "<file> ...", before anything a damaged header
    claims is allocated (docs/design.md §3)."""
    raw = _decompress(data, max_bytes)
    try:
        archive = zipfile.ZipFile(io.BytesIO(raw))
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError) as err:
        raise ValueError(f"holds zstd data that is not an npz archive ({err})") from None
    with archive:
        for info in archive.infolist():
            problem = _member_problem(archive, info, len(raw))
            if problem:
                raise ValueError(f"has an npz member {info.filename} that {problem}")
    try:
        with np.load(io.BytesIO(raw), allow_pickle=False) as npz:
            return {key: npz[key] for key in npz.files}
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, KeyError, RuntimeError, NotImplementedError,
            tokenize.TokenError) as err:
        raise ValueError(f"cannot be read as an npz archive ({type(err).__name__}: {err})") from None


def _decompress(data: bytes, max_bytes: int) -> bytes:
    if data[:4] != ZSTD_MAGIC:
        raise ValueError("is not zstd data (it does not start with the zstd magic number)")
    try:
        declared = zstandard.frame_content_size(data)
    except zstandard.ZstdError as err:
        raise ValueError(f"has a damaged zstd frame header ({err})") from None
    if declared > max_bytes:  # -1 where the header does not say
        raise ValueError(f"claims {declared:,} decoded bytes in its zstd frame header, more than the "
                         f"{max_bytes:,} its records can take")
    try:  # the output buffer is bounded where the header gives no size
        return zstandard.ZstdDecompressor().decompress(data, max_output_size=max_bytes)
    except zstandard.ZstdError as err:
        raise ValueError(f"is not a complete zstd frame of at most {max_bytes:,} decoded bytes ({err})") from None


def _member_problem(archive: zipfile.ZipFile, info: zipfile.ZipInfo, archive_bytes: int):
    """What is wrong with one npz member's container or npy header, or None: checked before numpy
    allocates the array that the header claims."""
    if info.compress_type != zipfile.ZIP_STORED:
        return "is compressed (the format stores uncompressed np.savez members)"
    if info.compress_size != info.file_size or info.header_offset + info.file_size > archive_bytes:
        return f"claims {info.file_size:,} bytes, more than the archive holds"
    try:
        with archive.open(info) as member:
            version = np.lib.format.read_magic(member)
            read_header = NPY_HEADER_READERS.get(version)
            if read_header is None:
                return f"has npy format version {version}, not 1.0 or 2.0"
            shape, _, dtype = read_header(member)
            header_bytes = member.tell()
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, RuntimeError, NotImplementedError,
            tokenize.TokenError) as err:
        # RuntimeError / NotImplementedError: zip flags of encryption or an unknown zip version (damage);
        # TokenError: numpy reparses a header that is not a Python literal with the tokenizer (an unclosed bracket)
        return f"has no readable npy header ({type(err).__name__}: {err})"
    if dtype.hasobject:
        return "holds Python objects, which are never loaded"
    claimed = math.prod(shape) * dtype.itemsize
    if header_bytes + claimed != info.file_size:
        return (f"claims shape {list(shape)} of {dtype} ({claimed:,} bytes) but stores "
                f"{info.file_size - header_bytes:,} bytes of data")
    return None
