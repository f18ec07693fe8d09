import json

import pytest

from pipeline import config
from pipeline.errors import UserError

from conftest import assert_one_sentence_error, run_cli


@pytest.mark.parametrize("preset", ["fashion_mnist", "cifar10", "tiny"])
def test_every_preset_resolves(preset):
    cfg = config.resolve(preset)
    assert cfg["name"] == preset and set(config.DEFAULTS) <= set(cfg)


def test_overrides_are_typed():
    cfg = config.resolve("tiny", ["steps=20", "percentile=99.9", "hflip=false", "unet_channels=8,16", "name=x"])
    assert cfg["steps"] == 20 and cfg["percentile"] == 99.9 and cfg["hflip"] is False
    assert cfg["unet_channels"] == [8, 16] and cfg["name"] == "x"


@pytest.mark.parametrize("override,fragment", [("chunk=5", "did you mean 'chunks'"), ("steps=ten", "must be int"),
                                               ("space=voxel", "must be one of pixel, latent"), ("steps", "key=value")])
def test_bad_overrides_are_refused(override, fragment):
    with pytest.raises(UserError, match=fragment):
        config.resolve("tiny", [override])


def test_unknown_key_in_a_config_file(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text('name = "mine"\nsamples_totl = 5\n')
    with pytest.raises(UserError, match="samples_totl.*did you mean 'samples_total'"):
        config.resolve(str(path))


def test_a_saved_config_json_runs_again(tiny_cfg, tmp_path):
    from pipeline import generate
    folder, _ = generate.generate(tiny_cfg(samples_total=2))
    again = config.resolve(str(folder / "config.json"))
    assert again == json.loads((folder / "config.json").read_text())


def test_help_lists_every_mode():
    out = run_cli("Main_Distill.py", "--help").stdout
    for mode in ("all", "generate", "verify", "repair", "export", "import", "train_d", "eval_d"):
        assert f"  {mode} " in out
    assert "  pretrain " in run_cli("Main_Diffusion.py", "--help").stdout


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path):
    result = run_cli("Main_Distill.py", "--config", "tiny", "--dry-run", f"data_dir={tmp_path / 'd'}")
    assert result.returncode == 0, result.stderr
    assert "[dry-run] would write 12 samples" in result.stdout
    assert "[dry-run] then train D for 6 steps" in result.stdout
    resolved = result.stdout[result.stdout.index("{"):result.stdout.index("\n}") + 2]
    assert json.loads(resolved)["samples_total"] == 12
    assert not (tmp_path / "d").exists()


def test_unknown_preset_is_one_sentence():
    assert_one_sentence_error(run_cli("Main_Distill.py", "--config", "nope"), "nope", "fashion_mnist")
