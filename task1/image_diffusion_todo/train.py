"""Train a DDPM on AFHQ (or any folder in AFHQ's layout), on one device or several.

    python train.py                                   # the course run: 64x64, 100k steps
    python train.py --save_dir results/run1 --resume  # continue from results/run1/last.ckpt
    python train.py --image_resolution 32 --ch 32 --ch_mult 1 2 2 --num_res_blocks 1 \\
        --sample_method ddim --train_num_steps 2000   # a small model that trains on a CPU
    accelerate launch --multi_gpu --num_processes 4 train.py --mixed_precision bf16 --ema_decay 0.9999
    torchrun --nproc_per_node 4 train.py ...          # the same without accelerate's launcher

Several processes (`accelerate launch`, `torchrun`) train one model data-parallel through accelerate:
--batch_size is the global batch of one optimizer step, as in the course, split evenly over the
processes (and over --gradient_accumulation_steps micro-batches), so the run follows the same recipe
on any number of GPUs. The main process alone logs, plots and writes files; the others wait.

Outputs in SAVE_DIR: config.json; at step 0 and every --log_interval steps (and at the last step)
samples_step<N>.png (a grid of samples) and trajectory_step<N>.png (x_T ... x_0 of the first
sample, as the course's train.py draws), then from step 1 on loss.png and last.ckpt (atomically:
config + tensors only). last.ckpt holds "state_dict" (the trained weights), with --ema_decay also
"ema_state_dict" (their exponential moving average, same keys), and "train_state": what --resume
needs to continue exactly where the run stopped (optimizer, learning-rate schedule, the losses,
the run's flags and every process's random generators).
"""
import copy
import itertools
import json
import math
import os
import random
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Optional

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed
from atomic_write import atomic_write_text
from cli import ArgumentParser, UsageError, pick_device, run
from dataset import DEFAULT_ROOT, AFHQDataModule, DatasetError, download_afhq
from model import CheckpointError, DiffusionModule, load_checkpoint
from network import UNet
from scheduler import PREDICTORS, SCHEDULES, DDPMScheduler, build_scheduler
from torchvision.utils import make_grid, save_image
from tqdm import tqdm

matplotlib.use("Agg")

NUM_GRID_SAMPLES = 4
GRID_DDIM_STEPS = 50
TRAJECTORY_FRAMES = 10
# Flags a --resume may change. Every other flag is the run's recipe (model, noise schedule, data,
# optimisation, seed): on --resume the checkpoint's value wins, and a note names what differed.
ERRORS = (UsageError, DatasetError, CheckpointError, OSError)  # what the script reports as one line (cli.run)
RESUME_MAY_CHANGE = ("train_num_steps", "log_interval", "sample_method", "data_root", "save_dir", "resume", "gpu",
                     "num_workers", "mixed_precision", "gradient_accumulation_steps")


def get_current_time():
    return datetime.now().strftime("%m-%d-%H%M%S")


