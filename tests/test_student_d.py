"""Student D: shapes for any chunk / channel count, teacher initialisation, save and load."""
import json

import pytest
import torch
from diffusers import UNet2DModel
from safetensors.torch import load_file, save_file

from pipeline.core.errors import UserError
from pipeline.students import student_d

from conftest import SMALL_BACKBONE, student_generator

@pytest.mark.parametrize("chunks,channels", [(1, 1), (3, 1), (5, 3), (10, 3), (12, 1)])
def test_pixel_student_predicts_every_chunk_and_passes_x_T_through(chunks, channels):
    backbone = dict(SMALL_BACKBONE, in_channels=channels, out_channels=channels)
    torch.manual_seed(0)
    model = student_d.new_student(backbone, student_generator(chunks, channels), head_channels=8)
    x_T = torch.randn(2, channels, 16, 16)
    out = model(x_T)
    assert out["chunks"].shape == (2, chunks, channels, 16, 16)
    assert torch.equal(out["rin"], x_T)
    assert sum(len(g) for g in model.groups) == chunks and model.groups[0][0] == 0  # noisiest chunk first
    sample = student_d.one_step(model, x_T)
    assert sample.shape == x_T.shape and sample.abs().max() <= 1


def test_latent_student_predicts_rin_with_its_own_channel_count_and_reads_out_through_x0out():
    backbone = dict(SMALL_BACKBONE, in_channels=3, out_channels=3)
    x0out = {"width": 6, "T": 1000, "groups": 3, "blocks": 1}
    model = student_d.StudentD(backbone, chunks=4, image_channels=3, latent_channels=6, space="latent", timestep=999,
                              head_channels=8, x0out=x0out)
    out = model(torch.randn(2, 3, 16, 16))
    assert out["rin"].shape == (2, 6, 16, 16) and out["chunks"].shape == (2, 4, 6, 16, 16)
    assert student_d.one_step(model, torch.randn(2, 3, 16, 16)).shape == (2, 3, 16, 16)
    assert not any(p.requires_grad for p in model.x0out.parameters())  # the teacher's head stays as it was
    with pytest.raises(ValueError, match="RNet"):
        student_d.new_student(backbone, student_generator(4, 3, space="latent", latent=6), head_channels=8)


def test_coarse_depths_serve_the_noisy_chunks():
    assert student_d.chunk_groups(10, 3) == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]  # the reference's split
    assert student_d.chunk_groups(2, 3) == [[0], [1], []]


@pytest.mark.parametrize("chunks", [2, 3])
def test_reads_every_depth_says_whether_every_decoder_layer_gets_a_gradient(chunks):
    """torchrun's DDP must be told when some layers get no gradient (fewer chunks than depths), or it stops."""
    torch.manual_seed(0)
    model = student_d.new_student(SMALL_BACKBONE, student_generator(chunks, 1), head_channels=8)
    for head in model.heads:  # heads start at zero, which would block every gradient behind them
        torch.nn.init.normal_(head.out.weight)
    model(torch.randn(2, 1, 16, 16))["chunks"].square().mean().backward()
    ungraded = [n for n, p in model.unet.up_blocks.named_parameters() if p.grad is None]
    assert model.reads_every_depth == (not ungraded) == (chunks == 3)


def test_heads_start_at_zero_and_the_backbone_can_start_from_the_teacher():
    torch.manual_seed(0)
    teacher = UNet2DModel(**SMALL_BACKBONE)
    model = student_d.new_student(teacher.config, student_generator(3, 1), head_channels=8)
    student_d.init_from_teacher(model, teacher)
    assert torch.equal(model.unet.conv_in.weight, teacher.conv_in.weight)
    assert torch.count_nonzero(model(torch.randn(1, 1, 16, 16))["chunks"]) == 0
    other = UNet2DModel(**dict(SMALL_BACKBONE, block_out_channels=[8, 8, 16]))
    with pytest.raises(UserError, match="shape"):
        student_d.init_from_teacher(model, other)


def _saved_student(folder):
    torch.manual_seed(0)
    model = student_d.new_student(SMALL_BACKBONE, student_generator(3, 1), head_channels=8)
    for p in model.parameters():
        p.data.normal_(0, 0.1)
    return model.eval(), student_d.save_student(model, folder)


