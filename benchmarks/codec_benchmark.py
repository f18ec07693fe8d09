"""Rate against distortion of the record codecs on the same real trajectories (issue targets, BENCHMARKS.md).

The embedded teacher (or, with ``--rnet``, the ring of an RNet in latent space) makes ``--samples`` float
trajectories once (cached under ``--out``); every codec variant then encodes them in shards of
``shard_size`` and is measured: bytes per sample of the compressed shards, z_final RMSE and max abs error
of the decoded records (start + every chunk, as the students read them), per-chunk RMSE, image RMSE,
encode and read time per sample. Variants: the reference codec (int8-p99.5), the same quantizer with
absmax scales, and ef-int8 at every ``--steps`` value (x_T regenerated) in this tool's version and in
version 2 (position-major codes at zstd level 10), plus ef-int8 at the default step with x_T stored and at
zstd level 10 (and, in pixel space, version 1). Every codec compresses at its own level (``zstd_level``
0) unless one is set. Writes ``rows.jsonl``, a markdown table and ``rate_distortion-<space>.png`` (needs
matplotlib: ``pip install matplotlib``).

Usage: .venv/bin/python benchmarks/codec_benchmark.py [--config fashion_mnist] [--samples 512]
           [--rnet FOLDER] [--steps 0.01,0.02,...] [--out SampledImgs/codec_benchmark] [key=value ...]
"""
import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pipeline.core import config, cpu, runtime
from pipeline.core.errors import UserError
from pipeline.data import codec as codecs, store
from pipeline.data.generate import CONTENT_KEYS, Generator
from pipeline.teacher import spaces

DEFAULT_STEPS = "0.005,0.01,0.02,0.035,0.05,0.1,0.2,0.4"


def load_trajectories(cfg, samples: int, out: Path) -> codecs.Trajectories:
    """The float trajectories of indices 0..samples-1, computed once and cached beside the results; the cache's
    name holds the generator's identity (teacher and RNet weights, steps, seed...), so another teacher recomputes."""
    space = cfg["space"]
    gen = Generator(cfg)
    identity = store.sha256(json.dumps({k: gen.generator.get(k) for k in CONTENT_KEYS}, sort_keys=True).encode())
    cache = out / f"trajectories-{space}-{cfg['steps']}x{cfg['chunks']}-{samples}-{identity[:12]}.npz"
    if cache.is_file():
        with np.load(cache) as saved:
            fields = {k: saved[k] for k in ("x_T", "start", "chunks", "z_final", "x0")}
            meta = saved["meta"].tolist()
        return codecs.Trajectories(**fields, T=meta[0], chunk_size=meta[1], space=spaces.SPACES[space])
    parts = []
    for lo in tqdm(range(0, samples, cfg["gen_batch_size"]), desc=f"trajectories ({space})", unit="batch"):
        parts.append(gen.trajectories(np.arange(lo, min(samples, lo + cfg["gen_batch_size"]))))
    fields = {k: np.concatenate([getattr(p, k) for p in parts]) for k in ("x_T", "start", "chunks", "z_final", "x0")}
    out.mkdir(parents=True, exist_ok=True)
    np.savez(cache, **fields, meta=np.array([parts[0].T, parts[0].chunk_size]))
    print(f"[codec] teacher {gen.seconds['teacher'] / samples * 1000:.1f} ms/sample for the trajectories")
    return codecs.Trajectories(**fields, T=parts[0].T, chunk_size=parts[0].chunk_size, space=spaces.SPACES[space])


def rows_of(traj: codecs.Trajectories, lo: int, hi: int) -> codecs.Trajectories:
    return codecs.Trajectories(*(getattr(traj, k)[lo:hi] for k in ("x_T", "start", "chunks", "z_final", "x0")),
                               T=traj.T, chunk_size=traj.chunk_size, space=traj.space)


def variants(cfg, steps):
    """(row name, step, codec): zstd_level=0 (the default) gives each codec its own level."""
    p, default = cfg["percentile"], cfg["codec_step"]
    reference_level = codecs.zstd_level(cfg, codecs.ReferenceCodec)
    level = codecs.zstd_level(cfg, codecs.FeedbackCodec)
    found = [("int8-p99.5 (reference)", None, codecs.ReferenceCodec(p, reference_level)),
             ("int8 absmax, no feedback", None, codecs.ReferenceCodec(100, reference_level))]
    found += [(f"ef-int8 step {s:g}", s, codecs.FeedbackCodec(s, "regenerate", p, level)) for s in steps]
    # version 2 as it was written: chunk codes position-major, zstd level 10
    found += [(f"ef-int8 version 2 step {s:g}", s, codecs.FeedbackCodec(s, "regenerate", p, 10, version=2))
              for s in steps]
    found += [(f"ef-int8 step {default:g}, x_T stored", default, codecs.FeedbackCodec(default, "store", p, level)),
              (f"ef-int8 step {default:g}, zstd level 10", default, codecs.FeedbackCodec(default, "regenerate", p, 10))]
    if spaces.of_config(cfg).image_is_end:  # version 1 derived the image from the decoded end state
        found.append((f"ef-int8 step {default:g}, image derived (version 1)", default,
                      codecs.FeedbackCodec(default, "regenerate", p, 10, version=1)))
    return found


