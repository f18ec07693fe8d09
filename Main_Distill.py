"""Distil a teacher DDPM into a one-step generator through offline teacher data.

The default mode, all, runs generate -> train_d -> binarize -> eval_d. generate writes teacher trajectories as
INT8 + zstd shards; verify checks them; export and import convert to and from the reference
one-file-per-sample layout; repair regenerates damaged shards; train_d fits the one-step student D;
binarize trains the 1-bit student B from D and exports it bit-packed; eval_d measures D and B against
the teacher; sample draws a trained student's one-step images.
"""
import sys

from pipeline import binarize, cli, evaluate, generate, reference_layout, sample, train_d, verify
from pipeline.config import output_dir


def _generate_plan(cfg):
    return [f"would write {cfg['samples_total']} samples of {cfg['steps']}-step DDIM trajectories ({cfg['chunks']} "
            f"chunks) from {cfg['teacher_path'] or cfg['teacher_hub_id']} into {output_dir(cfg, 'data_dir')}"]


def _all_plan(cfg):
    return _generate_plan(cfg) + [
        f"then train D for {cfg['d_train_steps']} steps into {output_dir(cfg, 'd_run_dir')}, binarize it for "
        f"{cfg['b_train_steps']} steps into {output_dir(cfg, 'b_run_dir')} and write the D-vs-B report to "
        f"{output_dir(cfg, 'eval_dir')}"]


def _all(cfg):
    """Every stage in turn; each one resumes, so rerunning after an interruption continues."""
    generate.generate(cfg)
    train_d.train_d(cfg)
    binarize.binarize(cfg)
    evaluate.eval_d(cfg)


MODES = {
    "all": cli.Mode("generate -> train_d -> binarize -> eval_d on the chosen preset; prints where the report is",
                    ("generate", "train_d", "binarize", "eval_d"), _all, _all_plan),
    "generate": cli.Mode("write offline teacher trajectories (INT8 residual chunks, zstd shards + manifest.json)",
                         ("generate",), generate.generate, _generate_plan),
    "verify": cli.Mode("check a teacher-data folder against its manifest; names every bad file and index",
                       ("verify",), verify.verify_command),
    "repair": cli.Mode("regenerate the shards that verify finds missing or damaged", ("repair",), verify.repair),
    "export": cli.Mode("write a teacher-data folder in the reference layout (sample_XXXXXXXX.zst) to reference_dir",
                       ("export",), reference_layout.export_command),
    "import": cli.Mode("read a reference-layout folder (reference_dir) into shards + manifest in data_dir",
                       ("import",), reference_layout.import_command),
    "train_d": cli.Mode("train the one-step student D on the teacher data (resumes from its checkpoint)",
                        ("train_d",), train_d.train_d),
    "binarize": cli.Mode("train the 1-bit student B from D (SPD + LRM, progressive) and export it bit-packed",
                         ("binarize",), binarize.binarize),
    "eval_d": cli.Mode("one-step samples of D and B, FID / precision / recall / PSNR / speed against the teacher, "
                       "report", ("eval_d",), evaluate.eval_d),
    "sample": cli.Mode("one-step images of a trained D or packed B (PNGs + grid + npz) in seconds, no teacher data",
                       ("sample",), sample.sample_command, sample.plan),
}

if __name__ == "__main__":
    sys.exit(cli.main("Main_Distill.py", __doc__, MODES, default_mode="all"))
