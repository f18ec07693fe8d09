"""--mode sample: a trained student's one-step images from the x_T that generate draws, its files, and
refused students. D and B are built untrained (random weights) on tiny teacher data: sampling does not
care how they were trained, and the data's records say which x_T each index has."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.core import config
from pipeline.core.errors import UserError
from pipeline.data import datasets, generate
from pipeline.evaluation import api, sample
from pipeline.students import packed, student_b, student_d
from pipeline.teacher import teachers, trajectory

from conftest import assert_one_sentence_error, read_records, reader_snippet, run_cli

BACKBONE = {"sample_size": 32, "in_channels": 1, "out_channels": 1, "block_out_channels": [8, 16],
            "layers_per_block": 1, "norm_num_groups": 4, "down_block_types": ["DownBlock2D"] * 2,
            "up_block_types": ["UpBlock2D"] * 2}
FIRST, COUNT = 3, 5


def _records_x_T(folder) -> dict:
    """index -> x_T of the teacher records, read through the tool's reader."""
    records = read_records(folder)
    return {int(i): x.astype(np.float32) for i, x in zip(records["index"], records["x_T_f16"])}


@pytest.fixture(scope="module")
def made(tmp_path_factory, small_teacher):
    """Tiny teacher data, and a D and a packed B of its shape with random weights."""
    root = tmp_path_factory.mktemp("sample")
    cfg = config.resolve("tiny", [f"teacher_path={small_teacher}", f"data_dir={root / 'data'}"])
    generate.generate(cfg)
    generator = json.loads((root / "data" / "manifest.json").read_text())["generator"]
    torch.manual_seed(0)
    d = student_d.new_student(BACKBONE, generator, head_channels=8)
    for p in d.parameters():  # the heads start at zero: give every layer something to say
        p.data.normal_(0, 0.05)
    student_d.save_student(d, root / "d")
    b = student_d.StudentD.from_config(d.config)
    b.load_state_dict(d.state_dict())
    student_b.to_binary(b, student_b.Binarization.from_config(cfg))
    student_b.start_scales(b)
    packed.export_packed(b.eval(), packed.b_config(d.config, cfg), root / "b")
    return root, _records_x_T(root / "data")


def _cfg(root, student, out, **overrides):
    items = {"d_weights": root / "d", "b_weights": root / "b", "sample_student": student, "sample_first": FIRST,
             "sample_count": COUNT, "student_samples_dir": out, **overrides}
    return config.resolve("tiny", [f"{k}={v}" for k, v in items.items()])


@pytest.mark.parametrize("student", ["d", "b"])
def test_image_k_is_the_students_output_on_record_ks_x_T(made, tmp_path, student, capsys):
    root, records = made
    out = sample.sample_command(_cfg(root, student, tmp_path / "out"))
    assert out == tmp_path / "out"
    index = list(range(FIRST, FIRST + COUNT))
    x_T = torch.from_numpy(np.stack([records[i] for i in index]))
    model = sample.LOADERS[student](root / student)
    with torch.no_grad():
        expected = datasets.to_uint8(student_d.one_step(model, x_T))
    with np.load(out / "samples.npz") as npz:
        assert npz["index"].tolist() == index and npz["images"].dtype == np.uint8
        assert np.array_equal(npz["images"], expected)
        assert npz["images"].std() > 5  # not a blank image: the network spoke
    assert sorted(p.name for p in out.glob("*.png")) == sorted([f"{i:06d}.png" for i in index] + ["grid.png"])
    for i, img in zip(index, expected):
        assert np.array_equal(np.asarray(Image.open(out / f"{i:06d}.png")), img[0])
    grid = Image.open(out / "grid.png")
    assert grid.size == (2 * (8 * 34 + 2), 2 * (34 + 2))  # one row of 8 slots, 2 px padding, enlarged 2x
    printed = capsys.readouterr().out
    assert f"{COUNT} one-step images of {student.upper()}" in printed and str(out / "samples.npz") in printed


def test_d_and_b_differ_and_x_T_follow_the_index_not_the_batch(made, tmp_path):
    root, _ = made
    d = sample.sample_command(_cfg(root, "d", tmp_path / "d"))
    b = sample.sample_command(_cfg(root, "b", tmp_path / "b"))
    one = sample.sample_command(_cfg(root, "d", tmp_path / "one", sample_first=FIRST + 2, sample_count=1,
                                     fid_batch_size=1))
    with np.load(d / "samples.npz") as dz, np.load(b / "samples.npz") as bz, np.load(one / "samples.npz") as oz:
        assert not np.array_equal(dz["images"], bz["images"])
        assert np.array_equal(oz["images"][0], dz["images"][2]) and oz["index"].tolist() == [FIRST + 2]


def test_default_output_folder_is_per_student(made):
    root, _ = made
    for student in ("d", "b"):
        cfg = _cfg(root, student, "")
        assert sample.out_folder(cfg) == config.PROJECT_ROOT / "SampledImgs" / "sample" / "tiny" / student


