"""The whole Task 1-2 experiment on a CPU, as one command, with the code paths of the GPU run.

    cd task1/image_diffusion_todo
    python -m experiments.image_experiment [--out ../../results/image_demo] [--quick]

AFHQ, the course's FID checkpoint and a GPU-day of training are replaced by things this
repository builds; everything else is the course's pipeline, run through its own scripts:

 1. data        ``experiments/standin_dataset.py``: three classes of shapes in AFHQ's layout.
 2. classifier  ``experiments/train_classifier.py``: fid/inception.py's Inception-v3 trained to
                tell the three classes apart, as the course made afhq_inception_v3.ckpt; its
                validation accuracy is reported.
 3. unet        ``train.py --data_root``: a reduced UNet (flags only), T = 1000.
 4. grid        ``experiments/fid_grid.py``: ``sampling.py`` for DDPM, DDIM steps x eta, the
                quadratic-spacing rows, DPM-Solver++(2M) and SDE-DPM-Solver++(2M); FID and KID +- SE of each against
                the validation split; the floor (train split against the same validation images);
                tables and figure.
 5. few_step    fid_grid again, into OUT/few_step/, for the cheap few-step rows only (DDIM and
                DPM-Solver++(2M) and SDE-DPM-Solver++(2M) at 10 and 20 calls on the quadratic timesteps)
                at N = 2000.

Stages 2 and 3 are independent and run at the same time, one process each (--jobs 2); the
grid samples and scores --jobs settings at once. Everything goes to OUT: data/, fid/, unet/,
samples/, grids/, results.json, results.md, fid_vs_steps.png, few_step/, stages.json. Every FID uses as
many real images as generated ones, the floor included, because FID is biased at small N.

``FULL`` below is sized for 1-1.5 hours on 2 CPU cores: every image of the grid costs
1000 + 4 x (10 + 20 + 50 + 100 + 1000) + 4 x (10 + 20 + 50) + 2 x (10 + 20 + 50) = 6200 network
evaluations (DDPM, the DDIM grid, its quadratic rows, the two solvers on the quadratic timesteps),
one of the few-step stage 2 x (10 + 20) + 2 x (10 + 20) = 120.
--quick shrinks everything so the pipeline runs end to end in a minute or two (for tests).
A stage recorded as done in OUT/stages.json with the same settings is reused, so a run that
was interrupted continues; delete OUT to start afresh.
"""
import os

if __name__ == "__main__":
    # One thread per process, set before numpy and torch start their thread pools: on a shared
    # CPU, threads wait for each other whenever one is descheduled; parallelism comes from
    # --jobs processes instead.
    for variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(variable, "1")

import json
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from atomic_write import atomic_write_text
from cli import ArgumentParser, UsageError, flags, run
from experiments import fid_grid, standin_dataset
from scheduler import PREDICTORS

COURSE_DIR = fid_grid.COURSE_DIR

