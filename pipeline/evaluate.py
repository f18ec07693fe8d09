"""``Main_Distill.py --mode eval_d``: D's one-step samples against the teacher, in numbers (DESIGN §5).

D is run on the x_T of the held-out records, which training never saw; the teacher's images for the
same x_T are those records' x0_teacher, so both sets share their starting noise and the teacher's
figures cost no sampling (they are cached in ``<data_dir>/eval``). For the first N = ``fid_samples``
records: FID against the dataset's test split (the first ``fid_reference_count`` images) beside the
floor at the same N, precision / recall, memorization and diversity scores; on every held-out record:
PSNR and MSE of D against the teacher. Throughput is measured on one batch of the same x_T, D's
single call against the teacher's whole DDIM chain, in this run. Everything lands in
``SampledImgs/distill/<run>/``: grids, every sample as PNG and in one npz, report.json and report.md.
"""
import io
import json
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from . import atomic, datasets, fid, images, latent_walk, metrics, runtime, students, teacher_data, teachers
from .config import output_dir, project_path
from .errors import UserError
from .trajectory import ddim_sample

THROUGHPUT_REPEATS = 7  # single calls; the teacher's chain is timed twice


def held_out_range(cfg, folder, manifest, n):
    """The held-out records recorded by the training run (else the config's), with at least n of them."""
    run_path = folder / "run.json"
    lo, hi = json.loads(run_path.read_text())["holdout_indices"] if run_path.is_file() else (0, cfg["holdout_samples"])
    if hi - lo <= 0:
        raise UserError("the held-out split is empty; train with holdout_samples > 0")
    if n > hi - lo:
        raise UserError(f"fid_samples={n} needs {n} held-out records but the split has {hi - lo}; lower fid_samples "
                        f"or train with a larger holdout_samples")
    if hi > manifest.next_index():
        raise UserError(f"{manifest.folder} holds {manifest.next_index()} records, fewer than the held-out split "
                        f"{lo}..{hi - 1}; generate the missing samples")
    return lo, hi


@torch.no_grad()
def one_step_images(model, x_T, batch_size, device):
    out = [students.one_step(model, x_T[lo:lo + batch_size].to(device)).float().cpu()
           for lo in tqdm(range(0, len(x_T), batch_size), desc="D one-step samples", unit="batch", dynamic_ncols=True)]
    return torch.cat(out)


def seconds_per_call(fn, repeats, warm_up=True):
    """The fastest of ``repeats`` timed calls after a warm-up (first calls allocate): the least
    disturbed by other work on the machine."""
    if warm_up:
        fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


@torch.no_grad()
def throughput(model, teacher, ddpm, x_T, steps, device) -> dict:
    """Images/s of D's single call and of the teacher's full DDIM chain on the same batch, each the
    best of several timings."""
    x = x_T.to(device)

    def finished(fn):  # CUDA calls return before the work is done
        return lambda: (fn(), torch.cuda.synchronize(device) if device.type == "cuda" else None)

    d_seconds = seconds_per_call(finished(lambda: students.one_step(model, x)), THROUGHPUT_REPEATS)
    call_seconds = seconds_per_call(finished(lambda: teacher(x, int(ddpm.config.num_train_timesteps) - 1)),
                                    THROUGHPUT_REPEATS)
    scheduler = teachers.ddim_scheduler(ddpm)
    chain_seconds = seconds_per_call(finished(lambda: ddim_sample(teacher, scheduler, x, steps)), repeats=2,
                                     warm_up=False)  # the single-call timing above warmed the teacher
    return {"batch": len(x), "device": str(device), "threads": torch.get_num_threads(),
            "d_images_per_s": len(x) / d_seconds, "teacher_images_per_s": len(x) / chain_seconds,
            "teacher_steps": steps, "speedup": chain_seconds / d_seconds,
            "d_cost_in_teacher_calls": d_seconds / call_seconds}


def sample_scores(feats, images_uint8, real_feats, train_uint8, n):
    precision, recall = metrics.precision_recall(real_feats[:n], feats)
    return {"fid": fid.frechet_distance(real_feats, feats), "precision": precision, "recall": recall,
            "memorization": metrics.memorization_score(images_uint8, train_uint8),
            "diversity": metrics.diversity_score(images_uint8), "n": n}