def check_args(args):
    positive = ["batch_size", "log_interval", "num_diffusion_train_timesteps", "image_resolution", "ch",
                "num_res_blocks", "warmup_steps", "gradient_accumulation_steps"]
    for name in positive:
        if getattr(args, name) < 1:
            raise UsageError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.train_num_steps < 0:
        raise UsageError(f"--train_num_steps must be >= 0, got {args.train_num_steps}")
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise UsageError(f"--lr must be a finite number > 0, got {args.lr}")
    if args.num_workers < 0:
        raise UsageError(f"--num_workers must be >= 0 (0: load data in the main process), got {args.num_workers}")
    if min(args.ch_mult) < 1:
        raise UsageError(f"--ch_mult values must be >= 1, got {args.ch_mult}")
    if args.save_dir is not None and Path(args.save_dir).exists() and not Path(args.save_dir).is_dir():
        raise UsageError(f"--save_dir {args.save_dir} is a file, not a folder: choose another --save_dir")
    if not 0 < args.beta_1 <= args.beta_T < 1:
        raise UsageError(f"need 0 < --beta_1 <= --beta_T < 1, got {args.beta_1}, {args.beta_T}")
    if not 0 <= args.cfg_dropout < 1 or not 0 <= args.dropout < 1:
        raise UsageError("--dropout and --cfg_dropout must be in [0, 1)")
    if args.ch % 32:
        raise UsageError(f"--ch must be a multiple of 32 (GroupNorm uses 32 groups), got {args.ch}")
    if args.image_resolution % 2 ** (len(args.ch_mult) - 1):
        raise UsageError(f"--image_resolution {args.image_resolution} must be divisible by "
                         f"2^(len(--ch_mult) - 1) = {2 ** (len(args.ch_mult) - 1)}")
    if any(not 0 <= level < len(args.ch_mult) for level in args.attn):
        raise UsageError(f"--attn levels {args.attn} must index --ch_mult (0..{len(args.ch_mult) - 1})")
    if args.ema_decay is not None and not 0 < args.ema_decay < 1:
        raise UsageError(f"--ema_decay must be in (0, 1), got {args.ema_decay}")
    # as in Task 2: no flag means what `accelerate launch --mixed_precision` says, else no
    args.mixed_precision = args.mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if args.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise UsageError("--mixed_precision fp16 needs a CUDA GPU; use bf16 or no on a CPU")


def make_accelerator(args) -> Accelerator:
    """One process (python train.py) or one per device (accelerate launch, torchrun), with mixed
    precision and gradient accumulation as the flags say. Without CUDA every process uses the CPU."""
    cuda = torch.cuda.is_available()
    if cuda and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        torch.cuda.set_device(pick_device(args.gpu))
    accelerator = Accelerator(cpu=not cuda, mixed_precision=args.mixed_precision,
                              gradient_accumulation_steps=args.gradient_accumulation_steps)
    if accelerator.num_processes > 1 and args.gpu != 0:
        raise UsageError("--gpu picks the GPU of a single process; with several processes each uses its own "
                         "(choose them with CUDA_VISIBLE_DEVICES)")
    return accelerator


def micro_batch_size(args, num_processes) -> int:
    """Images per process and micro-batch: the global --batch_size split evenly."""
    shares = num_processes * args.gradient_accumulation_steps
    if args.batch_size % shares:
        raise UsageError(f"--batch_size {args.batch_size} (the global batch) must be divisible by the number of "
                         f"processes x --gradient_accumulation_steps = {num_processes} x "
                         f"{args.gradient_accumulation_steps}")
    return args.batch_size // shares


def take_recipe_from_checkpoint(args, saved_flags: dict) -> list:
    """Set every recipe flag (see RESUME_MAY_CHANGE) to the checkpoint's value; returns the notes
    ("--lr 0.001 (this command said 0.0002)") for those that differed."""
    notes = []
    for name, saved in saved_flags.items():
        if name in RESUME_MAY_CHANGE or not hasattr(args, name) or getattr(args, name) == saved:
            continue
        notes.append(f"--{name} {saved} (this command said {getattr(args, name)})")
        setattr(args, name, saved)
    return notes


def build_model(args, num_classes) -> DiffusionModule:
    var_scheduler = DDPMScheduler(args.num_diffusion_train_timesteps, beta_1=args.beta_1, beta_T=args.beta_T,
                                  mode=args.mode)
    network = UNet(
        T=args.num_diffusion_train_timesteps,
        image_resolution=args.image_resolution,
        ch=args.ch,
        ch_mult=args.ch_mult,
        attn=args.attn,
        num_res_blocks=args.num_res_blocks,
        dropout=args.dropout,
        use_cfg=args.use_cfg,
        cfg_dropout=args.cfg_dropout,
        num_classes=num_classes if args.use_cfg else None,
    )
    return DiffusionModule(network, var_scheduler, predictor=args.predictor)


