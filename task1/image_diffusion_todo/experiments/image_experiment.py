"""The whole Task 1-2 experiment on a CPU, as one command, with the code paths of the GPU run.

    python image_experiment.py [--out ../../results/image_demo] [--quick]

AFHQ, the course's FID checkpoint and a GPU-day of training are replaced by things this
repository builds, everything else is the course's pipeline run through its own scripts:

 1. data        ``standin_dataset.py``: three classes of shapes, 16x16, AFHQ's layout.
 2. classifier  ``fid/train_classifier.py``: inception.py's Inception-v3 trained to tell the
                three classes apart, as the course made afhq_inception_v3.ckpt; its validation
                accuracy is reported.
 3. unet        ``train.py --data_root``: a reduced UNet (flags only), T = 1000.
 4. grid        ``fid_grid.py``: ``sampling.py`` for DDPM and DDIM steps x eta, FID of each
                against the validation split, the floor FID(train, val), tables and figure.

Everything goes to OUT: data/, fid/, unet/, samples/, grids/, results.json, results.md,
fid_vs_steps.png. Every FID uses the same number of real images as generated ones
(--num_samples), including the floor, because FID is biased at small N.

The sizes (``FULL`` below) are chosen for 2 CPU cores. Sampling costs 1000 + 4 x (10 + 20 +
50 + 100 + 1000) = 5720 network evaluations per image, so:
 - 16x16 images and a 2-level UNet with 32 channels: ~1.5 ms per image and evaluation on one
   core (the course UNet at 32x32 with ch_mult 1 2 2 took ~15 ms), N = 150 images per setting;
 - the x0 predictor (--predictor x0). With the course's noise predictor, 2000 CPU steps leave
   an error in the predicted noise's per-channel mean (half of its MSE at t = 999) that
   x0 = (x_t - sqrt(1 - alpha_bar) eps) / sqrt(alpha_bar) multiplies by ~150 near t = T:
   samples came out as saturated colour fields. Predicting x0 has no such amplification; the
   DDPM and DDIM updates are the same for every predictor (scheduler.py).
--quick shrinks everything so the pipeline runs end to end in a minute or two (for tests).
A stage recorded as done in OUT/stages.json with the same settings is reused, so a run that
was interrupted continues; delete OUT to start afresh.
"""
import os

if __name__ == "__main__":
    # One thread per process, set before numpy and torch start their thread pools. On a CPU
    # shared with other work, 2 threads per process ran PyTorch 10x and scipy's sqrtm 5x
    # slower than 1 thread in our measurements (the threads wait for each other whenever one
    # is descheduled); parallelism comes from --jobs sampling processes instead.
    for variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(variable, "1")

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import fid_grid
import standin_dataset
from cli import atomic_write_text

HERE = Path(__file__).resolve().parent

# The full run; numbers are the ones the README quotes.
FULL = dict(
    image_size=16, num_train_per_class=1000, num_val_per_class=1000,
    classifier=dict(img_size=75, epochs=6, batch_size=16, max_num_images_per_cat=600),
    unet=dict(ch=32, ch_mult=[1, 1], attn=[], num_res_blocks=1, dropout=0.0, predictor="x0",
              batch_size=64, lr=1e-3, warmup_steps=100, train_num_steps=4000, log_interval=1000,
              num_diffusion_train_timesteps=1000),
    grid=dict(num_samples=150, batch_size=150, ddim_steps=list(fid_grid.COURSE_DDIM_STEPS),
              etas=list(fid_grid.COURSE_ETAS), fid_img_size=75),
)
# --quick: every stage runs, on tiny sizes (T = 20 so that DDPM and DDIM with S = T are cheap).
QUICK = dict(
    image_size=16, num_train_per_class=24, num_val_per_class=8,
    classifier=dict(img_size=75, epochs=1, batch_size=8, max_num_images_per_cat=-1),
    unet=dict(ch=32, ch_mult=[1], attn=[], num_res_blocks=1, dropout=0.0, predictor="x0", batch_size=8,
              lr=1e-3, warmup_steps=1, train_num_steps=4, log_interval=4,
              num_diffusion_train_timesteps=20),
    grid=dict(num_samples=8, batch_size=8, ddim_steps=[5], etas=[0.0, 1.0],
              fid_img_size=75),
)


class StageError(Exception):
    """A stage's command failed; reported as one line."""


def run_script(command, cwd, log_path):
    """Run one of the course's scripts, its output going to ``log_path``; StageError on failure."""
    with open(log_path, "w") as log:
        result = subprocess.run([sys.executable, *command], cwd=cwd, stdout=log,
                                stderr=subprocess.STDOUT)
    if result.returncode != 0:
        lines = Path(log_path).read_text().strip().splitlines() or ["(no output)"]
        raise StageError(f"{command[0]} failed (log: {log_path}): {lines[-1]}")


def flags(options):
    """{"ch_mult": [1, 2]} -> ["--ch_mult", "1", "2"]: train.py's flags from a dict."""
    command = []
    for name, value in options.items():
        values = value if isinstance(value, list) else [value]
        command += [f"--{name}", *map(str, values)]
    return command


