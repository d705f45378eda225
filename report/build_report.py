"""Build the report from its template and the results files: report_template.md -> report.md -> report.pdf.

    python report/build_report.py                    # what `make report` runs
    python report/build_report.py --grid_results task1/image_diffusion_todo/results/fid_grid/results.json \
        --lora_run task2/runs/artistic_custom --dreambooth_run task2/runs/dreambooth_cat

Each `{{name}}` in the template is replaced by what the function of that name in `fill_values` returns:
a number, a table or a figure read from a results file. Your own results win over the committed ones when they exist: the AFHQ grid's
results.json (else the CPU stand-in's, labelled as such) and the validation images of your Task 2 runs
(else a placeholder naming the command that makes them). The markdown is then rendered with PyMuPDF:
maths ($...$, $$...$$) as images drawn by matplotlib's mathtext, page numbers added at the end.
"""
import argparse
import hashlib
import html
import json
import os
import re
import sys
import tempfile
from pathlib import Path

REPORT_DIR = Path(__file__).resolve().parent
ROOT = REPORT_DIR.parent
IMAGE_DIR = ROOT / "task1" / "image_diffusion_todo"
TASK2_DIR = ROOT / "task2"

GRID_RESULTS = IMAGE_DIR / "results" / "fid_grid" / "results.json"
STANDIN_RESULTS = REPORT_DIR / "results_image_demo.json"
# The wrappers' default output folders (task2/scripts/*.sh), first found wins.
LORA_RUNS = [TASK2_DIR / "runs" / "artistic_custom", TASK2_DIR / "runs" / "sd-naruto-model-lora"]
DREAMBOOTH_RUNS = [TASK2_DIR / "runs" / "dreambooth_cat"]
COURSE_STEPS = [10, 20, 50, 100, 1000]
COURSE_ETAS = [0.0, 0.2, 0.5, 1.0]
DDPM_BAR, DDIM_BAR = 20.0, 40.0  # the course notebook's bars: DDPM CD < 20, DDIM-50 (eta 0) CD < 40

PAGE_MARGIN = 54  # points
TEXT_WIDTH = 595 - 2 * PAGE_MARGIN  # A4 width in points, less the margins
CSS = """
body { font-family: sans-serif; font-size: 9.5pt; line-height: 1.3; }
h1, h2, h3 { border-style: none; }
h1 { font-size: 17pt; } h2 { font-size: 13.5pt; margin-top: 14pt; } h3 { font-size: 11pt; }
code { font-family: monospace; font-size: 8.5pt; }
pre { font-family: monospace; font-size: 8pt; background-color: #f2f2f2; padding: 4pt; }
table { margin: 4pt 0; }
th, td { font-size: 8.5pt; padding: 1pt 4pt; border-bottom: 0.5pt solid #999; text-align: right; }
th { border-bottom: 0.8pt solid #333; }
p.caption { font-size: 8.5pt; color: #444; }
p.placeholder { border: 0.5pt solid #c00; padding: 4pt; color: #800; }
"""


# ------------------------------------------------------------------------------------------------
# Reading results

def read_json(path):
    return json.loads(Path(path).read_text())


def course_seeds():
    """The course recipe's results, one per training seed, in seed order: [results dict]."""
    runs = [read_json(p) for p in sorted(REPORT_DIR.glob("results_2d_course*.json"))]
    return sorted(runs, key=lambda r: r["seed"])


def ddim_cd(results, steps, eta):
    """CD of the steps x eta grid's cell (the grid's spacing, the first draw of x_T)."""
    return next(r["cd"] for r in results["ddim"] if r["steps"] == steps and r["eta"] == eta)


def first_existing(paths):
    return next((Path(p) for p in paths if p and Path(p).exists()), None)


def validation_image(run_dir):
    """A Task 2 run's final validation grid (else its latest epoch's), or None."""
    if run_dir is None:
        return None
    folder = Path(run_dir) / "validation"
    final = folder / "final.png"
    if final.exists():
        return final
    epochs = sorted(folder.glob("epoch_*.png"))
    return epochs[-1] if epochs else None


# ------------------------------------------------------------------------------------------------
# Markdown pieces

def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def grid_table(value, steps=COURSE_STEPS, etas=COURSE_ETAS, corner="eta \\ steps"):
    """The course's shape: a row per eta, a column per number of steps; value(steps, eta) -> str."""
    return table([corner, *map(str, steps)], [[f"{eta:g}", *(value(s, eta) for s in steps)] for eta in etas])


def figure(path, caption, width=1.0, relative_to=REPORT_DIR):
    src = os.path.relpath(path, relative_to)
    return f"![{caption}|{width}]({src})\n\n<p class=\"caption\">{caption}</p>"


