"""The eval_d report in words (docs/design.md §5): ``report.md`` and the closing console lines, rendered
from the ``report.json`` dict that ``evaluate`` computes. Nothing here measures anything."""
from . import latent_walk

NAMES = {"d": "D", "b": "B"}
RATIO_NAMES = {"d_over_teacher": "D / teacher", "b_over_teacher": "B / teacher", "b_over_d": "B / D"}


def _f(value, digits=2):
    return "–" if value is None else f"{value:,.{digits}f}"


def _kid(sc) -> str:
    """KID x 10^3 as mean ± std over the subsets, the usual display."""
    return "–" if "kid" not in sc else f"{sc['kid'] * 1e3:.2f} ± {sc['kid_std'] * 1e3:.2f}"


def _score_rows(r) -> list:
    s, t, size, excess = r["scores"], r["throughput"], r["size"], r["fid_excess"]
    rows = [("Teacher", r["teacher_sampler"], "teacher", t["teacher_images_per_s"], t["teacher_steps"],
             size["teacher_parameters"])]
    for key in ("d", "b"):
        if key in s:
            label = "Student D (full precision)" if key == "d" else "Student B (1-bit weights)"
            rows.append((label, "one step", key, t[key]["images_per_s"], 1, size[key]["parameters"]))
    lines = ["| model | sampler | FID | FID − floor | KID ×10³ | precision | recall | memorization | diversity | "
             "images/s | network calls | parameters |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, sampler, key, speed, calls, params in rows:
        sc = s[key]
        lines.append(f"| {name} | {sampler} | {_f(sc['fid'])} | {_f(excess[key])} | {_kid(sc)} | "
                     f"{_f(sc['precision'], 3)} | {_f(sc['recall'], 3)} | {_f(sc['memorization'], 3)} | "
                     f"{_f(sc['diversity'], 3)} | {speed:.1f} | {calls} | {params:,} |")
    real = s["real"]
    lines.append(f"| real test images | – | {_f(real['fid'])} (floor) | – | {_kid(real)} (floor) | – | – | "
                 f"{_f(real['memorization'], 3)} | {_f(real['diversity'], 3)} | – | – | – |")
    return lines


def _ratio_rows(r) -> list:
    """Each student's FID over the teacher's (or B's over D's) beside the same ratio of excesses over the floor."""
    lines = ["| ratio | FID | FID − floor |", "|---|---|---|"]
    lines += [f"| {name} | {_f(r['fid_ratio'][key])} | **{_f(r['fid_excess_ratio'][key])}** |"
              for key, name in RATIO_NAMES.items() if key in r["fid_ratio"]]
    return lines


def _size_lines(r) -> list:
    size = r["size"]
    d = size["d"]
    lines = ["| model | parameters | fp32 bytes | fp16 bytes | packed bytes |", "|---|---|---|---|---|",
             f"| teacher | {size['teacher_parameters']:,} | {size['teacher_file_bytes']:,} | – | – |",
             f"| D | {d['parameters']:,} | {d['fp32_bytes']:,} | {d['fp16_bytes']:,} | – |"]
    if "b" not in size:
        return lines
    b = size["b"]
    lines += [f"| B | {b['parameters']:,} ({b['binary_weights']:,} binary) | – | – | **{b['packed_bytes']:,}** |", "",
              f"B's packed file is **{b['times_smaller_than_d_fp32']:.1f}x** smaller than D in fp32 and "
              f"{b['times_smaller_than_d_fp16']:.1f}x smaller than D in fp16: {b['sign_bytes']:,} bytes of sign bits "
              f"({b['binary_layers']} binary layers, {b['two_basis_layers']} of them with two bases), "
              f"{b['value_bytes']:,} bytes of {8 * b['bytes_per_value']}-bit float values, {b['header_bytes']:,} bytes of "
              f"safetensors header. "
              f"The values by kind:", "", "| full-precision values in the packed file | count | bytes |", "|---|---|---|"]
    lines += [f"| {kind} | {count:,} | {b['bytes_per_value'] * count:,} |"
              for kind, count in sorted(b["values_by_kind"].items())]
    lines += ["", "Layers kept in full precision (configuration `b_full_precision`; norms, activations and the folded "
              "constant time embedding are full precision too):", "", "| layer | parameters |", "|---|---|"]
    lines += [f"| `{row['name']}` | {row['parameters']:,} |" for row in b["full_precision_layers"]]
    return lines


def _kid_sentence(r) -> str:
    subsets = r["scores"]["real"]["kid_subsets"]
    return (f"KID ×10³ is the unbiased MMD² estimate on the same features (mean ± std over {subsets['subsets']} "
            f"subsets of {subsets['subset_size']}, seed {subsets['seed']}): unlike FID it has no floor that grows as "
            f"N shrinks (the real row gives it for N training images).")


def render_markdown(r) -> str:
    s, t = r["scores"], r["throughput"]
    has_b = "b" in s
    title = "One-step students D and B against their teacher" if has_b else "One-step student D against its teacher"
    students_line = "; ".join(f"student {NAMES[k]} `{v}`" for k, v in r["students"].items())
    lines = [f"# {title}", "",
             f"{students_line}; teacher `{r['teacher']}`; data `{r['data_dir']}`, held-out records "
             f"{r['held_out_records'][0]}..{r['held_out_records'][1]} (never trained on).", "",
             f"FID: N = {r['fid_samples']} samples against {r['fid_reference']}; the floor at the same N "
             f"(N real training images) is **{_f(s['real']['fid'])}**. FID − floor is what a model adds to what N "
             f"samples cost anyway, and the ratios below give it beside the plain FID ratios. {_kid_sentence(r)}", "",
             *_score_rows(r), "", *_ratio_rows(r), ""]
    for key, fidelity in r["fidelity_vs_teacher"].items():
        lines.append(f"Distillation fidelity of {NAMES[key]} on {fidelity['records']} held-out records (same x_T): "
                     f"PSNR **{fidelity['psnr_db']:.2f} dB**, MSE {fidelity['mse']:.5f}.")
    lines += ["", f"Speed ({t['device']}, {t['threads']} threads, batch {t['batch']}, same run): the teacher makes "
              f"{t['teacher_images_per_s']:.1f} images/s ({r['teacher_sampler']})."]
    for key in ("d", "b"):
        if key in t:
            lines[-1] += (f" {NAMES[key]} makes {t[key]['images_per_s']:.1f} images/s in one call, "
                          f"**{t[key]['speedup']:.1f}x** faster (one call costs {t[key]['cost_in_teacher_calls']:.2f} "
                          f"teacher calls).")
    if has_b:
        lines[-1] += (" B runs here as float convolutions of its +-scale weights (PyTorch has no 1-bit kernel), so "
                      "its speed is that of D plus rebuilding the binary weights, not that of 1-bit hardware.")
    lines += ["", "## Size", "", *_size_lines(r), "",
              "Metrics: " + "; ".join(f"{k}: {v}" for k, v in r["metrics"].items()) + ".", "", "## Samples", "",
              "D, one step (`grid.png`):", "", "![D](grid.png)", ""]
    if has_b:
        lines += ["B, one step, same x_T (`b_grid.png`):", "", "![B](b_grid.png)", ""]
    order = "the teacher, then D" + (", then B" if has_b else "")
    shown = "D and B side by side" if has_b else "D"
    lines += ["Teacher from the same x_T (`teacher_grid.png`):", "", "![teacher](teacher_grid.png)", "",
              f"Rows of {order}, from the same x_T (`comparison.png`):", "", "![comparison](comparison.png)", ""]
    if r.get("walk_frames"):
        lines += [f"A {r['walk_frames']}-frame latent walk of {shown} (spherical interpolation between the x_T of the "
                  f"first two held-out records): `latent_walk.gif`, and {latent_walk.STRIP_FRAMES} evenly spaced "
                  f"frames (one row per model):", "", "![latent walk](latent_walk.png)", ""]
    lines += ["Every sample: `samples/<record index>.png` (D), `b_samples/` (B) and `samples.npz` (keys teacher, "
              "index, d, b).", ""]
    return "\n".join(lines)


def console_lines(r, out) -> list:
    """What eval_d prints at the end: each student's headline figures and where the report and grids are."""
    s, t, excess = r["scores"], r["throughput"], r["fid_excess"]
    lines = []
    for key in ("d", "b"):
        if key in s:
            ratio = f"{key}_over_teacher"
            lines.append(f"[eval_d] FID {NAMES[key]} {s[key]['fid']:.2f} vs teacher {s['teacher']['fid']:.2f} "
                         f"(N={r['fid_samples']}, floor {s['real']['fid']:.2f}): ratio {_f(r['fid_ratio'][ratio])}, "
                         f"over the floor {excess[key]:.2f} vs {excess['teacher']:.2f}, excess ratio "
                         f"{_f(r['fid_excess_ratio'][ratio])}; KID x1e3 {_f(s[key]['kid'] * 1e3)} vs teacher "
                         f"{_f(s['teacher']['kid'] * 1e3)} (floor {_f(s['real']['kid'] * 1e3)}); PSNR vs teacher "
                         f"{r['fidelity_vs_teacher'][key]['psnr_db']:.2f} dB; {t[key]['speedup']:.1f}x faster than "
                         f"the {t['teacher_steps']}-step teacher")
    if "b" in r["size"]:
        b = r["size"]["b"]
        lines.append(f"[eval_d] packed B: {b['packed_bytes']:,} bytes, {b['times_smaller_than_d_fp32']:.1f}x smaller "
                     f"than D in fp32; FID ratio B / D {_f(r['fid_ratio']['b_over_d'])}, excess ratio B / D "
                     f"{_f(r['fid_excess_ratio']['b_over_d'])}")
    lines.append(f"[eval_d] report: {out / 'report.md'}")
    lines.append(f"[eval_d] sample grids: {out / 'grid.png'}" + (f", {out / 'b_grid.png'}" if "b" in s else ""))
    return lines