class Evaluation:
    def __init__(self, cfg):
        self.cfg = cfg
        self.device = runtime.configure(cfg)
        self.folder = students.d_folder(cfg)
        self.model = students.load_student(self.folder).to(self.device)
        self.manifest = teacher_data.open_data(cfg)
        students.check_fits(self.model, self.manifest)
        self.n = cfg["fid_samples"]
        if self.n < 2:
            raise UserError(f"fid_samples must be at least 2, got {self.n}")
        self.lo, self.hi = held_out_range(cfg, self.folder, self.manifest, self.n)
        self.teacher, self.ddpm, self.teacher_source = teacher_data.teacher_of(cfg, self.manifest, self.device)
        self.out_dir = output_dir(cfg, "eval_dir", "SampledImgs/distill")
        self.cache_dir = self.manifest.folder / "eval"
        self.features = fid.InceptionFeatures()

    def reference(self):
        """Inception features of the FID reference set (test split) and of N training images (floor)."""
        count = self.cfg["fid_reference_count"]
        if 0 < count < self.n:
            raise UserError(f"fid_reference_count={count} is smaller than fid_samples={self.n}; raise it (0 = all)")
        test, self.train_images, real, floor = fid.reference_features(self.cfg, self.features, self.n, count)
        if len(real) < self.n:
            raise UserError(f"the test split has {len(real)} images, fewer than fid_samples={self.n}; lower fid_samples")
        self.reference_name = f"{self.cfg['dataset']} test split, first {len(real)} images"
        return real, floor, test[:self.n]

    def teacher_scores(self, teacher_uint8, real):
        """The teacher's figures for these records, computed once per data folder and reference set."""
        key = f"teacher-records{self.lo}-{self.lo + self.n - 1}-ref{len(real)}"
        path = self.cache_dir / f"{key}.json"
        if path.is_file():
            return json.loads(path.read_text())
        feats = fid.extract(self.features, teacher_uint8, self.cfg["fid_batch_size"], "inception: teacher")
        scores = sample_scores(feats, teacher_uint8, real, self.train_images, self.n)
        atomic.write_json(path, scores)
        return scores

    def run(self):
        cfg, n = self.cfg, self.n
        records = teacher_data.read_range(self.manifest, self.lo, self.hi)
        d_images = one_step_images(self.model, records["x_T"], cfg["fid_batch_size"], self.device)
        fidelity = metrics.fidelity(d_images, records["x0"])
        d_uint8, teacher_uint8 = datasets.to_uint8(d_images[:n]), datasets.to_uint8(records["x0"][:n])
        real, floor, test_uint8 = self.reference()
        d_feats = fid.extract(self.features, d_uint8, cfg["fid_batch_size"], "inception: D samples")
        rows = {"teacher": self.teacher_scores(teacher_uint8, real),
                "d": sample_scores(d_feats, d_uint8, real, self.train_images, n),
                "real": {"fid": fid.frechet_distance(real, floor), "fid_of": f"{n} training images (floor)",
                         "memorization": metrics.memorization_score(test_uint8, self.train_images),
                         "diversity": metrics.diversity_score(test_uint8), "n": n}}
        batch_x = records["x_T"][:cfg["throughput_batch"]]
        speed = throughput(self.model, self.teacher, self.ddpm, batch_x, self.manifest.data["generator"]["steps"],
                           self.device)
        report = self.report(rows, fidelity, speed)
        self.write(report, d_uint8, teacher_uint8, records["index"][:n].numpy())
        self.walk(records["x_T"][0], records["x_T"][1])
        return report

    def walk(self, start, end):
        """D's images along the spherical path between the first two held-out x_T."""
        path = latent_walk.slerp(start, end, latent_walk.FRAMES)
        frames = datasets.to_uint8(one_step_images(self.model, path, self.cfg["fid_batch_size"], self.device))
        latent_walk.save_walk({"D": frames}, self.out_dir / "latent_walk.gif", self.out_dir / "latent_walk.png")

    def report(self, rows, fidelity, speed):
        gen = self.manifest.data["generator"]
        weights = self.folder / students.WEIGHTS_FILE
        return {
            "student": str(self.folder), "teacher": self.teacher_source, "data_dir": str(self.manifest.folder),
            "teacher_sampler": f"DDIM eta=0, {gen['steps']} steps", "held_out_records": [self.lo, self.hi - 1],
            "fid_samples": self.n, "fid_reference": self.reference_name,
            "scores": rows, "fidelity_vs_teacher": fidelity, "throughput": speed,
            "size": {"d_parameters": students.parameter_count(self.model), "d_file_bytes": weights.stat().st_size,
                     "teacher_parameters": teachers.parameter_count(self.teacher),
                     "teacher_file_bytes": teachers.safetensors_bytes(self.teacher)},
            "metrics": {"precision_recall": f"k-NN manifolds, k={metrics.PR_NEIGHBOURS}, Inception pool features, "
                                            f"N real = N generated",
                        "memorization": "mean L2 to the nearest training image, pixels in [0, 1] (higher = less copying)",
                        "diversity": "mean pairwise L2 between samples, pixels in [0, 1]",
                        "psnr": "per image, data range [-1, 1], D vs x0_teacher from the same x_T"},
        }

    def write(self, report, d_uint8, teacher_uint8, index):
        out = self.out_dir
        images.save_grid(d_uint8[:64], out / "grid.png")
        images.save_grid(teacher_uint8[:64], out / "teacher_grid.png")
        images.save_grid(images.interleave_rows(teacher_uint8[:32], d_uint8[:32], 8), out / "comparison.png")
        for i, img in zip(index, d_uint8):
            atomic.write_bytes(out / "samples" / f"{int(i):06d}.png", images.png_bytes(img.transpose(1, 2, 0)))
        buf = io.BytesIO()
        np.savez(buf, d=d_uint8, teacher=teacher_uint8, index=index)
        atomic.write_bytes(out / "samples.npz", buf.getvalue())
        atomic.write_json(out / "report.json", report)
        atomic.write_json(out / "config.json", self.cfg)
        atomic.write_bytes(out / "report.md", render_markdown(report).encode())


