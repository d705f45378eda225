"""The Task 1-2 FID table: DDPM and DDIM over steps x eta, from one checkpoint.

    python fid_grid.py --ckpt_path CKPT --gt_dir GT_DIR --out OUT_DIR

For DDPM (all T steps) and every DDIM setting (--ddim_steps x --etas, the course's grid by
default) it runs ``sampling.py`` -- the command a student runs -- into OUT_DIR/samples/<name>/,
takes the reverse-process time from its sampling.json, and measures the FID of the samples
against GT_DIR with ``fid/measure_fid.py``'s functions (the real images' statistics are
computed once). It writes

    OUT_DIR/results.json    every number (the schema is in ``write_results``' docstring)
    OUT_DIR/results.md      FID and time tables, the course's layout: rows eta, columns steps
    OUT_DIR/fid_vs_steps.png  FID and sampling time against the number of steps
    OUT_DIR/grids/<name>.png  the first 64 samples of every setting (real.png: real images)

--floor_dir adds the FID of real images against real images (e.g. the training split against
GT_DIR) at the same number of images: the best FID a perfect model could reach at this sample
size. --num_gt N measures against N evenly spaced images of GT_DIR (sorted, so every class
folder contributes equally) instead of all of them; FID is biased at small N, so compare only
numbers measured at the same N.

A setting whose folder already holds a matching sampling.json is not sampled again, so an
interrupted run continues where it stopped. scripts/fid_grid.sh runs this on a GPU with the
course's checkpoint and settings; image_experiment.py runs it on the CPU stand-in.
"""
import argparse
import json
import math
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import matplotlib
import numpy as np
from cli import atomic_write_text
from model import CheckpointError, DiffusionModule
from PIL import Image

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the non-interactive backend)

HERE = Path(__file__).resolve().parent
if str(HERE / "fid") not in sys.path:
    sys.path.append(str(HERE / "fid"))  # measure_fid imports inception flat, as the course runs it
import measure_fid  # noqa: E402

COURSE_DDIM_STEPS = (10, 20, 50, 100, 1000)
COURSE_ETAS = (0.0, 0.2, 0.5, 1.0)
GRID_IMAGES = 64


class GridError(Exception):
    """Bad input or a failed sampling run, reported as one line."""


def setting_name(method, steps=None, eta=None):
    return "ddpm" if method == "ddpm" else f"ddim_steps{steps}_eta{eta:g}"


def evenly_spaced(files, n):
    """n of ``files`` at evenly spaced positions (all of them when n is None or >= len)."""
    if n is None or n >= len(files):
        return files
    return [files[i] for i in np.linspace(0, len(files) - 1, n).round().astype(int)]