def measure(name, step, codec, traj, cfg, generator):
    """One row: bytes, errors and times of ``codec`` on every trajectory, shard by shard."""
    n, shard = len(traj.x_T), cfg["shard_size"]
    tally, payloads, encode_s, read_s = codecs.ErrorTally(), [], 0.0, 0.0
    for lo in range(0, n, shard):
        part = rows_of(traj, lo, min(n, lo + shard))
        start = time.perf_counter()
        records = dict(codec.encode(part), index=np.arange(lo, lo + len(part.x_T)))
        stored, extra = codec.pack(records, traj.space)
        payload = store.encode_npz(stored, codec.zstd_level)
        encode_s += time.perf_counter() - start
        tally.add(part, records)
        start = time.perf_counter()
        spec = {k: (str(v.dtype), list(v.shape[1:])) for k, v in stored.items() if k != "index"}
        back = codec.unpack(store.decode_npz(payload, store.npz_bound(spec, len(part.x_T))), generator, extra)
        read_s += time.perf_counter() - start
        if not all(np.array_equal(back[k], records[k]) for k in records):
            raise UserError(f"codec {name} did not decode its own records; this is a bug")
        payloads.append(len(payload))
    return {"codec": name, "step": step, "space": cfg["space"], "samples": n,
            "bytes_per_sample": sum(payloads) / n, **tally.summary(),
            "encode_ms_per_sample": 1000 * encode_s / n, "read_ms_per_sample": 1000 * read_s / n}


def table(rows, reference) -> str:
    lines = ["| codec | bytes/sample | × fewer than reference | z_final RMSE | z_final max abs | chunk RMSE "
             "(first..last) | image RMSE | encode ms/sample | read ms/sample |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['codec']} | {r['bytes_per_sample']:,.0f} | {reference / r['bytes_per_sample']:.2f} | "
                     f"{r['z_final_rmse']:.4g} | {r['z_final_max_abs']:.4g} | {r['chunk_rmse'][0]:.3g}..{r['chunk_rmse'][-1]:.3g} | "
                     f"{r['x0_rmse']:.3g} | {r['encode_ms_per_sample']:.2f} | {r['read_ms_per_sample']:.2f} |")
    return "\n".join(lines)


def plot(rows, path: Path, title: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("[codec] matplotlib is not installed, so no plot was drawn: .venv/bin/python -m pip install matplotlib")
        return
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    curves = {f"ef-int8 version {codecs.FeedbackCodec.VERSION} (steps)": "ef-int8 step ",
              "ef-int8 version 2 (steps)": "ef-int8 version 2 step "}
    on_curves = []
    for label, prefix in curves.items():
        curve = [r for r in rows if r["codec"].startswith(prefix) and "," not in r["codec"]]
        ax.plot([r["bytes_per_sample"] for r in curve], [r["z_final_rmse"] for r in curve], "o-", label=label)
        on_curves += curve
    for r in rows:
        if r not in on_curves:
            ax.plot(r["bytes_per_sample"], r["z_final_rmse"], "s", label=r["codec"])
    ax.set(xscale="log", yscale="log", xlabel="bytes per sample (zstd shards)", ylabel="z_final RMSE", title=title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    print(f"[codec] plot: {path}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="fashion_mnist")
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--rnet", default="", help="an RNet folder: measure latent-space trajectories of its ring")
    parser.add_argument("--steps", default=DEFAULT_STEPS, help="ef-int8 steps to measure (comma-separated)")
    parser.add_argument("--out", default="SampledImgs/codec_benchmark")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    extra = ["space=latent", f"rnet_path={args.rnet}"] if args.rnet else []
    cfg = config.resolve(args.config, [*args.overrides, *extra])
    out = Path(args.out)
    traj = load_trajectories(cfg, args.samples, out)
    generator = {"seed": cfg["seed"], "image_shape": list(traj.x_T.shape[1:]), "space": cfg["space"]}
    rows = [measure(*v, traj, cfg, generator) for v in tqdm(variants(cfg, [float(s) for s in args.steps.split(",")]),
                                                               desc="codecs", unit="codec")]
    machine = f"{platform.machine()}, {cpu.model_name()}, {os.cpu_count()} cores"
    with open(out / "rows.jsonl", "a") as f:
        for r in rows:
            f.write(json.dumps(dict(r, machine=machine, date=time.strftime("%Y-%m-%d"),
                                    command="benchmarks/codec_benchmark.py " + " ".join(sys.argv[1:]))) + "\n")
    print(f"{machine}, {time.strftime('%Y-%m-%d')}, {args.samples} trajectories of {cfg['name']} ({cfg['space']} "
          f"space, {cfg['steps']} steps, {cfg['chunks']} chunks, shards of {cfg['shard_size']})")
    print(table(rows, rows[0]["bytes_per_sample"]))
    plot(rows, out / f"rate_distortion-{cfg['space']}.png", f"{cfg['name']}, {cfg['space']} space, N = {args.samples}")


if __name__ == "__main__":
    try:
        main()
    except UserError as err:
        sys.exit(f"error: {err}")
