"""The user's job at its real size: every command of the assignment, run as a user types it, on the
real architectures with random weights and synthetic data in the real layouts.

    make rehearsal                                          # this machine's device, real sizes
    .venv/bin/python benchmarks/rehearsal.py --device cuda  # on a GPU; adds fp16, bf16, gradient checkpointing
    .venv/bin/python benchmarks/rehearsal.py --stages train,train_resume --keep
    .venv/bin/python benchmarks/rehearsal.py --scale tiny --out /tmp/r.json  # the test suite's few-second models

Task 1-2: an AFHQ-layout tree (train/val x cat/dog/wild, 512x512 JPEGs) and `python dataset.py` on it;
`train.py` with its default model and batch for --train_steps steps, then --resume for one more;
`sampling.py` DDPM, DDIM and DPM-Solver++ at its default batch (64); `fid/measure_fid.py` between two
folders of 500 images with the course's Inception-v3 (random weights in its checkpoint's layout).
Task 2: Stable Diffusion 1.4's architecture (benchmarks/sd1_architecture.py) saved as a diffusers
folder; the three wrappers with `sh`, 512 px, --train_steps steps, one validation image at 2 denoising
steps; DreamBooth with prior preservation and 2 class images; the LoRA files loaded into a stock
StableDiffusionPipeline; lora_inference.ipynb executed against them; the submission zip.

Memory and time do not depend on the weights' values, so the figures are those of the real job:
seconds per training step and per sampled image, peak memory (CUDA max allocated on a GPU, the peak
resident set of the stage's largest process on a CPU), output sizes, and the full job's time
projected from the measured rates. Everything is written in a temporary folder (deleted unless
--keep), never in the user's results; the figures go to report/rehearsal_<device>.json.

Two things are cut short, and said so in the results: DDPM sampling stops after --ddpm_steps of its
1000 steps (its rate projects the whole), and the DDIM and DPM-Solver++ stages take --sampling_calls
network calls per image (their rate per call projects any number of steps).

Bounds (exit status 1 when one is missed): every stage runs; each Task 2 LoRA file is 3.0-3.5 MB
(the course's "about 3MB", rank 4); no file of the submission zip is over 5 MB; on CUDA, LoRA with
fp16 peaks at <= 11 GiB (as benchmarks/bench_lora.py); the whole rehearsal takes <= 60 minutes on a
CPU and <= 8 minutes on a GPU, at real size.
"""
import argparse
import json
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMAGE_DIR = ROOT / "task1" / "image_diffusion_todo"
TASK2_DIR = ROOT / "task2"
HOOK_DIR = Path(__file__).resolve().parent / "rehearsal_hook"
MB, GIB = 10**6, 2**30

AFHQ_CLASSES = ("cat", "dog", "wild")
COURSE_TRAIN_STEPS = 100_000  # train.py's default --train_num_steps
COURSE_LOG_INTERVAL = 200  # train.py's default --log_interval: a sample grid and last.ckpt each time
COURSE_NUM_SAMPLES = 500  # sampling.py's default --num_samples, per FID cell
SAMPLING_BATCH = 64  # sampling.py's default --batch_size
# The course's FID grid: DDPM (T calls), and DDIM with S in {10, 20, 50, 100, 1000} x eta in {0, 0.2, 0.5, 1}.
GRID_CALLS_PER_IMAGE = 1000 + 4 * (10 + 20 + 50 + 100 + 1000)
GRID_CELLS = 1 + 5 * 4
NARUTO_IMAGES = 1221  # lambdalabs/naruto-blip-captions, as its dataset card lists (the hub is not reachable here)
VALIDATION_IMAGES, VALIDATION_STEPS = 4, 30  # task2/options.py: --num_validation_images, --num_inference_steps
LORA_SIZE_MB = (3.0, 3.5)  # rank-4 LoRA on SD 1.4's UNet attention, fp32: the course's "about 3MB"
SUBMISSION_FILE_LIMIT_MB = 5
FP16_LORA_LIMIT_GIB = 11.0
TIME_LIMIT_MINUTES = {"cpu": 60, "cuda": 8}
PROMPT = "a house"


@dataclass(frozen=True)
class Scale:
    """The sizes a rehearsal runs at: "full" is the user's job, "tiny" the test suite's."""
    afhq_size: int  # pixels of the synthetic AFHQ JPEGs (AFHQ's are 512x512)
    train_per_class: int
    val_images: int  # the FID folders' size (the course's eval folder: 500)
    train_flags: tuple = ()  # train.py beyond the rehearsal's own flags: none is the course's model and batch
    sampling_batch: int | None = None  # sampling.py --batch_size; None: its default, 64
    fid_flags: tuple = ()
    sd: str = "sd14"  # benchmarks/sd1_architecture.py scale
    resolution: int = 512  # Task 2 --resolution


