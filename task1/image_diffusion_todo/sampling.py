"""Sample images from a trained checkpoint with DDPM or DDIM, in one process or several.

    python sampling.py --ckpt_path CKPT --save_dir SAVE_DIR --sample_method ddim --ddim_steps 50 --eta 0.0
    python sampling.py ... --sample_method dpm_solver --solver_order 2 --ddim_steps 10 --timestep_spacing quadratic
    python sampling.py ... --sample_method sde_dpm_solver --solver_order 2 --ddim_steps 10 --timestep_spacing quadratic
    accelerate launch --num_processes 2 sampling.py --ckpt_path CKPT --save_dir SAVE_DIR ...
    torchrun --nproc_per_node 2 sampling.py --ckpt_path CKPT --save_dir SAVE_DIR ...

Writes SAVE_DIR/{i}.png for i = 0..num_samples-1 (image_path) and SAVE_DIR/sampling.json. The
checkpoint may be one train.py wrote or a course (Lab-1) file (read without running its code). The
noise schedule and the predictor come from the checkpoint: the course's --predictor, --mode,
--beta_1, --beta_T may repeat them; one that contradicts it stops the run.

Image i depends on (--seed, i) alone, whatever --batch_size and the number of processes: it has
its own torch.Generator seeded from (seed, i), which draws its class label (--use_cfg), x_T and
its noise at every step; the images are cut into the batches one process would sample and each
of N processes takes a contiguous block of them, so N processes write the bytes of one.
"""
import json
import math
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
from accelerate import PartialState
from accelerate.utils import gather_object, parse_flag_from_env
from atomic_write import atomic_write, atomic_write_text
from cli import ArgumentParser, UsageError, flags, pick_device, run
from dataset import tensor_to_pil_image
from dpm_solver import SOLVER_ORDERS, SOLVER_SPACINGS, DPMSolverScheduler, check_order
from model import CheckpointError, DiffusionModule
from scheduler import PREDICTORS, SCHEDULES, TIMESTEP_SPACINGS, build_scheduler, check_denoises, check_eta
from tqdm import tqdm

SUMMARY_FILE = "sampling.json"
SOLVER_METHODS = {"dpm_solver": False, "sde_dpm_solver": True}  # --sample_method -> DPMSolverScheduler's stochastic
ERRORS = (UsageError, CheckpointError, OSError)  # what the script reports as one line (cli.run)


def image_path(save_dir, i: int) -> Path:
    """Where image i goes: SAVE_DIR/{i}.png, the layout measure_fid.py and fid_grid.py read."""
    return Path(save_dir) / f"{i}.png"


def command(ckpt_path, save_dir, **settings) -> list:
    """The argv of `python sampling.py` for settings keyed by this script's flag names, e.g.
    command(ckpt, out, sample_method="ddim", ddim_steps=10, eta=0.5, use_ema=True): the one place
    where this script's command line is built for it by another program."""
    argv = ["--ckpt_path", str(ckpt_path), "--save_dir", str(save_dir), *flags(settings)]
    unknown = set(settings) - set(vars(parse_args(argv)))
    if unknown:
        raise ValueError(f"sampling.py has no flag --{sorted(unknown)[0]}")
    return ["sampling.py", *argv]


def check_args(args):
    if args.ddim_steps < 1:
        raise UsageError(f"--ddim_steps must be >= 1, got {args.ddim_steps}")
    try:
        check_eta(args.eta)
    except ValueError as error:
        raise UsageError(f"--{error}") from None
    if not math.isfinite(args.cfg_scale):
        raise UsageError(f"--cfg_scale must be a finite number, got {args.cfg_scale}")
    if args.num_samples < 1 or args.batch_size < 1:
        raise UsageError("--num_samples and --batch_size must be >= 1")
    if args.seed < 0:
        raise UsageError(f"--seed must be >= 0, got {args.seed}")
    if args.sample_method in SOLVER_METHODS:
        try:
            check_order(args.solver_order, SOLVER_METHODS[args.sample_method])
        except ValueError as error:
            raise UsageError(f"--solver_order {args.solver_order}: {error}") from None
    if args.timestep_spacing not in TIMESTEP_SPACINGS and args.sample_method not in SOLVER_METHODS:
        raise UsageError(f"--timestep_spacing {args.timestep_spacing} is for the DPM-Solver++ methods only; "
                         f"DDIM takes one of {', '.join(TIMESTEP_SPACINGS)}")