class GlobalBatchSampler(torch.utils.data.Sampler):
    """The image indices one process trains on, batch after batch, without end.

    The dataset is shuffled once per epoch by a generator of its own (seeded with `seed`), the
    epochs are laid end to end, and the stream is cut into global batches of `global_batch` images,
    one per optimizer step. Each global batch is cut into num_processes x accumulation_steps equal
    slices; process p takes slice a * num_processes + p at micro-step a. So the images of a step do
    not depend on the number of processes, and a run resumed at step s (start_step=s) gets exactly
    the batches the uninterrupted run would have got.
    """

    def __init__(self, num_images, global_batch, num_processes, process_index, accumulation_steps, seed,
                 start_step=0):
        self.num_images, self.global_batch, self.seed, self.start_step = num_images, global_batch, seed, start_step
        self.slice_size = global_batch // (num_processes * accumulation_steps)
        self.slices = [a * num_processes + process_index for a in range(accumulation_steps)]

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed)
        epoch, order = -1, []
        for step in itertools.count(self.start_step):
            for slice_index in self.slices:
                first = step * self.global_batch + slice_index * self.slice_size
                batch = []
                for position in range(first, first + self.slice_size):
                    while position // self.num_images > epoch:  # positions only grow: draw the next epoch's order
                        epoch, order = epoch + 1, torch.randperm(self.num_images, generator=generator).tolist()
                    batch.append(order[position % self.num_images])
                yield batch


@torch.no_grad()
def update_ema(ema_network, network, decay):
    """theta_ema <- decay * theta_ema + (1 - decay) * theta, parameter by parameter (the UNet has no buffers)."""
    for ema_parameter, parameter in zip(ema_network.parameters(), network.parameters()):
        ema_parameter.lerp_(parameter, 1 - decay)


def rng_state() -> dict:
    """This process's random generators, as tensors and plain values (they load with weights_only=True)."""
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached_gaussian),
        "python": random.getstate(),
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    kind, keys, position, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached_gaussian))
    random.setstate(state["python"])


def save_loss_plot(losses, path):
    plt.figure(figsize=(6, 4))
    plt.plot(np.arange(1, len(losses) + 1), losses, linewidth=0.5)
    plt.xlabel("step")
    plt.ylabel("loss")
    plt.yscale("log")
    plt.tight_layout()
    plt.savefig(path)
    plt.close()


def save_samples(network, diffusion: DiffusionModule, args, num_classes, step, save_dir):
    """Sample NUM_GRID_SAMPLES images with `network` (the same x_T every time, so the figures show
    progress): a grid of them, and a strip of TRAJECTORY_FRAMES moments x_T ... x_0 of the first."""
    var_scheduler = diffusion.var_scheduler
    if args.sample_method == "ddim":
        ddim_steps = min(GRID_DDIM_STEPS, var_scheduler.num_train_timesteps)
        var_scheduler = build_scheduler(var_scheduler.config, "ddim", ddim_steps).to(diffusion.device)
    grid_diffusion = DiffusionModule(network, var_scheduler, predictor=diffusion.predictor)
    generator = torch.Generator(grid_diffusion.device).manual_seed(args.seed)
    class_label = None
    if network.use_cfg:
        class_label = torch.arange(NUM_GRID_SAMPLES, device=grid_diffusion.device) % num_classes + 1
    network.eval()
    trajectory = grid_diffusion.sample(NUM_GRID_SAMPLES, return_traj=True, class_label=class_label, generator=generator)
    network.train()

    def to_unit(images):
        return (images.cpu() * 0.5 + 0.5).clamp(0, 1)

    save_image(make_grid(to_unit(trajectory[-1]), nrow=NUM_GRID_SAMPLES), save_dir / f"samples_step{step:07d}.png")
    frames = np.linspace(0, len(trajectory) - 1, TRAJECTORY_FRAMES).round().astype(int)
    strip = torch.stack([to_unit(trajectory[i][0]) for i in frames])
    save_image(make_grid(strip, nrow=TRAJECTORY_FRAMES), save_dir / f"trajectory_step{step:07d}.png")


