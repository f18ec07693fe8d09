"""``--mode verify`` checks a teacher-data folder against its manifest; ``--mode repair`` regenerates
the listed shards that are missing or damaged (records are a function of the generating config and
the sample index, so a repaired shard holds the records that were lost)."""
from tqdm import tqdm

from . import atomic, codec as codecs, store
from .errors import UserError
from .generate import Generator, codec_info, error_text, open_manifest
from .store import index_text


def find_problems(manifest):
    """[(file, indices, what is wrong)] for every problem of the folder; empty when all is well."""
    problems = []
    names = [s["file"] for s in manifest.shards]
    for name in sorted({n for n in names if names.count(n) > 1}):
        problems.append((name, "-", "is listed more than once"))
    for s in tqdm(manifest.shards, desc="verify", unit="shard", dynamic_ncols=True):
        if not store.SHARD_NAME.fullmatch(s["file"]):
            problems.append((s["file"], index_text(s["first_index"], s["count"]), "is not a shard file name"))
            continue
        problem = store.shard_problem(manifest, s)
        if problem:
            problems.append((s["file"], index_text(s["first_index"], s["count"]), problem))
    problems += store.coverage_problems(manifest.shards)
    totals = manifest.data.get("totals")
    if not isinstance(totals, dict) or totals.get("samples") != sum(s["count"] for s in manifest.shards):
        problems.append((store.MANIFEST, "-", "totals.samples does not match the shards listed"))
    return problems


def verify_command(cfg):
    manifest = store.load_manifest(cfg)
    problems = find_problems(manifest)
    for name in store.stray_files(manifest):
        print(f"[verify] note: {name} is not listed in the manifest (left by an interrupted run; generate replaces it)")
    for file, indices, what in problems:
        print(f"[verify] BAD {file} ({indices}): {what}")
    totals = manifest.data["totals"]
    if problems:
        raise UserError(f"{len(problems)} problem(s) in {manifest.folder}, first: {problems[0][0]} "
                        f"{problems[0][2]}; {store.damage_advice(manifest)}")
    print(f"[verify] OK: {len(manifest.shards)} shard(s), {totals['samples']} samples (indices 0..{totals['samples'] - 1}), "
          f"{totals['bytes']:,} bytes, codec {manifest.data['codec'].get('name')}")
    error = codecs.combined([s.get("codec_error") for s in manifest.shards])
    print(f"[verify] codec error measured when encoding: {error_text(error)}" if error else
          "[verify] codec error: not recorded (data written or imported before shards recorded it)")


def repair(cfg):
    manifest = store.load_manifest(cfg)
    if store.is_imported(manifest):
        raise UserError(f"{manifest.folder} was imported from {manifest.data['generator'].get('reference_dir')}, "
                        f"so its records cannot be regenerated; import that folder again into a new data_dir")
    problem = store.layout_problem(manifest)
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
        with tqdm(total=sum(s["count"] for s in damaged), desc="repair", unit="sample", dynamic_ncols=True) as bar:
            for s in damaged:
                number = int(store.SHARD_NAME.fullmatch(s["file"]).group(1))
                gen.write_shard(manifest, number, s["first_index"], s["count"], bar)
                bar.write(f"[repair] rewrote {s['file']} ({index_text(s['first_index'], s['count'])})")
