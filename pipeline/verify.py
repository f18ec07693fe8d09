"""``--mode verify`` checks a teacher-data folder against its manifest; ``--mode repair`` regenerates
the listed shards that are missing or damaged (records are a function of the generating config and
the sample index, so a repaired shard holds the records that were lost)."""
from tqdm import tqdm

from . import atomic, store
from .config import output_dir
from .errors import UserError


def _index_text(first, count):
    return f"indices {first}..{first + count - 1}"


def coverage_problems(shards):
    """Gaps and overlaps of the shards' index ranges against 0..N-1."""
    problems, expected = [], 0
    for s in sorted(shards, key=lambda s: s["first_index"]):
        if s["first_index"] > expected:
            problems.append(("-", _index_text(expected, s["first_index"] - expected), "are in no shard"))
        elif s["first_index"] < expected:
            overlap = min(expected, s["first_index"] + s["count"]) - s["first_index"]
            problems.append((s["file"], _index_text(s["first_index"], overlap), "are also in an earlier shard"))
        expected = max(expected, s["first_index"] + s["count"])
    return problems


def find_problems(manifest):
    """[(file, indices, what is wrong)] for every problem of the folder; empty when all is well."""
    problems = []
    names = [s["file"] for s in manifest.shards]
    for name in sorted({n for n in names if names.count(n) > 1}):
        problems.append((name, "-", "is listed more than once"))
    for s in tqdm(manifest.shards, desc="verify", unit="shard", dynamic_ncols=True):
        if not store.SHARD_NAME.fullmatch(s["file"]):
            problems.append((s["file"], _index_text(s["first_index"], s["count"]), "is not a shard file name"))
            continue
        problem = store.shard_problem(manifest, s)
        if problem:
            problems.append((s["file"], _index_text(s["first_index"], s["count"]), problem))
    problems += coverage_problems(manifest.shards)
    totals = manifest.data.get("totals")
    if not isinstance(totals, dict) or totals.get("samples") != sum(s["count"] for s in manifest.shards):
        problems.append((store.MANIFEST, "-", "totals.samples does not match the shards listed"))
    return problems


def layout_problem(manifest):
    """The first problem of the shard list itself (names, gaps, overlaps), as text, or None."""
    bad_name = next((s["file"] for s in manifest.shards if not store.SHARD_NAME.fullmatch(s["file"])), None)
    if bad_name:
        return f"lists '{bad_name}', which is not a shard file name"
    problems = coverage_problems(manifest.shards)
    if problems:
        return f"lists shards whose {problems[0][1]} {problems[0][2]}"
    names = [s["file"] for s in manifest.shards]
    if len(set(names)) != len(names):
        return "lists a shard file more than once"
    return None


def stray_files(manifest):
    listed = {s["file"] for s in manifest.shards}
    return sorted(p.name for p in manifest.folder.glob(store.SHARD_PATTERN) if p.name not in listed)


def load_manifest(cfg):
    folder = output_dir(cfg, "data_dir", "data")
    manifest = store.Manifest.load(folder)
    if manifest is None:
        raise UserError(f"{folder} has no {store.MANIFEST}; generate data there first or set data_dir=")
    return manifest


def verify_command(cfg):
    manifest = load_manifest(cfg)
    problems = find_problems(manifest)
    for name in stray_files(manifest):
        print(f"[verify] note: {name} is not listed in the manifest (left by an interrupted run; generate replaces it)")
    for file, indices, what in problems:
        print(f"[verify] BAD {file} ({indices}): {what}")
    totals = manifest.data["totals"]
    if problems:
        raise UserError(f"{len(problems)} problem(s) in {manifest.folder}, first: {problems[0][0]} "
                        f"{problems[0][2]}; run '--mode repair' with the generating config to regenerate damaged shards")
    print(f"[verify] OK: {len(manifest.shards)} shard(s), {totals['samples']} samples (indices 0..{totals['samples'] - 1}), "
          f"{totals['bytes']:,} bytes, codec {manifest.data['codec'].get('name')}")


def repair(cfg):
    from .generate import Generator, open_manifest, codec_info
    manifest = load_manifest(cfg)
    problem = layout_problem(manifest)
    if problem:
        raise UserError(f"{manifest.folder / store.MANIFEST} {problem}, so it was edited by hand; restore it or "
                        f"regenerate the folder")
    damaged = [s for s in manifest.shards if store.shard_problem(manifest, s)]
    if not damaged:
        print(f"[repair] nothing to repair in {manifest.folder}")
        return
    gen = Generator(cfg)
    with atomic.folder_lock(manifest.folder, "run"):
        manifest = open_manifest(manifest.folder, cfg, codec_info(cfg), gen.generator, gen.spec)
        bar = tqdm(total=sum(s["count"] for s in damaged), desc="repair", unit="sample", dynamic_ncols=True)
        for s in damaged:
            number = int(store.SHARD_NAME.fullmatch(s["file"]).group(1))
            gen.write_shard(manifest, number, s["first_index"], s["count"], bar)
            print(f"[repair] rewrote {s['file']} ({_index_text(s['first_index'], s['count'])})")
        bar.close()
