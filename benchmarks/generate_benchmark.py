"""Figures of ``generate`` on the embedded teacher (issue targets, written to BENCHMARKS.md):

* overhead of encode + compress + write against the time spent in teacher calls, same run;
* bytes per sample and compression ratios on real trajectories; zstd MB/s; decoding through the tool's
  reader (checks, decompression, the codec's unpacking, x_T regenerated) in ms per shard;
* peak memory (max RSS) of a generate process at 1x and 4x ``samples_total``.

Usage: .venv/bin/python benchmarks/generate_benchmark.py [--samples 64] [--config fashion_mnist] [key=value ...]
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import zstandard

from pipeline.core import cpu, runtime
from pipeline.data import store

ROOT = Path(__file__).resolve().parent.parent

CHILD = """
import json, resource, sys
from pipeline.core import config
from pipeline.data import generate
cfg = config.resolve(sys.argv[1], sys.argv[2:])
folder, seconds = generate.generate(cfg)
print("RESULT " + json.dumps({"seconds": seconds, "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def run_generate(config_name, overrides):
    out = subprocess.run([sys.executable, "-c", CHILD, config_name, *overrides], cwd=ROOT, capture_output=True,
                         text=True, check=False)
    if out.returncode:
        sys.exit(f"generate failed:\n{out.stderr[-2000:]}")
    line = next(l for l in out.stdout.splitlines() if l.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def codec_figures(folder: Path):
    """Sizes and codec speed measured on the shards just written."""
    manifest = json.loads((folder / "manifest.json").read_text())
    level = manifest["codec"]["zstd_level"]
    compressed = [(folder / s["file"]).read_bytes() for s in manifest["shards"]]
    raw = [zstandard.ZstdDecompressor().decompress(c) for c in compressed]
    start = time.perf_counter()
    for r in raw:
        zstandard.ZstdCompressor(level=level).compress(r)
    encode_s = time.perf_counter() - start
    start = time.perf_counter()
    for c in compressed:
        zstandard.ZstdDecompressor().decompress(c)
    decompress_s = time.perf_counter() - start
    reader = store.Manifest.load(folder)
    start = time.perf_counter()
    records = [reader.read_shard(entry) for entry in reader.shards]
    read_s = time.perf_counter() - start
    n = manifest["totals"]["samples"]
    per_sample_fp32 = sum(a[0].size * 4 for k, a in records[0].items() if k not in ("index", "T", "chunk_size")
                          and not k.endswith("scale_f16"))
    raw_bytes, comp_bytes = sum(map(len, raw)), sum(map(len, compressed))
    return {"samples": n, "bytes_per_sample": comp_bytes / n, "npz_bytes_per_sample": raw_bytes / n,
            "fp32_bytes_per_sample": per_sample_fp32, "zstd_ratio": raw_bytes / comp_bytes,
            "ratio_vs_fp32": per_sample_fp32 / (comp_bytes / n),
            "zstd_encode_mb_s": raw_bytes / 1e6 / encode_s, "zstd_decode_mb_s": raw_bytes / 1e6 / decompress_s,
            "read_shard_ms": 1000 * read_s / len(compressed), "read_ms_per_sample": 1000 * read_s / n}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=64, help="samples_total of the 1x run (the 4x run uses 4 times)")
    parser.add_argument("--config", default="fashion_mnist")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        runs = {}
        for factor in (1, 4):
            folder = Path(tmp) / f"x{factor}"
            runs[factor] = run_generate(args.config, [*args.overrides, f"samples_total={factor * args.samples}",
                                                      f"data_dir={folder}"])
        seconds = runs[4]["seconds"]
        codec_s = seconds["encode"] + seconds["compress"] + seconds["write"]
        figures = {
            "machine": f"{platform.machine()}, {cpu.model_name()}, {os.cpu_count()} cores",
            "date": time.strftime("%Y-%m-%d"),
            "command": "benchmarks/generate_benchmark.py " + " ".join(sys.argv[1:]),
            "teacher_seconds": seconds["teacher"], "encode_seconds": seconds["encode"],
            "compress_seconds": seconds["compress"], "write_seconds": seconds["write"],
            "overhead_percent_of_teacher": 100 * codec_s / seconds["teacher"],
            "teacher_seconds_per_sample": seconds["teacher"] / (4 * args.samples),
            **codec_figures(Path(tmp) / "x4"),
            "max_rss_mib_1x": runs[1]["max_rss_mib"], "max_rss_mib_4x": runs[4]["max_rss_mib"],
        }
    for key, value in figures.items():
        print(f"{key:>30}: {value:,.3f}" if isinstance(value, float) else f"{key:>30}: {value}")


if __name__ == "__main__":
    main()
