"""Train a DDPM on AFHQ (or any folder in AFHQ's layout).

    python train.py                                   # the course run: 64x64, 100k steps
    python train.py --save_dir results/run1 --resume  # continue from results/run1/last.ckpt
    python train.py --image_resolution 32 --ch 32 --ch_mult 1 2 2 --num_res_blocks 1 \\
        --sample_method ddim --train_num_steps 2000   # a small model that trains on a CPU

Every --log_interval steps (and at the last step) it writes SAVE_DIR/loss.png, a grid of samples
SAVE_DIR/samples_step<N>.png and SAVE_DIR/last.ckpt (atomically: config + tensors only).
"""
import json
import random
from datetime import datetime
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import torch
from cli import ArgumentParser, UsageError, pick_device, run
from dataset import DEFAULT_ROOT, AFHQDataModule, DatasetError, download_afhq, get_data_iterator
from model import CheckpointError, DiffusionModule, load_checkpoint
from network import UNet
from scheduler import PREDICTORS, SCHEDULES, DDPMScheduler, build_scheduler
from torchvision.utils import make_grid, save_image
from tqdm import tqdm

matplotlib.use("Agg")

NUM_GRID_SAMPLES = 4
GRID_DDIM_STEPS = 50


def get_current_time():
    return datetime.now().strftime("%m-%d-%H%M%S")


def check_args(args):
    positive = ["batch_size", "log_interval", "num_diffusion_train_timesteps", "image_resolution", "ch",
                "num_res_blocks", "warmup_steps"]
    for name in positive:
        if getattr(args, name) < 1:
            raise UsageError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.train_num_steps < 0:
        raise UsageError(f"--train_num_steps must be >= 0, got {args.train_num_steps}")
    if not args.lr > 0:
        raise UsageError(f"--lr must be > 0, got {args.lr}")
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


def save_loss_plot(losses, path):
    plt.figure(figsize=(6, 4))
    plt.plot(np.arange(1, len(losses) + 1), losses, linewidth=0.5)
    plt.xlabel("step")
    plt.ylabel("loss")
    plt.yscale("log")
    plt.tight_layout()
    plt.savefig(path)
    plt.close()


def save_sample_grid(ddpm: DiffusionModule, args, num_classes, step, save_dir):
    """Sample NUM_GRID_SAMPLES images (the same x_T every time, so grids show progress) and save a grid."""
    ddpm.eval()
    ddpm_scheduler = ddpm.var_scheduler
    if args.sample_method == "ddim":
        ddim_steps = min(GRID_DDIM_STEPS, ddpm_scheduler.num_train_timesteps)
        ddpm.var_scheduler = build_scheduler(ddpm_scheduler.config, "ddim", ddim_steps).to(ddpm.device)
    generator = torch.Generator(ddpm.device).manual_seed(args.seed)
    class_label = None
    if ddpm.network.use_cfg:
        class_label = torch.arange(NUM_GRID_SAMPLES, device=ddpm.device) % num_classes + 1
    samples = ddpm.sample(NUM_GRID_SAMPLES, class_label=class_label, generator=generator)
    ddpm.var_scheduler = ddpm_scheduler
    ddpm.train()
    grid = make_grid((samples * 0.5 + 0.5).clamp(0, 1), nrow=NUM_GRID_SAMPLES)
    save_image(grid, save_dir / f"samples_step{step:07d}.png")