def _f(value, digits=2):
    return "–" if value is None else f"{value:,.{digits}f}"


def render_markdown(r) -> str:
    s, t, size = r["scores"], r["throughput"], r["size"]
    rows = [("Teacher", f"{r['teacher_sampler']}", s["teacher"], f"{t['teacher_images_per_s']:.1f}",
             t["teacher_steps"], size["teacher_parameters"], size["teacher_file_bytes"]),
            ("Student D", "one step", s["d"], f"{t['d_images_per_s']:.1f}", 1, size["d_parameters"],
             size["d_file_bytes"])]
    lines = [
        "# One-step student D against its teacher", "",
        f"Student `{r['student']}`; teacher `{r['teacher']}`; data `{r['data_dir']}`, held-out records "
        f"{r['held_out_records'][0]}..{r['held_out_records'][1]} (never trained on).", "",
        f"FID: N = {r['fid_samples']} samples against {r['fid_reference']}; the floor at the same N "
        f"(N real training images) is **{_f(s['real']['fid'])}**.", "",
        "| model | sampler | FID | precision | recall | memorization | diversity | images/s | network calls | parameters | file bytes |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, sampler, sc, speed, calls, params, nbytes in rows:
        lines.append(f"| {name} | {sampler} | {_f(sc['fid'])} | {_f(sc['precision'], 3)} | {_f(sc['recall'], 3)} | "
                     f"{_f(sc['memorization'], 3)} | {_f(sc['diversity'], 3)} | {speed} | {calls} | {params:,} | "
                     f"{'–' if nbytes is None else f'{nbytes:,}'} |")
    lines.append(f"| real test images | – | {_f(s['real']['fid'])} (floor) | – | – | {_f(s['real']['memorization'], 3)} | "
                 f"{_f(s['real']['diversity'], 3)} | – | – | – | – |")
    fidelity = r["fidelity_vs_teacher"]
    lines += [
        "", f"FID ratio D / teacher: **{s['d']['fid'] / s['teacher']['fid']:.2f}**.", "",
        f"Distillation fidelity on {fidelity['records']} held-out records (same x_T): PSNR **{fidelity['psnr_db']:.2f} dB**, "
        f"MSE {fidelity['mse']:.5f}.", "",
        f"Speed ({t['device']}, {t['threads']} threads, batch {t['batch']}, same run): D makes "
        f"{t['d_images_per_s']:.1f} images/s in one call, the teacher {t['teacher_images_per_s']:.1f} images/s with "
        f"{t['teacher_steps']} DDIM steps: **{t['speedup']:.1f}x** faster; one D call costs "
        f"{t['d_cost_in_teacher_calls']:.2f} teacher calls.", "",
        "Metrics: " + "; ".join(f"{k}: {v}" for k, v in r["metrics"].items()) + ".", "",
        "## Samples", "",
        "D, one step (`grid.png`):", "", "![D](grid.png)", "",
        "Teacher from the same x_T (`teacher_grid.png`):", "", "![teacher](teacher_grid.png)", "",
        "Rows of the teacher, then D, from the same x_T (`comparison.png`):", "", "![comparison](comparison.png)", "",
        f"A {latent_walk.FRAMES}-frame latent walk of D (spherical interpolation between the x_T of the first two "
        f"held-out records): `latent_walk.gif`, and {latent_walk.STRIP_FRAMES} evenly spaced frames:", "",
        "![latent walk](latent_walk.png)", "",
        "Every D sample: `samples/<record index>.png` and `samples.npz` (keys d, teacher, index).", "",
    ]
    return "\n".join(lines)


def eval_d(cfg):
    report = Evaluation(cfg).run()
    out = output_dir(cfg, "eval_dir", "SampledImgs/distill")
    s = report["scores"]
    print(f"[eval_d] FID D {s['d']['fid']:.2f} vs teacher {s['teacher']['fid']:.2f} (N={report['fid_samples']}, "
          f"floor {s['real']['fid']:.2f}); PSNR vs teacher {report['fidelity_vs_teacher']['psnr_db']:.2f} dB; "
          f"{report['throughput']['speedup']:.1f}x faster than the {report['throughput']['teacher_steps']}-step teacher")
    print(f"[eval_d] report: {out / 'report.md'}\n[eval_d] sample grid: {out / 'grid.png'}")
    return report
