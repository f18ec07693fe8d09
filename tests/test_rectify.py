"""Main_Diffusion.py --mode rectify: the ring's grid and prediction types, a short run that resumes and
exports a loadable RNet, the EMA teacher that really updates, and the refusals."""
import json

import pytest
import torch

from pipeline.core import config
from pipeline.core.errors import UserError
from pipeline.evaluation import teacher_eval
from pipeline.teacher import ring, rnet_files, teachers
from pipeline.train.rectify import RectifyTrainer

from conftest import assert_one_sentence_error, run_cli

SMALL = {"rect_steps": 5, "rect_depth_weights": "0,1,1", "rect_batch_size": 4, "rect_rin_blocks": 1,
         "rect_r_blocks": 1, "rect_head_blocks": 1, "rect_checkpoint_every": 2, "rect_lora": "resnet",
         "rect_lora_rank": 2}


def _items(teacher, tmp_path, **extra):
    return {"teacher_path": teacher, "rect_run_dir": tmp_path / "run", **SMALL, **extra}


def _cfg(teacher, tmp_path, **extra):
    return config.resolve("tiny", [f"{k}={v}" for k, v in _items(teacher, tmp_path, **extra).items()])


def test_ring_grid_runs_from_T_minus_1_to_0():
    grid = ring.ring_timesteps(1000, 50)
    assert grid[0] == 999 and grid[-1] == 0 and len(grid) == 51 and bool((grid[1:] < grid[:-1]).all())
    assert torch.equal(ring.ring_timesteps(1000, 999), torch.arange(999, -1, -1))
    with pytest.raises(ValueError):
        ring.ring_timesteps(1000, 1000)


@pytest.mark.parametrize("prediction", ring.PREDICTIONS)
def test_each_prediction_type_gives_back_eps_and_x0(prediction):
    x0, eps = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    a = torch.tensor([0.99, 0.5, 0.01]).view(-1, 1, 1, 1)
    c0, c1 = a.sqrt(), (1 - a).sqrt()
    x_t = c0 * x0 + c1 * eps
    eps_hat, x0_hat = ring.eps_and_x0(prediction, ring.target(prediction, x0, eps, c0, c1), x_t, c0, c1)
    torch.testing.assert_close(eps_hat, eps, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(x0_hat, x0, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("prediction", ring.PREDICTIONS)
def test_the_chain_estimates_clamp_x0_only_where_asked_and_leave_eps_alone(prediction):
    alphas_cumprod = torch.linspace(0.9999, 0.0001, 1000)
    t = torch.tensor([999, 500, 0])
    c0, c1 = ring.coefficients(alphas_cumprod, t)
    x0, eps = 3 * torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)  # x0 well outside [-1, 1]
    output, x_t = ring.target(prediction, x0, eps, c0, c1), c0 * x0 + c1 * eps
    raw_eps, raw_x0 = ring.eps_and_x0(prediction, output, x_t, c0, c1)
    eps_free, x0_free = ring.chain_estimates(prediction, output, x_t, alphas_cumprod, t, clip_x0=False)
    eps_clip, x0_clip = ring.chain_estimates(prediction, output, x_t, alphas_cumprod, t, clip_x0=True)
    assert torch.equal(eps_free, raw_eps) and torch.equal(x0_free, raw_x0) and torch.equal(eps_clip, raw_eps)
    assert torch.equal(x0_clip, raw_x0.clamp(-1, 1)) and x0_free.abs().max() > 1


class _InterruptedAfterStep2(RectifyTrainer):
    def periodic(self):
        if self.step == 2:
            raise KeyboardInterrupt  # as Ctrl-C / SIGTERM reach the loop


def test_rectify_trains_resumes_and_exports_an_rnet_that_loads(small_teacher, tmp_path):
    with pytest.raises(KeyboardInterrupt):
        _InterruptedAfterStep2(_cfg(small_teacher, tmp_path, rect_train_steps=4)).run()
    trainer = RectifyTrainer(_cfg(small_teacher, tmp_path, rect_train_steps=4))
    assert trainer.step == 2
    trainer.run()
    stats = [json.loads(line) for line in (tmp_path / "run" / "stats.jsonl").read_text().splitlines()]
    assert stats[-1]["step"] == 4 and all(r["loss"] > 0 and r["grad_norm"] > 0 for r in stats)
    teacher, _, _ = teachers.load_teacher(trainer.cfg)
    net, meta = rnet_files.load_rnet(tmp_path / "run" / "rnet", teacher, teachers.weights_sha256(teacher), steps=5)
    assert meta["prediction"] == "v" and meta["steps"] == 5
    expected = trainer.ema_rnet()
    x_T, grid = torch.randn(2, 1, 32, 32), ring.ring_timesteps(1000, 5)
    torch.testing.assert_close(ring.ring_sample(net, x_T, grid), ring.ring_sample(expected, x_T, grid))
    # only what differs from the teacher is stored
    stored = (tmp_path / "run" / "rnet" / rnet_files.WEIGHTS_FILE).stat().st_size
    assert stored < 4 * sum(p.numel() for p in net.parameters())
    with pytest.raises(UserError, match="another teacher"):
        rnet_files.load_rnet(tmp_path / "run" / "rnet", teacher, "0" * 64)
    with pytest.raises(UserError, match="ring steps"):
        rnet_files.load_rnet(tmp_path / "run" / "rnet", teacher, teachers.weights_sha256(teacher), steps=10)


def test_the_ema_teacher_follows_the_ema_weights(small_teacher, tmp_path):
    trainer = RectifyTrainer(_cfg(small_teacher, tmp_path, rect_train_steps=4, rect_lr=0.1, rect_teacher="ema"))
    before = [p.clone() for p in trainer.ema_parameters(trainer.chain_teacher)]
    trainer.run()
    after = trainer.ema_parameters(trainer.chain_teacher)
    assert len(after) == len(trainer.ema.shadow_params) > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, after))
    for teacher_p, ema_p in zip(after, trainer.ema.shadow_params):
        torch.testing.assert_close(teacher_p, ema_p)


