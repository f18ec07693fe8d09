"""``--mode verify`` checks a teacher-data folder against its manifest; ``--mode repair`` regenerates
the listed shards that are missing or damaged (records are a function of the generating config and
the sample index, so a repaired shard holds the records that were lost)."""
import contextlib

from tqdm import tqdm

from ..core import atomic, distributed
from ..core.config import output_dir
from ..core.errors import UserError
from . import codec as codecs, store
from .generate import Generator, codec_info, error_text, open_manifest, write_rounds
from .store import index_text


def find_problems(manifest):
    """[(file, indices, what is wrong)] for every problem of the folder; empty when all is well. Under torchrun
    each rank reads its share of the shards and every rank gets the whole list."""
    problems = []
    names = [s["file"] for s in manifest.shards]
    for name in sorted({n for n in names if names.count(n) > 1}):
        problems.append((name, "-", "is listed more than once"))
    mine = manifest.shards[distributed.rank()::distributed.world()]
    shard_problems = []
    for s in tqdm(mine, desc="verify", unit="shard", dynamic_ncols=True, disable=not distributed.is_main()):
        problem = store.shard_problem(manifest, s)
        if problem:
            shard_problems.append((s["file"], index_text(s["first_index"], s["count"]), problem))
    found = [p for part in distributed.gather(shard_problems) for p in part]
    order = {s["file"]: i for i, s in enumerate(manifest.shards)}
    problems += sorted(found, key=lambda p: order.get(p[0], -1))
    problems += store.coverage_problems(manifest.shards)
    if totals_wrong(manifest):
        problems.append((store.MANIFEST, "-", "totals.samples does not match the shards listed"))
    return problems


def totals_wrong(manifest) -> bool:
    totals = manifest.data.get("totals")
    return not isinstance(totals, dict) or totals.get("samples") != sum(s["count"] for s in manifest.shards)


def verify_command(cfg):
    with distributed.together():
        manifest = store.load_manifest(cfg)
    problems = find_problems(manifest)
    if not distributed.is_main():  # rank 0 reports for every rank; all exit alike
        if problems:
            raise distributed.RankFailed(f"{len(problems)} problem(s) in {manifest.folder}")
        return
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
    """Regenerate the damaged shards; under torchrun the ranks share them and rank 0 writes the manifest."""
    with contextlib.ExitStack() as held:
        with distributed.together():
            gen = Generator(cfg)
            manifest, damaged = None, None
            if distributed.is_main():
                manifest, damaged = damaged_shards(cfg, gen, held)
        damaged, described = distributed.broadcast((damaged, manifest.data["codec"] if manifest else None))
        if not damaged:
            return
        gen.use_folder_codec(described, output_dir(cfg, "data_dir"))
        todo = [(int(store.SHARD_NAME.fullmatch(s["file"]).group(1)), s["first_index"], s["count"]) for s in damaged]

        def say(folder, entry, seconds):
            bar.write(f"[repair] rewrote {entry['file']} ({index_text(entry['first_index'], entry['count'])})")
        with tqdm(total=sum(s["count"] for s in damaged), desc="repair", unit="sample", dynamic_ncols=True,
                  disable=manifest is None) as bar:
            write_rounds(output_dir(cfg, "data_dir"), gen, manifest, todo, bar, on_listed=say)


def damaged_shards(cfg, gen, held):
    """(manifest, the listed shards that are missing or damaged) of the configured folder, its lock taken
    into ``held`` when there is anything to repair."""
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
        if totals_wrong(manifest):  # verify's advice for every problem is repair: the totals are recounted here
            with atomic.folder_lock(manifest.folder, "run"):
                manifest.save()
            print(f"[repair] recounted the totals of {manifest.folder / store.MANIFEST}")
        else:
            print(f"[repair] nothing to repair in {manifest.folder}")
        return manifest, []
    held.enter_context(atomic.folder_lock(manifest.folder, "run"))
    return open_manifest(manifest.folder, cfg, codec_info(cfg), gen.generator, gen.spec), damaged
