"""The Task 1-2 table: FID and KID of DDPM and DDIM over steps x eta, from one checkpoint.

    python -m experiments.fid_grid --ckpt_path CKPT --gt_dir GT_DIR --out OUT_DIR

(run from image_diffusion_todo/). For DDPM (all T steps) and every DDIM setting (--ddim_steps x
--etas, the course's grid by default, with --timestep_spacing; plus --extra_spacings at
--extra_steps x --etas) it runs ``sampling.py`` -- the command a student runs, as a process of its
own so that --jobs settings sample in parallel and --num_processes under torchrun -- into
OUT_DIR/samples/<setting>/, takes the reverse-process time from its sampling.json, and measures
the samples against GT_DIR with ``fid/measure_fid.py``'s functions (the real images' features
are computed once): FID, and KID with its (jackknife) standard error. It writes

    OUT_DIR/results.json      every number (the schema is in ``write_results``' docstring)
    OUT_DIR/results.md        the tables in the course's layout: rows eta, columns steps
    OUT_DIR/fid_vs_steps.png  FID, KID and sampling time against the number of steps
    OUT_DIR/grids/<setting>.png  the first 64 samples of every setting (real.png: real images)

--dpm_solver_steps adds DPM-Solver++ rows (dpm_solver.py; --dpm_solver_orders, --dpm_solver_spacings),
each compared with DDIM eta 0 at the same steps and spacing; --dpm_solver_sde adds SDE-DPM-Solver++
rows too, compared with DDIM eta 1; --skip_ddpm leaves out the slow DDPM row.
--floor_dir adds FID and KID of real images against real images (e.g. the training split
against GT_DIR) at the same number of images: where a perfect model would land at this sample
size. --num_gt N measures against N evenly spaced images of GT_DIR (sorted, so every class
folder contributes equally) instead of all of them. FID is biased at small N: compare FIDs only
at the same N; KID is unbiased, and differences smaller than about 2 standard errors are noise.

Samples are reused only when they are certainly the ones asked for: a setting's folder is kept
when its setting.json records the same checkpoint CONTENT (its SHA-256, so a checkpoint
rewritten in place is sampled again) and the same settings, and the folder holds exactly the
expected files. Anything else -- another checkpoint, other settings, an interrupted run, stray
files -- and the folder is emptied and sampled afresh. experiments/fid_grid.sh runs this on a
GPU with the course's checkpoint and settings; experiments/image_experiment.py on the CPU
stand-in.
"""
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple, Optional

import matplotlib
import numpy as np
from atomic_write import atomic_write_text
from cli import ArgumentParser, UsageError, run
from fid import measure_fid
from model import CheckpointError, DiffusionModule
import sampling
from PIL import Image
from dpm_solver import SOLVER_ORDERS, SOLVER_SPACINGS, solver_orders
from scheduler import TIMESTEP_SPACINGS, check_eta

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the non-interactive backend)

COURSE_DIR = Path(__file__).resolve().parent.parent  # where sampling.py runs
COURSE_DDIM_STEPS = (10, 20, 50, 100, 1000)
COURSE_ETAS = (0.0, 0.2, 0.5, 1.0)
COURSE_SPACING = "leading"  # sampling.py's default
GRID_IMAGES = 64
SETTING_FILE = "setting.json"
KID_SCALE = 1e3  # tables show KID x 10^3, as clean-fid and most papers do


class GridError(Exception):
    """A failed sampling run, reported as one line."""


class Setting(NamedTuple):
    """One sampler: DDPM (steps = T, eta and spacing unused), DDIM, or DPM-Solver++ (dpm_solver,
    sde_dpm_solver: steps = network calls, of order `order`; eta unused)."""
    method: str
    steps: int
    eta: float = 1.0
    spacing: Optional[str] = None
    order: Optional[int] = None

    @property
    def name(self):
        if self.method == "ddpm":
            return "ddpm"
        if self.method in sampling.SOLVER_METHODS:
            return f"{self.method}{self.order}_{self.spacing}_steps{self.steps}"
        spacing = "" if self.spacing == COURSE_SPACING else f"_{self.spacing}"
        return f"ddim{spacing}_steps{self.steps}_eta{self.eta:g}"