def figure_row(paths, captions, width):
    """Small pictures side by side, one caption naming them in order."""
    images = " ".join(f"![{c}|{width}]({os.path.relpath(p, REPORT_DIR)})" for p, c in zip(paths, captions))
    return f"{images}\n\n<p class=\"caption\">Left to right: {', '.join(captions)}.</p>"


def placeholder(what, command):
    return f"<p class=\"placeholder\">Not run yet: {what}. It comes from <code>{html.escape(command)}</code>; " \
           f"then run <code>make report</code> again.</p>"


def fmt(x, digits=2):
    return f"{x:.{digits}f}"


# ------------------------------------------------------------------------------------------------
# Task 1-1

def course_bars_table():
    runs = course_seeds()
    rows, ddpm_ok, ddim_ok = [], 0, 0
    for r in runs:
        ddpm, ddim50 = r["ddpm"]["cd"], ddim_cd(r, 50, 0.0)
        ddpm_ok += ddpm < DDPM_BAR
        ddim_ok += ddim50 < DDIM_BAR
        rows.append([r["seed"], fmt(ddpm), "yes" if ddpm < DDPM_BAR else "**no**",
                     fmt(ddim50), "yes" if ddim50 < DDIM_BAR else "**no**"])
    rows.append([f"**{len(runs)} seeds**", "", f"**{ddpm_ok} of {len(runs)}**", "", f"**{ddim_ok} of {len(runs)}**"])
    return table(["training seed", "DDPM CD", "< 20", "DDIM-50 CD (eta 0)", "< 40"], rows)


def course_bars_summary():
    runs = course_seeds()

    def span(values):
        return f"{fmt(min(values))} to {fmt(max(values))}"
    return (f"Over these seeds DDPM CD runs from {span([r['ddpm']['cd'] for r in runs])} (bar 20) and "
            f"DDIM-50 with eta 0 from {span([ddim_cd(r, 50, 0.0) for r in runs])} (bar 40): the training "
            f"run's luck decides as much as the code whether one run passes. DDIM-50 with eta 1 gives "
            f"{span([ddim_cd(r, 50, 1.0) for r in runs])}.")


def course_grid_table(seed=0):
    r = next(r for r in course_seeds() if r["seed"] == seed)
    return grid_table(lambda s, eta: fmt(ddim_cd(r, s, eta)))


def improved_grid_table():
    r = read_json(REPORT_DIR / "results_2d_improved.json")
    return grid_table(lambda s, eta: fmt(ddim_cd(r, s, eta)))


def spacing_table():
    """Mean +- SE over the draws of x_T, per spacing, improved recipe seed 0, S <= 100."""
    r = read_json(REPORT_DIR / "results_2d_improved.json")
    cells = {(c["timestep_spacing"], c["steps"], c["eta"]): c for c in r["spacings"]}
    spacings = ["leading", "linspace", "trailing", "quadratic"]
    rows = []
    for eta in (0.0, 1.0):
        for steps in (10, 20, 50, 100):
            row = [cells[(sp, steps, eta)] for sp in spacings]
            best = min(c["cd_mean"] for c in row)
            rows.append([steps, f"{eta:g}"] + [(f"**{fmt(c['cd_mean'])} ± {fmt(c['cd_se'])}**" if c["cd_mean"] == best
                                               else f"{fmt(c['cd_mean'])} ± {fmt(c['cd_se'])}") for c in row])
    return table(["steps S", "eta", *spacings], rows)


def dpm_solver_runs():
    """The Task 1-1 runs that have DPM-Solver++ rows: [(label, results dict)], course seeds first."""
    runs = [(f"course, seed {r['seed']}", r) for r in course_seeds() if r.get("dpm_solver")]
    for name in ("results_2d_improved.json", "results_2d_improved_seed1.json"):
        r = read_json(REPORT_DIR / name)
        if r.get("dpm_solver"):
            runs.append((f"improved, seed {r['seed']}", r))
    return runs


def z_score(a, b):
    """(a - b) in standard errors of the difference, for two rows with cd_mean and cd_se."""
    return (a["cd_mean"] - b["cd_mean"]) / (a["cd_se"] ** 2 + b["cd_se"] ** 2) ** 0.5


def cd_cell(row):
    """'mean ± SE' of a Task 1-1 row, '-' for None."""
    return f"{fmt(row['cd_mean'])} ± {fmt(row['cd_se'])}" if row else "-"


def solver_2d_name(row):
    """'SDE-2M', '3M', ... (the few-step table's column names) for a Task 1-1 dpm_solver row; order 1
    as the DDIM it equals."""
    if row["order"] == 1:
        return f"DDIM eta {1 if row['sde'] else 0}"
    return f"{'SDE-' if row['sde'] else ''}{row['order']}M"


def solver_rows_by_key(run):
    """A Task 1-1 run's dpm_solver rows by (sde, order, timestep_spacing, steps)."""
    return {(d["sde"], d["order"], d["timestep_spacing"], d["steps"]): d for d in run["dpm_solver"]}


