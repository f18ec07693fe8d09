"""Prepare the teacher: ``--mode pretrain`` trains a DDPM where none exists, ``--mode rectify`` trains
the rectified latent recurrence (RNet) around it, ``--mode sample`` draws from a teacher and measures
its FID."""
import sys

from pipeline import cli
from pipeline.core.config import output_dir


def pretrain(cfg):
    from pipeline.train import pretrain  # torch and diffusers load only when a stage runs
    pretrain.pretrain(cfg)


def rectify(cfg):
    from pipeline.train import rectify
    rectify.rectify(cfg)


def _rectify_plan(cfg):
    from pipeline.train import rectify
    return rectify.plan(cfg)


def sample(cfg):
    from pipeline.evaluation import teacher_eval
    teacher_eval.sample_and_score(cfg)


def _pretrain_plan(cfg):
    return [f"would train a UNet2DModel for {cfg['train_steps']} steps on {cfg['dataset']} (checkpoints in "
            f"{output_dir(cfg, 'run_dir')}) and write it to {cfg['teacher_path']}"]


def _sample_plan(cfg):
    return [f"would draw {cfg['fid_samples']} {cfg['steps']}-step DDIM samples from {cfg['teacher_path']} and "
            f"compute FID against the {cfg['dataset']} test split"]


MODES = {
    "pretrain": cli.Mode("train a teacher DDPM (diffusers UNet2DModel) on the configured dataset", ("pretrain",),
                         pretrain, _pretrain_plan, many_processes=True),
    "rectify": cli.Mode("train the rectified latent recurrence RNet around the teacher (Rin, R, Rout, X0out)",
                        ("rectify",), rectify, _rectify_plan, many_processes=True),
    "sample": cli.Mode("draw a sample grid from the teacher and measure its FID against the test split",
                       ("teacher_sample",), sample, _sample_plan),
}

if __name__ == "__main__":
    sys.exit(cli.main("Main_Diffusion.py", __doc__, MODES, default_mode="pretrain"))