SCALES = {
    "full": Scale(afhq_size=512, train_per_class=8, val_images=500),
    "tiny": Scale(afhq_size=64, train_per_class=2, val_images=12,
                  train_flags=("--image_resolution", "16", "--ch", "32", "--ch_mult", "1", "2", "--attn", "1",
                               "--num_res_blocks", "1", "--batch_size", "4", "--num_diffusion_train_timesteps", "20",
                               "--num_workers", "0"),
                  sampling_batch=4, fid_flags=("--img_size", "75", "--batch_size", "6"),
                  sd="tiny", resolution=32),
}


@dataclass
class Run:
    """One command of a stage: what it printed, how long it took, how much memory its processes used."""
    command: str
    seconds: float
    returncode: int
    peak_rss_bytes: int | None
    cuda_max_allocated_bytes: int | None
    log: str
    stopped_early: bool = False


class StageFailed(Exception):
    pass


@dataclass
class Rehearsal:
    """The settings of one rehearsal and its temporary folder; runs each stage's commands."""
    device: str
    scale: Scale
    work: Path
    train_steps: int
    sampling_calls: int
    ddpm_steps: int  # DDPM sampling is stopped after these of its T steps
    variants: tuple

    @property
    def model_dir(self):
        """The Stable Diffusion folder the sd_model stage writes."""
        return self.work / f"{self.scale.sd}-sd"

    def run_dir(self, name):
        """OUTPUT_DIR of the Task 2 run ``name``."""
        return self.work / "runs" / name

    # -- running a command ------------------------------------------------------------------------

    def env(self, name, extra=None):
        """The stage's environment: the venv first on PATH, offline, its own Hugging Face home, the
        memory hook on PYTHONPATH."""
        env = dict(os.environ)
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HOOK_DIR), env.get("PYTHONPATH")]))
        env.update(HF_HUB_OFFLINE="1", HF_HOME=str(self.work / "hf_home"), PYTHONUNBUFFERED="1",
                   REHEARSAL_MEMORY_LOG=str(self.work / "memory" / f"{name}.jsonl"))
        if self.device == "cpu":
            env["CUDA_VISIBLE_DEVICES"] = ""
        env.update(extra or {})
        return env

    def shown(self, argv):
        """The command as the results file shows it: no machine's absolute paths."""
        text = shlex.join(str(a) for a in argv).replace(sys.executable, "python").replace(str(self.work), "$WORK")
        return text.replace(str(ROOT) + "/", "").replace(str(ROOT), ".")

    def run(self, name, argv, cwd, env=None, stop=None):
        """Run ``argv`` in ``cwd``, its output into WORK/logs/<name>.log. ``stop(log_text)`` (optional) is
        asked every 0.2 s; when it says True the command gets SIGINT (Ctrl-C) and counts as stopped early.
        Peak memory comes from the hook (benchmarks/rehearsal_hook): the largest of the command's Python processes."""
        log_path = self.work / "logs" / f"{name}.log"
        memory_log = self.work / "memory" / f"{name}.jsonl"
        memory_log.unlink(missing_ok=True)
        start = time.perf_counter()
        with open(log_path, "w") as log:
            # Ctrl-C's default action back: a shell starts background jobs with SIGINT ignored, which a
            # child inherits, and Python then installs no KeyboardInterrupt for it
            process = subprocess.Popen([str(a) for a in argv], cwd=cwd, env=self.env(name, env), stdout=log,
                                       stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
            stopped = False
            while True:
                pid, status = os.waitpid(process.pid, os.WNOHANG)
                if pid:
                    break
                if stop is not None and not stopped and stop(log_path.read_text(errors="replace")):
                    process.send_signal(signal.SIGINT)
                    stopped = True
                time.sleep(0.2)
        process.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait again
        seconds = time.perf_counter() - start
        records = [json.loads(line) for line in memory_log.read_text().splitlines()] if memory_log.exists() else []

        def largest(key):
            return max((record[key] for record in records if record[key] is not None), default=None)

        result = Run(self.shown(argv), seconds, process.returncode, largest("peak_rss_bytes"),
                     largest("cuda_max_allocated_bytes"), log_path.read_text(errors="replace"), stopped)
        if result.returncode != 0 and not stopped:
            tail = "\n".join(result.log.strip().splitlines()[-15:])
            raise StageFailed(f"{result.command} exited with {result.returncode}:\n{tail}")
        return result

    def python(self, name, script, args, cwd, **kwargs):
        return self.run(name, [sys.executable, script, *args], cwd, **kwargs)


# -- synthetic data in the real layouts --------------------------------------------------------------

def smooth_image(rng, size, low=8):
    """A [size, size] RGB picture with structure at every scale JPEG sees (upsampled noise plus grain)."""
    from PIL import Image
    import numpy as np

    coarse = Image.fromarray(rng.integers(0, 256, (low, low, 3), dtype=np.uint8)).resize((size, size), Image.BICUBIC)
    grain = rng.normal(0, 12, (size, size, 3))
    return Image.fromarray(np.clip(np.asarray(coarse, dtype=float) + grain, 0, 255).astype(np.uint8))


def write_afhq_tree(root: Path, scale: Scale) -> dict:
    """root/{train,val}/{cat,dog,wild}/*.jpg as AFHQ lays them out; val holds scale.val_images in all."""
    import numpy as np

    rng = np.random.default_rng(0)
    counts = {"train": [scale.train_per_class] * 3,
              "val": [scale.val_images // 3 + (i < scale.val_images % 3) for i in range(3)]}
    for split, per_class in counts.items():
        for name, count in zip(AFHQ_CLASSES, per_class):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                smooth_image(rng, scale.afhq_size).save(folder / f"flickr_{name}_{i:06d}.jpg", quality=90)
    return {split: sum(per_class) for split, per_class in counts.items()}


def write_generated_folder(folder: Path, count: int, size: int = 64) -> None:
    """count images {i}.png, as sampling.py names them."""
    import numpy as np

    rng = np.random.default_rng(1)
    folder.mkdir(parents=True)
    for i in range(count):
        smooth_image(rng, size).save(folder / f"{i}.png")


def write_random_inception(path: Path) -> None:
    """The course's afhq_inception_v3.ckpt layout (a plain state_dict of fid/inception.py, 3 classes),
    random weights."""
    import torch

    sys.path.insert(0, str(IMAGE_DIR))
    from fid.inception import InceptionV3

    torch.manual_seed(0)
    torch.save(InceptionV3(for_train=False, num_classes=len(AFHQ_CLASSES)).state_dict(), path)


NARUTO_REHEARSAL_IMAGES = 2


def write_naruto_dataset(folder: Path) -> None:
    """A two-image dataset in lambdalabs/naruto-blip-captions' layout (data/train-*.parquet with an
    "image" and a "text" column), which `load_dataset(folder)` reads as the hub's. Two images make an
    epoch two steps, so a run of three validates after its first epoch too (validation_epochs=1)."""
    import datasets

    datasets.disable_progress_bars()
    images = sorted((TASK2_DIR / "sample_data" / "artistic-custom" / "train").glob("*.png"))[:NARUTO_REHEARSAL_IMAGES]
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    dataset = datasets.Dataset.from_dict({"image": [str(p) for p in images],
                                          "text": ["a drawing of a house"] * len(images)}, features=features)
    (folder / "data").mkdir(parents=True)
    dataset.to_parquet(str(folder / "data" / "train-00000-of-00001.parquet"))


# -- reading what the commands wrote ------------------------------------------------------------------

def train_rate(log):
    """seconds per training step of train.py's last "step N: ... s per training step" line."""
    found = re.findall(r"step \d+: loss \S+, ([\d.]+) s per training step .*?; samples and checkpoint ([\d.]+) s", log)
    if not found:
        raise StageFailed("train.py printed no 'step N: ... s per training step' line")
    return float(found[-1][0]), float(found[-1][1])


def tensorboard_step_seconds(logs_dir: Path):
    """Mean seconds of a training step: the time between consecutive logged losses, leaving out step 1
    (start-up) and the intervals that hold a validation (its images are logged when it ends)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    folders = [p.parent for p in logs_dir.rglob("events.out.tfevents.*")]
    if not folders:
        raise StageFailed(f"no tensorboard log under {logs_dir}")
    events = EventAccumulator(str(folders[0]), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    times = [event.wall_time for event in sorted(events.Scalars("loss"), key=lambda e: e.step)]
    validations = [event.wall_time for event in events.Images("validation")] if "validation" in events.Tags()["images"] else []
    steps = [end - start for start, end in zip(times, times[1:])
             if not any(start < validation < end for validation in validations)]
    if not steps:
        raise StageFailed(f"no training step between two others without a validation in {logs_dir}")
    return sum(steps) / len(steps)


class DenoisingProgress:
    """Watches model.sample's tqdm bar ("sampling: ... n/T") in a log: when each step was first seen,
    and whether ``limit`` steps are done."""

    def __init__(self, limit):
        self.limit, self.seen, self.total = limit, {}, None

    def __call__(self, log):
        now = time.perf_counter()
        for done, total in re.findall(r"sampling:.*?(\d+)/(\d+) \[", log):
            if int(done) >= 1:
                self.seen.setdefault(int(done), now)
            self.total = int(total)
        # two sightings at least, so that a rate can be measured between them
        return self.limit is not None and len(self.seen) >= 2 and max(self.seen) >= self.limit

    def seconds_per_step(self):
        first, last = min(self.seen), max(self.seen)
        return (self.seen[last] - self.seen[first]) / (last - first)


def peak_memory(runs) -> dict:
    """The largest peaks over a stage's commands, in GiB."""
    figures = {}
    rss = [run.peak_rss_bytes for run in runs if run.peak_rss_bytes is not None]
    if rss:
        figures["peak_rss_gib"] = round(max(rss) / GIB, 2)
    cuda = [run.cuda_max_allocated_bytes for run in runs if run.cuda_max_allocated_bytes is not None]
    if cuda:
        figures["cuda_max_allocated_gib"] = round(max(cuda) / GIB, 2)
    return figures


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


# -- the stages -----------------------------------------------------------------------------------

def stage_afhq_data(r: Rehearsal):
    counts = write_afhq_tree(r.work / "afhq", r.scale)
    run = r.python("afhq_data", "dataset.py", ["--data_root", r.work / "afhq"], IMAGE_DIR)
    eval_images = len(list((r.work / "afhq" / "eval").iterdir()))
    if eval_images != counts["val"]:
        raise StageFailed(f"dataset.py wrote {eval_images} eval images, not {counts['val']}")
    return [run], {"train_images": counts["train"], "val_images": counts["val"], "eval_images": eval_images,
                   "jpeg_size": r.scale.afhq_size}


def train_command(r: Rehearsal, save_dir, steps, extra=()):
    # --sample_method ddim: the sample grids (step 0 and the last) take 50 network calls, not DDPM's 1000
    return ["--data_root", r.work / "afhq", "--save_dir", save_dir, "--train_num_steps", steps,
            "--sample_method", "ddim", *r.scale.train_flags, *extra]


def train_figures(run, save_dir):
    seconds_per_step, saving_seconds = train_rate(run.log)
    return {"seconds_per_step": round(seconds_per_step, 3), "grid_and_checkpoint_seconds": saving_seconds,
            "checkpoint_mb": round((save_dir / "last.ckpt").stat().st_size / MB, 1)}


def stage_train(r: Rehearsal, name="train", precision=None):
    save_dir = r.work / name
    extra = ("--mixed_precision", precision) if precision else ()
    run = r.python(name, "train.py", train_command(r, save_dir, r.train_steps, extra), IMAGE_DIR)
    return [run], {"steps": r.train_steps, **train_figures(run, save_dir)}


def stage_train_resume(r: Rehearsal):
    save_dir = r.work / "train"
    run = r.python("train_resume", "train.py", [*train_command(r, save_dir, r.train_steps + 1), "--resume"], IMAGE_DIR)
    if f"resuming at step {r.train_steps}" not in run.log:
        raise StageFailed(f"train.py --resume did not resume at step {r.train_steps}")
    return [run], {"resumed_at": r.train_steps, **train_figures(run, save_dir)}


def sampling_args(r: Rehearsal, method, extra=()):
    """(save_dir, batch, sampling.py's flags): one batch of images with ``method``."""
    batch = r.scale.sampling_batch or SAMPLING_BATCH
    save_dir = r.work / "samples" / method
    batch_flag = ["--batch_size", batch] if r.scale.sampling_batch else []
    return save_dir, batch, ["--ckpt_path", r.work / "train" / "last.ckpt", "--save_dir", save_dir,
                             "--sample_method", method, "--num_samples", batch, *batch_flag, *extra]


def stage_sample_ddpm(r: Rehearsal):
    save_dir, batch, args = sampling_args(r, "ddpm")
    progress = DenoisingProgress(r.ddpm_steps)
    run = r.python("sample_ddpm", "sampling.py", args, IMAGE_DIR, stop=progress)
    figures = {"batch": batch, "num_train_timesteps": progress.total}
    if run.stopped_early:
        per_step = progress.seconds_per_step()
        figures.update(stopped_after_steps=max(progress.seen), seconds_per_image_call=per_step / batch,
                       projected_seconds_per_image=per_step / batch * progress.total)
    else:
        summary = json.loads((save_dir / "sampling.json").read_text())
        figures.update(images=summary["num_samples"],
                       seconds_per_image_call=summary["seconds"] / batch / progress.total,
                       projected_seconds_per_image=summary["seconds"] / batch)
    return [run], figures


def stage_sample_few_calls(r: Rehearsal, method):
    save_dir, batch, args = sampling_args(r, method, ["--ddim_steps", r.sampling_calls])
    run = r.python(f"sample_{method}", "sampling.py", args, IMAGE_DIR)
    summary = json.loads((save_dir / "sampling.json").read_text())
    images = len(list(save_dir.glob("*.png")))
    if images != batch:
        raise StageFailed(f"sampling.py wrote {images} images, not {batch}")
    return [run], {"batch": batch, "images": images, "network_calls": r.sampling_calls,
                   "seconds_per_image": summary["seconds"] / batch,
                   "seconds_per_image_call": summary["seconds"] / batch / r.sampling_calls}


def stage_fid(r: Rehearsal):
    ckpt, generated = r.work / "afhq_inception_v3.ckpt", r.work / "fid_generated"
    write_random_inception(ckpt)
    write_generated_folder(generated, r.scale.val_images)
    run = r.python("fid", "fid/measure_fid.py", [r.work / "afhq" / "eval", generated, "--ckpt", ckpt,
                                                 *r.scale.fid_flags], IMAGE_DIR)
    found = re.search(r"FID: ([-\d.e+]+)", run.log)
    if not found:
        raise StageFailed("measure_fid.py printed no 'FID: <value>'")
    return [run], {"images_per_folder": r.scale.val_images, "fid": float(found.group(1)),
                   "seconds_per_image": run.seconds / (2 * r.scale.val_images)}


def stage_sd_model(r: Rehearsal):
    run = r.python("sd_model", Path(__file__).with_name("sd1_architecture.py"), [r.work, "--scale", r.scale.sd], ROOT)
    return [run], {"model_gb": round(folder_bytes(r.model_dir) / 1e9, 2)}


WRAPPERS = {"lora_naruto": "train_lora.sh", "lora_custom": "train_lora_custom.sh",
            "dreambooth": "train_dreambooth_lora.sh"}
VARIANTS = {"fp16": ({"MIXED_PRECISION": "fp16"}, []), "bf16": ({"MIXED_PRECISION": "bf16"}, []),
            "gradient_checkpointing": ({}, ["--gradient_checkpointing"])}
# Which wrapper runs again in which variant: train_lora.sh in each (its run validates during training
# too), DreamBooth in fp16 (its class images are then drawn in fp16 as well).
VARIANT_RUNS = [("lora_naruto", "fp16"), ("lora_naruto", "bf16"), ("lora_naruto", "gradient_checkpointing"),
                ("dreambooth", "fp16")]


def stage_wrapper(r: Rehearsal, kind, variant=None):
    """One of task2/scripts/*.sh with `sh`, the course's flags plus a short run's."""
    name = kind if variant is None else f"{kind}_{variant}"
    output_dir = r.run_dir(name)
    env = {"MODEL_NAME": str(r.model_dir), "OUTPUT_DIR": str(output_dir)}
    steps, extra = r.train_steps, []
    if kind == "lora_naruto":
        if not (r.work / "naruto").exists():
            write_naruto_dataset(r.work / "naruto")
        env["DATASET_NAME"] = str(r.work / "naruto")
        steps = max(steps, NARUTO_REHEARSAL_IMAGES + 1)  # a step past the first epoch, whose validation then runs
    if kind == "dreambooth":
        env["CLASS_DIR"] = str(r.work / "class_images" / name)  # each run draws its own, in its precision
        extra = ["--with_prior_preservation", "--class_prompt=a photo of a cat", "--num_class_images=2"]
    variant_env, variant_flags = VARIANTS.get(variant, ({}, []))
    env.update(variant_env)
    flags = [f"--max_train_steps={steps}", "--num_inference_steps=2", "--num_validation_images=1",
             f"--resolution={r.scale.resolution}", *extra, *variant_flags]
    run = r.run(name, ["sh", TASK2_DIR / "scripts" / WRAPPERS[kind], *flags], TASK2_DIR, env=env)
    lora = output_dir / "pytorch_lora_weights.safetensors"
    validation = sorted(p.name for p in (output_dir / "validation").glob("*.png"))
    if not lora.exists() or "final.png" not in validation:
        raise StageFailed(f"{WRAPPERS[kind]} wrote no LoRA file or no validation/final.png")
    figures = {"steps": steps, "seconds_per_step": tensorboard_step_seconds(output_dir / "logs"),
               "lora_file_mb": round(lora.stat().st_size / MB, 3), "validation_images": validation}
    if kind == "dreambooth":
        figures["class_images"] = len(list((r.work / "class_images" / name).iterdir()))
    return [run], figures


def lora_runs(r: Rehearsal):
    return [r.run_dir(kind) for kind in WRAPPERS]


def stage_stock_pipeline(r: Rehearsal):
    args = [r.model_dir, *lora_runs(r)]
    run = r.run("stock_pipeline", [sys.executable, __file__, "--child_stock_pipeline", *args], ROOT)
    return [run], json.loads(run.log.strip().splitlines()[-1])


def child_stock_pipeline(model_dir, lora_dirs):
    """A stock StableDiffusionPipeline: the base model's image at 2 and 4 denoising steps (their
    difference is the time of a step), then each LoRA loaded alone and one image drawn at 2 steps.
    Prints the figures as one JSON line."""
    import numpy as np
    import torch
    from diffusers import StableDiffusionPipeline

    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipeline = StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None).to(device)
    pipeline.set_progress_bar_config(disable=True)

    def draw(steps):
        start = time.perf_counter()
        image = pipeline(PROMPT, num_inference_steps=steps, generator=torch.Generator(device).manual_seed(0),
                         output_type="np").images[0]
        return image, time.perf_counter() - start

    base, two_steps = draw(2)
    _, four_steps = draw(4)
    changes = {}
    for lora_dir in lora_dirs:
        pipeline.unload_lora_weights()
        pipeline.load_lora_weights(lora_dir)
        changes[Path(lora_dir).name] = float(np.abs(draw(2)[0] - base).max())
    per_step = (four_steps - two_steps) / 2
    print(json.dumps({"seconds_per_denoising_step": per_step, "seconds_per_image_besides_steps": two_steps - 2 * per_step,
                      "max_pixel_change_by_lora": changes}))


def stage_notebook(r: Rehearsal):
    out = r.work / "notebook"
    env = {"MODEL_NAME": str(r.model_dir), "LORA_PATH": "|".join(map(str, lora_runs(r))),
           "PROMPTS": PROMPT, "NUM_INFERENCE_STEPS": "2"}
    run = r.run("notebook", [sys.executable, "-m", "jupyter", "nbconvert", "--to", "notebook", "--execute",
                             "lora_inference.ipynb", "--output-dir", out], TASK2_DIR, env=env)
    notebook = json.loads((out / "lora_inference.ipynb").read_text())
    images = sum("image/png" in output.get("data", {}) for cell in notebook["cells"] for output in cell.get("outputs", []))
    if images != 1 + len(WRAPPERS):
        raise StageFailed(f"the notebook showed {images} image grids, not {1 + len(WRAPPERS)}")
    return [run], {"image_grids": images}


def stage_submission(r: Rehearsal):
    out = r.work / "submission"
    out.mkdir()
    run = r.run("submission", [sys.executable, "report/make_submission.py", "--id", "0", "--lora_link_1",
                               "https://example.com/1", "--lora_link_2", "https://example.com/2", "--out", out], ROOT)
    with zipfile.ZipFile(out / "0_lab2.zip") as archive:
        largest = max(archive.infolist(), key=lambda info: info.file_size)
        count = len(archive.infolist())
    return [run], {"files": count, "largest_file": largest.filename, "largest_file_mb": round(largest.file_size / MB, 3)}


def all_stages(r: Rehearsal):
    """(name, task, function, names of the stages it needs), in running order."""
    stages = [("afhq_data", "1-2", stage_afhq_data, ()),
              ("train", "1-2", stage_train, ("afhq_data",)),
              ("train_resume", "1-2", stage_train_resume, ("train",))]
    if r.device == "cuda":
        stages += [(f"train_{p}", "1-2", lambda r, p=p: stage_train(r, f"train_{p}", p), ("afhq_data",))
                   for p in ("fp16", "bf16") if p in r.variants]
    stages += [("sample_ddpm", "1-2", stage_sample_ddpm, ("train",)),
               ("sample_ddim", "1-2", lambda r: stage_sample_few_calls(r, "ddim"), ("train",)),
               ("sample_dpm_solver", "1-2", lambda r: stage_sample_few_calls(r, "dpm_solver"), ("train",)),
               ("fid", "1-2", stage_fid, ("afhq_data",)),
               ("sd_model", "2", stage_sd_model, ())]
    stages += [(kind, "2", lambda r, k=kind: stage_wrapper(r, k), ("sd_model",)) for kind in WRAPPERS]
    stages += [(f"{kind}_{v}", "2", lambda r, k=kind, v=v: stage_wrapper(r, k, v), ("sd_model",))
               for kind, v in VARIANT_RUNS if v in r.variants]
    stages += [("stock_pipeline", "2", stage_stock_pipeline, tuple(WRAPPERS)),
               ("notebook", "2", stage_notebook, tuple(WRAPPERS)),
               ("submission", "report", stage_submission, ())]
    return stages


# -- projections and bounds -------------------------------------------------------------------------

def wrapper_defaults(kind):
    """(optimizer steps, validations) of the course's run of a wrapper, from its flags in scripts/*.sh
    and the training loop's rule (task2/training.py: every --validation_epochs epochs but the last,
    then the final one from the saved file)."""
    lines = (TASK2_DIR / "scripts" / WRAPPERS[kind]).read_text().splitlines()
    text = "\n".join(line for line in lines if not line.lstrip().startswith("#"))  # the examples in comments set other values

    def flag(name):
        found = re.search(rf"--{name}=(\d+)", text)
        return int(found.group(1)) if found else None

    images = {"lora_naruto": NARUTO_IMAGES,
              "lora_custom": len(list((TASK2_DIR / "sample_data" / "artistic-custom" / "train").glob("*.png"))),
              "dreambooth": len(list((TASK2_DIR / "sample_data" / "dreambooth-cat").glob("*.png")))}[kind]
    steps = flag("max_train_steps") or flag("num_train_epochs") * images  # batch 1, one process
    epochs = -(-steps // images)
    validations = sum(1 for epoch in range(1, epochs) if epoch % flag("validation_epochs") == 0) + 1
    return steps, validations


def projections(figures: dict) -> dict:
    """The course's full jobs, from the measured rates (hours)."""
    hours = {}
    if "train" in figures:
        train = figures["train"]
        hours["train_100k_steps"] = COURSE_TRAIN_STEPS * train["seconds_per_step"] / 3600
        hours["train_100k_steps_sample_grids_and_checkpoints"] = (
            COURSE_TRAIN_STEPS / COURSE_LOG_INTERVAL * train["grid_and_checkpoint_seconds"] / 3600)
    if "sample_ddim" in figures:
        per_call = figures["sample_ddim"]["seconds_per_image_call"]
        hours["fid_grid_sampling_21_cells_500_images"] = GRID_CALLS_PER_IMAGE * COURSE_NUM_SAMPLES * per_call / 3600
    if "fid" in figures:
        hours["fid_grid_scoring"] = (GRID_CELLS + 1) * COURSE_NUM_SAMPLES * figures["fid"]["seconds_per_image"] / 3600
    image = figures.get("stock_pipeline")
    for kind in WRAPPERS:
        if kind in figures and image and figures[kind]["seconds_per_step"]:
            steps, validations = wrapper_defaults(kind)
            per_image = image["seconds_per_image_besides_steps"] + VALIDATION_STEPS * image["seconds_per_denoising_step"]
            hours[f"{kind}_course_run"] = (steps * figures[kind]["seconds_per_step"]
                                           + validations * VALIDATION_IMAGES * per_image) / 3600
    return {name: round(value, 3) for name, value in hours.items()}


def bounds(record: dict, device: str, scale_name: str) -> list:
    """(text, passed) for each bound this rehearsal can judge."""
    checks = [(f"stage {s['name']} ran", s["ok"]) for s in record["stages"]]
    figures = {s["name"]: s.get("figures", {}) for s in record["stages"] if s["ok"]}
    if scale_name == "full":
        low, high = LORA_SIZE_MB
        for name, values in figures.items():
            if "lora_file_mb" in values:
                checks.append((f"{name}: LoRA file {values['lora_file_mb']} MB in [{low}, {high}] MB",
                               low <= values["lora_file_mb"] <= high))
        checks.append((f"whole rehearsal {record['total_seconds'] / 60:.1f} min <= {TIME_LIMIT_MINUTES[device]} min",
                       record["total_seconds"] <= TIME_LIMIT_MINUTES[device] * 60))
    if "submission" in figures:
        largest = figures["submission"]["largest_file_mb"]
        checks.append((f"largest file of the submission zip {largest} MB <= {SUBMISSION_FILE_LIMIT_MB} MB",
                       largest <= SUBMISSION_FILE_LIMIT_MB))
    for name, values in figures.items():
        if name.endswith("_fp16") and "lora_file_mb" in values and "cuda_max_allocated_gib" in values:
            checks.append((f"{name}: peak {values['cuda_max_allocated_gib']} GiB <= {FP16_LORA_LIMIT_GIB} GiB",
                           values["cuda_max_allocated_gib"] <= FP16_LORA_LIMIT_GIB))
    return checks


def machine(device):
    import torch

    text = f"{os.cpu_count()}-core {platform.machine()} CPU"
    cpuinfo = Path("/proc/cpuinfo")
    model = re.search(r"model name\s*:\s*(.+)", cpuinfo.read_text()) if cpuinfo.exists() else None
    if model:
        text += f" ({model.group(1).strip()})"
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
        text += f", {memory:.0f} GiB"
    except (ValueError, OSError):
        pass
    if device == "cuda":
        text = f"{torch.cuda.get_device_name()} ({torch.cuda.get_device_properties(0).total_memory / GIB:.0f} GiB), " + text
    return text + f"; torch {torch.__version__}"


# -- the run ---------------------------------------------------------------------------------------

def run_stages(r: Rehearsal, selected):
    record_stages, done = [], set()
    for name, task, function, needs in all_stages(r):
        if selected and name not in selected:
            continue
        missing = [need for need in needs if need not in done and (not selected or need in selected)]
        entry = {"name": name, "task": task}
        if missing:
            entry.update(ok=False, error=f"skipped: needs {', '.join(missing)}")
        else:
            print(f"[rehearsal] {name} ...", flush=True)
            try:
                runs, figures = function(r)
            except StageFailed as error:
                entry.update(ok=False, error=str(error))
            else:
                seconds = sum(run.seconds for run in runs)
                figures = {**peak_memory(runs), **figures}
                entry.update(ok=True, seconds=round(seconds, 1), commands=[run.command for run in runs],
                             stopped_early=any(run.stopped_early for run in runs), figures=figures)
                done.add(name)
        print(f"[rehearsal] {name}: " + (f"{entry['seconds']} s, {entry['figures']}" if entry["ok"]
                                         else entry["error"]), flush=True)
        record_stages.append(entry)
    return record_stages


def parse_args(argv=None):
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--scale", choices=sorted(SCALES), default="full",
                        help="full: the real architectures and sizes; tiny: the test suite's (seconds)")
    parser.add_argument("--stages", default="", help="comma-separated stage names (default: all); "
                                                     "a stage whose prerequisite is left out is skipped")
    parser.add_argument("--train_steps", type=int, default=None,
                        help="optimizer steps of each training run (default: 2 on a CPU, 10 on CUDA)")
    parser.add_argument("--sampling_calls", type=int, default=None,
                        help="network calls per image of the DDIM and DPM-Solver++ stages (default: 2 on a CPU, 20 on CUDA)")
    parser.add_argument("--ddpm_steps", type=int, default=None,
                        help="stop DDPM sampling after this many of its T steps (default: 3 on a CPU, 100 on CUDA)")
    parser.add_argument("--variants", nargs="*", choices=sorted(VARIANTS), default=None,
                        help="extra runs of the training stages (default on CUDA: all three; on a CPU: none)")
    parser.add_argument("--out", type=Path, default=None, help="results file (default: report/rehearsal_<device>.json)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (its path is printed)")
    parser.add_argument("--child_stock_pipeline", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    cpu = args.device == "cpu"
    if not cpu and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU here")
    args.train_steps = args.train_steps or (2 if cpu else 10)
    args.sampling_calls = args.sampling_calls or (2 if cpu else 20)
    args.ddpm_steps = args.ddpm_steps or (3 if cpu else 100)
    args.variants = tuple(args.variants if args.variants is not None else (() if cpu else sorted(VARIANTS)))
    if args.train_steps < 2:
        parser.error("--train_steps must be >= 2 (the rate is measured between steps)")
    if args.variants and cpu and "fp16" in args.variants:
        parser.error("--variants fp16 needs CUDA")
    args.out = args.out or ROOT / "report" / f"rehearsal_{args.device}.json"
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.child_stock_pipeline:
        child_stock_pipeline(args.child_stock_pipeline[0], args.child_stock_pipeline[1:])
        return 0
    work = Path(tempfile.mkdtemp(prefix="rehearsal-"))
    (work / "logs").mkdir()
    (work / "memory").mkdir()
    r = Rehearsal(args.device, SCALES[args.scale], work, args.train_steps, args.sampling_calls, args.ddpm_steps,
                  args.variants)
    print(f"[rehearsal] {args.scale} scale on {args.device}, in {work}", flush=True)
    start = time.perf_counter()
    try:
        stages = run_stages(r, [s for s in args.stages.split(",") if s])
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    record = {"device": args.device, "machine": machine(args.device), "date": time.strftime("%Y-%m-%d"),
              "scale": args.scale,
              "command": "python benchmarks/rehearsal.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "train_steps": args.train_steps, "sampling_calls": args.sampling_calls, "ddpm_steps": args.ddpm_steps,
              "total_seconds": round(time.perf_counter() - start, 1), "stages": stages}
    record["projected_hours"] = projections({s["name"]: s["figures"] for s in stages if s["ok"]})
    checks = bounds(record, args.device, args.scale)
    record["bounds"] = [{"bound": text, "met": passed} for text, passed in checks]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    partial = args.out.with_name(args.out.name + ".tmp")
    partial.write_text(json.dumps(record, indent=2) + "\n")
    partial.replace(args.out)
    for text, passed in checks:
        print(f"  {'ok    ' if passed else 'MISSED'} {text}")
    print(f"[rehearsal] {record['total_seconds'] / 60:.1f} min; figures in {args.out}")
    return 0 if all(passed for _, passed in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
