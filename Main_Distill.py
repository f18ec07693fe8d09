"""Distil a teacher DDPM into a one-step generator through offline teacher data.

The default mode, all, runs generate -> train_d -> binarize -> eval_d. generate writes teacher trajectories as
INT8 + zstd shards; verify checks them; export and import convert to and from the reference
one-file-per-sample layout; repair regenerates damaged shards; train_d fits the one-step student D;
binarize trains the 1-bit student B from D and exports it bit-packed; eval_d measures D and B against
the teacher; sample draws a trained student's one-step images.
"""
import sys

from pipeline import cli
from pipeline.core.config import output_dir

# Each stage imports its module when it runs: torch and diffusers take seconds to import, and --help
# and a refused config should answer at once. A plan (--dry-run) checks what it can without working:
# the data folder and the split that training would use.


def generate(cfg):
    from pipeline.data import generate
    generate.generate(cfg)


def verify(cfg):
    from pipeline.data import verify
    verify.verify_command(cfg)


def repair(cfg):
    from pipeline.data import verify
    verify.repair(cfg)


def export(cfg):
    from pipeline.data import reference_layout
    reference_layout.export_command(cfg)


def import_(cfg):
    from pipeline.data import reference_layout
    reference_layout.import_command(cfg)


def train_d(cfg):
    from pipeline.train import train_d
    train_d.train_d(cfg)


def binarize(cfg):
    from pipeline.train import binarize
    binarize.binarize(cfg)


def eval_d(cfg):
    from pipeline.evaluation import evaluate
    evaluate.eval_d(cfg)


def sample(cfg):
    from pipeline.evaluation import sample
    sample.sample_command(cfg)


def sample_plan(cfg):
    from pipeline.evaluation import sample
    return sample.plan(cfg)


def check_all(cfg):
    """--mode all runs its stages in turn (cli.main, each as its own processes where ``procs`` says so) and each
    resumes, so rerunning after an interruption continues; binarize's key needs D's layer names, so it is refused
    here, before generate."""
    from pipeline.train import binarize
    binarize.check_before_training(cfg)


def generate_plan(cfg):
    from pipeline.data import generate
    from pipeline.teacher import teachers
    teachers.check_available(cfg)
    generate.check_existing_folder(cfg)  # a resume or extension: the teacher that made the folder, and its keys
    return [f"would write {cfg['samples_total']} samples of {cfg['steps']}-step DDIM trajectories ({cfg['chunks']} "
            f"chunks) from {cfg['teacher_path'] or cfg['teacher_hub_id']} into {output_dir(cfg, 'data_dir')}"]


def data_plan(cfg):
    from pipeline.data import store
    manifest = store.load_manifest(cfg)
    return [f"would read {manifest.data['totals']['samples']} records in {len(manifest.shards)} shard(s) of "
            f"{manifest.folder}"]


def training_plan(prefix, what):
    def plan(cfg):
        from pipeline.data import teacher_data
        manifest = teacher_data.open_data(cfg)
        (lo, hi), (train_lo, train_hi) = teacher_data.split(cfg, manifest)
        return [f"would train {what} for {cfg[prefix + '_train_steps']} steps on records {train_lo}..{train_hi - 1} "
                f"of {manifest.folder} (records {lo}..{hi - 1} held out) into {output_dir(cfg, prefix + '_run_dir')}"]
    return plan


def eval_plan(cfg):
    from pipeline.students import student_d, student_folders
    folder = student_folders.d_folder(cfg)
    student_d.load_student(folder)  # refuses a missing or damaged D, as the run would
    return data_plan(cfg) + [f"would evaluate the student D in {folder} (and B where one is packed) into "
                             f"{output_dir(cfg, 'eval_dir')}"]


def import_plan(cfg):
    from pipeline.data import reference_layout
    return [f"would import {reference_layout.reference_dir(cfg, must_exist=True)} into {output_dir(cfg, 'data_dir')}"]


def all_plan(cfg):
    check_all(cfg)
    return generate_plan(cfg) + [
        f"then train D for {cfg['d_train_steps']} steps into {output_dir(cfg, 'd_run_dir')}, binarize it for "
        f"{cfg['b_train_steps']} steps into {output_dir(cfg, 'b_run_dir')} and write the D-vs-B report to "
        f"{output_dir(cfg, 'eval_dir')}"]


MODES = {
    "all": cli.Mode("generate -> train_d -> binarize -> eval_d on the chosen preset; prints where the report is",
                    ("generate", "train_d", "binarize", "eval_d"), None, all_plan, many_processes=True,
                    before=check_all),
    "generate": cli.Mode("write offline teacher trajectories (INT8 residual chunks, zstd shards + manifest.json)",
                         ("generate",), generate, generate_plan, many_processes=True),
    "verify": cli.Mode("check a teacher-data folder against its manifest; names every bad file and index",
                       ("verify",), verify, data_plan, many_processes=True),
    "repair": cli.Mode("regenerate the shards that verify finds missing or damaged", ("repair",), repair, data_plan,
                       many_processes=True),
    "export": cli.Mode("write a teacher-data folder in the reference layout (sample_XXXXXXXX.zst) to reference_dir",
                       ("export",), export, data_plan),
    "import": cli.Mode("read a reference-layout folder (reference_dir) into shards + manifest in data_dir",
                       ("import",), import_, import_plan),
    "train_d": cli.Mode("train the one-step student D on the teacher data (resumes from its checkpoint)",
                        ("train_d",), train_d, training_plan("d", "D"), many_processes=True),
    "binarize": cli.Mode("train the 1-bit student B from D (SPD + LRM, progressive) and export it bit-packed",
                         ("binarize",), binarize, training_plan("b", "B"), many_processes=True),
    "eval_d": cli.Mode("one-step samples of D and B, FID / precision / recall / PSNR / speed against the teacher, "
                       "report", ("eval_d",), eval_d, eval_plan, many_processes=True),
    "sample": cli.Mode("one-step images of a trained D or packed B (PNGs + grid + npz) in seconds, no teacher data",
                       ("sample",), sample, sample_plan),
}

if __name__ == "__main__":
    sys.exit(cli.main("Main_Distill.py", __doc__, MODES, default_mode="all", script=__file__))
