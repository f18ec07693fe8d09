"""The record codecs: round trips, the error-feedback bound, the shard entry's error, x_T regeneration,
and damaged or unknown data refused with one sentence."""
import json

import numpy as np
import pytest

from pipeline.core.errors import UserError
from pipeline.data import code_layout, codec as codecs, generate, quant, store
from pipeline.teacher import spaces
from pipeline.teacher.trajectory import draw_x_T

from conftest import assert_one_sentence_error, read_folder, read_records, run_cli

SHAPE = (1, 8, 8)


def trajectories(n=6, chunks=5, latent=False, seed=0, channels=1) -> codecs.Trajectories:
    """A chain of shrinking random residuals, as a teacher's are (noisiest first is the larger here)."""
    rng = np.random.default_rng(seed)
    x_T = draw_x_T(seed, range(n), (channels,) + SHAPE[1:]).numpy()
    start = (rng.standard_normal((n, channels + 2) + SHAPE[1:]) * 3).astype(np.float32) if latent else x_T
    scale = np.linspace(1.0, 0.05, chunks, dtype=np.float32)[None, :, None, None, None]
    residuals = (rng.standard_normal((n, chunks) + start.shape[1:]) * scale).astype(np.float32)
    z_final = start + residuals.sum(1)
    x0 = np.tanh(z_final[:, :channels]) if latent else z_final
    return codecs.Trajectories(x_T, start, residuals, z_final, x0, T=1000, chunk_size=1000 // chunks,
                                space=spaces.SPACES["latent" if latent else "pixel"])


def feedback(step=0.05, x_T="regenerate", version=None):
    return codecs.FeedbackCodec(step, x_T, 99.5, 10, version)


def entry_for(extra):
    return dict(extra, file="shard-00000.npz.zst")


@pytest.mark.parametrize("latent", [False, True])
@pytest.mark.parametrize("x_T,version", [("regenerate", 3), ("store", 3), ("regenerate", 2), ("regenerate", 1)])
def test_feedback_records_survive_pack_and_unpack_bit_exactly(latent, x_T, version):
    traj = trajectories(latent=latent)
    codec = feedback(x_T=x_T, version=version)
    records = dict(codec.encode(traj), index=np.arange(len(traj.x_T)))
    stored, extra = codec.pack(records, traj.space)
    assert "x_T_f16" not in stored if x_T == "regenerate" else "x_T_f16" in stored
    assert ({"rin0_q", code_layout.RIN0_ROW_STEPS} & set(stored) != set()) == latent
    assert ("x0_teacher_f16" in stored) == latent
    spec = store.record_spec(1, 8, 3 if latent else 1, 5)
    assert sorted(stored) == sorted([*codec.stored_spec(spec, traj.space), "index"])
    back = codec.unpack({k: v.copy() for k, v in stored.items()}, {"seed": 0, "image_shape": list(traj.x_T.shape[1:]),
                        "space": "latent" if latent else "pixel"}, entry_for(extra))
    assert sorted(back) == sorted(records)
    for key in records:
        np.testing.assert_array_equal(back[key], records[key], err_msg=key)
        assert back[key].dtype == records[key].dtype


def test_wrapped_steps_undo_exactly_where_neighbours_differ_by_more_than_int8_holds():
    codes = np.array([[[127, -127, 127, 0, -127, -127, 5]]], np.int8).repeat(2, axis=1)
    for axis in (1, 2):
        steps = code_layout.wrapped_steps(codes, axis)
        assert steps.dtype == np.int8 and steps.shape == codes.shape
        np.testing.assert_array_equal(code_layout.wrapped_sum(steps, axis), codes)
    np.testing.assert_array_equal(code_layout.wrapped_steps(codes, 2)[0, 0], [127, 2, -2, -127, -127, 0, -124])


def test_a_chunk_is_stored_as_a_difference_only_where_that_takes_fewer_bits():
    rng = np.random.default_rng(0)
    drift = rng.integers(-40, 40, size=(8, 1, 2, 6, 6))
    alike = np.clip(drift + rng.integers(-1, 2, size=(8, 3, 2, 6, 6)), -127, 127)  # chunks 0-2: one pattern
    unlike = rng.integers(-3, 4, size=(8, 2, 2, 6, 6))  # chunks 3-4: small and unrelated to what came before
    codes = np.concatenate([alike, unlike], axis=1).astype(np.int8)
    codes[0, 1, 0, 0, 0], codes[0, 0, 0, 0, 0] = 127, -127  # a difference that wraps
    stored = code_layout.pack_chunks(codes)
    np.testing.assert_array_equal(stored[code_layout.DIFFERENCED], np.tile([0, 1, 1, 0, 0], (8, 1)))
    np.testing.assert_array_equal(stored["r_chunks_q_2"], np.subtract(codes[:, 2], codes[:, 1]))
    np.testing.assert_array_equal(stored["r_chunks_q_3"], codes[:, 3])
    np.testing.assert_array_equal(code_layout.unpack_chunks(stored), codes)
    stored[code_layout.DIFFERENCED][5:] = 0  # per sample: rows 5.. now read chunk 2 as codes
    np.testing.assert_array_equal(code_layout.unpack_chunks(stored)[5:, 2], stored["r_chunks_q_2"][5:])