def grid_settings(T, args):
    """DDPM, the main DDIM grid (--etas x --ddim_steps), then every extra spacing at --etas x
    --extra_steps, then DPM-Solver++ (--dpm_solver_orders x spacings x steps) and with --dpm_solver_sde
    SDE-DPM-Solver++ (those orders up to 2): the order of the tables."""
    settings = [] if args.skip_ddpm else [Setting("ddpm", T)]
    settings += [Setting("ddim", s, e, args.timestep_spacing) for e in args.etas for s in args.ddim_steps]
    settings += [Setting("ddim", s, e, spacing) for spacing in args.extra_spacings
                 for e in args.etas for s in args.extra_steps]
    methods = ["dpm_solver", "sde_dpm_solver"] if args.dpm_solver_sde else ["dpm_solver"]
    settings += [Setting(method, s, spacing=spacing, order=order) for method in methods
                 for order in args.dpm_solver_orders if order in solver_orders(sampling.SOLVER_METHODS[method])
                 for spacing in args.dpm_solver_spacings for s in args.dpm_solver_steps]
    return settings


def evenly_spaced(files, n):
    """n of ``files`` at evenly spaced positions (all of them when n is None or >= len)."""
    if n is None or n >= len(files):
        return files
    return [files[i] for i in np.linspace(0, len(files) - 1, n).round().astype(int)]