def read_checkpoint_to_resume(args, ckpt_path: Path):
    """(the checkpoint, notes on the recipe flags it overrides) for --resume; (None, []) for a new
    run, which must not write over an earlier run's last.ckpt."""
    if not args.resume:
        if ckpt_path.exists():
            raise UsageError(f"{ckpt_path} already exists: pass --resume to continue it, or choose another --save_dir")
        return None, []
    if args.save_dir is None:
        raise UsageError("--resume needs --save_dir (the folder holding last.ckpt)")
    checkpoint = load_checkpoint(ckpt_path)
    if "train_state" not in checkpoint:
        raise CheckpointError(f"{ckpt_path} has no training state to resume from")
    return checkpoint, take_recipe_from_checkpoint(args, checkpoint["train_state"].get("flags", {}))


def load_data(args, accelerator) -> AFHQDataModule:
    """The training data; the main process downloads AFHQ if needed, the others then read it."""
    with accelerator.main_process_first():
        if not Path(args.data_root).exists() and args.data_root == DEFAULT_ROOT:
            print(f"{args.data_root} does not exist: downloading AFHQ")
            download_afhq(args.data_root)
        if not Path(args.data_root).is_dir():
            raise DatasetError(f"data folder not found: {args.data_root}")
        return AFHQDataModule(batch_size=args.batch_size, num_workers=args.num_workers,
                              max_num_images_per_cat=args.max_num_images_per_cat,
                              image_resolution=args.image_resolution, afhq_root=args.data_root)


def resumed_or_new_model(args, checkpoint, ckpt_path, num_classes) -> DiffusionModule:
    """The checkpoint's model for --resume (checked against the data and flags), else a new one."""
    if checkpoint is None:
        return build_model(args, num_classes)
    diffusion = DiffusionModule(None, None)
    diffusion.load(ckpt_path)
    if diffusion.image_resolution != args.image_resolution:
        raise UsageError(f"{ckpt_path} was trained at {diffusion.image_resolution}x{diffusion.image_resolution}, "
                         f"not --image_resolution {args.image_resolution}")
    if diffusion.network.use_cfg and diffusion.network.config["num_classes"] != num_classes:
        raise UsageError(f"{ckpt_path} has {diffusion.network.config['num_classes']} classes, "
                         f"{args.data_root} has {num_classes}")
    return diffusion


@dataclass
class TrainState:
    """What an optimizer step changes besides the weights, and what --resume restores."""
    optimizer: torch.optim.Optimizer
    lr_scheduler: torch.optim.lr_scheduler.LambdaLR
    ema_network: Optional[torch.nn.Module]
    step: int = 0
    losses: list = field(default_factory=list)


def make_train_state(args, network, checkpoint) -> TrainState:
    """Adam with a linear warm-up over --warmup_steps, then constant; the EMA copy with
    --ema_decay; all as the checkpoint left them on --resume."""
    optimizer = torch.optim.Adam(network.parameters(), lr=args.lr)
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda=lambda t: min((t + 1) / args.warmup_steps, 1.0))
    ema_network = copy.deepcopy(network).requires_grad_(False) if args.ema_decay else None
    state = TrainState(optimizer, lr_scheduler, ema_network)
    if checkpoint is not None:
        saved = checkpoint["train_state"]
        optimizer.load_state_dict(saved["optimizer"])
        lr_scheduler.load_state_dict(saved["lr_scheduler"])
        state.step, state.losses = saved["step"], saved["losses"].tolist()
    return state


def restore_rng_states(accelerator, checkpoint, args, step) -> None:
    """This process's random generators as the checkpoint saved them (same number of processes),
    else afresh from --seed + step."""
    rng_states = checkpoint["train_state"].get("rng_states", [])
    if len(rng_states) == accelerator.num_processes:
        set_rng_state(rng_states[accelerator.process_index])
        return
    accelerator.print(f"note: the checkpoint holds the random generators of {len(rng_states)} process(es), "
                      f"this run has {accelerator.num_processes}: they start afresh from --seed + step")
    set_seed(args.seed + step, device_specific=True)