# The full run (the README's "make image-demo" section says what each choice buys).
FULL = dict(
    image_size=16, num_train_per_class=1000, num_val_per_class=1000,
    classifier=dict(img_size=75, epochs=6, batch_size=16, max_num_images_per_cat=600),
    unet=dict(ch=32, ch_mult=[1, 2, 2], attn=[], num_res_blocks=1, dropout=0.0, predictor="x0",
              batch_size=64, lr=1e-3, warmup_steps=100, train_num_steps=10000, log_interval=2500,
              num_diffusion_train_timesteps=1000, ema_decay=0.999),
    grid=dict(num_samples=150, batch_size=150, ddim_steps=list(fid_grid.COURSE_DDIM_STEPS),
              etas=list(fid_grid.COURSE_ETAS), extra_spacings=["quadratic"], extra_steps=[10, 20, 50],
              dpm_solver_steps=[10, 20, 50], dpm_solver_orders=[2], dpm_solver_spacings=["quadratic"],
              dpm_solver_sde=True, use_ema=True, fid_img_size=75),
    # The few-step samplers again at N = 2000, where their samples are cheap and KID's standard
    # error small enough to tell DPM-Solver++ from DDIM on the same timesteps.
    few_step=dict(num_samples=2000, batch_size=250, ddim_steps=[10, 20], etas=[0.0, 1.0],
                  timestep_spacing="quadratic", dpm_solver_steps=[10, 20], dpm_solver_orders=[2],
                  dpm_solver_spacings=["quadratic"], dpm_solver_sde=True, skip_ddpm=True, use_ema=True,
                  fid_img_size=75),
)
# --quick: every stage runs, on tiny sizes (T = 20 so that DDPM and DDIM with S = T are cheap).
QUICK = dict(
    image_size=16, num_train_per_class=24, num_val_per_class=8,
    classifier=dict(img_size=75, epochs=1, batch_size=8, max_num_images_per_cat=-1),
    unet=dict(ch=32, ch_mult=[1], attn=[], num_res_blocks=1, dropout=0.0, predictor="x0",
              batch_size=8, lr=1e-3, warmup_steps=1, train_num_steps=4, log_interval=4,
              num_diffusion_train_timesteps=20, ema_decay=0.9),
    grid=dict(num_samples=8, batch_size=8, ddim_steps=[5], etas=[0.5], extra_spacings=["quadratic"],
              extra_steps=[4], use_ema=True, fid_img_size=75),
    few_step=dict(num_samples=6, batch_size=6, ddim_steps=[4], etas=[0.0, 1.0], timestep_spacing="quadratic",
                  dpm_solver_steps=[4], dpm_solver_orders=[2], dpm_solver_spacings=["quadratic"],
                  dpm_solver_sde=True, skip_ddpm=True, use_ema=True, fid_img_size=75),
)


class StageError(Exception):
    """A stage's command failed; reported as one line."""


def run_script(command, log_path):
    """``python -m``/script ``command`` in the course's folder, its output going to
    ``log_path``; StageError with the log's last line on failure."""
    with open(log_path, "w") as log:
        result = subprocess.run([sys.executable, *command], cwd=COURSE_DIR, stdout=log,
                                stderr=subprocess.STDOUT)
    if result.returncode != 0:
        lines = Path(log_path).read_text().strip().splitlines() or ["(no output)"]
        raise StageError(f"{' '.join(command[:2])} failed (log: {log_path}): {lines[-1]}")


