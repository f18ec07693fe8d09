"""The rectified teacher's network: the reference's parameter counts, what trains, what starts as the
teacher, and the config round trip."""
import re

import pytest
import torch
from diffusers import UNet2DModel

from pipeline.core import config
from pipeline.teacher import lora, ring, rnet, rnet_files, teachers
from pipeline.teacher.film import FiLMResBlock, time_features

# google/ddpm-cifar10-32's UNet2DModel config (the reference teacher), random weights.
DDPM_CIFAR10 = dict(
    sample_size=32, in_channels=3, out_channels=3, block_out_channels=(128, 256, 256, 256), layers_per_block=2,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), add_attention=True,
    attention_head_dim=None, norm_num_groups=32, norm_eps=1e-6, act_fn="silu", time_embedding_type="positional",
    flip_sin_to_cos=False, freq_shift=1, downsample_padding=0, mid_block_scale_factor=1)


def small_unet(attention: bool) -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(sample_size=16, in_channels=1, out_channels=1, block_out_channels=(16, 32),
                       layers_per_block=1, norm_num_groups=8, add_attention=attention,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D" if attention else "DownBlock2D"),
                       up_block_types=("AttnUpBlock2D" if attention else "UpBlock2D", "UpBlock2D"))


def small_rnet(attention=True, **overrides) -> rnet.RNet:
    settings = dict(rnet.REFERENCE_SETTINGS, rin_blocks=1, r_blocks=1, head_blocks=1, **overrides)
    return rnet.RNet(small_unet(attention), T=1000, **settings)


def test_reference_settings_on_ddpm_cifar10_give_the_reference_parameter_counts():
    net = rnet.RNet(UNet2DModel(**DDPM_CIFAR10), T=1000, **rnet.REFERENCE_SETTINGS)
    assert rnet.parameter_counts(net) == (16_445_806, 87_210_094)
    assert rnet.parameter_counts(net.rin) == (3_249_664, 38_631_808)
    assert rnet.parameter_counts(net.r) == (7_870_312, 43_252_456)
    assert rnet.parameter_counts(net.x0out) == (2_662_915, 2_662_915)


@pytest.mark.parametrize("target, per_module, module_type", [("attention", 4, "Attention"),
                                                             ("resnet", 2, "ResnetBlock2D")])
def test_lora_wraps_its_target_layers_and_starts_as_the_base(target, per_module, module_type):
    unet = small_unet(attention=True)
    modules = sum(type(m).__name__ == module_type for m in unet.modules())
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([10, 900])
    before = unet(x, t).sample
    assert lora.add_lora(unet, target, rank=4, alpha=8) == per_module * modules > 0
    torch.testing.assert_close(unet(x, t).sample, before)  # the up projections start at zero
    assert lora.add_lora(small_unet(attention=False), "attention", 4, 8) == 0
    assert lora.add_lora(small_unet(attention=True), "none", 4, 8) == 0


def test_rin_reads_the_teachers_last_feature_map():
    teacher = small_unet(attention=True)
    net = small_rnet()
    seen = {}
    teacher.conv_out.register_forward_hook(lambda module, inputs, output: seen.update(features=inputs[0]))
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([3, 500])
    teacher(x, t)
    torch.testing.assert_close(net.rin.unet(x, t).sample, seen["features"])


def test_only_time_embedding_norms_conv_in_lora_and_new_layers_train():
    net = small_rnet()
    frozen = {name for name, p in net.named_parameters() if not p.requires_grad}
    assert frozen and all(".unet." in name for name in frozen)
    trained_in_trunk = [name for name, p in net.r.unet.named_parameters() if p.requires_grad]
    allowed = re.compile(r"^time_embedding\.|norm|\.(down|up)\.weight$")  # LoRA's projections: down / up
    assert all(allowed.search(name) for name in trained_in_trunk), trained_in_trunk
    assert any(name.endswith("to_q.down.weight") for name in trained_in_trunk)
    assert any(n.startswith("conv_in") for n, p in net.rin.unet.named_parameters() if p.requires_grad)
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([5, 700])
    z = net.rin(x, t)
    (net.x0out(net.r(z, t), t - 1).square().mean() + net(x, t).square().mean()).backward()
    assert all(p.grad is None for p in net.parameters() if not p.requires_grad)
    assert net.r.gate_logits.weight.grad is not None


def test_shapes_normalised_latent_and_the_gate_at_start():
    net = small_rnet()
    x, t = torch.randn(3, 1, 16, 16), torch.tensor([0, 400, 999])
    z = net.rin(x, t)
    assert z.shape == (3, 16, 16, 16)
    groups = z.view(3, 8, -1)
    torch.testing.assert_close(groups.mean(-1), torch.zeros(3, 8), atol=1e-4, rtol=0)
    torch.testing.assert_close(net.r.gate(t).flatten(), torch.full((3,), 0.15))
    assert net.r(z, t).shape == z.shape
    assert net.x0out(z, t).shape == x.shape and net.x0out(z, t).abs().max() < 1e-3  # heads start near zero


def test_config_round_trip_rebuilds_the_same_network():
    net = small_rnet(lora_target="resnet").eval()
    rebuilt = rnet.RNet.from_config(net.config).eval()
    rebuilt.load_state_dict(net.state_dict())
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([1, 999])
    torch.testing.assert_close(rebuilt.rin(x, t), net.rin(x, t))
    assert rnet.parameter_counts(rebuilt) == rnet.parameter_counts(net)


def test_film_block_starts_as_identity_and_time_features_span_the_schedule():
    block = FiLMResBlock(16, T=1000, groups=8)
    x = torch.randn(2, 16, 8, 8)
    torch.testing.assert_close(block(x, torch.tensor([0, 999])), x)
    features = time_features(torch.tensor([0, 999]), T=1000, dim=16)
    torch.testing.assert_close(features[0], torch.cat([torch.zeros(8), torch.ones(8)]))
    assert features.shape == (2, 16) and not torch.allclose(features[0], features[1])


def test_the_shipped_rnet_loads_around_the_shipped_teacher_and_its_ring_makes_images():
    cfg = config.resolve("fashion_mnist_latent")
    config.validate(cfg, ["generate"])
    unet, scheduler, _ = teachers.load_teacher(cfg)
    net, meta = rnet_files.load_rnet(config.project_path(cfg["rnet_path"]), unet, teachers.weights_sha256(unet),
                                     steps=cfg["steps"])
    assert meta["steps"] == cfg["steps"] == 50
    torch.manual_seed(0)
    with torch.no_grad():
        grid = ring.ring_timesteps(scheduler.config.num_train_timesteps, cfg["steps"])
        images = ring.ring_sample(net, torch.randn(2, 1, 32, 32), grid)
    assert images.shape == (2, 1, 32, 32) and images.abs().max() <= 1 and images.std() > 0.1