def dpm_solver_2d():
    """Few network calls on the quadratic timesteps: DDIM (the solvers' order 1) against DPM-Solver++
    (2M, 3M) and SDE-DPM-Solver++(2M), the best of all rows after the fact, and the SDE solver's
    difference from the ODE's 2M and from DDIM eta 1 in standard errors."""
    runs = dpm_solver_runs()
    if not runs:
        return placeholder("the DPM-Solver++ rows of Task 1-1 (a dpm_solver entry in report/results_2d_*.json)",
                           "python run_experiment.py --recipe improved --seed 0 --out OUT")
    rows = []
    for label, r in runs:
        solver = solver_rows_by_key(r)
        for calls in sorted({d["steps"] for d in r["dpm_solver"]}):
            quadratic = {(sde, order): solver.get((sde, order, "quadratic", calls))
                         for sde, order in ((False, 1), (True, 1), (False, 2), (False, 3), (True, 2))}
            best = min((d for d in r["dpm_solver"] if d["steps"] == calls), key=lambda d: d["cd_mean"])
            sde2 = quadratic[(True, 2)]
            rows.append([label, calls, len(sde2["cds"]), *map(cd_cell, quadratic.values()),
                         f"{cd_cell(best)} ({solver_2d_name(best)}, {best['timestep_spacing']})",
                         f"{z_score(sde2, quadratic[(False, 2)]):+.1f}", f"{z_score(sde2, quadratic[(True, 1)]):+.1f}"])
    return table(["run", "calls", "draws", "DDIM eta 0", "DDIM eta 1", "2M", "3M", "SDE-2M",
                  "best row (sampler, spacing)", "z SDE-2M vs 2M", "z SDE-2M vs eta 1"], rows)


def paired_difference(a, b):
    """Mean and standard error of a's CD minus b's, draw by draw, for two rows over the same draws
    (the same x_T and, for the SDE, the same noise stream): (mean, SE)."""
    differences = [x - y for x, y in zip(a["cds"], b["cds"])]
    mean = sum(differences) / len(differences)
    variance = sum((d - mean) ** 2 for d in differences) / (len(differences) - 1)
    return mean, (variance / len(differences)) ** 0.5


def dpm_solver_2d_fitted():
    """Every sampler on timesteps fitted to its model (fit_timesteps.py) against the same sampler on
    the quadratic ones (where the fit starts), the difference paired by draw, and the timesteps."""
    rows = []
    for label, r in dpm_solver_runs():
        solver = solver_rows_by_key(r)
        for d in r["dpm_solver"]:
            if d["timestep_spacing"] != "fitted":
                continue
            quadratic = solver[(d["sde"], d["order"], "quadratic", d["steps"])]
            mean, se = paired_difference(d, quadratic)
            rows.append([label, d["steps"], solver_2d_name(d), cd_cell(quadratic), cd_cell(d),
                         f"{mean:+.2f} ± {se:.2f}", ", ".join(map(str, d["timesteps"]))])
    if not rows:
        return placeholder("the fitted-timestep rows of Task 1-1",
                           "python run_experiment.py --recipe improved --out OUT")
    return table(["run", "calls", "sampler", "quadratic", "fitted", "fitted - quadratic (paired)",
                  "fitted timesteps"], rows)


FEW_STEP_GOAL = {10: 2.0, 20: 0.6}  # CD bounds at 10 and 20 network calls, improved recipe, seed 0


def few_step_goal_rows(seed):
    """SDE-DPM-Solver++(2M) by calls, improved recipe, on the timesteps fitted to the model where the
    run fitted them, on the quadratic ones elsewhere -> {calls: row}, or None."""
    r = dict(dpm_solver_runs()).get(f"improved, seed {seed}")
    if r is None:
        return None
    sde_2m = [d for d in r["dpm_solver"] if (d["sde"], d["order"]) == (True, 2)]
    rows = {d["steps"]: d for d in sde_2m if d["timestep_spacing"] == "quadratic"}
    rows.update({d["steps"]: d for d in sde_2m if d["timestep_spacing"] == "fitted"})
    return rows


def dpm_solver_2d_goal(seed):
    rows = few_step_goal_rows(seed)
    if rows is None:
        return "(not run yet)"
    return " and ".join(f"{fmt(rows[calls]['cd_mean'])} ± {fmt(rows[calls]['cd_se'])} at {calls} calls "
                        f"({rows[calls]['timestep_spacing']})" for calls in FEW_STEP_GOAL)