def test_rectify_cli_prints_counts_and_refuses_bad_input(small_teacher, tmp_path):
    args = [f"{k}={v}" for k, v in _items(small_teacher, tmp_path, rect_train_steps=1).items()]
    result = run_cli("Main_Diffusion.py", "--mode", "rectify", "--config", "tiny", "--dry-run", *args)
    assert result.returncode == 0 and "trainable of" in result.stdout, result.stderr
    result = run_cli("Main_Diffusion.py", "--mode", "rectify", "--config", "tiny", *args)
    assert result.returncode == 0 and "trainable of" in result.stdout, result.stderr
    changed = run_cli("Main_Diffusion.py", "--mode", "rectify", "--config", "tiny", *args, "rect_lr=0.001")
    assert_one_sentence_error(changed, "rect_lr")
    too_many = run_cli("Main_Diffusion.py", "--mode", "rectify", "--config", "tiny", *args, "rect_steps=1000")
    assert_one_sentence_error(too_many, "rect_steps")
    deep = run_cli("Main_Diffusion.py", "--mode", "rectify", "--config", "tiny", *args, "rect_steps=1")
    assert_one_sentence_error(deep, "rect_depth_weights")
    no_start = run_cli("Main_Diffusion.py", "--mode", "rectify", "--config", "tiny", "--dry-run", *args,
                       f"rect_init={tmp_path}")
    assert_one_sentence_error(no_start, "holds no RNet")