def describe_run(args, num_processes, per_process_batch) -> str:
    return (f"{num_processes} process{'es' if num_processes > 1 else ''}, global batch {args.batch_size} = "
            f"{args.batch_size // num_processes} per process"
            + (f" in {args.gradient_accumulation_steps} micro-batches of {per_process_batch}"
               if args.gradient_accumulation_steps > 1 else "")
            + (f", mixed precision {args.mixed_precision}" if args.mixed_precision != "no" else "")
            + (f", EMA decay {args.ema_decay}" if args.ema_decay else ""))


def save_checkpoint(diffusion, state: TrainState, rng_states, accelerator, args, ckpt_path) -> None:
    """last.ckpt: the weights, the EMA weights, and everything --resume needs."""
    train_state = {
        "step": state.step,
        "losses": torch.tensor(state.losses),
        "optimizer": state.optimizer.state_dict(),
        "lr_scheduler": state.lr_scheduler.state_dict(),
        "rng_states": rng_states,
        "flags": {name: value for name, value in vars(args).items() if name not in RESUME_MAY_CHANGE},
    }
    if accelerator.scaler is not None:
        train_state["grad_scaler"] = accelerator.scaler.state_dict()
    extra = {"train_state": train_state}
    if state.ema_network is not None:
        extra["ema_state_dict"] = state.ema_network.state_dict()
    diffusion.save(ckpt_path, extra=extra)


def train_steps(diffusion, training_diffusion, state: TrainState, batches, accelerator, args, save_dir, num_classes):
    """Optimizer steps up to --train_num_steps; every --log_interval steps (and at the last) the
    loss plot, the sample figures and last.ckpt. training_diffusion wraps the same weights in
    DDP and autocast; diffusion is what is saved and sampled."""
    network, device = diffusion.network, accelerator.device
    interval_start, interval_first_step = time.perf_counter(), state.step
    with tqdm(initial=state.step, total=args.train_num_steps, disable=not accelerator.is_main_process) as pbar:
        while state.step < args.train_num_steps:
            step_loss = 0.0
            for _ in range(args.gradient_accumulation_steps):
                img, label = next(batches)
                img, label = img.to(device), label.to(device)
                with accelerator.accumulate(training_diffusion.network):
                    loss = training_diffusion.get_loss(img, class_label=label if network.use_cfg else None)
                    accelerator.backward(loss)  # divides by the accumulation steps; all-reduces on the last one
                    state.optimizer.step()  # acts on the last micro-batch only (accelerate skips the others)
                    state.optimizer.zero_grad(set_to_none=True)
                step_loss = step_loss + loss.detach() / args.gradient_accumulation_steps
            state.lr_scheduler.step()
            if state.ema_network is not None:
                update_ema(state.ema_network, network, args.ema_decay)
            state.losses.append(accelerator.reduce(step_loss, "mean").item())  # the mean over all processes
            state.step += 1
            pbar.set_description(f"loss {state.losses[-1]:.4f}")
            pbar.update(1)

            if state.step % args.log_interval == 0 or state.step == args.train_num_steps:
                saving_start = time.perf_counter()
                rng_states = gather_object([rng_state()])  # every process's, in process order
                if accelerator.is_main_process:
                    save_loss_plot(state.losses, save_dir / "loss.png")
                    save_samples(state.ema_network or network, diffusion, args, num_classes, state.step, save_dir)
                    save_checkpoint(diffusion, state, rng_states, accelerator, args, save_dir / "last.ckpt")
                accelerator.wait_for_everyone()
                now = time.perf_counter()
                seconds_per_step = (saving_start - interval_start) / (state.step - interval_first_step)
                if accelerator.is_main_process:
                    tqdm.write(f"step {state.step}: loss {state.losses[-1]:.4f}, {seconds_per_step:.3f} s per "
                               f"training step (mean of the last {state.step - interval_first_step}); samples "
                               f"and checkpoint {now - saving_start:.1f} s")
                interval_start, interval_first_step = now, state.step


