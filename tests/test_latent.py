"""Teacher data in latent space: the ring's record (telescoping in latent space), generate / verify /
repair / export with an RNet, the reference reader on exported latent files, and the refusals."""
import io
import json

import numpy as np
import pytest
import torch
import zstandard

from pipeline.core import config
from pipeline.data import store, teacher_data
from pipeline.students import student_d
from pipeline.teacher import ring, rnet_files, teachers
from pipeline.train.rectify import RectifyTrainer

from conftest import assert_one_sentence_error, read_records, run_cli

RING_STEPS, CHUNKS, LATENT = 5, 5, 16


@pytest.fixture(scope="module")
def rnet_folder(small_teacher, tmp_path_factory):
    """A tiny RNet around the small teacher, trained for two steps on a 5-step ring."""
    run = tmp_path_factory.mktemp("rectify")
    items = {"teacher_path": small_teacher, "rect_run_dir": run, "rect_steps": RING_STEPS, "rect_train_steps": 2,
             "rect_batch_size": 4, "rect_rin_blocks": 1, "rect_r_blocks": 1, "rect_head_blocks": 1,
             "rect_lora": "resnet", "rect_lora_rank": 2}
    RectifyTrainer(config.resolve("tiny", [f"{k}={v}" for k, v in items.items()])).run()
    return run / "rnet"


def _args(small_teacher, rnet_folder, data, **extra):
    items = {"teacher_path": small_teacher, "rnet_path": rnet_folder, "data_dir": data, "space": "latent",
             "steps": RING_STEPS, "chunks": CHUNKS, "samples_total": 6, "shard_size": 3, **extra}
    return ["--config", "tiny", *(f"{k}={v}" for k, v in items.items())]


