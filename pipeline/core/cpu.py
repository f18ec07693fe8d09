"""What kind of CPU this is, read from /proc/cpuinfo without importing torch (docs/design.md §16).

One choice depends on it: the autocast precision (``precision=auto``: bf16 only with native bf16 instructions).
The benchmarks print the kind, named as they name the machines they ran on, because speed figures differ by kind.
"""
import functools
import platform
from pathlib import Path

AMX = "amx"  # Intel Sapphire Rapids and later: bf16 tile instructions
AVX512_BF16 = "avx512_bf16"  # AMD Zen 4 and later: bf16 dot products on AVX-512, no tiles
AVX2 = "avx2"  # AVX2 without native bf16 (e.g. the older EPYCs): autocast to bf16 is ~20x slower, so fp32
OTHER = "other"  # anything else (another architecture, or no /proc/cpuinfo)

DESCRIPTIONS = {AMX: "AMX (bf16 tiles)", AVX512_BF16: "AVX-512 bf16 without AMX", AVX2: "AVX2 without native bf16",
                OTHER: "no AVX2 or flags unreadable"}


@functools.lru_cache(maxsize=1)  # read once: launch.plan, launch.describe and autocast all ask
def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def flags() -> set:
    """The first processor's feature flags (every core of these machines has the same)."""
    for line in _cpuinfo().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def kind(cpu_flags=None) -> str:
    """One of AMX, AVX512_BF16, AVX2 or OTHER, the strongest instruction set the flags name."""
    cpu_flags = flags() if cpu_flags is None else cpu_flags
    if "amx_bf16" in cpu_flags:
        return AMX
    if "avx512_bf16" in cpu_flags:
        return AVX512_BF16
    return AVX2 if "avx2" in cpu_flags else OTHER


def has_fast_bf16(cpu_flags=None) -> bool:
    """bf16 matmuls are only fast with native instructions; without them autocast is ~20x slower than fp32
    (measured on an AVX2-only EPYC: 16 s against 0.85 s per UNet training step)."""
    return kind(cpu_flags) in (AMX, AVX512_BF16)


def model_name() -> str:
    """The CPU's model name, as benchmarks name the machine they ran on."""
    for line in _cpuinfo().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown cpu"
