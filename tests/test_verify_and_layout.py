import io
import json

import numpy as np
import pytest
import zstandard

from pipeline.core.errors import UserError
from pipeline.data import generate, store, verify

from conftest import (assert_one_sentence_error, flip_a_bit, npz_with_absurd_header, read_folder, run_cli,
                      run_distill_in_process)


@pytest.fixture
def dataset(tiny_cfg):
    """Reference-codec data: its shards hold the records themselves, which the tests below forge."""
    cfg = tiny_cfg(codec="int8-p99.5")
    folder, _ = generate.generate(cfg)
    return cfg, folder


def _verify(folder):
    return run_cli("Main_Distill.py", "--mode", "verify", "--config", "tiny", f"data_dir={folder}")


def test_verify_accepts_a_good_folder(dataset):
    _, folder = dataset
    result = _verify(folder)
    assert result.returncode == 0, result.stderr
    assert "OK: 3 shard(s), 12 samples" in result.stdout


def _truncate(path):
    path.write_bytes(path.read_bytes()[:-100])


@pytest.mark.parametrize("damage,what", [(flip_a_bit, "sha256"), (_truncate, "truncated"),
                                         (lambda p: p.unlink(), "is missing")])
def test_verify_names_the_damaged_shard_and_repair_restores_it(dataset, damage, what):
    cfg, folder = dataset
    before = read_folder(folder)
    damage(folder / "shard-00001.npz.zst")
    result = _verify(folder)
    assert_one_sentence_error(result, "shard-00001.npz.zst", "1 problem(s)")
    assert "BAD shard-00001.npz.zst (indices 5..9)" in result.stdout and what in result.stdout
    # generate refuses to extend a damaged folder and leaves it as it is
    with pytest.raises(UserError, match="shard-00001.npz.zst"):
        generate.generate(dict(cfg, samples_total=20))
    verify.repair(cfg)
    assert _verify(folder).returncode == 0
    after = read_folder(folder)
    for key in before:
        np.testing.assert_array_equal(after[key], before[key], err_msg=key)


def test_verify_finds_a_hand_edited_manifest(dataset):
    _, folder = dataset
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["shards"][2]["first_index"] = 11
    (folder / "manifest.json").write_text(json.dumps(manifest))
    result = _verify(folder)
    assert_one_sentence_error(result, "problem(s)")
    assert "indices 10..10" in result.stdout and "are in no shard" in result.stdout
    assert "holds indices other than 11" in result.stdout


def test_unreadable_manifest_is_one_sentence(dataset):
    _, folder = dataset
    (folder / "manifest.json").write_text("{not json")
    assert_one_sentence_error(_verify(folder), "manifest.json", "not a readable teacher-data manifest")


def _forge_content_size(frame: bytes, size: int) -> bytes:
    """``frame`` with an 8-byte content size field holding ``size`` in its zstd frame header (RFC 8878 §3.1.1.1)."""
    descriptor = frame[4]
    single_segment, dictionary_flag, size_flag = descriptor >> 5 & 1, descriptor & 3, descriptor >> 6
    offset = 5 + (0 if single_segment else 1) + (0, 1, 2, 4)[dictionary_flag]
    width = (1 if single_segment else 0, 2, 4, 8)[size_flag]
    return (frame[:4] + bytes([descriptor | 0xC0]) + frame[5:offset] + size.to_bytes(8, "little")
            + frame[offset + width:])