def test_each_codec_has_its_own_zstd_level_unless_one_is_set():
    cfg = {"codec_step": 0.05, "codec_x_T": "regenerate", "percentile": 99.5, "zstd_level": 0}
    assert codecs.from_config(dict(cfg, codec="ef-int8")).zstd_level == 1
    assert codecs.from_config(dict(cfg, codec="int8-p99.5")).zstd_level == 10
    assert codecs.from_config(dict(cfg, codec="ef-int8", zstd_level=7)).zstd_level == 7


def test_version_2_keeps_the_image_grey_levels_that_version_1_loses():
    traj = trajectories(n=16)
    traj.x0 = traj.z_final = np.clip(traj.z_final, -1.2, 1.2) / 1.2  # an image, flat where it saturates
    truth = codecs.image_levels(np.clip(traj.x0, -1, 1).astype(np.float16))
    levels = {}
    for version in (1, 2):
        codec = feedback(step=0.2, version=version)
        records = dict(codec.encode(traj), index=np.arange(len(traj.x_T)))
        stored, extra = codec.pack(records, traj.space)
        back = codec.unpack(stored, {"seed": 0, "image_shape": list(SHAPE), "space": "pixel"}, entry_for(extra))
        levels[version] = codecs.image_levels(back["x0_teacher_f16"])
    np.testing.assert_array_equal(levels[2], truth)
    assert np.mean(levels[1] != truth) > 0.5  # a step of 0.2 RMS is several grey levels


def test_reference_codec_stores_its_records_as_they_are():
    traj = trajectories()
    codec = codecs.ReferenceCodec(99.5, 10)
    records = codec.encode(traj)
    q, s = quant.quantize(traj.chunks, 99.5)
    np.testing.assert_array_equal(records["r_chunks_q"], q)
    np.testing.assert_array_equal(records["r_chunks_scale_f16"], s)
    stored, extra = codec.pack(records, traj.space)
    assert stored is records and extra == {} and codec.unpack(stored, {}, {}) is records


@pytest.mark.parametrize("latent", [False, True])
def test_every_partial_sum_is_within_half_a_step(latent):
    traj = trajectories(latent=latent)
    records = feedback(step=0.05).encode(traj)
    step = 0.05 * np.sqrt(np.mean(np.square(traj.z_final), axis=(2, 3)))[..., None, None]
    decoded = codecs.decoded_start(records, traj.space)[:, None] + np.cumsum(
        quant.dequantize(records["r_chunks_q"], records["r_chunks_scale_f16"]), axis=1)
    true = traj.start[:, None] + np.cumsum(traj.chunks, axis=1)
    rounded_up = step[:, None, :, 0, 0] * (1 + 2 ** -10)  # float16 rounds the stored scale up by < 1 ulp
    assert np.all(records["r_chunks_scale_f16"].astype(np.float32) <= rounded_up)  # int8 never needed a wider one
    assert np.all(np.abs(decoded - true) <= 0.5 * rounded_up[..., None, None] + 1e-6)


def test_the_final_error_does_not_grow_with_the_number_of_chunks():
    """With feedback the final state is off by one rounding however long the chain; the same steps without
    feedback add one rounding per chunk."""
    with_feedback, without = {}, {}
    for chunks in (2, 8, 32):
        traj = trajectories(n=16, chunks=chunks, seed=chunks)
        traj.chunks /= np.sqrt(chunks)  # the same final spread for every chain length
        traj.z_final = traj.start + traj.chunks.sum(1)
        records = feedback().encode(traj)
        with_feedback[chunks] = np.sqrt(np.mean(np.square(codecs.decoded_final(records, traj.space) - traj.z_final)))
        scales = records["r_chunks_scale_f16"]
        alone = [quant.dequantize(quant.quantize_step(traj.chunks[:, k], scales[:, k]), scales[:, k]) for k in range(chunks)]
        without[chunks] = np.sqrt(np.mean(np.square(traj.start + sum(alone) - traj.z_final)))
    assert max(with_feedback.values()) < 1.3 * min(with_feedback.values())
    assert without[32] > 3 * without[2] and without[32] > 3 * with_feedback[32]


