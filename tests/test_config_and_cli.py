import json
import re

import pytest

from pipeline.core import config, config_keys
from pipeline.core.errors import UserError

from conftest import ROOT, assert_one_sentence_error, run_cli


@pytest.mark.parametrize("preset", config.preset_names())
def test_every_preset_is_valid_for_every_stage(preset):
    cfg = config.resolve(preset)
    assert cfg["name"] == preset
    config.validate(cfg, config.STAGES)


@pytest.mark.parametrize("name", list(config.KEYS))
def test_every_key_is_read_by_a_stage_and_its_default_is_accepted(name):
    spec = config.KEYS[name]
    assert spec.stages and set(spec.stages) <= set(config.STAGES) and spec.help
    assert spec.range is None or spec.range.accepts(spec.default)
    assert not spec.choices or spec.default in spec.choices
    assert spec.check is None or spec.check(spec.default) is None


@pytest.mark.parametrize("override,fragment", [
    ("b_train_steps=0", "'b_train_steps' must be positive"), ("d_lr_warmup_fraction=1", "within (0, 1)"),
    ("percentile=40", "within [50, 100]"), ("zstd_level=23", "within [0, 22]"), ("lambda_spd=-1", "zero or positive"),
    ("chunks=3", "does not divide steps=10"), ("unet_channels=", "at least one value"),
    ("unet_norm_groups=5", "must divide every entry"), ("unet_attention_levels=2", "beyond the 2"),
    ("beta_start=0.5", "below beta_end"), ("fid_samples=5", "holdout_samples=4"), ("device=gpu", "cuda:N"),
    ("space=latent", "rectify"), ("ema_decay=1", "within [0, 1)"), ("d_lr=nan", "'d_lr' must be positive"),
    ("b_lr=inf", "'b_lr' must be positive"), ("holdout_samples=12", "leaves no training records of the samples_total"),
    ("train_samples=9", "more than the samples_total=12")])
def test_out_of_range_values_are_refused_for_the_stages_that_read_them(override, fragment):
    cfg = config.resolve("tiny", [override])
    with pytest.raises(UserError, match=re.escape(fragment)):
        config.validate(cfg, config.STAGES)


def test_a_stage_does_not_validate_keys_it_never_reads():
    config.validate(config.resolve("tiny", ["b_train_steps=0"]), ["generate", "train_d"])