def check_course_flags(args, stored_predictor, schedule: dict):
    """Stop when --predictor, --mode, --beta_1 or --beta_T contradicts the checkpoint.

    stored_predictor: None for a file that does not record it (a 2025 Lab-1 file); a cosine
    schedule does not use beta_1 and beta_T.
    """
    if args.predictor is not None and stored_predictor not in (None, args.predictor):
        raise UsageError(f"--predictor {args.predictor} contradicts the checkpoint's predictor {stored_predictor}")
    if args.mode is not None and args.mode != schedule["mode"]:
        raise UsageError(f"--mode {args.mode} contradicts the checkpoint's mode {schedule['mode']}")
    if schedule["mode"] == "cosine":
        return
    for name in ("beta_1", "beta_T"):
        given = getattr(args, name)
        if given is not None and not math.isclose(given, schedule[name], rel_tol=1e-6):
            raise UsageError(f"--{name} {given:g} contradicts the checkpoint's {name} {schedule[name]:g}")


def load_ema_weights(network, checkpoint: dict, ckpt_path) -> None:
    """Put the checkpoint's "ema_state_dict" (train.py --ema_decay) into network."""
    if "ema_state_dict" not in checkpoint:
        raise UsageError(f"--use_ema: {ckpt_path} holds no EMA weights (train with --ema_decay to save them)")
    try:
        network.load_state_dict(checkpoint["ema_state_dict"])
    except (RuntimeError, TypeError) as error:
        reason = " ".join(line.strip() for line in str(error).splitlines())  # "Error(s) in ...:" + the keys
        raise CheckpointError(f"the EMA weights of {ckpt_path} do not match its network: {reason}") from None


def image_seed(seed: int, i: int) -> int:
    """The 64-bit seed of image i's generator. numpy's SeedSequence hashes (seed, i) together, so
    no two pairs share a stream (with seed + i, image 1 of seed 5 would be image 0 of seed 6)."""
    return int(np.random.SeedSequence([seed, i]).generate_state(1, np.uint64)[0])


def image_generators(seed: int, indices, device) -> list:
    """One torch.Generator on device per image index, seeded from (seed, i) alone."""
    return [torch.Generator(device).manual_seed(image_seed(seed, i)) for i in indices]


def split_batches(num_samples: int, batch_size: int, num_processes: int) -> list:
    """The batches of each process: [[range(start, end), ...] for each process].

    The images are cut into the batches one process would sample, [0, B), [B, 2B), ..., and each
    process gets a contiguous block of them, the first processes one batch more when they do not
    divide evenly.
    """
    batches = [range(start, min(start + batch_size, num_samples)) for start in range(0, num_samples, batch_size)]
    blocks = np.array_split(np.arange(len(batches)), num_processes)
    return [[batches[k] for k in block] for block in blocks]


def describe_split(shares, batch_size: int) -> str:
    """How the images are shared, e.g. "2 processes: 256 + 244 images (batches of up to 64)"."""
    counts = [sum(len(batch) for batch in share) for share in shares]
    processes = "1 process" if len(shares) == 1 else f"{len(shares)} processes"
    return f"{processes}: {' + '.join(map(str, counts))} images (batches of up to {batch_size})"


