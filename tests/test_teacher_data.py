"""The checks that training runs on its teacher data: shards before step 1, damage met by a worker,
and the identity of the data a run reads."""
import shutil

import pytest

from pipeline.core import config
from pipeline.core.errors import UserError
from pipeline.data import generate, store, teacher_data

from conftest import flip_a_bit


@pytest.fixture(scope="module")
def made_once(tmp_path_factory, small_teacher):
    """12 records in shards of 5, 5, 2 from the small random teacher, made once and copied per test."""
    folder = tmp_path_factory.mktemp("made_once") / "data"
    generate.generate(_cfg(small_teacher, folder))
    return folder


@pytest.fixture
def data(made_once, small_teacher, tmp_path):
    folder = tmp_path / "data"
    shutil.copytree(made_once, folder)
    cfg = _cfg(small_teacher, folder)
    return cfg, teacher_data.open_data(cfg)


def _cfg(teacher, folder, **overrides):
    items = {"teacher_path": teacher, "data_dir": folder, **overrides}
    return config.resolve("tiny", [f"{k}={v}" for k, v in items.items()])


def test_check_shards_names_the_damaged_shard_of_the_range_only(data):
    cfg, manifest = data
    teacher_data.check_shards(manifest, 4, 12)
    flip_a_bit(manifest.folder / "shard-00001.npz.zst")
    damaged = r"shard-00001\.npz\.zst does not match its sha256.*--mode verify.*--mode repair"
    with pytest.raises(UserError, match=damaged):
        teacher_data.check_shards(manifest, 4, 12)
    teacher_data.check_shards(manifest, 0, 5)  # the damaged shard holds none of records 0..4
    (manifest.folder / "shard-00002.npz.zst").write_bytes(b"short")
    with pytest.raises(UserError, match=r"shard-00002\.npz\.zst has 5 bytes"):
        teacher_data.check_shards(manifest, 10, 12)


def test_check_shards_refuses_a_range_beyond_the_records(data):
    _, manifest = data
    with pytest.raises(UserError, match="holds records up to 11, not 12"):
        teacher_data.check_shards(manifest, 4, 13)


@pytest.mark.parametrize("workers", [0, 1])
def test_a_shard_damaged_after_the_check_ends_as_one_sentence(data, workers):
    cfg, manifest = data
    cfg = dict(cfg, data_workers=workers, shuffle_buffer=4)
    teacher_data.check_shards(manifest, 4, 12)
    flip_a_bit(manifest.folder / "shard-00001.npz.zst")
    stream = teacher_data.batches(cfg, manifest, 4, 12, seed=[0, 0], batch_size=4)
    with pytest.raises(UserError) as caught:
        for _ in range(20):  # an epoch reads every shard; 8 records make two batches
            next(stream)
    message = str(caught.value)
    assert "shard-00001.npz.zst does not match its sha256" in message
    assert "Traceback" not in message and "\n" not in message
    with pytest.raises(StopIteration):
        next(stream)


def test_data_identity_changes_when_the_data_grows_or_changes(data, small_teacher, tmp_path):
    cfg, manifest = data
    first, fixed = teacher_data.data_identity(manifest, 4, 12), teacher_data.data_identity(manifest, 0, 10)
    assert first["indices"] == [4, 12]
    assert [name for name, _ in first["shards"]] == ["shard-00000.npz.zst", "shard-00001.npz.zst",
                                                    "shard-00002.npz.zst"]
    generate.generate(dict(cfg, samples_total=15))
    grown = teacher_data.open_data(cfg)
    hi = grown.next_index()
    assert hi == 15 and teacher_data.data_identity(grown, 4, hi) != first
    # the last shard was regenerated whole with 5 records: same name, other bytes
    assert teacher_data.data_identity(grown, 4, 12)["shards"][-1] != first["shards"][-1]
    assert teacher_data.data_identity(grown, 0, 10) == fixed  # shards 0 and 1 are untouched
    other = tmp_path / "other"
    generate.generate(_cfg(small_teacher, other, seed=1))
    entry = next(s for s in store.Manifest.load(other).shards if s["file"] == "shard-00001.npz.zst")
    grown.add_shard(1, 5, 5, (other / entry["file"]).read_bytes())  # shard 1 regenerated with other content
    changed = teacher_data.data_identity(teacher_data.open_data(cfg), 0, 10)
    assert changed["indices"] == fixed["indices"] and changed["shards"][0] == fixed["shards"][0]
    assert changed["shards"][1] == ["shard-00001.npz.zst", entry["sha256"]] != fixed["shards"][1]


def test_data_rewritten_under_a_running_reader_is_named_as_such(data, small_teacher):
    cfg, manifest = data
    teacher_data.check_shards(manifest, 4, 12)
    generate.generate(_cfg(small_teacher, manifest.folder, samples_total=14))  # rewrites the short shard-00002
    stream = teacher_data.batches(dict(cfg, data_workers=0, shuffle_buffer=8), manifest, 4, 12, seed=[0, 0],
                                  batch_size=4)
    with pytest.raises(UserError, match=r"changed while this run was reading it \(shard-00002\.npz\.zst"):
        for _ in range(10):
            next(stream)