class Stages:
    """OUT/stages.json: for every finished stage, its settings and wall time."""

    def __init__(self, out):
        self.path = out / "stages.json"
        self.done = json.loads(self.path.read_text()) if self.path.is_file() else {}
        self.lock = threading.Lock()  # stages may finish at the same time in two threads

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
        with self.lock:
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
    few_step_settings = {"classifier": classifier_settings, "unet": unet_settings, **config["few_step"]}

    stages.run("data", data_settings, lambda: standin_dataset.build(
        data_root, config["num_train_per_class"], config["num_val_per_class"],
        config["image_size"], seed) and None)

    def train_classifier():
        fid_ckpt.parent.mkdir(exist_ok=True)
        run_script(["-m", "experiments.train_classifier", "--data_root", str(data_root),
                    "--out", str(fid_ckpt), "--num_workers", "0", "--seed", str(seed),
                    "--device", "cpu", *flags(config["classifier"])],
                   out / "fid" / "train_classifier.log")
        report = json.loads(fid_ckpt.with_suffix(".json").read_text())
        return {"val_accuracy": report["val_accuracy"]}

    def train_unet():
        # Left by an interrupted or older run: train.py refuses to overwrite last.ckpt.
        shutil.rmtree(unet_dir, ignore_errors=True)
        unet_dir.mkdir()
        run_script(["train.py", "--data_root", str(data_root), "--save_dir", str(unet_dir),
                    "--image_resolution", str(config["image_size"]), "--sample_method", "ddim",
                    "--max_num_images_per_cat", "-1", "--num_workers", "0", "--seed", str(seed),
                    *flags(config["unet"])],
                   out / "train_unet.log")

    # independent of each other: one process each when there are two cores
    with ThreadPoolExecutor(max_workers=min(jobs, 2)) as pool:
        classifier = pool.submit(stages.run, "classifier", classifier_settings, train_classifier)
        unet = pool.submit(stages.run, "unet", unet_settings, train_unet)
        classifier, _ = classifier.result(), unet.result()

    def run_grid(grid_out, grid_config):
        """fid_grid on the UNet against the validation split, N real images for N samples; its own
        cache (keyed on the checkpoint's content) decides which samples are reused."""
        args = fid_grid.make_args(
            ckpt_path=str(unet_dir / "last.ckpt"), gt_dir=str(data_root / "val"), out=str(grid_out),
            floor_dir=str(data_root / "train"), num_gt=grid_config["num_samples"], fid_ckpt=str(fid_ckpt),
            fid_device="cpu", gpu=0, jobs=jobs, seed=seed, **grid_config)
        return {"results": fid_grid.run_grid(args)}

    grid = stages.run("grid", grid_settings, lambda: run_grid(out, config["grid"]))
    few_step = stages.run("few_step", few_step_settings, lambda: run_grid(out / "few_step", config["few_step"]))

    results = dict(grid["results"])
    results["few_step"] = few_step["results"]
    results["classifier_val_accuracy"] = classifier["val_accuracy"]
    results["config"] = config
    results["stage_seconds"] = {name: stages.done[name]["seconds"]
                                for name in ("data", "classifier", "unet", "grid", "few_step")}
    results["this_run_seconds"] = time.time() - total_start
    fid_grid.write_results(results, out)
    report = experiment_markdown(results)
    atomic_write_text(out / "results.md", report)
    return results, report


def experiment_markdown(results):
    """results.md of the experiment: the grid's tables plus classifier accuracy and stage times."""
    stage_rows = "\n".join(f"| {name} | {seconds / 60:.1f} |"
                           for name, seconds in results["stage_seconds"].items())
    few_step = results["few_step"]
    return "\n".join([
        fid_grid.results_markdown(results),
        f"# Few-step samplers at N = {few_step['num_samples']} (few_step/)",
        "",
        fid_grid.results_markdown(few_step),
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
        f"| this run, end to end (classifier and unet run at the same time) | "
        f"{results['this_run_seconds'] / 60:.1f} |",
        "",
    ])


def main(args):
    if args.jobs < 1:
        raise UsageError("--jobs must be at least 1")
    out = Path(args.out).resolve()
    config = QUICK if args.quick else FULL
    if args.predictor is not None:
        config = {**config, "unet": {**config["unet"], "predictor": args.predictor}}
    _, report = run_experiment(out, config, args.seed, args.jobs)
    print()
    print(report)
    print(f"Outputs in {out}")


def parse_args(argv=None):
    parser = ArgumentParser(
        prog="python -m experiments.image_experiment",
        description="Train, sample DDPM and the DDIM steps x eta grid, and measure FID and KID, "
                    "on a CPU stand-in for AFHQ."
    )
    parser.add_argument("--out", default=str(COURSE_DIR.parent.parent / "results" / "image_demo"),
                        help="output folder (default: results/image_demo in the repository)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny data, models and grid: the whole pipeline in a minute or two "
                             "(for tests)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the data, the training runs and the samples")
    parser.add_argument("--jobs", type=int, default=2,
                        help="processes run at once (one per CPU core)")
    parser.add_argument("--predictor", choices=PREDICTORS, default=None,
                        help="train the UNet to predict this instead (default: x0; the README "
                             "compares it with the course's noise)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    run(main, parse_args(), (StageError, UsageError, FileExistsError, *fid_grid.ERRORS))
