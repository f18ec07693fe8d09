"""The reference's one-file-per-sample layout: files written exactly as the reference's writer does
are imported, the reference's reader reads our exports, imported data trains, and every malformed
file is refused with one sentence naming it, wherever it sits in the folder."""
import io
import json
import re

import numpy as np
import pytest
import zstandard

from pipeline.core import atomic, config
from pipeline.core.errors import UserError
from pipeline.data import generate, reference_layout, store, verify

from conftest import (assert_one_sentence_error, npz_with_absurd_header, read_folder, read_records, run_cli,
                      run_distill_in_process)

KEYS = ("x_T_f16", "x0_teacher_f16", "rin0_q", "rin0_scale_f16", "r_chunks_q", "r_chunks_scale_f16", "T", "chunk_size")


def reference_sample(index, chunks=5, channels=1, size=32, T=1000):
    """One sample with the reference's keys, dtypes and shapes (content random but consistent)."""
    rng = np.random.default_rng(index)
    return {"x_T_f16": rng.standard_normal((channels, size, size)).astype(np.float16),
            "x0_teacher_f16": rng.uniform(-1, 1, (channels, size, size)).astype(np.float16),
            "rin0_q": rng.integers(-127, 128, (channels, size, size), dtype=np.int8),
            "rin0_scale_f16": rng.uniform(0.01, 0.05, channels).astype(np.float16),
            "r_chunks_q": rng.integers(-127, 128, (chunks, channels, size, size), dtype=np.int8),
            "r_chunks_scale_f16": rng.uniform(0.001, 0.01, (chunks, channels)).astype(np.float16),
            "T": np.array([T], np.int16), "chunk_size": np.array([T // chunks], np.int16)}


def write_like_the_reference(path, payload):
    """The reference writer's calls: np.savez into memory, then a level-10 zstd stream writer (whose frame
    records no content size). ``payload`` is a dict of arrays, or raw bytes to compress as they are."""
    if isinstance(payload, dict):
        buf = io.BytesIO()
        np.savez(buf, **payload)
        payload = buf.getvalue()
    with open(path, "wb") as f:
        with zstandard.ZstdCompressor(level=10).stream_writer(f) as compressor:
            compressor.write(payload)


def reference_folder(folder, count=5):
    folder.mkdir(parents=True)
    samples = [reference_sample(i) for i in range(count)]
    for i, sample in enumerate(samples):
        write_like_the_reference(folder / f"sample_{i:08d}.zst", sample)
    return samples


def _import(ref, data, *extra):
    return run_cli("Main_Distill.py", "--mode", "import", "--config", "tiny", f"reference_dir={ref}",
                   f"data_dir={data}", "shard_size=2", *extra)


def test_files_written_by_the_reference_writer_are_imported(tmp_path):
    ref, data = tmp_path / "ref", tmp_path / "data"
    samples = reference_folder(ref)
    assert zstandard.frame_content_size((ref / "sample_00000000.zst").read_bytes()) == -1  # size not recorded
    result = _import(ref, data)
    assert result.returncode == 0, result.stderr
    imported = read_folder(data)
    np.testing.assert_array_equal(imported["index"], np.arange(5))
    for key in KEYS:
        np.testing.assert_array_equal(imported[key], np.stack([s[key] for s in samples]), err_msg=key)
        assert imported[key].dtype == samples[0][key].dtype, key
    manifest = json.loads((data / "manifest.json").read_text())
    assert [(s["first_index"], s["count"]) for s in manifest["shards"]] == [(0, 2), (2, 2), (4, 1)]
    generator = manifest["generator"]
    assert generator["source"] == store.IMPORTED and generator["teacher_sha256"] is None
    assert (generator["chunks"], generator["T"], generator["chunk_size"], generator["image_shape"]) == (5, 1000, 200,
                                                                                                        [1, 32, 32])
    assert not (tmp_path / "data.importing").exists()


@pytest.fixture(scope="module")
def exported(tmp_path_factory, small_teacher):
    """(config, data folder, its export) of 12 generated records, made once; tests only read them."""
    root = tmp_path_factory.mktemp("exported")
    cfg = config.resolve("tiny", [f"teacher_path={small_teacher}", f"data_dir={root / 'data'}"])
    folder, _ = generate.generate(cfg)
    reference_layout.export_command(dict(cfg, reference_dir=str(root / "ref")))
    return cfg, folder, root / "ref"


def test_the_reference_reader_reads_our_export(exported):
    """What the reference's QuantChunkDataset does with a file: stream_reader(f).read(), then np.load."""
    _, folder, ref = exported
    ours = read_records(folder)
    files = sorted(p for p in ref.iterdir() if p.name.endswith(".zst"))
    assert [p.name for p in files] == [f"sample_{i:08d}.zst" for i in range(12)]
    for i, path in enumerate(files):
        with open(path, "rb") as f, zstandard.ZstdDecompressor().stream_reader(f) as reader:
            raw = reader.read()
        sample = dict(np.load(io.BytesIO(raw)))
        assert sorted(sample) == sorted(KEYS)
        for key in KEYS:
            np.testing.assert_array_equal(sample[key], ours[key][i], err_msg=key)
            assert sample[key].dtype == ours[key].dtype, key
        assert sample["r_chunks_q"].shape == (5, 1, 32, 32) and sample["T"].tolist() == [1000]


def test_export_then_import_gives_the_same_records(exported, tmp_path):
    cfg, folder, ref = exported
    back = tmp_path / "imported"
    reference_layout.import_command(dict(cfg, reference_dir=str(ref), data_dir=str(back), shard_size=4))
    original, imported = read_records(folder), read_records(back)
    assert sorted(imported) == sorted(original)
    for key in original:
        np.testing.assert_array_equal(imported[key], original[key], err_msg=key)
    assert [s["count"] for s in store.Manifest.load(back).shards] == [4, 4, 4]
    with pytest.raises(UserError, match="was imported from .*, so its records cannot be regenerated"):
        verify.repair(dict(cfg, data_dir=str(back)))


def test_interrupted_export_is_not_a_dataset_and_rerunning_finishes_it(exported, tmp_path):
    cfg, _, _ = exported
    ref = tmp_path / "reference"
    partial = tmp_path / "reference.partial"
    partial.mkdir()
    (partial / atomic.STAGING_MARKER).write_text("")  # the first thing an export writes
    (partial / "sample_00000000.zst").write_bytes(b"left by a killed export")
    with pytest.raises(UserError, match="reference_dir .* does not exist"):
        reference_layout.import_command(dict(cfg, reference_dir=str(ref), data_dir=str(tmp_path / "x")))
    reference_layout.export_command(dict(cfg, reference_dir=str(ref)))
    assert len(list(ref.glob("sample_*.zst"))) == 12 and not partial.exists()


def test_imported_data_trains_once_its_teacher_is_named(exported, small_teacher, tmp_path, capsys):
    _, folder, ref = exported

    def cli(*args):  # the command line's front end, in this process: five stages without five interpreters
        return run_distill_in_process(capsys, *args)

    def import_into(data, *extra):
        return cli("--mode", "import", "--config", "tiny", f"reference_dir={ref}", f"data_dir={data}", "shard_size=2",
                   *extra)
    train = ["--mode", "train_d", "--config", "tiny", f"teacher_path={small_teacher}", "d_train_steps=2",
             "d_checkpoint_every=2", "data_workers=0"]
    unnamed = tmp_path / "unnamed"
    assert import_into(unnamed).returncode == 0
    refused = cli(*train, f"data_dir={unnamed}", f"d_run_dir={tmp_path / 'run0'}")
    assert_one_sentence_error(refused, str(unnamed), "without naming the teacher", "import_teacher=")
    named = tmp_path / "named"
    result = import_into(named, f"import_teacher={small_teacher}")
    assert result.returncode == 0, result.stderr
    made, imported = (json.loads((f / "manifest.json").read_text())["generator"] for f in (folder, named))
    for key in ("teacher_sha256", "space", "chunks", "T", "chunk_size", "image_shape", "latent_channels", "scheduler"):
        assert imported[key] == made[key], key
    assert imported["teacher"] == str(small_teacher) and imported["steps"] is None
    trained = cli(*train, f"data_dir={named}", f"d_run_dir={tmp_path / 'run'}")
    assert trained.returncode == 0, trained.stderr
    assert (tmp_path / "run" / "student" / "model.safetensors").is_file()
    # the later stages too: binarize from that D, and eval_d, which times the teacher with the config's steps
    later = [f"data_dir={named}", f"d_run_dir={tmp_path / 'run'}", f"b_run_dir={tmp_path / 'b'}", "b_train_steps=2",
             "b_checkpoint_every=2", f"eval_dir={tmp_path / 'eval'}", f"fid_cache_dir={tmp_path / 'fid'}"]
    binarized = cli("--mode", "binarize", *train[2:], *later)
    assert binarized.returncode == 0, binarized.stderr
    evaluated = cli("--mode", "eval_d", *train[2:], *later)
    assert evaluated.returncode == 0, evaluated.stderr
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["teacher_sampler"].startswith("DDIM eta=0, 10 steps (the config's")
    assert report["throughput"]["teacher_steps"] == 10 and set(report["scores"]) >= {"teacher", "d", "b"}


def test_a_teacher_that_did_not_make_the_files_is_refused(small_teacher, tmp_path):
    ref = tmp_path / "ref"
    ref.mkdir()
    write_like_the_reference(ref / "sample_00000000.zst", reference_sample(0, channels=3))
    result = _import(ref, tmp_path / "data", f"import_teacher={small_teacher}")
    assert_one_sentence_error(result, str(small_teacher), "image channels 1", "have 3", "import_teacher=")
    result = _import(ref, tmp_path / "data", f"import_teacher={tmp_path / 'nothing'}")
    assert_one_sentence_error(result, "no teacher weights", "import_teacher")
    assert not (tmp_path / "data").exists() and not (tmp_path / "data.importing").exists()


def _fewer_chunks(sample):
    return dict(sample, r_chunks_q=sample["r_chunks_q"][:4], r_chunks_scale_f16=sample["r_chunks_scale_f16"][:4])


def _damage(kind, path, sample):
    if kind == "not zstd":
        path.write_bytes(b"not a zstd frame at all")
    elif kind == "zstd but not npz":
        write_like_the_reference(path, b"zstd-compressed text, no npz archive")
    elif kind == "missing key":
        write_like_the_reference(path, {k: v for k, v in sample.items() if k != "rin0_scale_f16"})
    elif kind == "wrong dtype":
        write_like_the_reference(path, dict(sample, x0_teacher_f16=sample["x0_teacher_f16"].astype(np.float32)))
    elif kind == "wrong chunk count":
        write_like_the_reference(path, _fewer_chunks(sample))
    elif kind == "absurd header size":
        write_like_the_reference(path, npz_with_absurd_header(sample, "r_chunks_q"))
    elif kind == "gap in numbering":
        path.rename(path.with_name("sample_00000005.zst"))
    elif kind in ("encrypted zip flag", "unknown zip version"):
        buf = io.BytesIO()
        np.savez(buf, **sample)
        raw = bytearray(buf.getvalue())
        central = raw.index(b"PK\x01\x02")  # the first member's central-directory entry, which zipfile trusts
        if kind == "encrypted zip flag":
            raw[central + 8] |= 0x01
        else:
            raw[central + 6] = 0xFF
        write_like_the_reference(path, bytes(raw))


WHAT = {"not zstd": "is not zstd data", "zstd but not npz": "not an npz archive",
        "missing key": "has no key rin0_scale_f16", "wrong dtype": "has x0_teacher_f16 of dtype float32, not float16",
        "wrong chunk count": "has 4 chunks in r_chunks_q and T=1000, which make chunk_size = T // chunks = 250, but "
                             "its chunk_size is 200",
        "absurd header size": "r_chunks_q.npy that claims shape [1000000000000]",
        "gap in numbering": "is missing although sample_", "encrypted zip flag": "has no readable npy header",
        "unknown zip version": "not an npz archive (zip file version"}


@pytest.mark.parametrize("position", [0, 2, 4], ids=["first", "middle", "last"])
@pytest.mark.parametrize("kind", list(WHAT))
def test_a_malformed_file_is_one_sentence_naming_it(kind, position, tmp_path):
    ref, data = tmp_path / "ref", tmp_path / "data"
    samples = reference_folder(ref)
    bad = ref / f"sample_{position:08d}.zst"
    _damage(kind, bad, samples[position])
    result = _import(ref, data)
    assert_one_sentence_error(result, f"{bad} ", WHAT[kind])
    assert not data.exists() and not (tmp_path / "data.importing").exists()  # nothing that looks like data


@pytest.mark.parametrize("change,what", [
    (lambda s: dict(s, r_chunks_scale_f16=s["r_chunks_scale_f16"][:4]),
     "has r_chunks_scale_f16 of shape [4, 1], but its x_T_f16 [1, 32, 32] and r_chunks_q [5, 1, 32, 32] make it "
     "[5, 1]"),
    (lambda s: dict(s, rin0_q=s["rin0_q"][:, :16]), "has rin0_q of shape [1, 16, 32]"),
    (lambda s: dict(s, x_T_f16=s["x_T_f16"][:, :16]), "has x_T_f16 of shape [1, 16, 32], not [channels, size, size]"),
    (lambda s: dict(s, chunk_size=np.array([0], np.int16)), "has T=1000 and chunk_size=0, which must both be positive"),
    (lambda s: dict(s, T=np.array([999], np.int16)),
     "has 5 chunks in r_chunks_q and T=999, which make chunk_size = T // chunks = 199, but its chunk_size is 200"),
    (lambda s: dict(s, x0_teacher_f16=np.full_like(s["x0_teacher_f16"], np.nan)), "has NaN or inf in x0_teacher_f16"),
])
def test_a_file_that_disagrees_with_itself_is_named(change, what, tmp_path):
    good = reference_sample(0)
    assert reference_layout.sample_problem(good) is None
    path = tmp_path / "sample_00000000.zst"
    write_like_the_reference(path, change(good))
    with pytest.raises(UserError) as caught:
        reference_layout.read_sample(path)
    assert str(caught.value).startswith(f"{path} {what}")


def test_a_layout_other_than_the_first_files_names_both(tmp_path):
    ref = tmp_path / "ref"
    samples = reference_folder(ref)
    other = reference_sample(3, chunks=4)
    write_like_the_reference(ref / "sample_00000003.zst", other)
    assert reference_layout.sample_problem(other) is None  # consistent in itself
    result = _import(ref, tmp_path / "data")
    assert_one_sentence_error(result, "sample_00000003.zst has 1x32x32 images, 1 latent channels, 4 chunks",
                              "but sample_00000000.zst has", "5 chunks")
    assert samples and not (tmp_path / "data").exists()


def test_leftovers_of_a_killed_import_are_replaced_and_a_used_folder_is_refused(tmp_path):
    ref, data = tmp_path / "ref", tmp_path / "data"
    reference_folder(ref, count=3)
    staging = tmp_path / "data.importing"
    staging.mkdir()
    (staging / atomic.STAGING_MARKER).write_text("")  # the first thing an import writes
    (staging / "shard-00007.npz.zst").write_bytes(b"left by a killed import")
    assert _import(ref, data).returncode == 0
    assert sorted(p.name for p in data.glob("shard-*")) == ["shard-00000.npz.zst", "shard-00001.npz.zst"]
    assert not staging.exists()
    assert_one_sentence_error(_import(ref, data), str(data), "already holds a manifest")
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert_one_sentence_error(_import(ref, other), str(other), "is not empty")
    assert (other / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("T,chunks", [(10, 4), (1000, 36), (1000, 10)])
def test_chunk_size_is_T_over_chunks_as_both_writers_store_it(T, chunks):
    sample = reference_sample(0, chunks=chunks, T=T)
    assert int(sample["chunk_size"][0]) == T // chunks
    assert reference_layout.sample_problem(sample) is None


def test_an_npy_header_that_is_not_a_python_literal_is_one_sentence(tmp_path):
    """Issue 31: numpy reparses a broken header with the tokenizer, whose TokenError was a traceback."""
    buf = io.BytesIO()
    np.savez(buf, **reference_sample(0))
    raw = bytearray(buf.getvalue())
    header = raw.index(b"{'descr'")
    raw[raw.index(b"}", header)] = ord(" ")  # one byte: the header's dict is never closed
    path = tmp_path / "sample_00000000.zst"
    write_like_the_reference(path, bytes(raw))
    with pytest.raises(UserError, match="has no readable npy header"):
        reference_layout.read_sample(path)
    with pytest.raises(ValueError, match="has no readable npy header"):
        store.decode_npz(zstandard.ZstdCompressor().compress(bytes(raw)), 10 ** 6)


def test_staging_folders_holding_files_the_tool_did_not_write_are_refused_and_kept(exported, tmp_path):
    """Issue 31: export emptied an existing <reference_dir>.partial and import an existing <data_dir>.importing."""
    cfg, _, ref = exported
    partial, importing = tmp_path / "mine.partial", tmp_path / "data.importing"
    for folder in (partial, importing):
        folder.mkdir()
        (folder / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match=r"mine.partial holds files that export did not write .* notes.txt"):
        reference_layout.export_command(dict(cfg, reference_dir=str(tmp_path / "mine")))
    result = _import(ref, tmp_path / "data")
    assert_one_sentence_error(result, "data.importing holds files that import did not write", "notes.txt")
    assert (partial / "notes.txt").read_text() == "mine" and (importing / "notes.txt").read_text() == "mine"
    assert not (tmp_path / "mine").exists() and not (tmp_path / "data").exists()


def test_export_into_a_symlink_to_a_folder_fills_that_folder(exported, tmp_path):
    """Issue 31: a NotADirectoryError traceback that left a stray .partial."""
    cfg, _, _ = exported
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    reference_layout.export_command(dict(cfg, reference_dir=str(tmp_path / "link")))
    assert (tmp_path / "link").is_symlink() and len(list((tmp_path / "link").glob("sample_*.zst"))) == 12
    assert not list(tmp_path.glob("*.partial")) and not (tmp_path / "real" / atomic.STAGING_MARKER).exists()


def test_export_counts_its_files_without_a_progress_bar(exported, tmp_path, monkeypatch, capsys):
    """Issue 31: "0 files written" under TQDM_DISABLE=1."""
    import functools
    from tqdm import tqdm
    cfg, _, _ = exported
    monkeypatch.setattr(reference_layout, "tqdm", functools.partial(tqdm, disable=True))  # as TQDM_DISABLE=1 does
    reference_layout.export_command(dict(cfg, reference_dir=str(tmp_path / "out")))
    assert "[export] 12 files written to" in capsys.readouterr().out


def _special(kind, path, tmp_path):
    """A sample file name that is not a regular file: what ``kind`` says."""
    import os
    if kind == "dev-zero-link":
        path.symlink_to("/dev/zero")
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "fifo-link":
        os.mkfifo(tmp_path / "pipe")
        path.symlink_to(tmp_path / "pipe")
    else:
        path.mkdir()


@pytest.mark.parametrize("position", [0, 2])
@pytest.mark.parametrize("kind,what", [("dev-zero-link", "is a device (the symlink points to /dev/zero)"),
                                       ("fifo", "is a FIFO, not a regular file"),
                                       ("fifo-link", "is a FIFO (the symlink points to"),
                                       ("folder", "is a folder, not a regular file")])
def test_import_reads_only_regular_files(kind, what, position, tmp_path):
    """Issue 31: import followed a symlink to /dev/zero (memory without bound) and blocked on a FIFO."""
    import signal
    ref = tmp_path / "ref"
    reference_folder(ref, count=4)
    name = ref / f"sample_{position:08d}.zst"
    name.unlink()
    _special(kind, name, tmp_path)
    def blocked(*_):
        raise TimeoutError("import blocked on a file that is not a regular file")
    previous = signal.signal(signal.SIGALRM, blocked)
    signal.alarm(60)  # a FIFO opened for reading would block this test for good
    try:
        with pytest.raises(UserError, match=re.escape(f"{name.name} {what}")) as err:
            reference_layout.import_command(config.resolve("tiny", [f"reference_dir={ref}",
                                                                    f"data_dir={tmp_path / 'data'}"]))
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert str(err.value).count(";") == 1 and not (tmp_path / "data").exists()
    assert not (tmp_path / "data.importing").exists()


def test_a_fifo_among_the_sample_files_is_one_sentence_from_the_command_line(tmp_path):
    ref = tmp_path / "ref"
    reference_folder(ref, count=2)
    (ref / "sample_00000001.zst").unlink()
    _special("fifo-link", ref / "sample_00000001.zst", tmp_path)
    result = run_cli("Main_Distill.py", "--mode", "import", "--config", "tiny", f"reference_dir={ref}",
                     f"data_dir={tmp_path / 'data'}", timeout=120)
    assert result.returncode == 2
    assert_one_sentence_error(result, "sample_00000001.zst is a FIFO", "not a regular file")


def test_the_export_message_states_the_sums_that_hold(exported, tmp_path, capsys):
    """Issue 31: the message claimed the codec's accuracy for rin0 + sum(r_chunks), which in pixel space misses
    the teacher's image by rin0's percentile clipping. Measured here on the files, read as the reference reads them."""
    from pipeline.data import quant
    cfg, _, _ = exported
    capsys.readouterr()
    reference_layout.export_command(dict(cfg, reference_dir=str(tmp_path / "out")))
    out = capsys.readouterr().out
    found = re.search(r"x_T_f16 \+ sum\(r_chunks\) is the final state .* to within ([0-9.e-]+) \(the codec error "
                      r".*rin0 \+ sum\(r_chunks\) misses it by up to ([0-9.e-]+) in these files", out)
    assert found, out
    within, miss = float(found.group(1)), float(found.group(2))
    worst_x_T, worst_rin0 = 0.0, 0.0
    for path in sorted((tmp_path / "out").glob("sample_*.zst")):
        with open(path, "rb") as f, zstandard.ZstdDecompressor().stream_reader(f) as reader:
            sample = dict(np.load(io.BytesIO(reader.read())))
        chunks = quant.dequantize(sample["r_chunks_q"], sample["r_chunks_scale_f16"]).sum(axis=0)
        image = sample["x0_teacher_f16"].astype(np.float32)  # the teacher's image, kept in its 8-bit grey levels
        from_x_T = sample["x_T_f16"].astype(np.float32) + chunks
        from_rin0 = quant.dequantize(sample["rin0_q"], sample["rin0_scale_f16"]) + chunks
        worst_x_T = max(worst_x_T, float(np.abs(np.clip(from_x_T, -1, 1) - image).max()))
        worst_rin0 = max(worst_rin0, float(np.abs(from_rin0 - from_x_T).max()))
    assert worst_x_T <= within + 1 / 255 + 1e-3  # the grey levels round the image by half a level (1/255) at most
    assert worst_rin0 == pytest.approx(miss, rel=1e-2) and miss > 10 * within  # what the old message hid