def test_sample_mode_scores_the_ring_sampler_beside_the_ddim_teacher(small_teacher, tmp_path):
    from safetensors.torch import save_file
    RectifyTrainer(_cfg(small_teacher, tmp_path, rect_train_steps=2)).run()
    cache = tmp_path / "fid"
    cache.mkdir()
    # the reference set's features are derived data: stand-ins spare the test 10,000 Inception calls
    save_file({"features": torch.randn(10000, 2048)}, cache / "fashion_mnist-test-10000.safetensors")
    args = ["--mode", "sample", "--config", "tiny", f"teacher_path={small_teacher}", f"fid_cache_dir={cache}",
            f"samples_dir={tmp_path / 'samples'}", "fid_samples=4", "sample_count=4", "steps=5"]
    result = run_cli("Main_Diffusion.py", *args, f"rnet_path={tmp_path / 'run' / 'rnet'}")
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "samples" / "report.json").read_text())
    assert report["ring"]["fid"] > 0 and report["fid"] > 0 and report["ring"]["cost_per_step_in_teacher_calls"] > 0
    assert (tmp_path / "samples" / "ring_grid.png").is_file() and "ring sampler FID" in result.stdout
    # another RNet of the same config does not reuse the first one's cached ring samples
    teacher, _, _ = teachers.load_teacher(config.resolve("tiny", [f"teacher_path={small_teacher}"]))
    net, meta = rnet_files.load_rnet(tmp_path / "run" / "rnet", teacher, teachers.weights_sha256(teacher))
    cfg = {"seed": 0}
    key = teacher_eval.ring_cache_key(cfg, net, meta)
    with torch.no_grad():
        net.x0out.conv_out.bias.add_(1.0)
    assert teacher_eval.ring_cache_key(cfg, net, meta) != key
    other_steps = run_cli("Main_Diffusion.py", *args[:-1], "steps=6", f"rnet_path={tmp_path / 'run' / 'rnet'}")
    assert_one_sentence_error(other_steps, "ring steps")
    missing = run_cli("Main_Diffusion.py", *args, f"rnet_path={tmp_path}")
    assert_one_sentence_error(missing, "--mode rectify")


@pytest.mark.parametrize("prediction", ring.PREDICTIONS)
def test_every_prediction_type_trains_with_the_x0_loss(small_teacher, tmp_path, prediction):
    # the reference's x0 mode fails when its auxiliary x0 loss is on; here every type pays all three losses
    trainer = RectifyTrainer(_cfg(small_teacher, tmp_path, rect_train_steps=1, rect_prediction=prediction,
                                  rect_depth_weights="0,0,1"))
    trainer.run()
    stats = json.loads((tmp_path / "run" / "stats.jsonl").read_text().splitlines()[-1])
    assert stats["depth"] == 2 and all(torch.isfinite(torch.tensor(stats[k])) and stats[k] > 0
                                       for k in ("main", "x0", "consistency"))