def dpm_solver_2d_verdict():
    """Whether those rows meet FEW_STEP_GOAL: met (missed) when the bound lies 2 standard errors or more
    above (below) the mean, unresolved in between; seed 0, then seed 1 when it was run."""
    openings = {0: f"Against the few-step goal (CD ≤ {FEW_STEP_GOAL[10]:g} at 10 calls and ≤ "
                   f"{FEW_STEP_GOAL[20]:g} at 20, seed 0)",
                1: "The same bounds on seed 1"}
    sentences = []
    for seed, opening in openings.items():
        rows = few_step_goal_rows(seed)
        if rows is None:
            break
        parts = []
        for calls, bound in FEW_STEP_GOAL.items():
            z = (bound - rows[calls]["cd_mean"]) / rows[calls]["cd_se"]
            verdict = "met" if z >= 2 else "missed" if z <= -2 else "unresolved"
            parts.append(f"{calls} calls {verdict} (the bound {bound:g} is {abs(z):.1f} SE "
                         f"{'above' if z >= 0 else 'below'} the mean)")
        sentences.append(f"{opening}: {'; '.join(parts)}.")
    return " ".join(sentences)


# ------------------------------------------------------------------------------------------------
# Task 1-2

class ImageResults:
    """The AFHQ grid's results.json when there is one, else the CPU stand-in's (labelled)."""

    def __init__(self, grid_path):
        self.path = first_existing([grid_path, GRID_RESULTS])
        self.is_standin = self.path is None
        self.path = self.path or STANDIN_RESULTS
        self.results = read_json(self.path)
        self.cells = {(c["spacing"], c["steps"], c["eta"]): c for c in self.results["ddim"]}

    def fid(self, steps, eta, spacing=None):
        cell = self.cells.get((spacing or self.results["timestep_spacing"], steps, eta))
        return "–" if cell is None else f"{cell['fid']:.2f}"

    def label(self):
        r = self.results
        if self.is_standin:
            return (f"**CPU stand-in, not AFHQ** (no AFHQ grid results found at "
                    f"`{os.path.relpath(GRID_RESULTS, ROOT)}`): `make image-demo`, {r['num_samples']} generated "
                    f"against {r['num_gt']} real 16x16 images, sampling seed {r['seed']}; source "
                    f"`{os.path.relpath(self.path, ROOT)}`.")
        return (f"AFHQ: {r['num_samples']} generated against {r['num_gt']} real images, sampling seed "
                f"{r['seed']}, {r['timestep_spacing']} timesteps; source `{os.path.relpath(self.path, ROOT)}`.")

    def table(self):
        return grid_table(lambda s, eta: self.fid(s, eta), corner=f"{self.results['timestep_spacing']}: eta \\ steps")

    def ddpm_and_floor(self):
        r = self.results
        text = f"DDPM (1000 steps): FID **{r['ddpm']['fid']:.2f}**"
        if r.get("floor"):
            text += f"; floor (real against real images at the same N): FID **{r['floor']['fid']:.2f}**"
        return text + "."

    def comparisons(self):
        return comparisons_table(self.results.get("comparisons", []))

    def sample_grids(self):
        """The grid's sample pictures (grids/<setting>.png next to results.json), when the run wrote them."""
        folder = self.path.parent / "grids"
        if not self.is_standin:
            paths = sorted(folder.glob("*.png"))[:8]
            return figure_row(paths, [p.stem for p in paths], 0.24) if paths else ""
        names = ["image_standin_real", "image_standin_ddpm", "image_standin_ddim_steps10_eta0",
                 "image_standin_ddim_steps50_eta0"]
        return figure_row([REPORT_DIR / "figures" / f"{n}.png" for n in names],
                          [n.replace("image_standin_", "") for n in names], 0.24)

    def dpm_solver(self):
        rows = [[solver_method(d), d["spacing"], d["steps"], f"{d['fid']:.2f}",
                 f"{1e3 * d['kid']:.1f} ± {1e3 * d['kid_se']:.1f}", f"{d['seconds']:.1f}"]
                for d in self.results.get("dpm_solver", [])]
        if not rows:
            return placeholder("the DPM-Solver++ rows of Task 1-2",
                               "sh experiments/fid_grid.sh CKPT GT_DIR --dpm_solver_steps 10 20 50 --dpm_solver_sde "
                               "(in task1/image_diffusion_todo)")
        grid_rows = (f"In the grid (N = {self.results['num_samples']}):\n\n"
                     + table(["sampler", "spacing", "calls", "FID", "KID ×10³ ± SE", "seconds"], rows))
        few_step = self.results.get("few_step")
        return grid_rows + ("\n\n" + few_step_table(few_step) if few_step else "")


def solver_method(row):
    """'DPM-Solver++(2M)' or 'SDE-DPM-Solver++(2M)' for a dpm_solver row of a Task 1-2 results.json."""
    return f"{'SDE-' if row['sde'] else ''}DPM-Solver++({row['order']}M)"


