"""Prepare the teacher: ``--mode pretrain`` trains a DDPM where none exists, ``--mode sample`` draws
from a teacher and measures its FID."""
import sys

from pipeline import cli


def _pretrain(cfg, dry_run):
    from pipeline.pretrain import pretrain
    if dry_run:
        print(f"[dry-run] would train a UNet2DModel for {cfg['train_steps']} steps on {cfg['dataset']} "
              f"and write it to {cfg['teacher_path']}")
        return
    pretrain(cfg)


def _sample(cfg, dry_run):
    from pipeline.teacher_eval import sample_and_score
    if dry_run:
        print(f"[dry-run] would draw {cfg['fid_samples']} {cfg['steps']}-step DDIM samples from "
              f"{cfg['teacher_path']} and compute FID against the {cfg['dataset']} test split")
        return
    sample_and_score(cfg)


MODES = {
    "pretrain": ("train a teacher DDPM (diffusers UNet2DModel) on the configured dataset", _pretrain),
    "sample": ("draw a sample grid from the teacher and measure its FID against the test split", _sample),
}

if __name__ == "__main__":
    sys.exit(cli.main("Main_Diffusion.py", __doc__, MODES, default_mode="pretrain"))
