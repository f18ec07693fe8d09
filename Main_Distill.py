"""Distil a teacher DDPM into a one-step generator through offline teacher data.

The default mode, all, runs generate -> train_d -> binarize -> eval_d. generate writes teacher trajectories as
INT8 + zstd shards; verify checks them; export and import convert to and from the reference
one-file-per-sample layout; repair regenerates damaged shards; train_d fits the one-step student D;
binarize trains the 1-bit student B from D and exports it bit-packed; eval_d measures D and B against
the teacher.
"""
import importlib
import sys

from pipeline import cli


def _generate(cfg, dry_run):
    from pipeline import generate
    if dry_run:
        generate.validate(cfg)
        print(f"[dry-run] would write {cfg['samples_total']} samples of {cfg['steps']}-step DDIM trajectories "
              f"({cfg['chunks']} chunks) from {cfg['teacher_path'] or cfg['teacher_hub_id']} into "
              f"{cfg['data_dir'] or 'data/' + cfg['name']}")
        return
    generate.generate(cfg)


def _stage(module, function):
    """A mode whose module is imported only when it runs; --dry-run stops after printing the config."""
    def run(cfg, dry_run):
        if not dry_run:
            getattr(importlib.import_module(f"pipeline.{module}"), function)(cfg)
    return run


def _all(cfg, dry_run):
    """Every stage in turn; each one resumes, so rerunning after an interruption continues."""
    _generate(cfg, dry_run)
    if dry_run:
        print(f"[dry-run] then train D for {cfg['d_train_steps']} steps into "
              f"{cfg['d_run_dir'] or 'Checkpoints/distill/' + cfg['name']}, binarize it for {cfg['b_train_steps']} "
              f"steps into {cfg['b_run_dir'] or 'Checkpoints/binarize/' + cfg['name']} and write the D-vs-B report "
              f"to {cfg['eval_dir'] or 'SampledImgs/distill/' + cfg['name']}")
    for module, function in (("train_d", "train_d"), ("binarize", "binarize"), ("evaluate", "eval_d")):
        _stage(module, function)(cfg, dry_run)


MODES = {
    "all": ("generate -> train_d -> binarize -> eval_d on the chosen preset; prints where the report is", _all),
    "generate": ("write offline teacher trajectories (INT8 residual chunks, zstd shards + manifest.json)", _generate),
    "verify": ("check a teacher-data folder against its manifest; names every bad file and index",
               _stage("verify", "verify_command")),
    "repair": ("regenerate the shards that verify finds missing or damaged", _stage("verify", "repair")),
    "export": ("write a teacher-data folder in the reference layout (sample_XXXXXXXX.zst) to reference_dir",
               _stage("reference_layout", "export_command")),
    "import": ("read a reference-layout folder (reference_dir) into shards + manifest in data_dir",
               _stage("reference_layout", "import_command")),
    "train_d": ("train the one-step student D on the teacher data (resumes from its checkpoint)",
                _stage("train_d", "train_d")),
    "binarize": ("train the 1-bit student B from D (SPD + LRM, progressive) and export it bit-packed",
                 _stage("binarize", "binarize")),
    "eval_d": ("one-step samples of D, FID / precision / recall / PSNR / speed against the teacher, report",
               _stage("evaluate", "eval_d")),
}

if __name__ == "__main__":
    sys.exit(cli.main("Main_Distill.py", __doc__, MODES, default_mode="all"))
