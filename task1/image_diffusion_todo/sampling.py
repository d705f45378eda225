"""Sample images from a trained checkpoint with DDPM or DDIM.

    python sampling.py --ckpt_path CKPT --save_dir SAVE_DIR --sample_method ddim --ddim_steps 50 --eta 0.0

Writes SAVE_DIR/{i}.png for i = 0..num_samples-1 and SAVE_DIR/sampling.json. The checkpoint may be
one train.py wrote or a course (Lab-1) file (read without running code from it, see
course_checkpoint.py). The noise schedule (T, betas, schedule mode) and the predictor come from
the checkpoint: the course's flags --predictor, --mode, --beta_1, --beta_T may repeat them, a flag
that contradicts the checkpoint stops the run, and --predictor fills in what a 2025 Lab-1 file
lacks. The same flags and --seed give the same images.
"""
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from cli import ArgumentParser, UsageError, pick_device, run, atomic_write_text
from dataset import tensor_to_pil_image
from model import CheckpointError, DiffusionModule
from scheduler import PREDICTORS, SCHEDULES, TIMESTEP_SPACINGS, build_scheduler
from tqdm import tqdm


def check_args(args):
    if args.ddim_steps < 1:
        raise UsageError(f"--ddim_steps must be >= 1, got {args.ddim_steps}")
    if not 0 <= args.eta <= 1:
        raise UsageError(f"--eta must be in [0, 1], got {args.eta}")
    if args.num_samples < 1 or args.batch_size < 1:
        raise UsageError("--num_samples and --batch_size must be >= 1")


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


def main(args):
    check_args(args)
    device = pick_device(args.gpu)

    ddpm = DiffusionModule(None, None)
    checkpoint = ddpm.load(args.ckpt_path)
    check_course_flags(args, checkpoint["config"]["predictor"], ddpm.var_scheduler.config)
    if args.predictor is not None:  # the checkpoint's own, or what a 2025 Lab-1 file lacks
        ddpm.predictor = args.predictor
    T = ddpm.var_scheduler.num_train_timesteps
    if args.sample_method == "ddim" and args.ddim_steps > T:
        raise UsageError(f"--ddim_steps {args.ddim_steps} is more than the checkpoint's T = {T}")
    if args.use_cfg and not ddpm.network.use_cfg:
        raise UsageError(f"{args.ckpt_path} was not trained with --use_cfg: it cannot do classifier-free guidance")
    ddpm.var_scheduler = build_scheduler(ddpm.var_scheduler.config, args.sample_method, args.ddim_steps, args.eta,
                                         timestep_spacing=args.timestep_spacing)
    ddpm = ddpm.to(device).eval()
    num_steps = len(ddpm.var_scheduler.timesteps)
    if args.sample_method == "ddim" and num_steps < args.ddim_steps:
        print(f"{args.timestep_spacing} spacing repeats timesteps at {args.ddim_steps} steps: "
              f"taking the {num_steps} distinct ones")

    save_dir = Path(args.save_dir)
    save_dir.mkdir(exist_ok=True, parents=True)
    generator = torch.Generator(device).manual_seed(args.seed)
    num_classes = ddpm.network.config["num_classes"]

    seconds = 0.0
    num_batches = int(np.ceil(args.num_samples / args.batch_size))
    for i in tqdm(range(num_batches), desc="batches"):
        sidx = i * args.batch_size
        eidx = min(sidx + args.batch_size, args.num_samples)
        B = eidx - sidx

        class_label, guidance_scale = None, 1.0
        if args.use_cfg:
            class_label = torch.randint(1, num_classes + 1, (B,), generator=generator, device=device)
            guidance_scale = args.cfg_scale

        # time the reverse process only: not model loading, not writing PNGs
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        samples = ddpm.sample(B, class_label=class_label, guidance_scale=guidance_scale, generator=generator)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds += time.perf_counter() - start

        for j, img in zip(range(sidx, eidx), tensor_to_pil_image(samples)):
            img.save(save_dir / f"{j}.png")

    summary = {
        "ckpt_path": str(args.ckpt_path),
        "sample_method": args.sample_method,
        "ddim_steps": args.ddim_steps,
        "eta": args.eta,
        "timestep_spacing": args.timestep_spacing,
        "num_samples": args.num_samples,
        "seed": args.seed,
        "seconds": seconds,
    }
    atomic_write_text(save_dir / "sampling.json", json.dumps(summary, indent=2))
    print(f"Saved {args.num_samples} images to {save_dir} ({seconds:.1f} s of sampling)")


def parse_args(argv=None):
    parser = ArgumentParser(
        description="Sample images from a checkpoint written by train.py, or by the course's code (Lab 1).",
        epilog="--predictor, --mode, --beta_1 and --beta_T are the course's flags. The checkpoint's values "
               "are used: a flag that contradicts them stops the run; --predictor fills in what a 2025 "
               "Lab-1 file does not record (default then: noise).")
    parser.add_argument("--ckpt_path", required=True,
                        help="checkpoint: last.ckpt written by train.py, or a course (Lab-1) checkpoint")
    parser.add_argument("--save_dir", required=True, help="output folder for {i}.png and sampling.json")
    parser.add_argument("--sample_method", choices=("ddpm", "ddim"), default="ddpm",
                        help="ddpm: all T steps; ddim: --ddim_steps steps with stochasticity --eta")
    parser.add_argument("--ddim_steps", type=int, default=50, help="number of DDIM steps (1..T)")
    parser.add_argument("--eta", type=float, default=0.0, help="DDIM eta in [0, 1]: 0 deterministic, 1 DDPM-like noise")
    parser.add_argument("--timestep_spacing", choices=TIMESTEP_SPACINGS, default="leading",
                        help="which DDIM steps: leading (the course's: multiples of T//S from 0), linspace "
                             "(0 to T-1), trailing (from T-1 down), quadratic (dense near 0, the DDIM paper's)")
    parser.add_argument("--predictor", choices=PREDICTORS, default=None,
                        help="what the network predicts (course default: noise)")
    parser.add_argument("--mode", choices=SCHEDULES, default=None, help="beta schedule (course default: linear)")
    parser.add_argument("--beta_1", type=float, default=None, help="first beta (course default: 1e-4)")
    parser.add_argument("--beta_T", type=float, default=None, help="last beta (course default: 0.02)")
    parser.add_argument("--num_samples", type=int, default=500, help="number of images to generate")
    parser.add_argument("--batch_size", type=int, default=64, help="images sampled at once")
    parser.add_argument("--seed", type=int, default=63, help="random seed (same seed, same images)")
    parser.add_argument("--use_cfg", action="store_true",
                        help="classifier-free guidance with random class labels (needs a --use_cfg checkpoint; "
                             "without it, a class-conditional checkpoint samples with the null label)")
    parser.add_argument("--cfg_scale", type=float, default=7.5, help="guidance scale w (1 = conditional only)")
    parser.add_argument("--gpu", type=int, default=0, help="CUDA device index (the CPU is used without CUDA)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    run(main, parse_args(), (UsageError, CheckpointError))