def few_step_table(results):
    """The few-step stage (make image-demo's OUT/few_step/): FID (KID ×10³ ± SE) of DDIM at each eta
    and of each solver, a column per number of network calls, then its contrasts (fid_grid.comparisons)."""
    calls = sorted({r["steps"] for r in results["ddim"] + results["dpm_solver"]})
    cells = {(f"DDIM, eta {r['eta']:g}", r["steps"]): r for r in results["ddim"]}
    cells.update({(solver_method(r), r["steps"]): r for r in results["dpm_solver"]})
    samplers = list(dict.fromkeys(name for name, _ in cells))

    def cell(row):
        return "–" if row is None else f"{row['fid']:.2f} ({1e3 * row['kid']:.1f} ± {1e3 * row['kid_se']:.1f})"

    spacing = results["timestep_spacing"]
    floor = results.get("floor")
    return "\n\n".join([
        f"At N = {results['num_samples']} (the few-step stage of `make image-demo`, {spacing} timesteps, "
        "the same x_T for every sampler; FID (KID ×10³ ± SE)"
        + (f"; floor {cell(floor)}" if floor else "") + "):",
        table([f"{spacing}: sampler \\ calls", *map(str, calls)],
              [[name, *(cell(cells.get((name, c))) for c in calls)] for name in samplers]),
        comparisons_table(results.get("comparisons", [])),
    ])


def comparisons_table(comparisons):
    rows = [[c["a"], c["b"], f"{1e3 * c['kid_difference']:.1f} ± {1e3 * c['se']:.1f}", f"{c['z']:.2f}",
             "resolved" if abs(c["z"]) >= 2 else "unresolved"] for c in comparisons]
    return table(["A", "B", "KID(A) − KID(B), ×10³", "z", "verdict"], rows) if rows else ""


def fid_discussion(image):
    """What the table resolves, in words: the stand-in's 150 and 1000-image runs, or the user's grid."""
    if not image.is_standin:
        resolved = [c for c in image.results.get("comparisons", []) if abs(c["z"]) >= 2]
        if not resolved:
            return "No contrast of the table is resolved (every |z| < 2) at this N."
        return "Resolved (|z| ≥ 2): " + "; ".join(
            f"{c['a']} against {c['b']} (z = {c['z']:.1f})" for c in resolved) + "."
    r = read_json(REPORT_DIR / "results_image_demo_n1000.json")
    seed = ("the same sampling seed" if r["seed"] == image.results["seed"] else
            f"sampling seed {r['seed']}, not the table's {image.results['seed']}, so other images")
    return (f"On the stand-in at N = {image.results['num_samples']}, no DDIM setting is told apart from "
            f"DDPM or from the floor. With N = {r['num_samples']} on a few settings (the same checkpoint, "
            f"{seed}; `report/results_image_demo_n1000.json`) DDPM FID is {r['ddpm']['fid']:.1f} against a "
            f"floor of {r['floor']['fid']:.1f}, and the contrasts read:\n\n" + comparisons_table(r["comparisons"]))


# ------------------------------------------------------------------------------------------------
# Task 2

def training_images(folder):
    """[(image path, caption or None)] of a Task 2 data folder: metadata.jsonl's captions when it has one."""
    folder = Path(folder)
    metadata = folder / "metadata.jsonl"
    if metadata.exists():
        rows = [json.loads(line) for line in metadata.read_text().splitlines() if line.strip()]
        return [(folder / row["file_name"], row.get("text")) for row in rows]
    return [(p, None) for p in sorted(folder.iterdir()) if p.suffix.lower() in (".png", ".jpg", ".jpeg")]


