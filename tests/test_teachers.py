import json

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel

from pipeline import config, generate, teachers
from pipeline.errors import UserError

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


def test_google_config_has_the_reference_parameter_count(google_config_teacher):
    assert google_config_teacher[1] == 35_746_307


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