def test_the_pretrained_chain_follows_the_frozen_teacher_and_trains(small_teacher, tmp_path):
    trainer = RectifyTrainer(_cfg(small_teacher, tmp_path, rect_train_steps=1, rect_teacher="pretrained",
                                  rect_depth_weights="0,0,1"))
    grid = ring.ring_timesteps(1000, 5)
    times = [grid[k].expand(2) for k in (1, 2, 3)]
    x_t = torch.randn(2, 1, 32, 32)
    chain = trainer.pretrained_chain_targets(x_t, times)
    c0, c1 = ring.coefficients(trainer.alphas_cumprod, times[0])
    eps = trainer.teacher(x_t, times[0]).sample
    # targets: the teacher's ε with its x0 clipped as the DDIM teacher clips it (x0 = (x − c1·ε)/c0 blows up at high t)
    torch.testing.assert_close(chain["x0"][0], ((x_t - c1 * eps) / c0).clamp(-1, 1), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(chain["pred"][0], c0 * eps - c1 * chain["x0"][0], atol=1e-4, rtol=1e-4)
    assert chain["x0"][0].abs().max() <= 1 and chain["z"][0] is None and len(chain["z"]) == 3
    n0, n1 = ring.coefficients(trainer.alphas_cumprod, times[1])
    x_1 = n0 * chain["x0"][0] + n1 * eps
    torch.testing.assert_close(chain["x0"][1], ((x_1 - n1 * trainer.teacher(x_1, times[1]).sample) / n0).clamp(-1, 1),
                               atol=1e-4, rtol=1e-4)
    # (loose: in training mode every call takes a spectral-norm power iteration, moving the weights slightly)
    torch.testing.assert_close(chain["z"][1], trainer.model.rin(x_1, times[1]), atol=1e-2, rtol=1e-2)
    trainer.run()
    stats = json.loads((tmp_path / "run" / "stats.jsonl").read_text().splitlines()[-1])
    assert stats["depth"] == 2 and all(torch.isfinite(torch.tensor(stats[k])) and stats[k] > 0
                                       for k in ("main", "x0", "consistency"))


def test_rect_init_starts_from_an_rnet_and_refuses_another_network(small_teacher, tmp_path):
    RectifyTrainer(_cfg(small_teacher, tmp_path, rect_train_steps=4, rect_lr=0.1)).run()
    first = tmp_path / "run" / "rnet"
    second = RectifyTrainer(_cfg(small_teacher, tmp_path, rect_train_steps=2, rect_run_dir=tmp_path / "deeper",
                                 rect_depth_weights="0,0,0,1", rect_init=first))
    teacher, _, _ = teachers.load_teacher(second.cfg)
    start, _ = rnet_files.load_rnet(first, teacher, teachers.weights_sha256(teacher))
    fresh = RectifyTrainer(_cfg(small_teacher, tmp_path, rect_run_dir=tmp_path / "fresh")).model.state_dict()
    assert any(not torch.allclose(a, b) for a, b in zip(fresh.values(), start.state_dict().values()))
    for (name, a), b in zip(second.model.state_dict().items(), start.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)
    # the EMA starts from those weights too
    for ema_p, p in zip(second.ema.shadow_params, second.ema_parameters(second.model)):
        torch.testing.assert_close(ema_p, p)
    with pytest.raises(UserError, match="another network"):
        RectifyTrainer(_cfg(small_teacher, tmp_path, rect_run_dir=tmp_path / "other", rect_head_blocks=2,
                            rect_init=first))


def test_rect_steps_beyond_the_teachers_own_T_is_one_sentence(tmp_path):
    """Issue 31: the config rule checks num_train_timesteps; a teacher with another T gave ring.py's ValueError."""
    cfg = config.resolve("tiny")
    torch.manual_seed(0)
    teachers.save_teacher(teachers.new_unet(cfg, channels=1), teachers.new_scheduler(dict(cfg, num_train_timesteps=4)),
                          tmp_path / "teacher")
    with pytest.raises(UserError, match=r"rect_steps=5 must be at most 3, the teacher in .* having T=4"):
        RectifyTrainer(_cfg(tmp_path / "teacher", tmp_path))
    assert not (tmp_path / "run").exists()


def test_the_dry_run_counts_on_the_meta_device_and_refuses_a_rank_beyond_full(small_teacher, tmp_path, monkeypatch):
    """Issue 31: --dry-run built the whole RNet, so rect_lora_rank=200000 took 22.9 GB to print a plan."""
    from pipeline.teacher import rnet
    from pipeline.train import rectify
    built = []
    counts = rnet.parameter_counts
    monkeypatch.setattr(rnet, "parameter_counts", lambda net: built.append(net) or counts(net))
    cfg = _cfg(small_teacher, tmp_path, rect_lora_rank=32)  # the full rank of the tiny teacher's widest wrapped layers
    line = next(x for x in rectify.plan(cfg) if "trainable of" in x)
    assert {p.device.type for p in built[0].parameters()} == {"meta"}  # nothing allocated
    teacher, ddpm, _ = teachers.load_teacher(cfg)
    real = rnet.RNet(teacher, **rectify.rnet_settings(cfg, ddpm.config.num_train_timesteps))
    assert line.endswith(f"RNet with {rectify.counts_line(real)}")  # the same counts as the network a run trains
    args = [f"{k}={v}" for k, v in _items(small_teacher, tmp_path, rect_lora_rank=200000).items()]
    for plan in (["--dry-run"], []):
        result = run_cli("Main_Diffusion.py", "--mode", "rectify", "--config", "tiny", *plan, *args)
        assert result.returncode == 2
        assert_one_sentence_error(result, "rect_lora_rank=200000 is more than 32", "rect_lora=resnet", "at most 32")
    assert not (tmp_path / "run").exists()