def training_grid(kind, data_dir, figures_dir):
    """Draw the training images in one row (captions as titles) -> figures_dir/task2_<kind>_training.png,
    and describe the data set in a sentence."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    items = training_images(data_dir) if Path(data_dir).is_dir() else []
    if not items:
        return placeholder(f"training images in {data_dir}", "a folder of .png/.jpg images")
    shown = items[:8]
    fig, axes = plt.subplots(1, len(shown), figsize=(2.0 * len(shown), 2.3), squeeze=False)
    sizes = set()
    for ax, (path, caption) in zip(axes[0], shown):
        image = Image.open(path)
        sizes.add(f"{image.width}x{image.height}")
        ax.imshow(image.convert("RGB"))
        ax.set_title(f'"{caption}"' if caption else path.name, fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    figures_dir.mkdir(parents=True, exist_ok=True)
    out = figures_dir / f"task2_{kind}_training.png"
    fig.savefig(out, dpi=100, metadata={"Software": None})
    plt.close(fig)
    where = os.path.relpath(Path(data_dir).resolve(), ROOT)
    captions = ("with one caption each in metadata.jsonl" if items[0][1] else
                "all captioned with the instance prompt \"a photo of a sks cat\" (train_dreambooth_lora.sh's default)"
                if kind == "dreambooth" else "without captions")
    description = (f"`{where}`: {len(items)} images ({', '.join(sorted(sizes))}), {captions}"
                   f"{'' if len(shown) == len(items) else f'; the first {len(shown)} shown'}.")
    return description + "\n\n" + figure(out, f"Training images of {where}" + (" with their captions" if items[0][1] else ""))


def generated(kind, run_dir):
    runs, command, prompt = {
        "lora": (LORA_RUNS, "cd task2 && sh scripts/train_lora_custom.sh", "\"a house\" (train_lora_custom.sh)"),
        "dreambooth": (DREAMBOOTH_RUNS, "cd task2 && sh scripts/train_dreambooth_lora.sh",
                       "\"A photo of sks cat in a bucket\" (train_dreambooth_lora.sh)"),
    }[kind]
    image = validation_image(first_existing([run_dir, *runs]))
    if image is None:
        return placeholder(f"generated images of the {'LoRA' if kind == 'lora' else 'DreamBooth + LoRA'} run "
                           f"(its validation/final.png)", command)
    return figure(image, f"Validation images after training, {image.parent.parent.name}/validation/{image.name}; "
                         f"the run's validation prompt (the wrapper's default: {prompt})")


# ------------------------------------------------------------------------------------------------
# The rehearsal at real size (benchmarks/rehearsal.py)

REHEARSAL_RESULTS = [REPORT_DIR / "rehearsal_cpu.json", REPORT_DIR / "rehearsal_cuda.json"]
REHEARSAL_RATES = [("seconds_per_step", "s per training step"), ("seconds_per_image_call", "s per image and network call"),
                   ("projected_seconds_per_image", "s per image (all T steps)"), ("seconds_per_image", "s per image"),
                   ("seconds_per_denoising_step", "s per denoising step (with guidance)")]
REHEARSAL_OUTPUTS = [("checkpoint_mb", "checkpoint {} MB"), ("lora_file_mb", "LoRA file {} MB"),
                     ("eval_images", "{} eval images"), ("images", "{} images"), ("class_images", "{} class images"),
                     ("fid", "FID {:.3g} (random weights)"), ("model_gb", "model {} GB"), ("image_grids", "{} image grids"),
                     ("largest_file_mb", "largest file {} MB")]
PROJECTED_JOBS = {
    "train_100k_steps": "train.py, the course's 100,000 steps (training steps only)",
    "train_100k_steps_sample_grids_and_checkpoints": "its 500 sample grids and checkpoints (at the rehearsal's "
                                                     "--sample_method ddim; the default DDPM grid makes 20x the calls)",
    "fid_grid_sampling_21_cells_500_images": "sampling the FID grid: 21 cells x 500 images (5,720 calls per image)",
    "fid_grid_scoring": "scoring it: 22 folders of 500 images through Inception-v3",
    "lora_naruto_course_run": "train_lora.sh (1,221 images x 100 epochs, validation every epoch)",
    "lora_custom_course_run": "train_lora_custom.sh (4 images x 100 epochs)",
    "dreambooth_course_run": "train_dreambooth_lora.sh (500 steps)",
}


def rehearsal_runs():
    return [read_json(path) for path in REHEARSAL_RESULTS if path.exists()]


def rehearsal_cells(figures, names):
    return ", ".join(template.format(figures[key]) for key, template in names if figures.get(key) is not None)


def rehearsal_rate(figures):
    return "; ".join(f"{figures[key]:.3g} {unit}" for key, unit in REHEARSAL_RATES if figures.get(key))


def rehearsal_table():
    """A table per rehearsal run: per stage its seconds, rate, peak memory and outputs; then the
    projected hours of the course's full jobs."""
    parts = []
    for run in rehearsal_runs():
        memory = "CUDA max allocated" if run["device"] == "cuda" else "Peak RSS"
        rows = []
        for stage in run["stages"]:
            figures = stage.get("figures", {})
            peak = figures.get("cuda_max_allocated_gib", figures.get("peak_rss_gib"))
            rows.append([f"`{stage['name']}`", stage["task"], stage.get("seconds", "failed"),
                         rehearsal_rate(figures) + (" (stopped early)" if stage.get("stopped_early") else ""),
                         "" if peak is None else f"{peak:.2f}", rehearsal_cells(figures, REHEARSAL_OUTPUTS)])
        jobs = [[PROJECTED_JOBS.get(name, name), f"{hours:,.1f}"] for name, hours in run["projected_hours"].items()]
        parts += [f"**{run['machine']}**, `{run['command'].strip()}`: {run['total_seconds'] / 60:.1f} minutes in all, "
                  f"{run['train_steps']} training steps per run.",
                  table(["Stage", "Task", "Seconds", "Rate", f"{memory} (GiB)", "Output"], rows),
                  table(["The course's full job", "Projected hours on this machine"], jobs)]
    return "\n\n".join(parts) if parts else placeholder("the rehearsal", "make rehearsal")