def main(args):
    check_args(args)
    device = pick_device(args.gpu)
    save_dir = Path(args.save_dir or f"results/diffusion-{get_current_time()}")
    ckpt_path = save_dir / "last.ckpt"

    # check everything that can fail before writing anything
    checkpoint = None
    if args.resume:
        if args.save_dir is None:
            raise UsageError("--resume needs --save_dir (the folder holding last.ckpt)")
        checkpoint = load_checkpoint(ckpt_path)
        if "train_state" not in checkpoint:
            raise CheckpointError(f"{ckpt_path} has no training state to resume from")
    elif ckpt_path.exists():
        raise UsageError(f"{ckpt_path} already exists: pass --resume to continue it, or choose another --save_dir")

    if not Path(args.data_root).exists() and args.data_root == DEFAULT_ROOT:
        print(f"{args.data_root} does not exist: downloading AFHQ")
        download_afhq(args.data_root)
    if not Path(args.data_root).is_dir():
        raise DatasetError(f"data folder not found: {args.data_root}")
    ds_module = AFHQDataModule(batch_size=args.batch_size, num_workers=args.num_workers,
                               max_num_images_per_cat=args.max_num_images_per_cat,
                               image_resolution=args.image_resolution, afhq_root=args.data_root)
    num_classes = ds_module.num_classes

    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)

    if checkpoint is not None:
        ddpm = DiffusionModule(None, None)
        ddpm.load(ckpt_path)
        if ddpm.image_resolution != args.image_resolution:
            raise UsageError(f"{ckpt_path} was trained at {ddpm.image_resolution}x{ddpm.image_resolution}, "
                             f"not --image_resolution {args.image_resolution}")
        if ddpm.network.use_cfg and ddpm.network.config["num_classes"] != num_classes:
            raise UsageError(f"{ckpt_path} has {ddpm.network.config['num_classes']} classes, "
                             f"{args.data_root} has {num_classes}")
    else:
        ddpm = build_model(args, num_classes)
    ddpm = ddpm.to(device).train()

    optimizer = torch.optim.Adam(ddpm.network.parameters(), lr=args.lr)
    # linear warm-up of the learning rate over warmup_steps, then constant
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda=lambda t: min((t + 1) / args.warmup_steps, 1.0))
    step, losses = 0, []
    if checkpoint is not None:
        state = checkpoint["train_state"]
        optimizer.load_state_dict(state["optimizer"])
        lr_scheduler.load_state_dict(state["lr_scheduler"])
        step, losses = state["step"], state["losses"].tolist()
        torch.set_rng_state(state["torch_rng"])

    save_dir.mkdir(parents=True, exist_ok=True)
    print(f"save_dir: {save_dir}" + (f" (resuming at step {step})" if checkpoint is not None else ""))
    if checkpoint is None:
        with open(save_dir / "config.json", "w") as f:
            json.dump({**vars(args), "save_dir": str(save_dir), "model": ddpm.config}, f, indent=2)

    train_it = get_data_iterator(ds_module.train_dataloader())
    with tqdm(initial=step, total=args.train_num_steps) as pbar:
        while step < args.train_num_steps:
            img, label = next(train_it)
            img, label = img.to(device), label.to(device)
            loss = ddpm.get_loss(img, class_label=label if ddpm.network.use_cfg else None)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            lr_scheduler.step()
            losses.append(loss.item())
            step += 1
            pbar.set_description(f"loss {losses[-1]:.4f}")
            pbar.update(1)

            if step % args.log_interval == 0 or step == args.train_num_steps:
                save_loss_plot(losses, save_dir / "loss.png")
                save_sample_grid(ddpm, args, num_classes, step, save_dir)
                train_state = {
                    "step": step,
                    "losses": torch.tensor(losses),
                    "optimizer": optimizer.state_dict(),
                    "lr_scheduler": lr_scheduler.state_dict(),
                    "torch_rng": torch.get_rng_state(),
                }
                ddpm.save(ckpt_path, extra={"train_state": train_state})


def parse_args(argv=None):
    parser = ArgumentParser(description="Train a DDPM on AFHQ (or any folder in AFHQ's layout).")
    parser.add_argument("--gpu", type=int, default=0, help="CUDA device index (the CPU is used without CUDA)")
    parser.add_argument("--batch_size", type=int, default=16, help="images per training step")
    parser.add_argument("--train_num_steps", type=int, default=100000, help="total number of training steps")
    parser.add_argument("--warmup_steps", type=int, default=200, help="steps of linear learning-rate warm-up")
    parser.add_argument("--log_interval", type=int, default=200,
                        help="every this many steps: loss plot, sample grid and last.ckpt")
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
    parser.add_argument("--seed", type=int, default=63, help="random seed")
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
                        help="continue training from SAVE_DIR/last.ckpt (model and noise schedule come from it)")
    parser.add_argument("--ch", type=int, default=128, help="UNet base channels")
    parser.add_argument("--ch_mult", type=int, nargs="+", default=[1, 2, 2, 2],
                        help="UNet channel multiplier per resolution level")
    parser.add_argument("--attn", type=int, nargs="*", default=[1], help="UNet levels with self-attention")
    parser.add_argument("--num_res_blocks", type=int, default=4, help="UNet residual blocks per level")
    parser.add_argument("--dropout", type=float, default=0.1, help="UNet dropout")
    parser.add_argument("--num_workers", type=int, default=4, help="DataLoader worker processes")
    return parser.parse_args(argv)


if __name__ == "__main__":
    run(main, parse_args(), (UsageError, DatasetError, CheckpointError))