def load_diffusion(args) -> DiffusionModule:
    """The checkpoint's model with the sampler the flags ask for; UsageError or CheckpointError
    (before anything is written) when the flags and the checkpoint do not fit."""
    ddpm = DiffusionModule(None, None)
    checkpoint = ddpm.load(args.ckpt_path)
    check_course_flags(args, checkpoint["config"]["predictor"], ddpm.var_scheduler.config)
    if args.predictor is not None:  # the checkpoint's own, or what a 2025 Lab-1 file lacks
        ddpm.predictor = args.predictor
    if args.use_ema:
        load_ema_weights(ddpm.network, checkpoint, args.ckpt_path)
    T = ddpm.var_scheduler.num_train_timesteps
    if args.sample_method != "ddpm" and args.ddim_steps > T:
        raise UsageError(f"--ddim_steps {args.ddim_steps} is more than the checkpoint's T = {T}")
    if args.use_cfg and not ddpm.network.use_cfg:
        raise UsageError(f"{args.ckpt_path} was not trained with --use_cfg: it cannot do classifier-free guidance")
    try:
        if args.sample_method in SOLVER_METHODS:
            schedule = {key: ddpm.var_scheduler.config[key] for key in ("num_train_timesteps", "beta_1", "beta_T", "mode")}
            ddpm.var_scheduler = DPMSolverScheduler(**schedule, num_inference_timesteps=args.ddim_steps,
                                                    order=args.solver_order, timestep_spacing=args.timestep_spacing,
                                                    stochastic=SOLVER_METHODS[args.sample_method])
        else:
            ddpm.var_scheduler = build_scheduler(ddpm.var_scheduler.config, args.sample_method, args.ddim_steps,
                                                 args.eta, timestep_spacing=args.timestep_spacing)
        if args.sample_method == "ddim":  # the sub-sequence stays diffusers'; sampling x_T as x_0 is refused here
            check_denoises(ddpm.var_scheduler.timesteps, args.timestep_spacing)
    except ValueError as error:
        raise UsageError(f"--ddim_steps {args.ddim_steps}: {error}") from None
    return ddpm


def prepare_save_dir(save_dir: Path, num_samples: int) -> None:
    """Create save_dir, or stop with a UsageError (nothing written) when it cannot take this
    run's images: a file, not writable, an image's name taken by a folder, or PNGs {i}.png with
    i >= num_samples from another run, which measure_fid.py would score with this run's."""
    if save_dir.exists():
        if not save_dir.is_dir():
            raise UsageError(f"--save_dir {save_dir} is a file, not a folder: choose another --save_dir")
        taken = next((path for path in map(partial(image_path, save_dir), range(num_samples)) if path.is_dir()), None)
        if taken is not None:
            raise UsageError(f"--save_dir {save_dir} holds a folder named {taken.name}: move it or choose another --save_dir")
        others = sorted(int(path.stem) for path in save_dir.glob("*.png") if path.stem.isdigit())
        others = [i for i in others if i >= num_samples]
        if others:
            raise UsageError(f"--save_dir {save_dir} holds {len(others)} images of another run ({others[0]}.png ...) "
                             f"beyond --num_samples {num_samples}, which measure_fid.py would score too: "
                             f"delete them or choose an empty --save_dir")
    try:
        save_dir.mkdir(exist_ok=True, parents=True)
        with tempfile.TemporaryFile(dir=save_dir):
            pass
    except OSError as error:
        raise UsageError(f"cannot write to --save_dir {save_dir}: {error.strerror or error}") from None


def save_png(image, path: Path) -> None:
    """A PNG written atomically: a kill or a full disk leaves the old file or none, never part of one."""
    atomic_write(path, lambda f: image.save(f, format="PNG"))


def main(args):
    check_args(args)
    ddpm = load_diffusion(args)
    save_dir = Path(args.save_dir)
    prepare_save_dir(save_dir, args.num_samples)

    # one process under plain python; N under accelerate launch or torchrun (gloo without CUDA)
    state = PartialState(cpu=not torch.cuda.is_available() or parse_flag_from_env("ACCELERATE_USE_CPU"))
    device = pick_device(args.gpu) if state.num_processes == 1 else state.device
    ddpm = ddpm.to(device).eval()
    shares = split_batches(args.num_samples, args.batch_size, state.num_processes)
    my_batches = shares[state.process_index]
    if state.is_main_process:
        print(describe_split(shares, args.batch_size), flush=True)

    num_classes = ddpm.network.config["num_classes"]

    seconds = 0.0
    for indices in tqdm(my_batches, desc="batches", disable=not state.is_main_process):
        generators = image_generators(args.seed, indices, device)
        class_label, guidance_scale = None, 1.0
        if args.use_cfg:
            class_label = torch.cat([torch.randint(1, num_classes + 1, (1,), generator=g, device=device)
                                     for g in generators])
            guidance_scale = args.cfg_scale

        # time the reverse process only: not model loading, not writing PNGs
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        samples = ddpm.sample(len(indices), class_label=class_label, guidance_scale=guidance_scale,
                              generator=generators, progress=state.is_main_process)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds += time.perf_counter() - start

        for i, img in zip(indices, tensor_to_pil_image(samples)):
            save_png(img, image_path(save_dir, i))

    seconds_per_process = gather_object([seconds])  # waits for every process
    if state.is_main_process:
        summary = {
            "ckpt_path": str(args.ckpt_path),
            "sample_method": args.sample_method,
            "ddim_steps": args.ddim_steps,
            "eta": args.eta,
            "solver_order": args.solver_order if args.sample_method in SOLVER_METHODS else None,
            "timestep_spacing": args.timestep_spacing,
            "num_samples": args.num_samples,
            "seed": args.seed,
            "use_ema": args.use_ema,
            "num_processes": state.num_processes,
            "seconds": sum(seconds_per_process),
            "seconds_per_process": seconds_per_process,
        }
        atomic_write_text(save_dir / SUMMARY_FILE, json.dumps(summary, indent=2))
        print(f"Saved {args.num_samples} images to {save_dir} ({summary['seconds']:.1f} s of sampling"
              + (f" over {state.num_processes} processes)" if state.num_processes > 1 else ")"))