class Stages:
    """OUT/stages.json: for every finished stage, its settings and wall time."""

    def __init__(self, out):
        self.path = out / "stages.json"
        self.done = json.loads(self.path.read_text()) if self.path.is_file() else {}

    def run(self, name, settings, work):
        """work() unless ``name`` already finished with these settings -> its record."""
        record = self.done.get(name)
        if record is not None and record["settings"] == settings:
            print(f"== {name}: done in an earlier run ({record['seconds']:.0f} s), reused", flush=True)
            return record
        print(f"== {name}", flush=True)
        start = time.time()
        extra = work() or {}
        record = {"settings": settings, "seconds": time.time() - start, **extra}
        self.done[name] = record
        atomic_write_text(self.path, json.dumps(self.done, indent=2) + "\n")
        print(f"== {name}: {record['seconds']:.0f} s", flush=True)
        return record


def run_experiment(out, config, seed, jobs=2):
    out.mkdir(parents=True, exist_ok=True)
    stages = Stages(out)
    data_root = out / "data"
    fid_ckpt = out / "fid" / "standin_inception_v3.ckpt"
    unet_dir = out / "unet"
    total_start = time.time()

    # A stage's settings include those of the stages it depends on, so that changing the
    # data, say, redoes everything after it.
    data_settings = {key: config[key] for key in ("image_size", "num_train_per_class",
                                                  "num_val_per_class")}
    data_settings["seed"] = seed
    classifier_settings = {"data": data_settings, **config["classifier"]}
    unet_settings = {"data": data_settings, **config["unet"]}
    grid_settings = {"classifier": classifier_settings, "unet": unet_settings, **config["grid"]}

    stages.run("data", data_settings, lambda: standin_dataset.build(
        data_root, config["num_train_per_class"], config["num_val_per_class"],
        config["image_size"], seed) and None)

    def train_classifier():
        fid_ckpt.parent.mkdir(exist_ok=True)
        run_script(["train_classifier.py", "--data_root", str(data_root), "--out", str(fid_ckpt),
                    "--num_workers", "0", "--seed", str(seed), *flags(config["classifier"])],
                   HERE / "fid", out / "fid" / "train_classifier.log")
        report = json.loads(fid_ckpt.with_suffix(".json").read_text())
        return {"val_accuracy": report["val_accuracy"]}

    classifier = stages.run("classifier", classifier_settings, train_classifier)

    def train_unet():
        # Left by an interrupted or older run: train.py refuses to overwrite last.ckpt, and
        # samples of another network must not be reused.
        for stale in (unet_dir, out / "samples"):
            shutil.rmtree(stale, ignore_errors=True)
        unet_dir.mkdir()
        run_script(["train.py", "--data_root", str(data_root), "--save_dir", str(unet_dir),
                    "--image_resolution", str(config["image_size"]), "--sample_method", "ddim",
                    "--max_num_images_per_cat", "-1", "--num_workers", "0", "--seed", str(seed),
                    *flags(config["unet"])],
                   HERE, out / "train_unet.log")

    stages.run("unet", unet_settings, train_unet)

    grid_args = fid_grid.build_parser().parse_args([
        "--ckpt_path", str(unet_dir / "last.ckpt"), "--gt_dir", str(data_root / "val"),
        "--out", str(out), "--floor_dir", str(data_root / "train"),
        "--num_gt", str(config["grid"]["num_samples"]), "--fid_ckpt", str(fid_ckpt),
        "--fid_device", "cpu", "--gpu", "0", "--jobs", str(jobs), *flags(config["grid"]),
    ])
    grid = stages.run("grid", grid_settings, lambda: {"results": fid_grid.run_grid(grid_args)})

    results = dict(grid["results"])
    results["classifier_val_accuracy"] = classifier["val_accuracy"]
    results["config"] = config
    results["stage_seconds"] = {name: stages.done[name]["seconds"]
                                for name in ("data", "classifier", "unet", "grid")}
    results["total_seconds"] = sum(results["stage_seconds"].values())
    results["this_run_seconds"] = time.time() - total_start
    fid_grid.write_results(results, out)
    report = experiment_markdown(results)
    atomic_write_text(out / "results.md", report)
    return results, report


def experiment_markdown(results):
    """results.md of the experiment: the grid's tables plus classifier accuracy and stage times."""
    stage_rows = "\n".join(f"| {name} | {seconds / 60:.1f} |"
                           for name, seconds in results["stage_seconds"].items())
    return "\n".join([
        fid_grid.results_markdown(results),
        "## FID network",
        "",
        f"Inception-v3 trained as a classifier of the stand-in's classes: validation accuracy "
        f"{results['classifier_val_accuracy']:.4f}.",
        "",
        "## Wall time",
        "",
        "| stage | minutes |",
        "|---|---|",
        stage_rows,
        f"| total | {results['total_seconds'] / 60:.1f} |",
        "",
    ])


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Train, sample DDPM and the DDIM steps x eta grid, and measure FID, on a "
                    "CPU stand-in for AFHQ."
    )
    parser.add_argument("--out", default=str(HERE.parent.parent / "results" / "image_demo"),
                        help="output folder (default: results/image_demo in the repository)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny data, models and grid: the whole pipeline in a minute or two "
                             "(for tests)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data and the training runs")
    parser.add_argument("--jobs", type=int, default=2,
                        help="sampling processes run at once (one per CPU core)")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.exit(2, "error: --jobs must be at least 1\n")
    config = QUICK if args.quick else FULL
    out = Path(args.out).resolve()
    try:
        _, report = run_experiment(out, config, args.seed, args.jobs)
    except (StageError, FileExistsError, fid_grid.GridError, fid_grid.CheckpointError,
            fid_grid.measure_fid.FIDInputError, ValueError, OSError) as error:
        parser.exit(1, f"error: {fid_grid.measure_fid.one_line(error)}\n")
    print()
    print(report)
    print(f"Outputs in {out}")


if __name__ == "__main__":
    main()