def main(args):
    check_args(args)
    save_dir = Path(args.save_dir or f"results/diffusion-{get_current_time()}")
    ckpt_path = save_dir / "last.ckpt"
    checkpoint, notes = read_checkpoint_to_resume(args, ckpt_path)  # everything that can fail, before writing

    accelerator = make_accelerator(args)
    num_processes, device = accelerator.num_processes, accelerator.device
    per_process_batch = micro_batch_size(args, num_processes)
    if notes:
        accelerator.print(f"note: --resume keeps the checkpoint's {', '.join(notes)}")
    data = load_data(args, accelerator)

    # process p draws its timesteps, noise and dropout from seed + p (process 0: the seed itself)
    set_seed(args.seed, device_specific=True)
    diffusion = resumed_or_new_model(args, checkpoint, ckpt_path, data.num_classes).to(device).train()
    state = make_train_state(args, diffusion.network, checkpoint)
    # DDP (gradients averaged over the processes) and autocast around the same weights:
    # diffusion.network stays the plain UNet, which is saved, sampled and averaged into the EMA.
    ddp_network, state.optimizer = accelerator.prepare(diffusion.network, state.optimizer)
    training_diffusion = DiffusionModule(ddp_network, diffusion.var_scheduler, predictor=diffusion.predictor)
    if accelerator.scaler is not None and checkpoint is not None and "grad_scaler" in checkpoint["train_state"]:
        accelerator.scaler.load_state_dict(checkpoint["train_state"]["grad_scaler"])
    if state.ema_network is not None:
        # the checkpoint's average, or the weights DDP has just copied from process 0 to all
        saved_ema = checkpoint.get("ema_state_dict") if checkpoint is not None else None
        state.ema_network.load_state_dict(saved_ema if saved_ema is not None else diffusion.network.state_dict())

    batch_sampler = GlobalBatchSampler(len(data.train_ds), args.batch_size, num_processes, accelerator.process_index,
                                       args.gradient_accumulation_steps, args.seed, start_step=state.step)
    # the loader's own generator seeds its workers, so data loading leaves the global generators alone
    loader = torch.utils.data.DataLoader(data.train_ds, batch_sampler=batch_sampler, num_workers=args.num_workers,
                                         generator=torch.Generator().manual_seed(args.seed))
    batches = iter(loader)
    if checkpoint is not None:
        restore_rng_states(accelerator, checkpoint, args, state.step)

    accelerator.print(describe_run(args, num_processes, per_process_batch))
    if accelerator.is_main_process:
        save_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temporary_checkpoints(save_dir)
        print(f"save_dir: {save_dir}" + (f" (resuming at step {state.step})" if checkpoint is not None else ""))
        if checkpoint is None:
            config = {**vars(args), "save_dir": str(save_dir), "num_processes": num_processes, "model": diffusion.config}
            atomic_write_text(save_dir / "config.json", json.dumps(config, indent=2))
            save_samples(state.ema_network or diffusion.network, diffusion, args, data.num_classes, 0, save_dir)
    accelerator.wait_for_everyone()
    train_steps(diffusion, training_diffusion, state, batches, accelerator, args, save_dir, data.num_classes)
    accelerator.end_training()


def remove_stale_temporary_checkpoints(save_dir: Path) -> None:
    """atomic_write removes its temporary file on an error or Ctrl-C; a killed run (SIGKILL, power
    loss) leaves it: a full-size .last.ckpt.*.tmp, removed here (one run writes to a save_dir at a time)."""
    for stale in save_dir.glob(".last.ckpt.*.tmp"):
        stale.unlink(missing_ok=True)