def _flip_middle_byte(path):
    data = path.read_bytes()
    at = len(data) // 2 + 3
    path.write_bytes(data[:at] + bytes([data[at] ^ 0x04]) + data[at + 1:])


@pytest.mark.parametrize("student", ["d", "b"])
def test_missing_and_damaged_students_are_refused_in_one_sentence(made, tmp_path, student):
    root, _ = made
    empty = tmp_path / "empty"
    empty.mkdir()
    key = f"{student}_weights"
    with pytest.raises(UserError, match="holds no student" if student == "d" else "holds no packed B") as missing:
        sample.sample_command(_cfg(root, student, tmp_path / "out", **{key: empty}))
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    for f in (root / student).iterdir():
        (damaged / f.name).write_bytes(f.read_bytes())
    _flip_middle_byte(damaged / (student_d.WEIGHTS_FILE if student == "d" else packed.PACKED_FILE))
    with pytest.raises(UserError, match="checksum mismatch") as broken:
        sample.sample_command(_cfg(root, student, tmp_path / "out", **{key: damaged}))
    for err in (missing, broken):
        assert "\n" not in str(err.value) and str(err.value).count(". ") == 0
    assert not (tmp_path / "out").exists()  # nothing written for a refused student


def test_b_weights_none_cannot_be_sampled(made, tmp_path):
    root, _ = made
    with pytest.raises(UserError, match="b_weights=none"):
        sample.plan(_cfg(root, "b", tmp_path / "out", b_weights="none"))
    assert "one-step images of D" in sample.plan(_cfg(root, "d", tmp_path / "out"))[0]


def test_the_command_line_samples_plans_and_refuses_in_one_sentence(made, tmp_path):
    root, _ = made
    args = ["--mode", "sample", "--config", "tiny", f"d_weights={root / 'd'}", f"b_weights={root / 'b'}",
            f"sample_first={FIRST}", "sample_count=2"]
    result = run_cli("Main_Distill.py", *args, f"student_samples_dir={tmp_path / 'out'}")
    assert result.returncode == 0, result.stderr
    assert f"grid: {tmp_path / 'out' / 'grid.png'}" in result.stdout
    with np.load(tmp_path / "out" / "samples.npz") as npz:
        assert npz["index"].tolist() == [FIRST, FIRST + 1]
    planned = run_cli("Main_Distill.py", *args, "sample_student=d", "--dry-run")
    assert planned.returncode == 0 and "[dry-run] would write 2 one-step images of D" in planned.stdout
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    for f in (root / "b").iterdir():
        (damaged / f.name).write_bytes(f.read_bytes())
    _flip_middle_byte(damaged / packed.PACKED_FILE)
    result = run_cli("Main_Distill.py", *args, f"b_weights={damaged}", f"student_samples_dir={tmp_path / 'x'}")
    assert result.returncode == 2
    assert_one_sentence_error(result, "checksum mismatch", "re-export")


@pytest.mark.parametrize("student", ["d", "b"])
def test_the_python_api_gives_the_images_sample_writes(made, tmp_path, student):
    root, records = made
    out = sample.sample_command(_cfg(root, student, tmp_path / "out"))
    held = api.load(root / student)
    assert held.kind == student.upper()
    index = list(range(FIRST, FIRST + COUNT))
    with np.load(out / "samples.npz") as npz:
        assert np.array_equal(held(index), npz["images"])
    x_T = torch.from_numpy(np.stack([records[i] for i in index]))  # the x_T of the teacher records
    assert np.array_equal(held(x_T=x_T, batch_size=2), held(index))


def test_the_python_api_samples_the_teacher_by_ddim_and_refuses_what_is_no_model(made, small_teacher, tmp_path):
    teacher = api.load(small_teacher, steps=4)
    assert teacher.kind == "teacher"
    unet, ddpm, _ = teachers.load_teacher(config.resolve("tiny", [f"teacher_path={small_teacher}"]))
    x_T = trajectory.draw_x_T(0, [0, 1], teacher.image_shape)
    expected = datasets.to_uint8(trajectory.ddim_sample(unet, teachers.ddim_scheduler(ddpm), x_T, 4))
    assert np.array_equal(teacher([0, 1]), expected)
    with pytest.raises(UserError, match="holds no student D, packed B or teacher"):
        api.load(tmp_path)
    with pytest.raises(UserError, match="one of the two"):
        teacher([0], x_T=x_T)


def test_the_readmes_python_api_block_runs_on_a_trained_d(made):
    root, _ = made
    code = reader_snippet("api").replace('"Checkpoints/distill/fashion_mnist"', repr(str(root / "d")))
    scope = {}
    exec(code, scope)
    assert scope["images"].shape == (16, 1, 32, 32) and scope["images"].dtype == np.uint8
    assert np.array_equal(scope["images"], api.load(root / "d")(range(16)))