def test_the_ring_record_telescopes_in_latent_space(small_teacher, rnet_folder):
    unet, _, _ = teachers.load_teacher(config.resolve("tiny", [f"teacher_path={small_teacher}"]))
    net, meta = rnet_files.load_rnet(rnet_folder, unet, teachers.weights_sha256(unet), steps=RING_STEPS)
    x_T, grid = torch.randn(3, 1, 32, 32), ring.ring_timesteps(1000, RING_STEPS)
    rin0, r_chunks, z_final, x0 = ring.latent_residual_record(net, x_T, grid, CHUNKS)
    assert rin0.shape == (3, LATENT, 32, 32) and r_chunks.shape == (3, CHUNKS, LATENT, 32, 32)
    torch.testing.assert_close(rin0 + r_chunks.sum(1), z_final, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(rin0, net.rin(x_T, torch.full((3,), 999)))
    torch.testing.assert_close(x0, ring.ring_sample(net, x_T, grid))


def test_generate_verify_repair_and_export_in_latent_space(small_teacher, rnet_folder, tmp_path):
    data, ref = tmp_path / "data", tmp_path / "ref"
    result = run_cli("Main_Distill.py", "--mode", "generate", *_args(small_teacher, rnet_folder, data))
    assert result.returncode == 0, result.stderr
    manifest = store.Manifest.load(data)
    gen = manifest.data["generator"]
    assert gen["space"] == "latent" and gen["latent_channels"] == LATENT and len(gen["rnet_sha256"]) == 64
    records = read_records(data)
    assert records["rin0_q"].shape == (6, LATENT, 32, 32) and records["r_chunks_q"].shape == (6, CHUNKS, LATENT, 32, 32)
    assert records["x0_teacher_f16"].shape == (6, 1, 32, 32)
    # training reads rin0 as the dequantised latent, not x_T (as in pixel space)
    tensors = teacher_data.read_range(manifest, 0, 6)
    unet, _, _ = teachers.load_teacher(config.resolve("tiny", [f"teacher_path={small_teacher}"]))
    net, _ = rnet_files.load_rnet(rnet_folder, unet, teachers.weights_sha256(unet))
    with torch.no_grad():
        rin0 = net.rin(tensors["x_T"], torch.full((6,), 999))
    assert tensors["rin0"].shape == (6, LATENT, 32, 32)
    assert (tensors["rin0"] - rin0).abs().mean() < 0.02 * rin0.abs().mean()
    first = (data / "shard-00000.npz.zst").read_bytes()
    (data / "shard-00000.npz.zst").write_bytes(first[:100])
    assert run_cli("Main_Distill.py", "--mode", "verify", *_args(small_teacher, rnet_folder, data)).returncode != 0
    result = run_cli("Main_Distill.py", "--mode", "repair", *_args(small_teacher, rnet_folder, data))
    assert result.returncode == 0, result.stderr
    assert (data / "shard-00000.npz.zst").read_bytes() == first
    result = run_cli("Main_Distill.py", "--mode", "export", *_args(small_teacher, rnet_folder, data,
                                                                     reference_dir=ref))
    assert result.returncode == 0, result.stderr
    # the reference's QuantChunkDataset: stream_reader(f).read(), np.load, dequantise with the fp16 scales
    with open(ref / "sample_00000004.zst", "rb") as f, \
            zstandard.ZstdDecompressor().stream_reader(f) as reader:
        sample = dict(np.load(io.BytesIO(reader.read())))
    rin0 = sample["rin0_q"].astype(np.float16) * sample["rin0_scale_f16"][:, None, None]
    chunks = sample["r_chunks_q"].astype(np.float16) * sample["r_chunks_scale_f16"][:, :, None, None]
    assert rin0.shape == (LATENT, 32, 32) and chunks.shape == (CHUNKS, LATENT, 32, 32)
    np.testing.assert_array_equal(sample["rin0_q"], records["rin0_q"][4])


def test_latent_generate_refuses_what_does_not_fit(small_teacher, rnet_folder, tmp_path):
    data = tmp_path / "data"
    no_rnet = run_cli("Main_Distill.py", "--mode", "generate", *_args(small_teacher, "", data))
    assert_one_sentence_error(no_rnet, "--mode rectify")
    other_steps = run_cli("Main_Distill.py", "--mode", "generate", *_args(small_teacher, rnet_folder, data, steps=10))
    assert_one_sentence_error(other_steps, "ring steps")
    odd_chunks = run_cli("Main_Distill.py", "--mode", "generate", *_args(small_teacher, rnet_folder, data, chunks=2))
    assert_one_sentence_error(odd_chunks, "chunks=2")
    other = tmp_path / "other_teacher"
    cfg = config.resolve("tiny")
    torch.manual_seed(1)
    teachers.save_teacher(teachers.new_unet(cfg, channels=1), teachers.new_scheduler(cfg), other)
    other_teacher = run_cli("Main_Distill.py", "--mode", "generate", *_args(other, rnet_folder, data))
    assert_one_sentence_error(other_teacher, "another teacher")
    assert not (data / store.MANIFEST).exists()


def test_d_and_b_train_and_evaluate_on_latent_data(small_teacher, rnet_folder, tmp_path, capsys):
    from conftest import cli_args, run_distill_in_process, tiny_items
    items = tiny_items(small_teacher, tmp_path, rnet_path=rnet_folder, space="latent", steps=RING_STEPS,
                       chunks=CHUNKS)
    for mode in ("generate", "train_d", "binarize", "eval_d"):  # the command line's front end, in this process
        result = run_distill_in_process(capsys, "--mode", mode, *cli_args(items))
        assert result.returncode == 0, (mode, result.stderr[-2000:])
    d = student_d.load_student(tmp_path / "d" / "student")
    assert d.config["space"] == "latent" and d.config["x0out"]["width"] == LATENT
    # D's read-out is the RNet's x0 head, unchanged by training
    unet, _, _ = teachers.load_teacher(config.resolve("tiny", [f"teacher_path={small_teacher}"]))
    net, _ = rnet_files.load_rnet(rnet_folder, unet, teachers.weights_sha256(unet))
    for name, tensor in net.x0out.state_dict().items():
        torch.testing.assert_close(d.x0out.state_dict()[name], tensor)
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["scores"]["d"]["fid"] > 0 and report["scores"]["b"]["fid"] > 0
    assert report["throughput"]["d"]["speedup"] > 0 and report["teacher_sampler"].startswith("ring")
    for student in ("d", "b"):  # one-step samples read out through X0out, from D and from the packed B
        result = run_distill_in_process(capsys, "--mode", "sample", *cli_args(items), f"sample_student={student}",
                                        "sample_count=2", f"student_samples_dir={tmp_path / student}")
        assert result.returncode == 0, result.stderr[-2000:]
        assert (tmp_path / student / "grid.png").is_file()
    x0out_parameters = sum(p.numel() for p in net.x0out.parameters())
    assert report["size"]["d"]["x0out_parameters"] == x0out_parameters
    assert report["size"]["b"]["values_by_kind"]["x0 head (X0out, latent space)"] == x0out_parameters


def test_imported_latent_data_trains_once_its_rnet_is_named(small_teacher, rnet_folder, tmp_path):
    """Issue 31: latent data (what the reference itself writes) could be imported but never trained on."""
    data, ref = tmp_path / "data", tmp_path / "ref"
    for mode, extra in (("generate", {}), ("export", {"reference_dir": ref})):
        result = run_cli("Main_Distill.py", "--mode", mode, *_args(small_teacher, rnet_folder, data, **extra))
        assert result.returncode == 0, result.stderr[-2000:]

    def imported(name, *named):
        return run_cli("Main_Distill.py", "--mode", "import", "--config", "tiny", f"reference_dir={ref}",
                       f"data_dir={tmp_path / name}", *named)

    def train_d(name):
        return run_cli("Main_Distill.py", "--mode", "train_d", "--config", "tiny", f"teacher_path={small_teacher}",
                       f"data_dir={tmp_path / name}", f"d_run_dir={tmp_path / name}-d", "holdout_samples=2",
                       "d_train_steps=2", "d_checkpoint_every=2", "data_workers=0", "d_batch_size=2")
    teacher = f"import_teacher={small_teacher}"
    assert_one_sentence_error(imported("alone", f"import_rnet={rnet_folder}"), "needs import_teacher= too")
    assert imported("unnamed", teacher).returncode == 0
    assert_one_sentence_error(train_d("unnamed"), "imported without naming the RNet", "import_rnet=")
    result = imported("named", teacher, f"import_rnet={rnet_folder}")
    assert result.returncode == 0, result.stderr[-2000:]
    made, got = (store.Manifest.load(f).data["generator"] for f in (data, tmp_path / "named"))
    for key in ("teacher_sha256", "rnet_sha256", "space", "latent_channels", "chunks", "T", "image_shape"):
        assert got[key] == made[key], key
    trained = train_d("named")
    assert trained.returncode == 0, trained.stderr[-2000:]
    assert (tmp_path / "named-d" / "student" / "model.safetensors").is_file()
    pixel = tmp_path / "pixel"
    pixel.mkdir()
    with open(ref / "sample_00000000.zst", "rb") as f, zstandard.ZstdDecompressor().stream_reader(f) as reader:
        sample = dict(np.load(io.BytesIO(reader.read())))
    sample.update(rin0_q=sample["rin0_q"][:1], rin0_scale_f16=sample["rin0_scale_f16"][:1],
                  r_chunks_q=sample["r_chunks_q"][:, :1], r_chunks_scale_f16=sample["r_chunks_scale_f16"][:, :1])
    buf = io.BytesIO()
    np.savez(buf, **sample)
    (pixel / "sample_00000000.zst").write_bytes(zstandard.ZstdCompressor().compress(buf.getvalue()))
    result = run_cli("Main_Distill.py", "--mode", "import", "--config", "tiny", f"reference_dir={pixel}",
                     f"data_dir={tmp_path / 'p'}", teacher, f"import_rnet={rnet_folder}")
    assert_one_sentence_error(result, "names an RNet, but the imported files hold pixel-space data")
    assert not (tmp_path / "p").exists() and not (tmp_path / "alone").exists()
