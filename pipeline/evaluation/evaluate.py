"""``Main_Distill.py --mode eval_d``: the one-step students D and B against the teacher, in numbers
(docs/design.md §5).

D (``d_weights``) and, when one exists, the packed 1-bit B (``b_weights``) run on the x_T of the held-out
records, which training never saw; the teacher's images for the same x_T are those records' x0_teacher, so
every set shares its starting noise and the teacher's figures cost no sampling (they are cached in
``<data_dir>/eval``). For the first N = ``fid_samples`` records: FID against the dataset's test split (the
first ``fid_reference_count`` images) beside the floor at the same N and each model's excess over that
floor, KID on the same features, precision / recall, memorization and diversity scores; on every held-out
record: PSNR and MSE against the teacher. Throughput is measured on one batch of the same x_T, each
student's single call against the teacher's whole DDIM chain, in this run. Sizes: D's safetensors in fp32
and fp16, B's packed file with the breakdown of what is not sign bits, and the layers B keeps in full
precision. Everything lands in ``SampledImgs/distill/<run>/``: grids, every sample as PNG and in one npz, a
latent walk of D and B side by side, report.json and report.md (rendered by ``report``).
"""
import io

import numpy as np
import torch
from safetensors.torch import save as safetensors_bytes
from tqdm import tqdm

from ..core import atomic, config, distributed, images, jsonfile, run_record, runtime
from ..core.config import output_dir
from ..core.errors import UserError
from ..teacher import teachers
from ..data import datasets, teacher_data
from ..students import packed, student_b, student_d, student_folders
from . import api, fid, latent_walk, metrics
from . import report as report_text

THROUGHPUT_REPEATS = 7  # single calls; the teacher's chain (a few seconds) is timed once
NAMES = report_text.NAMES


def held_out_range(cfg, folder, manifest, n):
    """The held-out records recorded by the training run (else the config's), with at least n of them."""
    run = run_record.read(folder, student_d.REWRITE)
    lo, hi = run["holdout_indices"] if run is not None else (0, cfg["holdout_samples"])
    if hi - lo <= 0:
        raise UserError("the held-out split is empty; train with holdout_samples > 0")
    if n > hi - lo:
        raise UserError(f"fid_samples={n} needs {n} held-out records but the split has {hi - lo}; lower fid_samples "
                        f"or train with a larger holdout_samples")
    if hi > manifest.next_index():
        raise UserError(f"{manifest.folder} holds {manifest.next_index()} records, fewer than the held-out split "
                        f"{lo}..{hi - 1}; generate the missing samples")
    return lo, hi


def b_folder(cfg):
    """The packed B to evaluate beside D: ``b_weights`` (a packed folder or a binarize run holding
    one), else ``<b_run_dir>/packed`` when binarize has written it; None for D alone."""
    if cfg["b_weights"] == "none":
        return None
    folder = student_folders.packed_folder(cfg)
    return folder if cfg["b_weights"] or (folder / packed.PACKED_FILE).is_file() else None


def one_step_images(model, x_T, batch_size, label="D"):
    """The images the Python API gives (pipeline/evaluation/api.py), with a progress bar."""
    return api.one_step_images(model, x_T, batch_size, progress=lambda starts: tqdm(
        starts, desc=f"{label} one-step samples", unit="batch", dynamic_ncols=True, disable=not distributed.is_main()))


@torch.inference_mode()
def throughput(models: dict, teacher, ddpm, chain, x_T, steps, device) -> dict:
    """Images/s of each student's single call and of the teacher's whole chain (``chain(x_T)``: DDIM in
    pixel space, the ring in latent space) on the same batch, each the best of several timings."""
    x = x_T.to(device)

    def finished(fn):  # CUDA calls return before the work is done
        return lambda: (fn(), torch.cuda.synchronize(device) if device.type == "cuda" else None)

    call_seconds = runtime.seconds_per_call(finished(lambda: teacher(x, int(ddpm.config.num_train_timesteps) - 1)),
                                            THROUGHPUT_REPEATS)
    # timed once: the single-call timing above warmed the teacher, and a chain is long enough to amortise
    # the first-call allocations of the ring's own modules
    chain_seconds = runtime.seconds_per_call(finished(lambda: chain(x)), repeats=1, warm_up=False)
    speed = {"batch": len(x), "device": str(device), "threads": torch.get_num_threads(),
             "teacher_images_per_s": len(x) / chain_seconds, "teacher_steps": steps}
    for key, model in models.items():
        seconds = runtime.seconds_per_call(finished(lambda: student_d.one_step(model, x)), THROUGHPUT_REPEATS)
        speed[key] = {"images_per_s": len(x) / seconds, "speedup": chain_seconds / seconds,
                      "cost_in_teacher_calls": seconds / call_seconds}
    return speed


