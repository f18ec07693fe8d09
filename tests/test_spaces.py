"""The trajectory spaces: one object per space answers what the stages used to branch on, and the rule that no
module outside it (and the config's own validation) tests a space by its name."""
import re

import pytest
import torch

from pipeline.core import config
from pipeline.core.config_keys import KEYS
from pipeline.teacher import spaces, teachers

from conftest import ROOT

ATTRIBUTES = ("name", "start_is_x_T", "image_is_end", "needs_rnet", "step_name", "chain_channels", "sampler_text",
              "manifest_sampler", "residual_sampler", "image_sampler", "readout")
NAME_TEST = re.compile(r"""[=!]=\s*["'](pixel|latent)["']|["'](pixel|latent)["']\s*[=!]=""")


def test_the_space_key_offers_exactly_the_spaces_and_each_has_every_attribute():
    assert KEYS["space"].choices == tuple(spaces.SPACES)
    for name, space in spaces.SPACES.items():
        assert space.name == name and all(hasattr(space, a) for a in ATTRIBUTES), name


def test_older_manifests_without_a_space_are_pixel_data():
    assert spaces.of_generator({}) is spaces.SPACES["pixel"]
    assert spaces.of_generator({"space": "latent"}).needs_rnet
    assert spaces.of_reference_files(1, 1).name == "pixel" and spaces.of_reference_files(1, 32).name == "latent"


def test_each_space_gives_the_chain_width_of_a_teacher():
    config = {"in_channels": 3, "block_out_channels": [32, 64]}
    assert spaces.SPACES["pixel"].chain_channels(config) == 3
    assert spaces.SPACES["latent"].chain_channels(config) == 32


def test_the_pixel_space_samples_the_teachers_chain_and_its_end_is_the_image(small_teacher):
    unet, ddpm, _ = teachers.load_teacher(config.resolve("tiny", [f"teacher_path={small_teacher}"]))
    scheduler = teachers.ddim_scheduler(ddpm)
    pixel = spaces.SPACES["pixel"]
    x_T = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        start, residuals, end, image = pixel.residual_sampler(unet.eval(), scheduler, None, 4)(x_T, 2)
        chain_image = pixel.image_sampler(unet, scheduler, None, 4)(x_T)
    assert torch.equal(start, x_T) and image is end and residuals.shape == (2, 2, 1, 32, 32)
    torch.testing.assert_close(start + residuals.sum(1), end, atol=1e-5, rtol=0)
    torch.testing.assert_close(chain_image, end.clamp(-1, 1), atol=1e-5, rtol=0)
    assert pixel.readout(None, end) is end


@pytest.mark.parametrize("path", sorted([*(ROOT / "pipeline").rglob("*.py"), ROOT / "Main_Distill.py",
                                         ROOT / "Main_Diffusion.py"]), ids=lambda p: p.name)
def test_no_module_but_the_spaces_and_the_config_check_tests_a_space_by_name(path):
    if path.name in ("spaces.py", "config.py"):  # the spaces themselves; the config's refusal before any work
        return
    found = [n for n, line in enumerate(path.read_text().splitlines(), 1) if NAME_TEST.search(line)]
    assert not found, f"{path.name} lines {found} test a space by its name; ask pipeline.teacher.spaces instead"