# ------------------------------------------------------------------------------------------------
# Template -> markdown

def fill_values(args):
    image = ImageResults(args.grid_results)
    seeds = course_seeds()
    seed0 = next(r for r in seeds if r["seed"] == 0)
    improved = read_json(REPORT_DIR / "results_2d_improved.json")
    improved1 = read_json(REPORT_DIR / "results_2d_improved_seed1.json")
    return {
        "course_bars_table": course_bars_table,
        "course_grid_table": course_grid_table,
        "course_bars_summary": course_bars_summary,
        "course_ddpm_cd_seed0": lambda: fmt(seed0["ddpm"]["cd"]),
        "course_ddim50_seed0": lambda: fmt(ddim_cd(seed0, 50, 0.0)),
        "course_seeds_list": lambda: ", ".join(str(r["seed"]) for r in seeds),
        "course_num_seeds": lambda: str(len(seeds)),
        "floor_cd": lambda: fmt(seed0["floor_cd"], 3),
        "improved_ddpm_cd": lambda: fmt(improved["ddpm"]["cd"], 3),
        "improved_ddpm_cd_seed1": lambda: fmt(improved1["ddpm"]["cd"], 3),
        "improved_grid_table": improved_grid_table,
        "spacing_table": spacing_table,
        "dpm_solver_2d": dpm_solver_2d,
        "dpm_solver_2d_fitted": dpm_solver_2d_fitted,
        "dpm_solver_2d_goal": lambda: dpm_solver_2d_goal(0),
        "dpm_solver_2d_goal_seed1": lambda: dpm_solver_2d_goal(1),
        "dpm_solver_2d_verdict": dpm_solver_2d_verdict,
        "fid_label": image.label,
        "fid_table": image.table,
        "fid_ddpm_and_floor": image.ddpm_and_floor,
        "fid_comparisons": image.comparisons,
        "fid_samples": image.sample_grids,
        "fid_quadratic_table": lambda: grid_table(lambda s, eta: image.fid(s, eta, "quadratic"),
                                                  steps=image.results.get("extra_steps") or [10, 20, 50],
                                                  corner="quadratic: eta \\ steps")
        if "quadratic" in image.results.get("extra_spacings", []) else "",
        "dpm_solver_image": image.dpm_solver,
        "fid_discussion": lambda: fid_discussion(image),
        "task2_1_training": lambda: training_grid("lora", args.lora_data, args.out_md.parent / "figures"),
        "task2_2_training": lambda: training_grid("dreambooth", args.dreambooth_data, args.out_md.parent / "figures"),
        "task2_1_generated": lambda: generated("lora", args.lora_run),
        "task2_2_generated": lambda: generated("dreambooth", args.dreambooth_run),
        "rehearsal_table": rehearsal_table,
    }


def fill_template(template, values):
    def replace(match):
        name = match.group(1)
        if name not in values:
            raise KeyError(f"report_template.md: unknown placeholder {{{{{name}}}}}")
        return values[name]()
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", replace, template)


# ------------------------------------------------------------------------------------------------
# Markdown -> PDF

MATH_OR_CODE = re.compile(r"(```.*?```|`[^`\n]*`|\$\$.+?\$\$|\$[^$\n]+?\$)", re.DOTALL)


def render_math(tex, math_dir, display):
    """Draw $tex$ with matplotlib's mathtext -> an <img> tag sized in points (300 dpi PNG)."""
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib import mathtext
    from matplotlib.font_manager import FontProperties
    from PIL import Image

    size = 11.0 if display else 10.0
    name = hashlib.sha256(f"{size}:{tex}".encode()).hexdigest()[:16] + ".png"
    path = math_dir / name
    if not path.exists():
        math_dir.mkdir(parents=True, exist_ok=True)
        mathtext.math_to_image(f"${tex}$", str(path), prop=FontProperties(size=size), dpi=300, format="png")
    width, height = Image.open(path).size
    tag = f'<img src="{path}" width="{width * 72 / 300:.1f}" height="{height * 72 / 300:.1f}"/>'
    return f'\n\n<div class="math">{tag}</div>\n\n' if display else tag


def markdown_to_html(markdown, md_dir, math_dir):
    from markdown_it import MarkdownIt
    from PIL import Image

    def replace(match):
        text = match.group(0)
        if text.startswith("$$"):
            return render_math(text[2:-2].strip(), math_dir, display=True)
        if text.startswith("$"):
            return render_math(text[1:-1], math_dir, display=False)
        return text
    markdown = MATH_OR_CODE.sub(replace, markdown)
    body = MarkdownIt("commonmark", {"html": True}).enable("table").render(markdown)

    def size_image(match):
        """Figures: path made absolute, width = the fraction after '|' in the alt text x the text width."""
        src, alt = match.group(1), match.group(2)
        path = (md_dir / src).resolve()
        fraction = float(alt.rsplit("|", 1)[1]) if "|" in alt else 1.0
        w, h = Image.open(path).size
        width = min(TEXT_WIDTH * fraction, w * 72 / 100)
        return f'<img src="{path}" width="{width:.1f}" height="{width * h / w:.1f}"/>'
    return re.sub(r'<img src="([^"]+)" alt="([^"]*)" ?/?>', size_image, body)


