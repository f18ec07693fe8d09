import json

import numpy as np
import pytest

from pipeline import generate, reference_layout, verify
from pipeline.errors import UserError

from conftest import assert_one_sentence_error, run_cli
from test_generate import read_folder


@pytest.fixture
def dataset(tiny_cfg):
    cfg = tiny_cfg()
    folder, _ = generate.generate(cfg)
    return cfg, folder


def _verify(folder):
    return run_cli("Main_Distill.py", "--mode", "verify", "--config", "tiny", f"data_dir={folder}")


def test_verify_accepts_a_good_folder(dataset):
    _, folder = dataset
    result = _verify(folder)
    assert result.returncode == 0, result.stderr
    assert "OK: 3 shard(s), 12 samples" in result.stdout


def _bit_flip(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


def _truncate(path):
    path.write_bytes(path.read_bytes()[:-100])


@pytest.mark.parametrize("damage,what", [(_bit_flip, "sha256"), (_truncate, "truncated"),
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


def test_reference_layout_round_trip(dataset, tmp_path):
    cfg, folder = dataset
    ref = tmp_path / "reference"
    reference_layout.export_command(dict(cfg, reference_dir=str(ref)))
    names = sorted(p.name for p in ref.iterdir())
    assert names == ["config.json"] + [f"sample_{i:08d}.zst" for i in range(12)]
    one = reference_layout.read_sample(ref / "sample_00000007.zst")
    assert one["r_chunks_q"].shape == (5, 1, 32, 32) and one["T"].shape == (1,) and one["T"].dtype == np.int16
    assert "index" not in one
    back = tmp_path / "imported"
    reference_layout.import_command(dict(cfg, reference_dir=str(ref), data_dir=str(back), shard_size=4))
    original, imported = read_folder(folder), read_folder(back)
    for key in original:
        np.testing.assert_array_equal(imported[key], original[key], err_msg=key)
    assert _verify(back).returncode == 0


def test_interrupted_export_is_not_a_dataset_and_rerunning_finishes_it(dataset, tmp_path):
    cfg, _ = dataset
    ref = tmp_path / "reference"
    partial = tmp_path / "reference.partial"
    partial.mkdir()
    (partial / "sample_00000000.zst").write_bytes(b"left by a killed export")
    with pytest.raises(UserError, match="reference_dir .* does not exist"):
        reference_layout.import_command(dict(cfg, reference_dir=str(ref), data_dir=str(tmp_path / "x")))
    reference_layout.export_command(dict(cfg, reference_dir=str(ref)))
    assert len(list(ref.glob("sample_*.zst"))) == 12 and not partial.exists()


def test_import_refuses_a_gap_in_numbering(dataset, tmp_path):
    cfg, _ = dataset
    ref = tmp_path / "reference"
    reference_layout.export_command(dict(cfg, reference_dir=str(ref)))
    (ref / "sample_00000003.zst").unlink()
    with pytest.raises(UserError, match="sample_00000003.zst"):
        reference_layout.import_command(dict(cfg, reference_dir=str(ref), data_dir=str(tmp_path / "x")))
