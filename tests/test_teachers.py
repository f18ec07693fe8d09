import json

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel
from safetensors.torch import load_file

from pipeline.core import config
from pipeline.core.errors import UserError
from pipeline.data import generate
from pipeline.teacher import teachers

from conftest import assert_one_sentence_error, run_cli

GOOGLE_DDPM_CIFAR10 = dict(
    sample_size=32, in_channels=3, out_channels=3, block_out_channels=(128, 256, 256, 256), layers_per_block=2,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), attention_head_dim=None,
    norm_num_groups=32, norm_eps=1e-6, act_fn="silu", time_embedding_type="positional", flip_sin_to_cos=False,
    freq_shift=1, downsample_padding=0, center_input_sample=False, add_attention=True)


@pytest.fixture(scope="session")
def google_config_teacher(tmp_path_factory):
    """A random UNet2DModel with the exact google/ddpm-cifar10-32 config, written with save_pretrained."""
    torch.manual_seed(0)
    unet = UNet2DModel(**GOOGLE_DDPM_CIFAR10)
    path = tmp_path_factory.mktemp("ddpm_ema_cifar10")
    unet.save_pretrained(path / "unet")
    DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                  clip_sample=True).save_pretrained(path / "scheduler")
    return path, teachers.parameter_count(unet)


def test_the_cifar10_preset_loads_the_google_config_teacher_as_saved(google_config_teacher):
    path, _ = google_config_teacher
    unet, ddpm, source = teachers.load_teacher(config.resolve("cifar10", [f"teacher_path={path}"]))
    assert source == str(path) and list(unet.config.block_out_channels) == [128, 256, 256, 256]
    saved = load_file(path / "unet" / "diffusion_pytorch_model.safetensors")
    state = unet.state_dict()
    assert set(saved) == set(state) and all(torch.equal(saved[k], state[k]) for k in saved)
    assert ddpm.config.num_train_timesteps == 1000 and ddpm.config.beta_end == 0.02


def test_cifar10_preset_generates_with_the_google_config_teacher(google_config_teacher, tmp_path):
    path, _ = google_config_teacher
    cfg = config.resolve("cifar10", [f"teacher_path={path}", f"data_dir={tmp_path}", "samples_total=2",
                                     "shard_size=2", "gen_batch_size=2", "steps=2", "chunks=2", "num_threads=1"])
    generate.generate(cfg)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["generator"]["image_shape"] == [3, 32, 32]
    assert manifest["record"]["r_chunks_q"]["shape"] == [2, 3, 32, 32]
    assert manifest["generator"]["teacher"] == str(path)


def test_missing_cifar10_teacher_offline_names_both_places(tmp_path):
    result = run_cli("Main_Distill.py", "--config", "cifar10", f"teacher_path={tmp_path / 'ddpm_ema_cifar10'}",
                     f"data_dir={tmp_path / 'data'}")
    assert_one_sentence_error(result, "ddpm_ema_cifar10", "google/ddpm-cifar10-32")
    assert not (tmp_path / "data" / "manifest.json").exists()


def test_teacher_folder_without_weights_is_one_sentence(tmp_path):
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text(json.dumps(UNet2DModel().config))
    result = run_cli("Main_Distill.py", "--config", "tiny", f"teacher_path={tmp_path}", f"data_dir={tmp_path / 'd'}")
    assert_one_sentence_error(result, "no teacher weights", str(tmp_path))


def test_damaged_weights_file_is_one_sentence(small_teacher, tmp_path):
    import shutil
    broken = tmp_path / "teacher"
    shutil.copytree(small_teacher, broken)
    weights = broken / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(UserError, match="cannot be loaded"):
        teachers.load_teacher(config.resolve("tiny", [f"teacher_path={broken}"]))


def _fake_cifar10(folder, per_batch=6):
    """Stand-in CIFAR-10 batches in the genuine pickle layout (their MD5 sums differ, hence
    verify_dataset_md5=false)."""
    import pickle

    import numpy as np
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch"]:
        batch = {b"data": rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8),
                 b"labels": [int(v) for v in rng.integers(0, 10, per_batch)]}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=4))
    return folder


def test_cifar10_preset_end_to_end_with_the_google_config_teacher(google_config_teacher, tmp_path):
    from pipeline.evaluation import evaluate
    from pipeline.train import binarize, train_d
    path, _ = google_config_teacher
    cfg = config.resolve("cifar10", [
        f"teacher_path={path}", f"data_dir={tmp_path / 'data'}", f"dataset_dir={_fake_cifar10(tmp_path / 'cifar')}",
        "verify_dataset_md5=false", f"d_run_dir={tmp_path / 'run'}", f"eval_dir={tmp_path / 'out'}",
        f"fid_cache_dir={tmp_path / 'fid'}", "samples_total=4", "shard_size=2", "gen_batch_size=2", "steps=2",
        "chunks=2", "num_threads=1", "holdout_samples=2", "d_train_steps=1", "d_batch_size=2", "shuffle_buffer=2",
        "data_workers=0", "fid_samples=2", "fid_reference_count=4", "fid_batch_size=2", "throughput_batch=2",
        "walk_frames=2", f"b_run_dir={tmp_path / 'b'}", "b_train_steps=1", "b_batch_size=2", "b_checkpoint_every=1"])
    generate.generate(cfg)
    train_d.train_d(cfg)
    binarize.binarize(cfg)
    report = evaluate.eval_d(cfg)
    assert report["size"]["teacher_parameters"] == 35_746_307
    assert report["size"]["d"]["parameters"] > 35_746_307
    # the 35.7 M-parameter B packs into about a bit per weight (attention q/k/v/proj included)
    assert report["size"]["b"]["times_smaller_than_d_fp32"] > 20
    assert report["throughput"]["teacher_steps"] == 2
    assert (tmp_path / "out" / "grid.png").is_file()


def test_cifar10_rectify_dry_run_prints_the_reference_parameter_counts(google_config_teacher):
    path, _ = google_config_teacher
    result = run_cli("Main_Diffusion.py", "--mode", "rectify", "--config", "cifar10", "--dry-run", f"teacher_path={path}")
    assert result.returncode == 0, result.stderr
    assert "16,445,806 trainable of 87,210,094 parameters" in result.stdout