def paginate(body, raw_path, bottom_margin):
    """Lay the HTML out on A4 pages -> raw_path. False when MuPDF placed something below a page's text
    area (it can, after a table that ends at the foot of a page), where it would be cut off."""
    import fitz  # PyMuPDF

    # img src paths are absolute; the archive is the file system root, so drop the leading "/"
    story = fitz.Story(html=re.sub(r'src="/', 'src="', body), user_css=CSS, archive=fitz.Archive("/"))
    page = fitz.paper_rect("a4")
    where = page + (PAGE_MARGIN, PAGE_MARGIN, -PAGE_MARGIN, -bottom_margin)
    writer = fitz.DocumentWriter(str(raw_path))
    fits, more = True, True
    while more:
        device = writer.begin_page(page)
        more, filled = story.place(where)
        # filled = (x0, y0, x1, y1); a last element's bottom margin may end a little below the text area,
        # still above the page number
        fits &= filled[3] <= where.y1 + PAGE_MARGIN / 3
        story.draw(device)
        writer.end_page()
    writer.close()
    return fits


def html_to_pdf(body, pdf_path):
    """Paginate (a larger bottom margin until nothing is cut off), number the pages, save atomically."""
    import fitz  # PyMuPDF

    pdf_path = Path(pdf_path)
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw.pdf"
        if not any(paginate(body, raw, PAGE_MARGIN + extra) for extra in range(0, 121, 10)):
            raise RuntimeError("build_report.py: the layout cuts content off at every bottom margin tried")
        doc = fitz.open(raw)
        for i, p in enumerate(doc):
            text = f"{i + 1} / {doc.page_count}"
            p.insert_text((p.rect.width / 2 - 3 * len(text), p.rect.height - PAGE_MARGIN / 2), text, fontsize=8)
        doc.set_metadata({"title": "DDIM and LoRA: report", "creationDate": "", "modDate": "", "producer": ""})
        pages = doc.page_count
        partial = pdf_path.with_name(pdf_path.name + ".tmp")  # same folder, so the rename is atomic
        doc.save(partial, garbage=3, deflate=True, no_new_id=True)
        doc.close()
        os.replace(partial, pdf_path)
    return pages


def write_text_atomic(path, text):
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--template", default=REPORT_DIR / "report_template.md", type=Path)
    parser.add_argument("--out_md", default=REPORT_DIR / "report.md", type=Path)
    parser.add_argument("--out_pdf", default=REPORT_DIR / "report.pdf", type=Path)
    parser.add_argument("--grid_results", default=None, type=Path,
                        help=f"the AFHQ grid's results.json (default: {os.path.relpath(GRID_RESULTS, ROOT)} when it exists)")
    parser.add_argument("--lora_run", default=None, type=Path, help="a Task 2-1 OUTPUT_DIR (default: task2/runs/...)")
    parser.add_argument("--dreambooth_run", default=None, type=Path, help="a Task 2-2 OUTPUT_DIR")
    parser.add_argument("--lora_data", default=TASK2_DIR / "sample_data" / "artistic-custom" / "train", type=Path,
                        help="the Task 2-1 training images (an imagefolder with metadata.jsonl)")
    parser.add_argument("--dreambooth_data", default=TASK2_DIR / "sample_data" / "dreambooth-cat", type=Path,
                        help="the Task 2-2 instance images")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.grid_results is not None and not args.grid_results.exists():
        sys.exit(f"build_report.py: error: --grid_results {args.grid_results} does not exist; "
                 f"run experiments/fid_grid.sh first or leave the flag out")
    markdown = fill_template(args.template.read_text(), fill_values(args))
    # figure() writes links relative to report/; report.md elsewhere (the tests) needs them relative to it
    header = "<!-- Generated by report/build_report.py from report/report_template.md: edit the template. -->\n\n"
    if args.out_md.resolve().parent != REPORT_DIR:
        markdown = re.sub(r"\]\((?!http)([^)]+)\)",
                          lambda m: f"]({os.path.relpath((REPORT_DIR / m.group(1)).resolve(), args.out_md.resolve().parent)})",
                          markdown)
    write_text_atomic(args.out_md, header + markdown)
    body = markdown_to_html(markdown, args.out_md.resolve().parent, REPORT_DIR / "build" / "math")
    pages = html_to_pdf(body, args.out_pdf)
    print(f"wrote {args.out_md} and {args.out_pdf} ({pages} pages)")


if __name__ == "__main__":
    main()