def file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_json(path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def checkpoint_identity(ckpt_path):
    """What a checkpoint's samples depend on: {"T", "sha256" (of the file's bytes), "predictor"}.
    CheckpointError for a missing or foreign file."""
    diffusion = DiffusionModule(None, None)
    diffusion.load(ckpt_path)
    return {"T": diffusion.var_scheduler.num_train_timesteps, "sha256": file_sha256(ckpt_path),
            "predictor": diffusion.predictor}


def sample(args, setting, save_dir, checkpoint):
    """sampling.py for one setting into save_dir, unless save_dir already holds exactly these
    samples (see the module docstring) -> its sampling.json. checkpoint: checkpoint_identity()."""
    key = {"ckpt_sha256": checkpoint["sha256"], "predictor": checkpoint["predictor"],
           "sample_method": setting.method, "ddim_steps": setting.steps, "eta": setting.eta,
           "timestep_spacing": setting.spacing, "use_ema": args.use_ema,
           "num_samples": args.num_samples, "batch_size": args.batch_size, "seed": args.seed}
    if setting.method in sampling.SOLVER_METHODS:
        key["solver_order"] = setting.order
    expected = {sampling.image_path(save_dir, i).name for i in range(args.num_samples)}
    expected |= {sampling.SUMMARY_FILE, SETTING_FILE}
    if save_dir.exists():
        if read_json(save_dir / SETTING_FILE) == key and {p.name for p in save_dir.iterdir()} == expected:
            return read_json(save_dir / sampling.SUMMARY_FILE)
        shutil.rmtree(save_dir)
    # N > 1: torchrun shares the images out (image i depends on (seed, i) only, so the PNGs are
    # the ones 1 process writes); --standalone lets parallel --jobs each pick a free port.
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone",
                 "--nproc_per_node", str(args.num_processes)] if args.num_processes > 1 else [sys.executable])
    command = launcher + sampling.command(
        args.ckpt_path, save_dir, sample_method=setting.method, ddim_steps=setting.steps, eta=setting.eta,
        timestep_spacing=setting.spacing, solver_order=setting.order, use_ema=args.use_ema,
        num_samples=args.num_samples, batch_size=args.batch_size, seed=args.seed, gpu=args.gpu)
    print(f"[{setting.name}] sampling {args.num_samples} images", flush=True)
    result = subprocess.run(command, cwd=COURSE_DIR, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    if result.returncode != 0:
        lines = result.stderr.strip().splitlines() or ["(no message)"]
        raise GridError(f"sampling.py failed for {setting.name}: {lines[-1]}")
    atomic_write_text(save_dir / SETTING_FILE, json.dumps(key, indent=2) + "\n")
    return read_json(save_dir / sampling.SUMMARY_FILE)


def save_grid(files, path, columns=8):
    """The first GRID_IMAGES of ``files`` tiled ``columns`` wide into one PNG."""
    images = [Image.open(f).convert("RGB") for f in files[:GRID_IMAGES]]
    width, height = images[0].size
    rows = math.ceil(len(images) / columns)
    grid = Image.new("RGB", (columns * width, rows * height))
    for i, image in enumerate(images):
        grid.paste(image, ((i % columns) * width, (i // columns) * height))
    grid.save(path)


def measure_all(args, settings, out, checkpoint, scorer, reference):
    """Sample (sample()) and score every setting against reference features, --jobs at a time
    -> {name: row}.

    A job samples its setting in a sampling.py process, then scores it here while the other
    jobs sample, so scoring overlaps sampling. The longest runs start first so that parallel
    jobs finish together.
    """
    def job(setting):
        save_dir = out / "samples" / setting.name
        summary = sample(args, setting, save_dir, checkpoint)
        files = [sampling.image_path(save_dir, i) for i in range(args.num_samples)]
        save_grid(files, out / "grids" / f"{setting.name}.png")
        row = {"steps": setting.steps, **scorer.score(files, reference, setting.name),
               "seconds": summary["seconds"]}
        if setting.method == "ddim":
            row.update(eta=setting.eta, spacing=setting.spacing)
        if setting.method in sampling.SOLVER_METHODS:
            row.update(sde=sampling.SOLVER_METHODS[setting.method], order=setting.order, spacing=setting.spacing)
        print(f"[{setting.name}] FID {row['fid']:.3f}, KID {format_kid(row)}, "
              f"{row['seconds']:.1f} s of sampling", flush=True)
        return row

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = {s.name: pool.submit(job, s) for s in sorted(settings, key=lambda s: -s.steps)}
        try:
            return {name: future.result() for name, future in futures.items()}
        except BaseException:
            pool.shutdown(cancel_futures=True)
            raise


def format_kid(row):
    """'1.23 +- 0.45': KID and its standard error, x KID_SCALE."""
    return f"{KID_SCALE * row['kid']:.2f} +- {KID_SCALE * row['kid_se']:.2f}"


def format_table(rows, steps, etas, cell):
    """Markdown table: rows eta, columns steps, entries cell(row) ("-" where no row)."""
    lookup = {(r["steps"], r["eta"]): r for r in rows}
    lines = ["| eta \\ steps | " + " | ".join(str(s) for s in steps) + " |",
             "|" + "---|" * (len(steps) + 1)]
    for eta in etas:
        cells = [cell(lookup[(s, eta)]) if (s, eta) in lookup else "-" for s in steps]
        lines.append(f"| {eta:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def spacing_tables(results, cell):
    """One format_table per timestep spacing: (spacing, steps, table)."""
    tables = []
    for spacing in [results["timestep_spacing"], *results["extra_spacings"]]:
        rows = [r for r in results["ddim"] if r["spacing"] == spacing]
        steps = sorted({r["steps"] for r in rows})
        tables.append((spacing, format_table(rows, steps, results["etas"], cell)))
    return tables


RESOLVED_Z = 2.0  # a difference under 2 standard errors is called unresolved


def comparisons(results):
    """The contrasts a reader of the table asks about, as KID differences in standard errors:
    DDPM against the floor and against DDIM(S = T, eta = 1) (the same process), fewest against
    most steps for every eta, eta 0 against eta 1 at the fewest steps, every extra spacing against
    the main one at the same steps and eta 0, every solver row against its order 1 (DDIM eta 0, for
    the SDE eta 1) on the same timesteps, and every solver at its fewest against its most calls
    -> [{"a", "b", "kid_difference", "se", "z"}], a minus b.

    se = sqrt(se_a^2 + se_b^2). Both KIDs are measured against the same real images and from the
    same seed's x_T, which correlates their errors positively: the true error of the difference is
    smaller, so this se is cautious.
    """
    ddim = {(r["spacing"], r["steps"], r["eta"]): r for r in results["ddim"]}
    main, steps, etas = results["timestep_spacing"], sorted(results["steps"]), sorted(results["etas"])

    def name(spacing, s, eta):
        return f"DDIM {s} steps, eta {eta:g}" + ("" if spacing == main else f", {spacing}")

    pairs = []
    if results.get("floor") is not None and results["ddpm"] is not None:
        pairs.append(("DDPM", results["ddpm"], "floor (real vs. real)", results["floor"]))
    if (main, results["T"], 1.0) in ddim and results["ddpm"] is not None:
        pairs.append(("DDPM", results["ddpm"], name(main, results["T"], 1.0), ddim[(main, results["T"], 1.0)]))
    for eta in etas if len(steps) > 1 else []:
        pairs.append((name(main, steps[0], eta), ddim[(main, steps[0], eta)],
                      name(main, steps[-1], eta), ddim[(main, steps[-1], eta)]))
    if len(etas) > 1:
        pairs.append((name(main, steps[0], etas[0]), ddim[(main, steps[0], etas[0])],
                      name(main, steps[0], etas[-1]), ddim[(main, steps[0], etas[-1])]))
    for spacing in results["extra_spacings"]:
        for s in results["extra_steps"]:
            if (main, s, etas[0]) in ddim:
                pairs.append((name(spacing, s, etas[0]), ddim[(spacing, s, etas[0])],
                              name(main, s, etas[0]), ddim[(main, s, etas[0])]))
    for row in results.get("dpm_solver", []):  # against the solver's order 1 on the same timesteps
        eta = 1.0 if row["sde"] else 0.0
        if (row["spacing"], row["steps"], eta) in ddim:
            pairs.append((solver_name(row), row, name(row["spacing"], row["steps"], eta),
                          ddim[(row["spacing"], row["steps"], eta)]))
    solvers = {}
    for row in results.get("dpm_solver", []):
        solvers.setdefault(solver_label(row), []).append(row)
    for rows in solvers.values():
        if len(rows) > 1:
            fewest, most = min(rows, key=lambda r: r["steps"]), max(rows, key=lambda r: r["steps"])
            pairs.append((solver_name(fewest), fewest, solver_name(most), most))
    rows = []
    for a, row_a, b, row_b in pairs:
        difference = row_a["kid"] - row_b["kid"]
        se = float(np.hypot(row_a["kid_se"], row_b["kid_se"]))
        rows.append({"a": a, "b": b, "kid_difference": difference, "se": se, "z": difference / se})
    return rows


def solver_method(row):
    """'DPM-Solver++(2M)' or 'SDE-DPM-Solver++(2M)' for a results["dpm_solver"] row."""
    return f"{'SDE-' if row['sde'] else ''}DPM-Solver++({row['order']}M)"


def solver_label(row):
    """'DPM-Solver++(2M), quadratic': the row's sampler and timesteps."""
    return f"{solver_method(row)}, {row['spacing']}"


def solver_name(row):
    """'DPM-Solver++(2M) 10 calls, quadratic': the row's sampler, calls and timesteps."""
    return f"{solver_method(row)} {row['steps']} calls, {row['spacing']}"


def dpm_solver_table(rows, cell):
    """Markdown table of DPM-Solver++ rows: one row per (sampler, spacing), columns the calls."""
    calls = sorted({r["steps"] for r in rows})
    lookup = {(solver_label(r), r["steps"]): r for r in rows}
    lines = ["| sampler, spacing \\ network calls | " + " | ".join(map(str, calls)) + " |",
             "|" + "---|" * (len(calls) + 1)]
    for label in dict.fromkeys(solver_label(r) for r in rows):
        cells = [cell(lookup[(label, n)]) if (label, n) in lookup else "-" for n in calls]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def comparisons_markdown(rows):
    lines = ["| A | B | KID(A) - KID(B), x 10^3 | z | verdict |", "|---|---|---|---|---|"]
    for row in rows:
        verdict = ("unresolved" if abs(row["z"]) < RESOLVED_Z
                   else f"{'B' if row['z'] > 0 else 'A'} lower")
        lines.append(f"| {row['a']} | {row['b']} | {KID_SCALE * row['kid_difference']:.2f} +- "
                     f"{KID_SCALE * row['se']:.2f} | {row['z']:.2f} | {verdict} |")
    return "\n".join(lines)


def results_markdown(results):
    n = results["num_samples"]
    ddpm = results["ddpm"]

    def fid_kid(row):
        return f"{row['fid']:.1f} ({format_kid(row)})"

    lines = [
        f"# FID and KID of DDPM and DDIM samples ({n} generated vs. {results['num_gt']} real images)",
        "",
        f"Checkpoint `{results['ckpt_path']}` (SHA-256 {results['ckpt_sha256'][:12]}...); real "
        f"images `{results['gt_dir']}`; FID network `{results['fid_ckpt']}` at "
        f"{results['fid_img_size']}x{results['fid_img_size']}; paths relative to this folder.",
        "",
        "## FID (KID x 10^3 +- its standard error); lower is better",
        "",
        "FID is biased upwards at small N (compare at the same N only); KID is unbiased. "
        + (f"DDPM ({ddpm['steps']} steps): **{fid_kid(ddpm)}**." if ddpm else "DDPM not sampled (--skip_ddpm)."),
    ]
    if results.get("floor") is not None:
        lines += ["", f"Floor, real vs. real images at the same N: **{fid_kid(results['floor'])}**."]
    for spacing, table in spacing_tables(results, fid_kid):
        lines += ["", f"DDIM, {spacing} timesteps:", "", table]
    if results.get("dpm_solver"):
        lines += ["", "DPM-Solver++ (the ODE solver; SDE-: the SDE solver; eta does not apply; steps = network "
                      "calls):", "",
                  dpm_solver_table(results["dpm_solver"], fid_kid)]
    lines += ["", "## What the table resolves", "",
              f"KID differences with their standard errors (z = difference / SE); |z| < "
              f"{RESOLVED_Z:g} is unresolved at this N. See `comparisons` in experiments/fid_grid.py.",
              "", comparisons_markdown(comparisons(results))]
    lines += ["", f"## Sampling time (seconds for {n} images, reverse process only)", "",
              f"DDPM: {ddpm['seconds']:.1f} s." if ddpm else "DDPM not sampled."]
    for spacing, table in spacing_tables(results, lambda row: f"{row['seconds']:.1f}"):
        lines += ["", f"DDIM, {spacing} timesteps:", "", table]
    if results.get("dpm_solver"):
        lines += ["", "DPM-Solver++:", "", dpm_solver_table(results["dpm_solver"], lambda row: f"{row['seconds']:.1f}")]
    return "\n".join(lines) + "\n"


def plot(results, path):
    """FID, KID (+- 1 standard error) and sampling time against steps, one line per eta and
    spacing (solid: the main spacing, dashed: extra spacings; DPM-Solver++ dotted); DDPM a star,
    the floor dotted."""
    fig, (ax_fid, ax_kid, ax_time) = plt.subplots(1, 3, figsize=(16, 4.2))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    spacings = [results["timestep_spacing"], *results["extra_spacings"]]

    def draw(rows, **style):
        rows = sorted(rows, key=lambda r: r["steps"])
        steps = [r["steps"] for r in rows]
        ax_fid.plot(steps, [r["fid"] for r in rows], **style)
        ax_kid.errorbar(steps, [KID_SCALE * r["kid"] for r in rows],
                        yerr=[KID_SCALE * r["kid_se"] for r in rows], capsize=3, **style)
        ax_time.plot(steps, [r["seconds"] for r in rows], **style)

    for i, eta in enumerate(results["etas"]):
        for spacing in spacings:
            draw([r for r in results["ddim"] if r["eta"] == eta and r["spacing"] == spacing],
                 marker="o", color=colours[i % len(colours)], linestyle="-" if spacing == spacings[0] else "--",
                 label=f"DDIM {spacing}, eta={eta:g}")
    solvers = list(dict.fromkeys(solver_label(r) for r in results.get("dpm_solver", [])))
    for i, label in enumerate(solvers, start=len(results["etas"])):
        draw([r for r in results["dpm_solver"] if solver_label(r) == label],
             marker="^", color=colours[i % len(colours)], linestyle=":", label=label)
    ddpm, floor = results["ddpm"], results.get("floor")
    star = dict(marker="*", s=150, color="black", zorder=3, label="DDPM")
    if ddpm is not None:
        ax_fid.scatter([ddpm["steps"]], [ddpm["fid"]], **star)
        ax_kid.scatter([ddpm["steps"]], [KID_SCALE * ddpm["kid"]], **star)
        ax_time.scatter([ddpm["steps"]], [ddpm["seconds"]], **star)
    if floor is not None:
        ax_fid.axhline(floor["fid"], color="gray", linestyle=":", label="floor (real vs real)")
        ax_kid.axhline(KID_SCALE * floor["kid"], color="gray", linestyle=":",
                       label="floor (real vs real)")
    n = results["num_samples"]
    ax_fid.set(xscale="log", xlabel="sampling steps", ylabel=f"FID (N = {n})", title="FID")
    ax_kid.set(xscale="log", xlabel="sampling steps", ylabel="KID x 10^3 (+- 1 s.e.)", title="KID")
    ax_time.set(xscale="log", yscale="log", xlabel="sampling steps",
                ylabel=f"seconds for {n} images", title="Sampling time")
    for ax in (ax_fid, ax_kid, ax_time):
        ax.grid(True, which="both", alpha=0.3)
    ax_time.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_results(results, out):
    """results.json, results.md and fid_vs_steps.png in ``out``. results.json (paths relative
    to ``out``; a score is {"fid": float, "kid": float, "kid_se": float}):

    {"ckpt_path": str, "ckpt_sha256": str, "gt_dir": str, "num_samples": int, "num_gt": int,
     "fid_ckpt": str, "fid_img_size": int, "use_ema": bool, "seed": int, "T": int,
     "steps": [int], "etas": [float], "timestep_spacing": str, "extra_spacings": [str],
     "extra_steps": [int], "floor": score | null, "floor_dir": str | null,
     "ddpm": {"steps": int, **score, "seconds": float} | null (--skip_ddpm),
     "ddim": [{"steps": int, "eta": float, "spacing": str, **score, "seconds": float}, ...],
     "dpm_solver": [{"sde": bool, "order": int, "spacing": str, "steps": int, **score, "seconds": float}, ...],
     "wall_seconds": {"real_features": float, "sampling_and_scoring": float},
     "comparisons": comparisons(results)}

    -> what results.json holds.
    """
    results = {**results, "comparisons": comparisons(results)}
    atomic_write_text(out / "results.json", json.dumps(results, indent=2) + "\n")
    atomic_write_text(out / "results.md", results_markdown(results))
    plot(results, out / "fid_vs_steps.png")
    return results


def run_grid(args):
    """Sample every setting, measure every FID and KID, write the outputs -> the results dict."""
    # sampling.py runs in COURSE_DIR: hand it absolute paths
    args.ckpt_path, out = Path(args.ckpt_path).resolve(), Path(args.out).resolve()
    checkpoint = checkpoint_identity(args.ckpt_path)
    T = checkpoint["T"]
    most_steps = max(args.ddim_steps + (args.extra_steps if args.extra_spacings else []) + args.dpm_solver_steps)
    if most_steps > T:
        raise UsageError(f"--ddim_steps/--extra_steps {most_steps} is more than the checkpoint's T = {T}")
    gt_files = evenly_spaced(measure_fid.list_images(args.gt_dir), args.num_gt)
    floor_files = (evenly_spaced(measure_fid.list_images(args.floor_dir), len(gt_files))
                   if args.floor_dir else None)
    measure_fid.verify_images(gt_files + (floor_files or []))
    (out / "samples").mkdir(parents=True, exist_ok=True)
    (out / "grids").mkdir(exist_ok=True)
    save_grid(gt_files, out / "grids" / "real.png")  # what the samples are compared with

    start = time.time()
    scorer = measure_fid.Scorer(args.fid_ckpt, args.fid_img_size, args.fid_batch_size, args.fid_device)
    reference = scorer.features(gt_files, "real images")
    floor = scorer.score(floor_files, reference, "floor images") if floor_files is not None else None
    if floor is not None:
        print(f"[floor] FID {floor['fid']:.3f}, KID {format_kid(floor)} "
              f"({len(floor_files)} images of {args.floor_dir})", flush=True)
    real_seconds = time.time() - start

    start = time.time()
    settings = grid_settings(T, args)
    rows = measure_all(args, settings, out, checkpoint, scorer, reference)

    def relative(path):
        return os.path.relpath(Path(path).resolve(), out) if path is not None else None

    results = {
        "ckpt_path": relative(args.ckpt_path), "ckpt_sha256": checkpoint["sha256"],
        "gt_dir": relative(args.gt_dir), "num_samples": args.num_samples,
        "num_gt": len(gt_files), "fid_ckpt": relative(args.fid_ckpt),
        "fid_img_size": args.fid_img_size, "use_ema": args.use_ema, "seed": args.seed,
        "T": T, "steps": list(args.ddim_steps), "etas": list(args.etas),
        "timestep_spacing": args.timestep_spacing, "extra_spacings": list(args.extra_spacings),
        "extra_steps": list(args.extra_steps), "floor": floor, "floor_dir": relative(args.floor_dir),
        "ddpm": rows.get("ddpm"), "ddim": [rows[s.name] for s in settings if s.method == "ddim"],
        "dpm_solver": [rows[s.name] for s in settings if s.method in sampling.SOLVER_METHODS],
        "wall_seconds": {"real_features": real_seconds, "sampling_and_scoring": time.time() - start},
    }
    return write_results(results, out)


def build_parser():
    parser = ArgumentParser(
        prog="python -m experiments.fid_grid",
        description="Sample DDPM and the DDIM steps x eta grid from a checkpoint; tabulate FID and KID."
    )
    parser.add_argument("--ckpt_path", required=True, help="DDPM checkpoint written by train.py")
    parser.add_argument("--gt_dir", required=True, help="folder of real images to measure against")
    parser.add_argument("--out", required=True, help="output folder (samples, grids, tables, figure)")
    parser.add_argument("--num_samples", type=int, default=500,
                        help="images generated per setting (course: 500)")
    parser.add_argument("--batch_size", type=int, default=100, help="images sampled at once")
    parser.add_argument("--ddim_steps", type=int, nargs="+", default=list(COURSE_DDIM_STEPS),
                        help="DDIM step counts (columns of the table)")
    parser.add_argument("--etas", type=float, nargs="+", default=list(COURSE_ETAS),
                        help="DDIM eta values, each in [0, 1] (rows of the tables)")
    parser.add_argument("--timestep_spacing", choices=TIMESTEP_SPACINGS, default=COURSE_SPACING,
                        help="DDIM timestep spacing of the main table (sampling.py's flag; "
                             "default: the course's leading)")
    parser.add_argument("--extra_spacings", choices=TIMESTEP_SPACINGS, nargs="*", default=[],
                        help="more spacings, each a table of --extra_steps x --etas (e.g. quadratic)")
    parser.add_argument("--extra_steps", type=int, nargs="+", default=[10, 20, 50],
                        help="DDIM step counts of the --extra_spacings tables")
    parser.add_argument("--dpm_solver_steps", type=int, nargs="*", default=[],
                        help="network calls of DPM-Solver++ rows (sampling.py --sample_method dpm_solver; none by "
                             "default), each compared with DDIM eta 0 on the same timesteps where the grid has it")
    parser.add_argument("--dpm_solver_orders", type=int, nargs="+", choices=SOLVER_ORDERS, default=[2],
                        help="DPM-Solver++ orders of those rows")
    parser.add_argument("--dpm_solver_spacings", choices=SOLVER_SPACINGS, nargs="+", default=["quadratic"],
                        help="timestep spacings of those rows")
    parser.add_argument("--dpm_solver_sde", action="store_true",
                        help="SDE-DPM-Solver++ rows too (--sample_method sde_dpm_solver; the orders up to 2), each "
                             "compared with DDIM eta 1 on the same timesteps")
    parser.add_argument("--skip_ddpm", action="store_true",
                        help="leave out DDPM (all T steps, the grid's slowest row), e.g. to add a few rows")
    parser.add_argument("--jobs", type=int, default=1,
                        help="settings sampled and scored at once (1 on a GPU; on a CPU, one per "
                             "core with OMP_NUM_THREADS=1)")
    parser.add_argument("--num_processes", type=int, default=1,
                        help="sampling.py processes per setting (torchrun, one per GPU; times are summed)")
    parser.add_argument("--use_ema", action="store_true",
                        help="sample with the checkpoint's EMA weights (train.py --ema_decay)")
    parser.add_argument("--seed", type=int, default=63, help="sampling seed (sampling.py's default)")
    parser.add_argument("--gpu", type=int, default=0, help="CUDA device for sampling.py")
    parser.add_argument("--num_gt", type=int, default=None,
                        help="measure against this many evenly spaced real images (default: all)")
    parser.add_argument("--floor_dir", default=None,
                        help="other real images (e.g. the training split): adds FID/KID(real, real)")
    parser.add_argument("--fid_ckpt", default=str(measure_fid.DEFAULT_CKPT),
                        help="Inception-v3 weights (default: the course's fid/afhq_inception_v3.ckpt)")
    parser.add_argument("--fid_img_size", type=int, default=256,
                        help="FID input size (course: 256; the size the FID network was trained at)")
    parser.add_argument("--fid_batch_size", type=int, default=50, help="images per Inception pass")
    parser.add_argument("--fid_device", default=None, help="device for FID (default: cuda if available)")
    return parser


def make_args(**settings):
    """This script's arguments from keyword settings named as its flags (defaults for the rest),
    checked: how another program runs the grid in its own process, without a command line."""
    args = build_parser().parse_args(["--ckpt_path", "", "--gt_dir", "", "--out", ""])
    unknown = set(settings) - set(vars(args))
    if unknown:
        raise ValueError(f"fid_grid has no flag --{sorted(unknown)[0]}")
    vars(args).update(settings)
    check_args(args)
    return args


def check_args(args):
    for name in ("batch_size", "fid_batch_size", "jobs", "num_processes"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name} must be at least 1")
    if args.num_samples < 3 or (args.num_gt is not None and args.num_gt < 3):
        raise UsageError("--num_samples and --num_gt must be at least 3 (FID needs a covariance, "
                         "KID's standard error 3 images)")
    if min(args.ddim_steps + args.extra_steps + args.dpm_solver_steps) < 1:
        raise UsageError("--ddim_steps, --extra_steps and --dpm_solver_steps must be at least 1")
    if args.timestep_spacing in args.extra_spacings:
        raise UsageError(f"--extra_spacings repeats the main --timestep_spacing {args.timestep_spacing}")
    try:
        for eta in args.etas:
            check_eta(eta)
    except ValueError:
        raise UsageError(f"--etas must lie in [0, 1], got {args.etas}") from None
    if args.fid_img_size < measure_fid.MIN_INPUT_SIZE:
        raise UsageError(f"--fid_img_size must be at least {measure_fid.MIN_INPUT_SIZE}")


def main(args):
    check_args(args)
    results = run_grid(args)
    print()
    print(results_markdown(results))


ERRORS = (UsageError, GridError, CheckpointError, measure_fid.FIDInputError, ValueError, OSError)

if __name__ == "__main__":
    run(main, build_parser().parse_args(), ERRORS)
