"""The tiny preset from a clean folder, as a user runs it: the shipped teacher, every data mode."""
import json

from conftest import ROOT, run_cli


def test_tiny_preset_with_the_shipped_teacher(tmp_path):
    data, ref, imported = tmp_path / "data", tmp_path / "ref", tmp_path / "imported"
    assert (ROOT / "Diffusion" / "fashion_mnist" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    result = run_cli("Main_Distill.py", "--config", "tiny", f"data_dir={data}")
    assert result.returncode == 0, result.stderr
    assert "12 samples in 3 shard(s)" in result.stdout and "np.load(io.BytesIO(zstandard" in result.stdout
    manifest = json.loads((data / "manifest.json").read_text())
    assert manifest["generator"]["teacher"].endswith("Diffusion/fashion_mnist")
    assert json.loads((data / "config.json").read_text())["name"] == "tiny"
    for args in (["--mode", "verify", f"data_dir={data}"],
                 ["--mode", "export", f"data_dir={data}", f"reference_dir={ref}"],
                 ["--mode", "import", f"data_dir={imported}", f"reference_dir={ref}"],
                 ["--mode", "verify", f"data_dir={imported}"]):
        step = run_cli("Main_Distill.py", "--config", "tiny", *args)
        assert step.returncode == 0, (args, step.stderr)
    assert len(list(ref.glob("sample_*.zst"))) == 12