def sample(args, method, steps, eta, save_dir):
    """Run sampling.py for one setting (unless save_dir already holds it) -> its sampling.json."""
    expected = {"ckpt_path": str(args.ckpt_path), "sample_method": method, "ddim_steps": steps,
                "eta": eta, "num_samples": args.num_samples, "seed": args.seed}
    summary_path = save_dir / "sampling.json"
    if summary_path.is_file():
        summary = json.loads(summary_path.read_text())
        if all(summary.get(key) == value for key, value in expected.items()):
            return summary
    command = [sys.executable, "sampling.py", "--ckpt_path", str(args.ckpt_path),
               "--save_dir", str(save_dir), "--sample_method", method,
               "--ddim_steps", str(steps), "--eta", str(eta),
               "--num_samples", str(args.num_samples), "--batch_size", str(args.batch_size),
               "--seed", str(args.seed), "--gpu", str(args.gpu)]
    print(f"[{setting_name(method, steps, eta)}] sampling {args.num_samples} images", flush=True)
    result = subprocess.run(command, cwd=HERE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    if result.returncode != 0:
        lines = result.stderr.strip().splitlines() or ["(no message)"]
        raise GridError(f"sampling.py failed for {setting_name(method, steps, eta)}: {lines[-1]}")
    return json.loads(summary_path.read_text())


def sample_all(args, settings, samples_dir):
    """sample() every (method, steps, eta) of ``settings``, --jobs at a time -> {name: summary}.

    The longest runs start first so that parallel jobs finish together.
    """
    by_cost = sorted(settings, key=lambda setting: -setting[1])
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = {setting_name(*setting): pool.submit(
            sample, args, *setting, samples_dir / setting_name(*setting)) for setting in by_cost}
        try:
            return {name: future.result() for name, future in futures.items()}
        except BaseException:
            pool.shutdown(cancel_futures=True)
            raise


def save_grid(files, path, columns=8):
    """The first GRID_IMAGES of ``files`` tiled ``columns`` wide into one PNG."""
    images = [Image.open(f).convert("RGB") for f in files[:GRID_IMAGES]]
    width, height = images[0].size
    rows = math.ceil(len(images) / columns)
    grid = Image.new("RGB", (columns * width, rows * height))
    for i, image in enumerate(images):
        grid.paste(image, ((i % columns) * width, (i // columns) * height))
    grid.save(path)


def format_table(rows, steps, etas, key, ddpm, floor=None, digits=2):
    """Markdown table of ``key`` ("fid" or "seconds"): rows eta, columns steps, then DDPM (and floor)."""
    lookup = {(r["steps"], r["eta"]): r[key] for r in rows}
    header = "| eta \\ steps | " + " | ".join(str(s) for s in steps) + " |"
    lines = [header, "|" + "---|" * (len(steps) + 1)]
    for eta in etas:
        cells = [f"{lookup[(s, eta)]:.{digits}f}" if (s, eta) in lookup else "-" for s in steps]
        lines.append(f"| {eta:g} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"DDPM ({ddpm['steps']} steps): {ddpm[key]:.{digits}f}")
    if floor is not None:
        lines.append("")
        lines.append(f"Floor (real vs. real images at the same N): {floor:.{digits}f}")
    return "\n".join(lines)


def plot(results, path):
    """FID (left) and sampling time (right) against the number of steps, one line per eta."""
    fig, (ax_fid, ax_time) = plt.subplots(1, 2, figsize=(11, 4))
    for eta in results["etas"]:
        rows = sorted((r for r in results["ddim"] if r["eta"] == eta), key=lambda r: r["steps"])
        steps = [r["steps"] for r in rows]
        ax_fid.plot(steps, [r["fid"] for r in rows], marker="o", label=f"DDIM eta={eta:g}")
        ax_time.plot(steps, [r["seconds"] for r in rows], marker="o", label=f"DDIM eta={eta:g}")
    ddpm = results["ddpm"]
    ax_fid.scatter([ddpm["steps"]], [ddpm["fid"]], marker="*", s=150, color="black", zorder=3,
                   label="DDPM")
    ax_time.scatter([ddpm["steps"]], [ddpm["seconds"]], marker="*", s=150, color="black",
                    zorder=3, label="DDPM")
    if results.get("floor_fid") is not None:
        ax_fid.axhline(results["floor_fid"], color="gray", linestyle=":", label="floor (real vs real)")
    n = results["num_samples"]
    ax_fid.set(xscale="log", xlabel="sampling steps", ylabel=f"FID (N = {n})",
               title="FID against steps")
    ax_time.set(xscale="log", yscale="log", xlabel="sampling steps",
                ylabel=f"seconds for {n} images", title="Sampling time against steps")
    for ax in (ax_fid, ax_time):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_results(results, out):
    """results.json, results.md and fid_vs_steps.png in ``out``. results.json:

    {"ckpt_path": str, "gt_dir": str, "num_samples": int, "num_gt": int, "fid_ckpt": str,
     "fid_img_size": int, "T": int, "steps": [int], "etas": [float],
     "floor_fid": float | null, "floor_dir": str | null,
     "ddpm": {"steps": int, "fid": float, "seconds": float},
     "ddim": [{"steps": int, "eta": float, "fid": float, "seconds": float}, ...]}
    """
    atomic_write_text(out / "results.json", json.dumps(results, indent=2) + "\n")
    atomic_write_text(out / "results.md", results_markdown(results))
    plot(results, out / "fid_vs_steps.png")


def results_markdown(results):
    n = results["num_samples"]
    return "\n".join([
        f"# FID of DDPM and DDIM samples ({n} generated vs. {results['num_gt']} real images)",
        "",
        f"Checkpoint `{results['ckpt_path']}`; real images `{results['gt_dir']}`; FID network "
        f"`{results['fid_ckpt']}` at {results['fid_img_size']}x{results['fid_img_size']}.",
        "",
        "## FID (lower is better)",
        "",
        format_table(results["ddim"], results["steps"], results["etas"], "fid", results["ddpm"],
                     results.get("floor_fid")),
        "",
        f"## Sampling time (seconds for {n} images, reverse process only)",
        "",
        format_table(results["ddim"], results["steps"], results["etas"], "seconds",
                     results["ddpm"], digits=1),
        "",
    ])


def run_grid(args):
    """Sample every setting, measure every FID, write the outputs -> the results dict."""
    # sampling.py runs in this folder: hand it absolute paths
    args.ckpt_path, out = Path(args.ckpt_path).resolve(), Path(args.out).resolve()
    diffusion = DiffusionModule(None, None)
    diffusion.load(args.ckpt_path)  # CheckpointError for a missing or foreign checkpoint
    T = diffusion.var_scheduler.num_train_timesteps
    del diffusion
    if max(args.ddim_steps) > T:
        raise GridError(f"--ddim_steps {max(args.ddim_steps)} is more than the checkpoint's T = {T}")
    gt_files = evenly_spaced(measure_fid.list_images(args.gt_dir), args.num_gt)
    floor_files = (evenly_spaced(measure_fid.list_images(args.floor_dir), len(gt_files))
                   if args.floor_dir else None)
    measure_fid.verify_images(gt_files + (floor_files or []))
    device = measure_fid.parse_device(args.fid_device)
    model = measure_fid.load_inception(args.fid_ckpt, device)
    (out / "samples").mkdir(parents=True, exist_ok=True)
    (out / "grids").mkdir(exist_ok=True)

    def statistics(files, desc):
        features = measure_fid.extract_features(files, model, args.fid_img_size,
                                                args.fid_batch_size, device, desc)
        return measure_fid.feature_statistics(features)

    save_grid(gt_files, out / "grids" / "real.png")  # what the samples are compared with
    fid_seconds = time.time()
    gt_stats = statistics(gt_files, "real images")
    floor_fid = None
    if floor_files is not None:
        floor_fid = measure_fid.frechet_distance(*statistics(floor_files, "floor images"), *gt_stats)
        print(f"[floor] FID {floor_fid:.3f} ({len(floor_files)} images of {args.floor_dir})", flush=True)
    fid_seconds = time.time() - fid_seconds

    settings = [("ddpm", T, 1.0)] + [("ddim", s, e) for e in args.etas for s in args.ddim_steps]
    sampling_seconds = time.time()
    summaries = sample_all(args, settings, out / "samples")
    sampling_seconds = time.time() - sampling_seconds

    ddpm, ddim = None, []
    for method, steps, eta in settings:
        name = setting_name(method, steps, eta)
        save_dir = out / "samples" / name
        summary = summaries[name]
        files = sorted(save_dir.glob("*.png"), key=lambda p: int(p.stem) if p.stem.isdigit() else -1)
        save_grid(files, out / "grids" / f"{name}.png")
        start = time.time()
        fid = measure_fid.frechet_distance(*statistics(files, name), *gt_stats)
        fid_seconds += time.time() - start
        row = {"steps": steps, "eta": eta, "fid": fid, "seconds": summary["seconds"]}
        print(f"[{name}] FID {fid:.3f}, {summary['seconds']:.1f} s of sampling", flush=True)
        if method == "ddpm":
            ddpm = {key: row[key] for key in ("steps", "fid", "seconds")}
        else:
            ddim.append(row)

    results = {
        "ckpt_path": str(args.ckpt_path), "gt_dir": str(args.gt_dir),
        "num_samples": args.num_samples, "num_gt": len(gt_files),
        "fid_ckpt": str(args.fid_ckpt), "fid_img_size": args.fid_img_size, "T": T,
        "steps": list(args.ddim_steps), "etas": list(args.etas),
        "floor_fid": floor_fid, "floor_dir": str(args.floor_dir) if args.floor_dir else None,
        "ddpm": ddpm, "ddim": ddim,
        "wall_seconds": {"sampling": sampling_seconds, "fid": fid_seconds},
    }
    write_results(results, out)
    return results


def build_parser():
    parser = argparse.ArgumentParser(
        description="Sample DDPM and the DDIM steps x eta grid from a checkpoint and tabulate FID."
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
                        help="DDIM eta values (rows of the table)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="sampling.py processes run at once (1 on a GPU; on a CPU, one per core "
                             "with OMP_NUM_THREADS=1)")
    parser.add_argument("--seed", type=int, default=63, help="sampling seed (sampling.py's default)")
    parser.add_argument("--gpu", type=int, default=0, help="CUDA device for sampling.py")
    parser.add_argument("--num_gt", type=int, default=None,
                        help="measure against this many evenly spaced real images (default: all)")
    parser.add_argument("--floor_dir", default=None,
                        help="other real images (e.g. the training split): adds FID(real, real)")
    parser.add_argument("--fid_ckpt", default=str(measure_fid.DEFAULT_CKPT),
                        help="Inception-v3 weights (default: the course's fid/afhq_inception_v3.ckpt)")
    parser.add_argument("--fid_img_size", type=int, default=256,
                        help="FID input size (course: 256; the size the FID network was trained at)")
    parser.add_argument("--fid_batch_size", type=int, default=50, help="images per Inception pass")
    parser.add_argument("--fid_device", default=None, help="device for FID (default: cuda if available)")
    return parser


def check_args(parser, args):
    for name in ("num_samples", "batch_size", "fid_batch_size", "jobs"):
        if getattr(args, name) < 1:
            parser.exit(2, f"error: --{name} must be at least 1\n")
    if args.num_samples < 2:
        parser.exit(2, "error: --num_samples must be at least 2 (FID needs a covariance)\n")
    if args.num_gt is not None and args.num_gt < 2:
        parser.exit(2, "error: --num_gt must be at least 2\n")
    if min(args.ddim_steps) < 1 or min(args.etas) < 0:
        parser.exit(2, "error: --ddim_steps must be >= 1 and --etas >= 0\n")
    if args.fid_img_size < measure_fid.MIN_INPUT_SIZE:
        parser.exit(2, f"error: --fid_img_size must be at least {measure_fid.MIN_INPUT_SIZE}\n")


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    try:
        results = run_grid(args)
    except (GridError, CheckpointError, measure_fid.FIDInputError, ValueError) as error:
        parser.exit(1, f"error: {measure_fid.one_line(error)}\n")
    print()
    print(results_markdown(results))


if __name__ == "__main__":
    main()