def _replace_listed_shard(folder, name, payload):
    """Put ``payload`` in place of a shard and list its size and sha256, as if it had been written so."""
    (folder / name).write_bytes(payload)
    manifest = json.loads((folder / "manifest.json").read_text())
    entry = next(s for s in manifest["shards"] if s["file"] == name)
    entry.update(bytes=len(payload), sha256=store.sha256(payload))
    (folder / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("forge,what", [
    (lambda arrays: zstandard.ZstdCompressor(level=3).compress(npz_with_absurd_header(arrays, "r_chunks_q")),
     "has an npz member r_chunks_q.npy that claims shape [1000000000000]"),
    (lambda arrays: _forge_content_size(store.encode_npz(arrays, 3), 2 ** 40),
     "claims 1,099,511,627,776 decoded bytes in its zstd frame header"),
])
def test_a_shard_that_claims_an_absurd_size_is_refused_before_allocating(dataset, forge, what):
    _, folder = dataset
    arrays = read_folder(folder)
    rows = {key: value[5:10] for key, value in arrays.items()}
    _replace_listed_shard(folder, "shard-00001.npz.zst", forge(rows))
    result = _verify(folder)
    assert_one_sentence_error(result, "shard-00001.npz.zst", "1 problem(s)")
    assert f"BAD shard-00001.npz.zst (indices 5..9): {what}" in result.stdout


def test_decoding_bounds_frames_that_do_not_record_their_size():
    arrays = {"a": np.arange(1000, dtype=np.int64)}
    buf, out = io.BytesIO(), io.BytesIO()
    np.savez(buf, **arrays)
    with zstandard.ZstdCompressor(level=10).stream_writer(out, closefd=False) as writer:
        writer.write(buf.getvalue())
    frame = out.getvalue()
    assert zstandard.frame_content_size(frame) == -1
    assert zstandard.frame_content_size(_forge_content_size(store.encode_npz(arrays, 3), 2 ** 40)) == 2 ** 40
    np.testing.assert_array_equal(store.decode_npz(frame, len(buf.getvalue()))["a"], arrays["a"])
    with pytest.raises(ValueError, match=f"is not a complete zstd frame of at most {len(buf.getvalue()) - 1:,} "):
        store.decode_npz(frame, len(buf.getvalue()) - 1)
    with pytest.raises(ValueError, match="is not a complete zstd frame"):
        store.decode_npz(frame[:-20], 10 ** 6)


def test_shards_compressed_on_any_number_of_threads_are_the_same_bytes():
    """generate compresses on every thread a process has: the shards must not depend on how many that is."""
    rng = np.random.default_rng(0)  # 24 MB of int8 codes with some structure: several of zstd's jobs at level 3
    arrays = {"codes": np.repeat(rng.integers(-20, 20, 6_000_000, dtype=np.int8), 4)}
    one = store.encode_npz(arrays, 3, workers=1)
    assert store.encode_npz(arrays, 3, workers=3) == one and zstandard.frame_content_size(one) > 24_000_000
    np.testing.assert_array_equal(store.decode_npz(one, 25_000_000)["codes"], arrays["codes"])


def _edit_record(key, value):
    def edit(rows):
        rows[key] = rows[key].copy()
        rows[key].flat[3] = value
        return rows
    return edit


@pytest.mark.parametrize("edit,what", [
    (_edit_record("rin0_scale_f16", np.nan), "holds NaN or inf in rin0_scale_f16"),
    (_edit_record("r_chunks_scale_f16", np.inf), "holds NaN or inf in r_chunks_scale_f16"),
    (_edit_record("x0_teacher_f16", -np.inf), "holds NaN or inf in x0_teacher_f16"),
    (_edit_record("r_chunks_scale_f16", -0.5), "holds a negative quantization scale in r_chunks_scale_f16"),
    (_edit_record("T", 0), "holds a T or chunk_size that is not positive"),
    (_edit_record("T", 999), "holds T=999, but the folder's teacher has T="),
    (_edit_record("chunk_size", 7), "holds chunk_size=7, but the folder's T and chunks make it"),
])
def test_verify_refuses_values_no_writer_produces_even_when_rehashed(dataset, capsys, edit, what):
    """Issue 31: an edited shard whose sha256 was recomputed passes every checksum; its values must not."""
    _, folder = dataset
    rows = {key: value[5:10] for key, value in read_folder(folder).items()}
    _replace_listed_shard(folder, "shard-00001.npz.zst", store.encode_npz(edit(rows), 3))
    result = run_distill_in_process(capsys, "--mode", "verify", "--config", "tiny", f"data_dir={folder}")
    assert_one_sentence_error(result, "shard-00001.npz.zst", "1 problem(s)", what)
    assert f"BAD shard-00001.npz.zst (indices 5..9): {what}" in result.stdout
    manifest = store.Manifest.load(folder)
    with pytest.raises(UserError, match=what.replace("(", r"\(")):  # every reader, training's too
        manifest.read_shard(manifest.shards[1])


@pytest.mark.parametrize("key", ["count", "first_index", "bytes"])
def test_a_manifest_number_too_large_for_any_folder_is_one_sentence(dataset, capsys, key):
    """Issue 31: a count of 10**20 was an OverflowError in verify, train_d, export and repair."""
    _, folder = dataset
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["shards"][1][key] = 10 ** 20
    (folder / "manifest.json").write_text(json.dumps(manifest))
    for mode in ("verify", "repair", "export", "train_d"):
        result = run_distill_in_process(capsys, "--mode", mode, "--config", "tiny", f"data_dir={folder}",
                                        f"reference_dir={folder.parent / 'ref'}", f"d_run_dir={folder.parent / 'd'}")
        assert_one_sentence_error(result, "shard-00001.npz.zst", "edited by hand")


def test_a_manifest_nested_too_deeply_for_the_parser_is_one_sentence(dataset, capsys):
    """Issue 31: a RecursionError traceback before."""
    _, folder = dataset
    (folder / "manifest.json").write_text("{\"shards\": " + "[" * 100_000 + "]" * 100_000 + "}")
    result = run_distill_in_process(capsys, "--mode", "verify", "--config", "tiny", f"data_dir={folder}")
    assert_one_sentence_error(result, "manifest.json", "not a readable teacher-data manifest")


@pytest.mark.parametrize("name", ["../shard-00001.npz.zst", "/etc/passwd", "sub/shard-00001.npz.zst", "notes.txt"])
def test_a_manifest_naming_files_outside_the_folder_is_refused_by_every_reader(dataset, capsys, name):
    """Issue 31: eval_d and Manifest.read_shard read what a manifest names; one rule in the loader now."""
    _, folder = dataset
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["shards"][1]["file"] = name
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="which is not a shard file of the folder"):
        store.Manifest.load(folder)
    for mode in ("verify", "repair", "export", "train_d", "eval_d"):
        result = run_distill_in_process(capsys, "--mode", mode, "--config", "tiny", f"data_dir={folder}",
                                        f"reference_dir={folder.parent / 'ref'}", f"d_run_dir={folder.parent / 'd'}")
        assert_one_sentence_error(result, name, "edited by hand")


def test_repair_recounts_totals_as_verify_advises(dataset, capsys):
    """Issue 31: verify said "repair" for a totals mismatch that repair did not fix."""
    cfg, folder = dataset
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["totals"]["samples"] = 99
    (folder / "manifest.json").write_text(json.dumps(manifest))
    result = run_distill_in_process(capsys, "--mode", "verify", "--config", "tiny", f"data_dir={folder}")
    assert_one_sentence_error(result, "totals.samples does not match", "--mode repair")
    verify.repair(cfg)
    result = run_distill_in_process(capsys, "--mode", "verify", "--config", "tiny", f"data_dir={folder}")
    assert result.returncode == 0, result.stderr