@pytest.mark.parametrize("key", [name for name, spec in config.KEYS.items() if spec.folder])
def test_a_folder_key_naming_a_file_is_refused(key, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    for value in (blocker, blocker / "below"):
        with pytest.raises(UserError, match=f"config key '{key}' names .*not a folder"):
            config.validate(config.resolve("tiny", [f"{key}={value}"]), config.STAGES)


def test_docs_config_md_is_the_table():
    assert (ROOT / "docs" / "config.md").read_text() == config_keys.markdown(), \
        "regenerate it: python -m pipeline.core.config_keys > docs/config.md"


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
    from pipeline.data import generate
    folder, _ = generate.generate(tiny_cfg(samples_total=2))
    again = config.resolve(str(folder / "config.json"))
    assert again == json.loads((folder / "config.json").read_text())


def test_help_lists_every_mode_and_every_key():
    distill, diffusion = run_cli("Main_Distill.py", "--help").stdout, run_cli("Main_Diffusion.py", "--help").stdout
    for mode in ("all", "generate", "verify", "repair", "export", "import", "train_d", "binarize", "eval_d", "sample"):
        assert f"  {mode} " in distill
    assert "  pretrain " in diffusion and "  sample " in diffusion
    for name in config.KEYS:
        assert f"\n  {name} = " in distill + diffusion, name


@pytest.mark.parametrize("dry_run", [True, False])
def test_a_bad_late_stage_key_stops_all_before_generate_starts(tmp_path, dry_run):
    result = run_cli("Main_Distill.py", "--config", "tiny", f"data_dir={tmp_path / 'd'}", "b_lmb_min_size=-1",
                     *(["--dry-run"] if dry_run else []))
    assert_one_sentence_error(result, "b_lmb_min_size", "zero or positive")
    assert result.returncode == 2 and not (tmp_path / "d").exists()


def test_a_run_folder_that_is_a_file_is_one_sentence(tmp_path):
    (tmp_path / "run").write_text("")
    result = run_cli("Main_Distill.py", "--mode", "train_d", "--config", "tiny", f"d_run_dir={tmp_path / 'run'}")
    assert_one_sentence_error(result, "d_run_dir", "not a folder")


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


def test_dry_run_of_a_training_stage_checks_its_data_and_split(tiny_cfg, tmp_path, small_teacher):
    from pipeline.data import generate
    args = ["--config", "tiny", f"teacher_path={small_teacher}", f"data_dir={tmp_path / 'data'}",
            f"d_run_dir={tmp_path / 'run'}"]
    assert_one_sentence_error(run_cli("Main_Distill.py", "--mode", "train_d", "--dry-run", *args), "no manifest.json")
    generate.generate(tiny_cfg(samples_total=6))
    result = run_cli("Main_Distill.py", "--mode", "train_d", "--dry-run", *args)
    assert "[dry-run] would train D for 6 steps on records 4..5" in result.stdout, result.stderr
    assert not (tmp_path / "run").exists()
    assert_one_sentence_error(run_cli("Main_Distill.py", "--mode", "train_d", "--dry-run", *args,
                                      "holdout_samples=6"), "leaves no training records")


@pytest.mark.parametrize("name,text", [("broken.toml", "name = \n"), ("broken.json", "{\"name\": "),
                                       ("list.json", "[1, 2]"), ("deep.json", "[" * 100_000 + "]" * 100_000),
                                       ("deep.toml", "a = " + "[" * 100_000 + "]" * 100_000)])
def test_a_config_file_that_does_not_parse_is_one_sentence(tmp_path, name, text):
    (tmp_path / name).write_text(text)
    result = run_cli("Main_Distill.py", "--config", str(tmp_path / name), "--dry-run")
    assert_one_sentence_error(result, name)


@pytest.mark.parametrize("override,fragment", [
    ("fid_reference_count=2", "fid_reference_count=2 is smaller than fid_samples=4"),
    ("fid_reference_count=10001", "more than the 10000 images of the fashion_mnist test split"),
    ("b_full_precision=*", "b_full_precision keeps every layer in full precision"),
    ("b_full_precision=unet.*,heads.*", "b_full_precision keeps every layer in full precision"),
])
def test_late_keys_of_all_are_refused_before_generate_starts(tmp_path, small_teacher, capsys, override, fragment):
    """Issue 31: these stopped --mode all only after generate, train_d (and binarize) had run."""
    from conftest import run_distill_in_process
    result = run_distill_in_process(capsys, "--config", "tiny", f"teacher_path={small_teacher}",
                                    f"data_dir={tmp_path / 'd'}", override)
    assert_one_sentence_error(result, fragment)
    assert result.returncode == 2 and not (tmp_path / "d").exists()


def test_patterns_that_leave_a_binary_layer_pass_the_early_check(tiny_cfg):
    from pipeline.train import binarize
    binarize.check_before_training(tiny_cfg(b_full_precision="unet.*"))  # the heads stay binary


def test_overrides_may_follow_dry_run(tmp_path, small_teacher, capsys):
    """Issue 31: argparse refused key=value after --dry-run."""
    from conftest import run_distill_in_process
    result = run_distill_in_process(capsys, "--config", "tiny", f"teacher_path={small_teacher}", "--dry-run",
                                    "samples_total=10", f"data_dir={tmp_path / 'd'}")
    assert result.returncode == 0, result.stderr
    assert "[dry-run] would write 10 samples" in result.stdout and not (tmp_path / "d").exists()