def default_num_workers() -> int:
    """The course's 4 DataLoader workers, fewer on a machine with fewer cores: more would only wait for
    a core, and torch warns that they may freeze. The images do not depend on it (no random transforms)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(4, cores)


def parse_args(argv=None):
    may_change = ", ".join("--" + name for name in RESUME_MAY_CHANGE if name not in ("save_dir", "resume"))
    parser = ArgumentParser(description="Train a DDPM on AFHQ (or any folder in AFHQ's layout), on one device or, "
                                        "under `accelerate launch` / `torchrun`, data-parallel on several.")
    parser.add_argument("--gpu", type=int, default=0,
                        help="CUDA device of a single process (several processes: each its own)")
    parser.add_argument("--batch_size", type=int, default=16,
                        help="images per optimizer step over all processes (the course's global batch)")
    parser.add_argument("--train_num_steps", type=int, default=100000, help="total number of optimizer steps")
    parser.add_argument("--warmup_steps", type=int, default=200, help="steps of linear learning-rate warm-up")
    parser.add_argument("--log_interval", type=int, default=200,
                        help="steps between sample figures, loss plot and last.ckpt")
    parser.add_argument("--lr", type=float, default=2e-4, help="Adam learning rate")
    parser.add_argument("--max_num_images_per_cat", type=int, default=3000,
                        help="max number of training images per class (-1 = all)")
    parser.add_argument("--num_diffusion_train_timesteps", type=int, default=1000,
                        help="T, the number of diffusion steps")
    parser.add_argument("--beta_1", type=float, default=1e-4, help="first beta of the noise schedule")
    parser.add_argument("--beta_T", type=float, default=0.02, help="last beta of the noise schedule")
    parser.add_argument("--mode", choices=SCHEDULES, default="linear", help="beta schedule")
    parser.add_argument("--predictor", choices=PREDICTORS, default="noise",
                        help="what the network predicts: the noise, x_0, or the posterior mean")
    parser.add_argument("--seed", type=int, default=63,
                        help="random seed (the data order; process p draws its noise from seed + p)")
    parser.add_argument("--image_resolution", type=int, default=64, help="training image size in pixels")
    parser.add_argument("--sample_method", choices=("ddpm", "ddim"), default="ddpm",
                        help=f"sampler for the periodic sample grid (ddim: {GRID_DDIM_STEPS} steps, eta 0)")
    parser.add_argument("--use_cfg", action="store_true", help="train class-conditional, for classifier-free guidance")
    parser.add_argument("--cfg_dropout", type=float, default=0.1,
                        help="probability of dropping the class label (CFG training)")
    parser.add_argument("--data_root", default=DEFAULT_ROOT,
                        help="folder in AFHQ's layout: {train,val}/<class>/*.png|jpg "
                             f"(AFHQ is downloaded when the default {DEFAULT_ROOT} is missing)")
    parser.add_argument("--save_dir", default=None, help="output folder (default: results/diffusion-<timestamp>)")
    parser.add_argument("--resume", action="store_true",
                        help="continue exactly from SAVE_DIR/last.ckpt with its recipe; only "
                             f"{may_change} may change")
    parser.add_argument("--ch", type=int, default=128, help="UNet base channels")
    parser.add_argument("--ch_mult", type=int, nargs="+", default=[1, 2, 2, 2],
                        help="UNet channel multiplier per resolution level")
    parser.add_argument("--attn", type=int, nargs="*", default=[1], help="UNet levels with self-attention")
    parser.add_argument("--num_res_blocks", type=int, default=4, help="UNet residual blocks per level")
    parser.add_argument("--dropout", type=float, default=0.1, help="UNet dropout")
    parser.add_argument("--num_workers", type=int, default=default_num_workers(),
                        help="DataLoader worker processes per process (default: the course's 4, or the number "
                             "of CPU cores where fewer)")

    extra = parser.add_argument_group("beyond the course (GPU speed, several GPUs)")
    extra.add_argument("--mixed_precision", choices=("no", "fp16", "bf16"), default=None,
                       help="autocast the UNet (fp16 needs CUDA); default: accelerate's setting, else no")
    extra.add_argument("--ema_decay", type=float, default=None,
                       help="keep an EMA of the weights with this decay (e.g. 0.9999), saved and sampled; off by default")
    extra.add_argument("--gradient_accumulation_steps", type=int, default=1,
                       help="micro-batches per optimizer step (less memory, same recipe)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    run(main, parse_args(), ERRORS)
