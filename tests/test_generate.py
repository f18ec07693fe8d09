import io
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import zstandard

from pipeline.core.errors import UserError
from pipeline.data import codec as codecs, generate, quant, store

from conftest import ROOT, assert_one_sentence_error, read_folder, run_cli


def test_generate_writes_shards_and_manifest(tiny_cfg):
    """The reference codec's shards hold the records themselves, readable with numpy + zstandard."""
    cfg = tiny_cfg(codec="int8-p99.5")
    folder, seconds = generate.generate(cfg)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert [(s["first_index"], s["count"]) for s in manifest["shards"]] == [(0, 5), (5, 5), (10, 2)]
    assert manifest["codec"]["name"] == "int8-p99.5+zstd"
    assert manifest["generator"]["steps"] == 10 and manifest["generator"]["chunks"] == 5
    assert manifest["totals"]["samples"] == 12
    assert json.loads((folder / "config.json").read_text())["samples_total"] == 12
    data = read_folder(folder)
    np.testing.assert_array_equal(data["index"], np.arange(12))
    # telescoping identity survives quantization up to the quantizer's error
    rin0 = quant.dequantize(data["rin0_q"], data["rin0_scale_f16"])
    chunks = quant.dequantize(data["r_chunks_q"], data["r_chunks_scale_f16"])
    z_final = rin0 + chunks.sum(1)
    x0 = data["x0_teacher_f16"].astype(np.float32)
    assert np.abs(z_final - x0).mean() < 0.05
    # one stats line per shard, with the size the manifest lists, and the time spent so far
    stats = [json.loads(line) for line in (folder / "stats.jsonl").read_text().splitlines()]
    assert [(s["shard"], s["bytes"]) for s in stats] == [(s["file"], s["bytes"]) for s in manifest["shards"]]
    assert stats[-1]["teacher_seconds_total"] == round(seconds["teacher"], 4)


def test_extend_with_larger_samples_total_matches_one_run(tiny_cfg, tmp_path):
    small = tiny_cfg(samples_total=7)
    generate.generate(small)
    generate.generate(tiny_cfg(samples_total=12))
    one_run = tiny_cfg(data_dir=str(tmp_path / "one"), samples_total=12)
    generate.generate(one_run)
    extended, reference = read_folder(tmp_path / "data"), read_folder(tmp_path / "one")
    np.testing.assert_array_equal(extended["index"], np.arange(12))
    for key in reference:
        np.testing.assert_array_equal(extended[key], reference[key], err_msg=key)


def _snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name not in ("config.json", ".lock")}


def test_folder_made_with_another_config_is_refused(tiny_cfg, small_teacher, tmp_path):
    generate.generate(tiny_cfg(samples_total=3))
    before = _snapshot(tmp_path / "data")
    with pytest.raises(UserError, match="made with steps=10, not 20"):
        generate.generate(tiny_cfg(samples_total=6, steps=20, chunks=5))
    result = run_cli("Main_Distill.py", "--mode", "generate", "--config", "tiny", f"teacher_path={small_teacher}",
                     f"data_dir={tmp_path / 'data'}", "samples_total=6", "percentile=99.9")
    assert_one_sentence_error(result, "percentile=99.5, not 99.9")
    assert _snapshot(tmp_path / "data") == before


def test_hand_edited_manifest_is_refused_before_writing(tiny_cfg, tmp_path):
    generate.generate(tiny_cfg())
    path = tmp_path / "data" / "manifest.json"
    manifest = json.loads(path.read_text())
    del manifest["shards"][1]
    path.write_text(json.dumps(manifest))
    before = _snapshot(tmp_path / "data")
    with pytest.raises(UserError, match="indices 5..9 are in no shard"):
        generate.generate(tiny_cfg(samples_total=20))
    assert _snapshot(tmp_path / "data") == before


def test_more_steps_than_the_teacher_has_is_one_sentence(small_teacher, tmp_path):
    result = run_cli("Main_Distill.py", "--mode", "generate", "--config", "tiny", f"teacher_path={small_teacher}", f"data_dir={tmp_path}",
                     "steps=2000", "chunks=10")
    assert_one_sentence_error(result, "steps=2000", "1000")


@pytest.mark.parametrize("override,fragments", [("samples_total=0", ("samples_total", "must be positive", "0")),
                                                ("samples_total=-3", ("samples_total", "must be positive", "-3")),
                                                ("chunks=3", ("chunks=3 does not divide steps=10",)),
                                                ("stepz=3", ("did you mean 'steps'",))])
def test_bad_generate_config_is_one_sentence(override, fragments, small_teacher, tmp_path):
    result = run_cli("Main_Distill.py", "--mode", "generate", "--config", "tiny", f"teacher_path={small_teacher}",
                     f"data_dir={tmp_path}", override)
    assert_one_sentence_error(result, *fragments)
    assert not (tmp_path / "manifest.json").exists()