def test_the_tally_reports_the_errors_it_measures():
    traj = trajectories()
    records = feedback().encode(traj)
    tally = codecs.ErrorTally()
    tally.add(traj, records)
    summary = tally.summary()
    error = codecs.decoded_final(records, traj.space) - traj.z_final
    assert summary["samples"] == 6 and len(summary["chunk_rmse"]) == 5
    assert summary["z_final_rmse"] == pytest.approx(np.sqrt(np.mean(error ** 2)), rel=1e-3)
    assert summary["z_final_max_abs"] == pytest.approx(np.abs(error).max(), rel=1e-3)
    both = codecs.combined([summary, dict(summary, samples=2, z_final_rmse=0.0)])
    assert both["samples"] == 8 and both["z_final_rmse"] == pytest.approx(summary["z_final_rmse"] * np.sqrt(6 / 8), rel=1e-3)


@pytest.fixture(scope="module")
def ef_data(tmp_path_factory, small_teacher):
    """A folder of the default codec, made once; tests copy it before changing it."""
    from pipeline.core import config
    root = tmp_path_factory.mktemp("ef")
    cfg = config.resolve("tiny", [f"teacher_path={small_teacher}", f"data_dir={root / 'data'}"])
    generate.generate(cfg)
    return cfg, root / "data"


def test_generate_records_the_codec_error_and_regenerates_x_T(ef_data):
    cfg, folder = ef_data
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["codec"]["name"] == "ef-int8+zstd" and manifest["codec"]["x_T"] == "regenerate"
    for entry in manifest["shards"]:
        assert len(entry["x_T_sha256"]) == 64 and entry["codec_error"]["samples"] == entry["count"]
        assert 0 < entry["codec_error"]["z_final_rmse"] < 0.05 * 0.3
    assert "x_T_f16" not in read_folder(folder) and codecs.IMAGE_CORRECTION in read_folder(folder)  # x_T is not stored ...
    records = read_records(folder)
    np.testing.assert_array_equal(records["x_T_f16"], draw_x_T(cfg["seed"], range(12), [1, 32, 32]).numpy().astype(np.float16))
    result = run_cli("Main_Distill.py", "--mode", "verify", "--config", "tiny", f"data_dir={folder}")
    assert result.returncode == 0 and "codec error measured when encoding: z_final RMSE" in result.stdout


def test_stored_x_T_gives_the_same_records(ef_data, tmp_path):
    cfg, folder = ef_data
    generate.generate(dict(cfg, data_dir=str(tmp_path / "stored"), codec_x_T="store"))
    stored, regenerated = read_records(tmp_path / "stored"), read_records(folder)
    for key in regenerated:
        np.testing.assert_array_equal(stored[key], regenerated[key], err_msg=key)


def _copy(folder, tmp_path):
    import shutil
    return shutil.copytree(folder, tmp_path / "copy")


def _rewrite_manifest(folder, change):
    manifest = json.loads((folder / "manifest.json").read_text())
    change(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))


def test_x_T_that_does_not_regenerate_is_named(ef_data, tmp_path):
    folder = _copy(ef_data[1], tmp_path)
    _rewrite_manifest(folder, lambda m: m["shards"][1].update(x_T_sha256="0" * 64))
    result = run_cli("Main_Distill.py", "--mode", "verify", "--config", "tiny", f"data_dir={folder}")
    assert_one_sentence_error(result, "shard-00001.npz.zst", "1 problem(s)")
    assert "x_T does not regenerate bit-exactly from (seed, index)" in result.stdout


def test_packed_codes_of_the_wrong_shape_name_the_shard(ef_data, tmp_path):
    folder = _copy(ef_data[1], tmp_path)
    stored = {k: v for k, v in read_folder(folder).items()}
    rows = {k: v[5:10] for k, v in stored.items()}
    rows["r_chunks_q_2"] = rows["r_chunks_q_2"][:, :, :-1]
    payload = store.encode_npz(rows, 3)
    (folder / "shard-00001.npz.zst").write_bytes(payload)
    _rewrite_manifest(folder, lambda m: m["shards"][1].update(bytes=len(payload), sha256=store.sha256(payload)))
    with pytest.raises(UserError, match=r"shard-00001.npz.zst r_chunks_q_2 is int8\[5, 1, 31, 32\], "
                                        r"expected int8\[5, 1, 32, 32\]"):
        store.Manifest.load(folder).read_shard(store.Manifest.load(folder).shards[1])


