"""How version 3 of ef-int8 lays out its int8 codes in a shard (docs/design.md §15).

A chain's chunks, and the rows of Rin(x_T), resemble their neighbours, so their differences often take fewer
bits than the codes themselves. Differences are taken modulo 256, so they stay int8 and a running int8 sum gives
the codes back exactly.

    r_chunks_q_<k>          int8 [N, C, H, W]   chunk k's codes, or their difference from chunk k-1's
    r_chunks_q_differenced  uint8 [N, chunks]   1 where r_chunks_q_<k> holds the difference (never chunk 0)
    rin0_q_row_steps        int8 [N, C, H, W]   latent space: rin0's codes, each row less the row above
"""
import numpy as np

CHUNK_PREFIX = "r_chunks_q_"
DIFFERENCED = "r_chunks_q_differenced"
RIN0_ROW_STEPS = "rin0_q_row_steps"
ENTROPY_STRIDE = 7  # every 7th value is enough to tell which of two distributions has fewer bits


def chunk_key(chunk: int) -> str:
    return f"{CHUNK_PREFIX}{chunk}"


def is_chunk_key(key: str) -> bool:
    return key.startswith(CHUNK_PREFIX) and key[len(CHUNK_PREFIX):].isdigit()


def chunk_spec(dtype: str, chunks: int, shape: list) -> dict:
    return {**{chunk_key(k): (dtype, list(shape)) for k in range(chunks)}, DIFFERENCED: ("uint8", [chunks])}


def order0_bits(values: np.ndarray) -> float:
    """Bits per value of an order-0 code of (a sample of) int8 ``values``: what zstd's Huffman stage comes near."""
    sample = values.reshape(-1)[::ENTROPY_STRIDE].view(np.uint8)
    counts = np.bincount(sample, minlength=256)
    p = counts[counts > 0] / sample.size
    return float(-(p * np.log2(p)).sum())


def pack_chunks(codes: np.ndarray) -> dict:
    """One array per chunk of ``codes`` [N, chunks, C, H, W]: its codes, or their difference from the previous
    chunk's where that has fewer bits over the whole shard (the chain's later chunks; at coarse steps, where
    rounding decides more of each code, fewer of them)."""
    n, chunks = codes.shape[:2]
    stored, differenced = {}, np.zeros((n, chunks), np.uint8)
    for k in range(chunks):
        chunk = np.ascontiguousarray(codes[:, k])
        if k:
            difference = np.subtract(chunk, codes[:, k - 1])  # int8 arrays wrap
            if order0_bits(difference) < order0_bits(chunk):
                chunk, differenced[:, k] = difference, 1
        stored[chunk_key(k)] = chunk
    stored[DIFFERENCED] = differenced
    return stored


def unpack_chunks(stored: dict) -> np.ndarray:
    """The codes [N, chunks, C, H, W] that ``pack_chunks`` stored."""
    chunks = stored[DIFFERENCED].shape[1]  # checked against the manifest's record, unlike a count of keys
    first = stored[chunk_key(0)]
    codes = np.empty((len(first), chunks, *first.shape[1:]), np.int8)
    differenced = stored[DIFFERENCED].astype(bool).reshape(len(first), chunks, *[1] * (first.ndim - 1))
    for k in range(chunks):
        codes[:, k] = stored[chunk_key(k)]
        if k:
            np.add(codes[:, k - 1], codes[:, k], out=codes[:, k], where=differenced[:, k])
    return codes


def wrapped_steps(codes: np.ndarray, axis: int) -> np.ndarray:
    """int8 differences between neighbours along ``axis`` (the first kept as it is), modulo 256."""
    later, earlier = [slice(None)] * codes.ndim, [slice(None)] * codes.ndim
    later[axis], earlier[axis] = slice(1, None), slice(None, -1)
    steps = codes.copy()
    np.subtract(codes[tuple(later)], codes[tuple(earlier)], out=steps[tuple(later)])
    return steps


def wrapped_sum(steps: np.ndarray, axis: int) -> np.ndarray:
    """The codes whose ``wrapped_steps`` are ``steps``, added slice by slice (numpy's cumsum along an inner axis is
    5x slower on int8)."""
    codes = np.empty_like(steps)
    at = [slice(None)] * steps.ndim

    def part(array, j):
        at[axis] = j
        return array[tuple(at)]
    part(codes, 0)[...] = part(steps, 0)
    for j in range(1, steps.shape[axis]):
        np.add(part(codes, j - 1), part(steps, j), out=part(codes, j))
    return codes