def test_resume_after_sigkill_gives_identical_data(small_teacher, tmp_path, tiny_cfg):
    args = ["--mode", "generate", "--config", "tiny", f"teacher_path={small_teacher}", "samples_total=24",
            "shard_size=3", "gen_batch_size=3", f"data_dir={tmp_path / 'killed'}"]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.Popen([sys.executable, str(ROOT / "Main_Distill.py"), *args], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    manifest = tmp_path / "killed" / "manifest.json"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if manifest.exists() and len(json.loads(manifest.read_text())["shards"]) >= 2:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    listed = len(json.loads(manifest.read_text())["shards"])
    assert 2 <= listed < 8, "the run was not interrupted midway"
    finished = run_cli("Main_Distill.py", *args)
    assert finished.returncode == 0, finished.stderr
    assert f"{3 * listed} samples present" in finished.stdout
    generate.generate(tiny_cfg(samples_total=24, shard_size=3, gen_batch_size=3, data_dir=str(tmp_path / "clean")))
    resumed, clean = read_folder(tmp_path / "killed"), read_folder(tmp_path / "clean")
    for key in clean:
        np.testing.assert_array_equal(resumed[key], clean[key], err_msg=key)
    assert not list((tmp_path / "killed").glob(".*.tmp"))


def test_shard_round_trip_with_plain_numpy_and_zstandard(tmp_path):
    arrays = {"a": np.arange(6, dtype=np.int8).reshape(2, 3), "b": np.ones((2, 1), np.float16)}
    path = tmp_path / "x.npz.zst"
    path.write_bytes(store.encode_npz(arrays, level=10))
    raw = zstandard.ZstdDecompressor().decompress(path.read_bytes())
    # the README's reader calls decompress() without a bound, which needs the size in the frame header
    assert zstandard.frame_content_size(path.read_bytes()) == len(raw)
    with np.load(io.BytesIO(raw)) as npz:
        assert set(npz.files) == {"a", "b"}
        np.testing.assert_array_equal(npz["a"], arrays["a"])
        assert npz["b"].dtype == np.float16
    assert raw[:2] == b"PK"  # a plain (uncompressed) npz inside one zstd frame


def test_channels_last_teacher_gives_the_same_records(tiny_cfg):
    """The inference memory format is a speed choice only: the teacher's chains agree to float rounding."""
    import torch
    records = {}
    for layout in (True, False):
        gen = generate.Generator(tiny_cfg(channels_last=layout))
        conv = gen.unet.down_blocks[0].resnets[0].conv1.weight
        assert conv.is_contiguous(memory_format=torch.channels_last) == layout
        records[layout] = gen.records(np.arange(4), codecs.ErrorTally())
    for key, value in records[True].items():
        if value.dtype.kind == "f":
            # the image is kept in grey levels: a rounding difference at a level's edge moves it one level
            atol = 1 / 127.5 + 1e-3 if key == "x0_teacher_f16" else 2e-3
            np.testing.assert_allclose(value.astype(np.float32), records[False][key].astype(np.float32),
                                       atol=atol, rtol=0)


def test_a_teacher_with_nan_weights_is_not_told_to_use_fp32(tmp_path, capsys):
    """Issue 31: the advice was "use gen_precision=fp32" with fp32 already set."""
    import torch
    from pipeline.core import config
    from pipeline.teacher import teachers
    from conftest import run_distill_in_process
    cfg = config.resolve("tiny")
    torch.manual_seed(0)
    unet = teachers.new_unet(cfg, channels=1)
    with torch.no_grad():
        unet.conv_in.weight[0, 0, 0, 0] = float("nan")
    teachers.save_teacher(unet, teachers.new_scheduler(cfg), tmp_path / "teacher")
    result = run_distill_in_process(capsys, "--mode", "generate", "--config", "tiny",
                                    f"teacher_path={tmp_path / 'teacher'}", f"data_dir={tmp_path / 'data'}",
                                    "gen_precision=fp32")
    assert_one_sentence_error(result, "gen_precision=fp32", "hold NaN or inf themselves")
    assert "use gen_precision=fp32" not in result.stderr


@pytest.mark.parametrize("samples_total", [6, 4, 12], ids=["resume-complete", "fewer", "extend"])
def test_a_teacher_whose_weights_changed_is_refused_by_run_and_plan(samples_total, tmp_path, capsys):
    """Issue 31: every generate into a folder that recorded its teacher's sha256 (resume, rerun, extension, and
    the --dry-run plan of each) refuses a teacher edited in place since, with one sentence and the folder kept."""
    import torch
    from conftest import run_distill_in_process
    from pipeline.core import config
    from pipeline.teacher import teachers
    cfg = config.resolve("tiny")
    torch.manual_seed(0)
    unet, teacher = teachers.new_unet(cfg, channels=1), tmp_path / "teacher"
    teachers.save_teacher(unet, teachers.new_scheduler(cfg), teacher)
    args = ["--mode", "generate", "--config", "tiny", f"teacher_path={teacher}", f"data_dir={tmp_path / 'data'}",
            "shard_size=3"]
    assert run_distill_in_process(capsys, *args, "samples_total=6").returncode == 0
    before = _snapshot(tmp_path / "data")
    with torch.no_grad():
        unet.conv_in.weight[0, 0, 0, 0] += 1e-3  # one weight retrained in place
    teachers.save_teacher(unet, teachers.new_scheduler(cfg), teacher)
    for plan in ([], ["--dry-run"]):
        result = run_distill_in_process(capsys, *args, f"samples_total={samples_total}", *plan)
        assert result.returncode == 2
        assert_one_sentence_error(result, "was made by a teacher whose weights have sha256",
                                  f"the teacher in {teacher} has", "changed since", "teacher_path=")
        assert "would write" not in result.stdout
    assert _snapshot(tmp_path / "data") == before