def kid_scores(real_feats, feats) -> dict:
    """KID mean and std, with the subsets that drew them (a cached teacher row counts only for the same)."""
    mean, std = fid.kernel_distance(real_feats, feats)
    return {"kid": mean, "kid_std": std, "kid_subsets": fid.kid_settings(len(real_feats), len(feats))}


def sample_scores(features, images_uint8, real_feats, train_uint8, n, batch_size, desc):
    """FID, KID, precision / recall, memorization and diversity of one set of uint8 images (None on the ranks other
    than 0 under torchrun: they only share the Inception features, which every rank must extract)."""
    feats = fid.extract(features, images_uint8, batch_size, desc)
    if not distributed.is_main():
        return None
    precision, recall = metrics.precision_recall(real_feats[:n], feats)
    return {"fid": fid.frechet_distance(real_feats, feats), **kid_scores(real_feats, feats),
            "precision": precision, "recall": recall,
            "memorization": metrics.memorization_score(images_uint8, train_uint8),
            "diversity": metrics.diversity_score(images_uint8), "n": n}


def d_size(model, folder) -> dict:
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    x0out = getattr(model, "x0out", None)  # latent space: the RNet's x0 head is part of the one-step generator
    return {"parameters": student_d.parameter_count(model),
            "x0out_parameters": student_d.parameter_count(x0out) if x0out is not None else 0,
            "fp32_bytes": (folder / student_d.WEIGHTS_FILE).stat().st_size,
            "fp16_bytes": len(safetensors_bytes({k: v.half() for k, v in state.items()}))}


def b_size(model, folder, d: dict) -> dict:
    """B's packed file: bytes by part (the packed format's own breakdown), the ratio to D, and the layers
    kept in full precision."""
    binary = dict(student_b.binary_layers(model))
    full_precision = [{"name": name, "parameters": sum(p.numel() for p in m.parameters(recurse=False))}
                      for name, m in model.named_modules()
                      if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) and name not in binary
                      and name.rpartition(".")[0] not in binary]
    parts = packed.byte_breakdown(folder, model)
    file_bytes = parts["file_bytes"]
    return {"parameters": student_d.parameter_count(model),
            "binary_weights": sum(layer.weight.numel() for layer in binary.values()),
            "two_basis_layers": sum(layer.binarizer_name == "lmb2" for layer in binary.values()),
            "binary_layers": len(binary),
            "packed_bytes": file_bytes, **{k: parts[k] for k in ("sign_bytes", "header_bytes", "value_bytes",
                                                                 "bytes_per_value", "values_by_kind")},
            "full_precision_layers": full_precision,
            "times_smaller_than_d_fp32": d["fp32_bytes"] / file_bytes,
            "times_smaller_than_d_fp16": d["fp16_bytes"] / file_bytes}


