import re
import subprocess
import sys

from pipeline.data import generate

from conftest import ROOT, reader_snippet


def test_readme_reader_runs_with_numpy_and_zstandard_only(tiny_cfg, tmp_path):
    folder, _ = generate.generate(tiny_cfg(codec="int8-p99.5"))
    code = reader_snippet().replace('"data/fashion_mnist"', repr(str(folder)))
    assert "import torch" not in code and "pipeline" not in code
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    lines = out.splitlines()
    assert [l.split(":")[0] for l in lines] == ["samples 0..4", "samples 5..9", "samples 10..11"]
    assert all(float(l.rsplit("=", 1)[1]) < 0.05 for l in lines)


def test_readme_tool_reader_reads_the_default_codec(tiny_cfg):
    folder, _ = generate.generate(tiny_cfg())
    code = reader_snippet("tool reader").replace('"data/fashion_mnist"', repr(str(folder)))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    lines = out.splitlines()
    assert [l.split(":")[0] for l in lines] == ["samples 0..4", "samples 5..9", "samples 10..11"]
    assert all(0 < float(l.rsplit(" ", 1)[1]) < 0.05 for l in lines)


def test_readme_starts_with_the_two_commands():
    text = (ROOT / "README.md").read_text()
    first_block = re.search(r"```bash\n(.*?)```", text, re.S).group(1).splitlines()
    assert [l.split("#")[0].strip() for l in first_block] == [
        "bash setup.sh && .venv/bin/python Main_Distill.py", "bash setup.sh && .venv/bin/python -m pytest -q"]
    ci = (ROOT / ".ci" / "run").read_text()
    assert "bash setup.sh && .venv/bin/python -m pytest -q" in ci