def test_save_and_load_reproduce_the_outputs(tmp_path):
    model, nbytes = _saved_student(tmp_path / "d")
    assert (tmp_path / "d" / student_d.WEIGHTS_FILE).stat().st_size == nbytes
    loaded = student_d.load_student(tmp_path / "d")
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(model(x)["chunks"], loaded(x)["chunks"])


def _rewrite_weights(path, config, signed=True):
    """Rewrite D's weights as a faulty writer would, with a checksum that matches ``config``."""
    state = load_file(path)
    metadata = {"sha256": student_d.content_sha256(state, config)} if signed else {}
    save_file(state, str(path), metadata=metadata)


def test_one_changed_byte_of_the_weights_or_the_config_is_refused(tmp_path):
    _saved_student(tmp_path / "d")
    weights, config_path = tmp_path / "d" / student_d.WEIGHTS_FILE, tmp_path / "d" / student_d.CONFIG_FILE
    good_weights, good_config = weights.read_bytes(), config_path.read_text()
    at = len(good_weights) // 2  # inside the tensor bytes
    weights.write_bytes(good_weights[:at] + bytes([good_weights[at] ^ 0x10]) + good_weights[at + 1:])
    with pytest.raises(UserError, match="model.safetensors or the student_config.json.*checksum mismatch.*train_d"):
        student_d.load_student(tmp_path / "d")
    weights.write_bytes(good_weights)
    config_path.write_text(good_config.replace('"timestep": 999', '"timestep": 998'))  # same shapes, other outputs
    assert config_path.read_text() != good_config
    with pytest.raises(UserError, match="checksum mismatch"):
        student_d.load_student(tmp_path / "d")
    config_path.write_text(good_config)
    student_d.load_student(tmp_path / "d")


def test_missing_damaged_or_foreign_students_are_one_sentence(tmp_path):
    _saved_student(tmp_path / "d")
    with pytest.raises(UserError, match="holds no student"):
        student_d.load_student(tmp_path / "nothing")
    weights, config_path = tmp_path / "d" / student_d.WEIGHTS_FILE, tmp_path / "d" / student_d.CONFIG_FILE
    config = json.loads(config_path.read_text())
    good_weights = weights.read_bytes()
    _rewrite_weights(weights, config, signed=False)
    with pytest.raises(UserError, match="carries no checksum"):
        student_d.load_student(tmp_path / "d")
    wider = dict(config, head_channels=16)
    config_path.write_text(json.dumps(wider))
    _rewrite_weights(weights, wider)
    with pytest.raises(UserError, match="does not fit the architecture"):
        student_d.load_student(tmp_path / "d")
    weights.write_bytes(good_weights)
    config_path.write_text(json.dumps(dict(config, kind="something else")))
    with pytest.raises(UserError, match="not a student D config"):
        student_d.load_student(tmp_path / "d")
    config_path.write_text("[1, 2")
    with pytest.raises(UserError, match="not a student D config"):
        student_d.load_student(tmp_path / "d")
    config_path.write_text(json.dumps(config))
    weights.write_bytes(good_weights[:1000])
    with pytest.raises(UserError, match="cannot be read"):
        student_d.load_student(tmp_path / "d")


def test_rin_skips_start_at_the_least_squares_multiple_of_rin():
    torch.manual_seed(0)
    model = student_d.new_student(SMALL_BACKBONE, student_generator(3, 1), head_channels=8)
    rin = torch.randn(4, 1, 16, 16)
    factors = torch.tensor([-0.05, -0.2, -0.7])
    chunks = factors.view(1, 3, 1, 1, 1) * rin[:, None] + 0.01 * torch.randn(4, 3, 1, 16, 16)
    student_d.fit_rin_skips(model, rin, chunks)
    with torch.no_grad():
        out = model(rin)["chunks"]  # the other head outputs start at zero, so only the linear path speaks
    torch.testing.assert_close(out, factors.view(1, 3, 1, 1, 1) * rin[:, None], atol=0.01, rtol=0.05)


def test_json_nested_too_deeply_for_the_parser_is_one_sentence(tmp_path):
    """Issue 31: a config or metadata of 100,000 nested lists was a RecursionError traceback."""
    _saved_student(tmp_path / "d")
    (tmp_path / "d" / student_d.CONFIG_FILE).write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(UserError, match="not a student D config"):
        student_d.load_student(tmp_path / "d")
