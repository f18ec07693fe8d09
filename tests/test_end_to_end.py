"""The tiny preset from a clean folder, as a user runs it: the shipped teacher, every mode."""
import json

from conftest import ROOT, run_cli


def test_tiny_preset_with_the_shipped_teacher(tmp_path):
    data, ref, imported = tmp_path / "data", tmp_path / "ref", tmp_path / "imported"
    outputs = [f"data_dir={data}", f"d_run_dir={tmp_path / 'run'}", f"b_run_dir={tmp_path / 'b'}",
               f"eval_dir={tmp_path / 'out'}", f"fid_cache_dir={tmp_path / 'fid'}"]
    assert (ROOT / "Diffusion" / "fashion_mnist" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    result = run_cli("Main_Distill.py", "--config", "tiny", *outputs)  # the default mode: the whole pipeline
    assert result.returncode == 0, result.stderr
    assert "12 samples in 3 shard(s)" in result.stdout and "codec ef-int8+zstd: z_final RMSE" in result.stdout
    assert "read its records with pipeline.data.store.Manifest.load(folder).read_shard(entry)" in result.stdout
    assert f"report: {tmp_path / 'out' / 'report.md'}" in result.stdout
    assert f"sample grids: {tmp_path / 'out' / 'grid.png'}, {tmp_path / 'out' / 'b_grid.png'}" in result.stdout
    assert "packed B:" in result.stdout and (tmp_path / "b" / "packed" / "packed.safetensors").is_file()
    manifest = json.loads((data / "manifest.json").read_text())
    assert manifest["generator"]["teacher"].endswith("Diffusion/fashion_mnist")
    assert json.loads((data / "config.json").read_text())["name"] == "tiny"
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["throughput"]["teacher_steps"] == 10 and report["fid_samples"] == 4
    assert set(report["scores"]) == {"teacher", "d", "b", "real"}
    for args in (["--mode", "verify", f"data_dir={data}"],
                 ["--mode", "export", f"data_dir={data}", f"reference_dir={ref}"],
                 ["--mode", "import", f"data_dir={imported}", f"reference_dir={ref}"],
                 ["--mode", "verify", f"data_dir={imported}"]):
        step = run_cli("Main_Distill.py", "--config", "tiny", *args)
        assert step.returncode == 0, (args, step.stderr)
    assert len(list(ref.glob("sample_*.zst"))) == 12