def test_fuzzed_shards_give_only_clear_errors(ef_data, tmp_path):
    folder = _copy(ef_data[1], tmp_path)
    original = (folder / "shard-00000.npz.zst").read_bytes()
    rng = np.random.default_rng(0)
    for trial in range(40):
        data = bytearray(original)
        for position in rng.integers(0, len(data), size=1 + trial % 4):
            data[position] = int(rng.integers(0, 256))
        data = bytes(data[: len(data) - (trial % 3) * 7])
        (folder / "shard-00000.npz.zst").write_bytes(data)
        _rewrite_manifest(folder, lambda m: m["shards"][0].update(bytes=len(data), sha256=store.sha256(data)))
        manifest = store.Manifest.load(folder)
        try:
            manifest.read_shard(manifest.shards[0])
        except UserError as err:
            assert "shard-00000.npz.zst" in str(err) and "\n" not in str(err)


def test_an_unknown_codec_is_refused_with_one_sentence(ef_data, tmp_path):
    folder = _copy(ef_data[1], tmp_path)
    _rewrite_manifest(folder, lambda m: m["codec"].update(name="magic-2bit", version=3))
    result = run_cli("Main_Distill.py", "--mode", "verify", "--config", "tiny", f"data_dir={folder}")
    assert_one_sentence_error(result, "codec 'magic-2bit' version 3, which this tool does not read")
    _rewrite_manifest(folder, lambda m: m["codec"].update(name=codecs.FEEDBACK, version=codecs.FeedbackCodec.VERSION + 1))
    result = run_cli("Main_Distill.py", "--mode", "verify", "--config", "tiny", f"data_dir={folder}")
    assert_one_sentence_error(result, f"codec 'ef-int8+zstd' version {codecs.FeedbackCodec.VERSION + 1}, which")


def test_extending_with_another_step_or_codec_is_refused(ef_data, tmp_path):
    cfg, folder = ef_data
    folder = _copy(folder, tmp_path)
    with pytest.raises(UserError, match="codec step=0.05, not 0.1"):
        generate.generate(dict(cfg, data_dir=str(folder), codec_step=0.1, samples_total=13))
    with pytest.raises(UserError, match='codec name="ef-int8\\+zstd", not "int8-p99.5\\+zstd"'):
        generate.generate(dict(cfg, data_dir=str(folder), codec="int8+zstd", samples_total=13))
    with pytest.raises(UserError, match="codec zstd_level=1, not 5"):  # a level set on purpose is not overridden
        generate.generate(dict(cfg, data_dir=str(folder), zstd_level=5, samples_total=13))


@pytest.mark.parametrize("old_version", [1, 2])
def test_a_folder_of_an_older_version_is_extended_with_its_version_and_level(ef_data, tmp_path, monkeypatch, old_version):
    """Folders written before version 3 were compressed at level 10 (then the only default)."""
    cfg = dict(ef_data[0], data_dir=str(tmp_path / "old"), samples_total=7)
    monkeypatch.setattr(codecs.FeedbackCodec, "VERSION", old_version)
    generate.generate(dict(cfg, zstd_level=10))
    monkeypatch.undo()
    generate.generate(dict(cfg, samples_total=12))
    manifest = store.Manifest.load(tmp_path / "old")
    assert manifest.data["codec"]["version"] == old_version and manifest.data["codec"]["zstd_level"] == 10
    assert manifest.next_index() == 12
    stored = read_folder(tmp_path / "old")
    assert codecs.CHUNKS_BY_POSITION in stored and not any(map(code_layout.is_chunk_key, stored))
    assert (codecs.IMAGE_CORRECTION in stored) == (old_version == 2)
    np.testing.assert_array_equal(read_records(tmp_path / "old")["r_chunks_q"], read_records(ef_data[1])["r_chunks_q"])


def test_a_manifest_whose_record_lacks_the_chunks_is_refused(ef_data, tmp_path):
    folder = _copy(ef_data[1], tmp_path)
    _rewrite_manifest(folder, lambda m: m["record"].pop("r_chunks_q"))
    with pytest.raises(UserError, match="is not a readable teacher-data manifest"):
        store.Manifest.load(folder)


def test_the_codec_key_offers_exactly_the_registered_codecs():
    from pipeline.core.config_keys import KEYS
    assert KEYS["codec"].choices == tuple(codecs.CODECS)
    assert all(f"{name} " in KEYS["codec"].help for name in codecs.CODECS)  # and its help names each of them