class Evaluation:
    def __init__(self, cfg, with_fid=True):
        """``with_fid=False`` skips the Inception network: only ``samples()`` is usable then (a machine
        without the FID weights can sample and time; the images are scored elsewhere)."""
        self.cfg = cfg
        self.device = runtime.configure(cfg)
        self.manifest = teacher_data.open_data(cfg)
        self.folders = {"d": student_folders.d_folder(cfg)}
        self.models = {"d": student_d.load_student(self.folders["d"])}
        b = b_folder(cfg)
        if b is not None:
            self.folders["b"], self.models["b"] = b, packed.load_packed(b)
        for model in self.models.values():
            student_d.check_fits(model.to(self.device), self.manifest)
            runtime.for_inference(model, cfg)
        self.n = cfg["fid_samples"]
        if self.n < 2:
            raise UserError(f"fid_samples must be at least 2, got {self.n}")
        self.lo, self.hi = held_out_range(cfg, self.folders["d"], self.manifest, self.n)
        b_run = run_record.read(b, packed.REDO) if b is not None else None
        if b_run is not None:
            b_holdout = b_run["holdout_indices"]
            if b_holdout != [self.lo, self.hi]:
                raise UserError(f"B in {b} held out records {b_holdout} but D held out {[self.lo, self.hi]}; "
                                f"binarize this D again or set b_weights= to its B (none = D alone)")
        self.teacher, self.ddpm, self.teacher_source = teacher_data.teacher_of(cfg, self.manifest, self.device)
        self.rnet = teacher_data.rnet_of(cfg, self.manifest, self.teacher)
        runtime.for_inference(self.teacher, cfg)  # timed in the students' memory format
        self.out_dir = output_dir(cfg, "eval_dir")
        self.cache_dir = self.manifest.folder / "eval"
        self.features = fid.InceptionFeatures(cfg["channels_last"]) if with_fid else None

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
        """The teacher's figures for these records, computed once per data folder and reference set (and again
        when the cached row predates KID or drew other KID subsets)."""
        key = f"teacher-records{self.lo}-{self.lo + self.n - 1}-ref{len(real)}"
        path = self.cache_dir / f"{key}.json"
        try:
            cached = jsonfile.loads(path.read_text())
        except (OSError, ValueError):
            cached = None  # not cached yet, or a damaged cache: compute it again
        kid = fid.kid_settings(len(real), self.n)
        current = isinstance(cached, dict) and "kid" in cached and cached.get("kid_subsets") == kid
        if distributed.everywhere(current):  # the scoring below is collective
            return cached
        scores = sample_scores(self.features, teacher_uint8, real, self.train_images, self.n,
                               self.cfg["fid_batch_size"], "inception: teacher")
        if distributed.is_main():
            atomic.write_json(path, scores)
        return scores

    def samples(self):
        """One-step images of every student on the held-out x_T: (records, fidelity vs the teacher on all
        of them, the first N of each student as uint8, the teacher's first N as uint8)."""
        records = teacher_data.read_range(self.manifest, self.lo, self.hi)
        samples = {key: one_step_images(model, records["x_T"], self.cfg["fid_batch_size"], NAMES[key])
                   for key, model in self.models.items()}
        fidelity = {key: metrics.fidelity(images_, records["x0"]) for key, images_ in samples.items()}
        uint8 = {key: datasets.to_uint8(images_[:self.n]) for key, images_ in samples.items()}
        return records, fidelity, uint8, datasets.to_uint8(records["x0"][:self.n])

    def teacher_steps(self) -> int:
        """The DDIM steps that made the data; imported data does not record them, so the config's are timed."""
        return self.manifest.data["generator"]["steps"] or self.cfg["steps"]

    def chain(self):
        """The teacher chain that made the data, as x_T -> images: DDIM, or the RNet's ring."""
        rnet = None if self.rnet is None else runtime.for_inference(self.rnet.to(self.device), self.cfg)
        return self.manifest.space.image_sampler(self.teacher, teachers.ddim_scheduler(self.ddpm), rnet,
                                                 self.teacher_steps())

    def speed(self, records):
        batch_x = records["x_T"][:self.cfg["throughput_batch"]]
        return throughput(self.models, self.teacher, self.ddpm, self.chain(), batch_x, self.teacher_steps(),
                          self.device)

    def run(self):
        cfg, n = self.cfg, self.n
        records, fidelity, uint8, teacher_uint8 = self.samples()
        real, floor, test_uint8 = self.reference()
        rows = {"teacher": self.teacher_scores(teacher_uint8, real)}
        for key, images_ in uint8.items():
            rows[key] = sample_scores(self.features, images_, real, self.train_images, n, cfg["fid_batch_size"],
                                      f"inception: {NAMES[key]} samples")
        if not distributed.is_main():
            return None  # the Inception work was shared; rank 0 times, writes and reports
        rows["real"] = {"fid": fid.frechet_distance(real, floor), **kid_scores(real, floor),
                        "fid_of": f"{n} training images (floor)",
                        "memorization": metrics.memorization_score(test_uint8, self.train_images),
                        "diversity": metrics.diversity_score(test_uint8), "n": n}
        report = self.report(rows, fidelity, self.speed(records))
        self.write(report, uint8, teacher_uint8, records["index"][:n].numpy())
        if self.cfg["walk_frames"]:
            self.walk(records["x_T"][0], records["x_T"][1])
        return report

    def walk(self, start, end):
        """The students' images along the spherical path between the first two held-out x_T, side by side."""
        path = latent_walk.slerp(start, end, self.cfg["walk_frames"])
        frames = {NAMES[key]: datasets.to_uint8(one_step_images(model, path, self.cfg["fid_batch_size"], NAMES[key]))
                  for key, model in self.models.items()}
        latent_walk.save_walk(frames, self.out_dir / "latent_walk.gif", self.out_dir / "latent_walk.png")

    def student_sizes(self) -> dict:
        """D's file bytes (fp32, fp16) and, when evaluated, B's packed bytes with their breakdown."""
        size = {"d": d_size(self.models["d"], self.folders["d"])}
        if "b" in self.models:
            size["b"] = b_size(self.models["b"], self.folders["b"], size["d"])
        return size

    def sampler_text(self, gen) -> str:
        return self.manifest.space.sampler_text(gen, self.teacher_steps())

    def report(self, rows, fidelity, speed):
        gen = self.manifest.data["generator"]
        ratios, kid = metrics.fid_ratios(rows), rows["real"]["kid_subsets"]
        size = {"teacher_parameters": teachers.parameter_count(self.teacher),
                "teacher_file_bytes": teachers.safetensors_bytes(self.teacher), **self.student_sizes()}
        return {
            "students": {key: str(folder) for key, folder in self.folders.items()}, "teacher": self.teacher_source,
            "data_dir": str(self.manifest.folder), "teacher_sampler": self.sampler_text(gen),
            "held_out_records": [self.lo, self.hi - 1], "fid_samples": self.n, "fid_reference": self.reference_name,
            "scores": rows, "fid_excess": metrics.fid_excess(rows), "fid_ratio": ratios["fid"],
            "fid_excess_ratio": ratios["fid_excess"], "fidelity_vs_teacher": fidelity, "throughput": speed,
            "size": size, "walk_frames": self.cfg["walk_frames"],
            "metrics": {"kid": f"unbiased MMD² with the kernel (x·y/d + 1)³ on the Inception pool features, mean "
                               f"and std over {kid['subsets']} subsets of {kid['subset_size']} (seed {kid['seed']})",
                        "fid_excess": "FID minus the floor (N training images against the same reference)",
                        "precision_recall": f"k-NN manifolds, k={metrics.PR_NEIGHBOURS}, Inception pool features, "
                                            f"N real = N generated",
                        "memorization": "mean L2 to the nearest training image, pixels in [0, 1] (higher = less copying)",
                        "diversity": "mean pairwise L2 between samples, pixels in [0, 1]",
                        "psnr": "per image, data range [-1, 1], student vs x0_teacher from the same x_T"},
        }

    def write(self, report, uint8: dict, teacher_uint8, index):
        out = self.out_dir
        for key, images_ in uint8.items():
            images.save_grid(images_[:64], out / ("grid.png" if key == "d" else f"{key}_grid.png"))
            for i, img in zip(index, images_):
                folder = "samples" if key == "d" else f"{key}_samples"
                atomic.write_bytes(out / folder / f"{int(i):06d}.png", images.png_bytes(img.transpose(1, 2, 0)))
        images.save_grid(teacher_uint8[:64], out / "teacher_grid.png")
        rows = [teacher_uint8[:32], *(images_[:32] for images_ in uint8.values())]
        images.save_grid(images.interleave_rows(*rows, per_row=8), out / "comparison.png")
        buf = io.BytesIO()
        np.savez(buf, teacher=teacher_uint8, index=index, **uint8)
        atomic.write_bytes(out / "samples.npz", buf.getvalue())
        atomic.write_json(out / "report.json", report)
        atomic.write_json(out / "config.json", self.cfg)
        atomic.write_bytes(out / "report.md", report_text.render_markdown(report).encode())


def eval_d(cfg):
    """The report (None on the ranks other than 0 under torchrun, which share the Inception features only)."""
    config.validate(cfg, ["eval_d"])  # callers from Python skip the CLI's check
    with distributed.together():  # under torchrun a refused set-up stops every rank with one sentence
        evaluation = Evaluation(cfg)
    report = evaluation.run()
    if report is not None:
        print("\n".join(report_text.console_lines(report, output_dir(cfg, "eval_dir"))))
    return report