def parse_args(argv=None):
    parser = ArgumentParser(
        description="Sample images from a checkpoint written by train.py, or by the course's code (Lab 1).",
        epilog="--predictor, --mode, --beta_1, --beta_T: the checkpoint's values are used; a flag that "
               "contradicts them stops the run. Several processes: accelerate launch or torchrun.")
    parser.add_argument("--ckpt_path", required=True,
                        help="checkpoint: last.ckpt written by train.py, or a course (Lab-1) checkpoint")
    parser.add_argument("--save_dir", required=True, help="output folder for {i}.png and sampling.json")
    parser.add_argument("--sample_method", choices=("ddpm", "ddim", *SOLVER_METHODS), default="ddpm",
                        help="ddpm: all T steps; ddim: --ddim_steps steps with stochasticity --eta; dpm_solver, "
                             "sde_dpm_solver: DPM-Solver++ (ODE) or SDE-DPM-Solver++ of order --solver_order with "
                             "--ddim_steps network calls (eta unused)")
    parser.add_argument("--ddim_steps", type=int, default=50,
                        help="number of DDIM steps, or of DPM-Solver++ network calls (1..T)")
    parser.add_argument("--solver_order", type=int, choices=SOLVER_ORDERS, default=2,
                        help="DPM-Solver++ order (1 is DDIM with eta 0, for the SDE eta 1; 2 is DPM-Solver++(2M); "
                             "the SDE solver takes 1 or 2)")
    parser.add_argument("--eta", type=float, default=0.0, help="DDIM eta in [0, 1]: 0 deterministic, 1 DDPM-like noise")
    parser.add_argument("--timestep_spacing", choices=SOLVER_SPACINGS, default="leading",
                        help="which timesteps (see scheduler.ddim_sub_sequence); leading is the course's; "
                             "the DPM-Solver++ methods also take logsnr (evenly spaced in log-SNR)")
    parser.add_argument("--predictor", choices=PREDICTORS, default=None,
                        help="what the network predicts (course default: noise)")
    parser.add_argument("--mode", choices=SCHEDULES, default=None, help="beta schedule (course default: linear)")
    parser.add_argument("--beta_1", type=float, default=None, help="first beta (course default: 1e-4)")
    parser.add_argument("--beta_T", type=float, default=None, help="last beta (course default: 0.02)")
    parser.add_argument("--num_samples", type=int, default=500, help="number of images to generate")
    parser.add_argument("--batch_size", type=int, default=64, help="images sampled at once (by each process)")
    parser.add_argument("--seed", type=int, default=63, help="random seed: image i depends on (seed, i) alone")
    parser.add_argument("--use_cfg", action="store_true",
                        help="classifier-free guidance with random class labels (needs a --use_cfg checkpoint)")
    parser.add_argument("--cfg_scale", type=float, default=7.5, help="guidance scale w (1 = conditional only)")
    parser.add_argument("--use_ema", action="store_true",
                        help="sample with the checkpoint's EMA weights (saved by train.py --ema_decay)")
    parser.add_argument("--gpu", type=int, default=0,
                        help="CUDA device of a single process (several processes: each its own)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    run(main, parse_args(), ERRORS)
    PartialState().destroy_process_group()  # here, not in main: a process may run main more than once
