"""The command-line flags both training scripts take, and their checks, run before anything is loaded
or written.

The defaults suit one consumer GPU and the course's runs: batch 1, a constant learning rate of 1e-4 with
no warm-up, 100 epochs; the wrappers in scripts/ set the course's other values. Where the diffusers
example scripts use other defaults (batch 16 or 4, 500 warm-up steps, lr 5e-4 for DreamBooth), those
are for larger GPUs and longer runs.
"""
import math
import os
import shutil
from pathlib import Path

import torch

from checkpoints import check_resume_matches, find_checkpoint
from cli import UsageError, first_line
from images import INTERPOLATION_MODES
from lora_weights import LORA_WEIGHTS_NAME

REPORT_TO = ["tensorboard", "wandb", "comet_ml", "all", "none"]
LR_SCHEDULERS = ["linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"]


def add_common_args(parser):
    """Add the flags both training scripts take to ``parser``, in --help's groups."""
    parser.epilog = ("The defaults suit one consumer GPU (batch 1, constant lr 1e-4, no warm-up); "
                     "scripts/*.sh set the course's values.")
    add_model_args(parser.add_argument_group("model"))
    add_output_args(parser.add_argument_group("output, checkpoints, logging"))
    add_image_args(parser.add_argument_group("images"))
    add_training_args(parser.add_argument_group("training"))
    add_validation_args(parser.add_argument_group("validation"))


def add_model_args(group):
    group.add_argument("--pretrained_model_name_or_path", required=True,
                       help="Stable Diffusion: a hub name (CompVis/stable-diffusion-v1-4) or a local folder.")
    group.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit) of the model.")
    group.add_argument("--variant", default=None, help='Weights variant, e.g. "fp16" (files *.fp16.safetensors).')
    group.add_argument("--tokenizer_name", default=None, help="Load the tokenizer from here instead.")
    group.add_argument("--cache_dir", default=None, help="Where downloaded models and datasets are stored.")
    group.add_argument("--prediction_type", default=None, choices=["epsilon", "v_prediction"],
                       help="What the UNet learns to predict (None: what the model's scheduler says).")


def add_output_args(group):
    group.add_argument("--output_dir", required=True,
                       help="Where the LoRA file, checkpoint-N/, validation/ and logs/ are written.")
    group.add_argument("--overwrite_output_dir", action="store_true",
                       help="Delete an earlier run's results in --output_dir and start afresh there.")
    group.add_argument("--checkpointing_steps", type=int, default=500, help="Save checkpoint-N/ every this many steps.")
    group.add_argument("--checkpoints_total_limit", type=int, default=None,
                       help="Keep at most this many checkpoints (the oldest are deleted).")
    group.add_argument("--resume_from_checkpoint", default=None,
                       help='"latest", a checkpoint-N in --output_dir, or a path to a checkpoint folder.')
    group.add_argument("--report_to", default="tensorboard", choices=REPORT_TO,
                       help="Where loss, learning rate and validation images are logged.")
    group.add_argument("--logging_dir", default="logs", help="Tracker folder, relative to --output_dir.")


def add_image_args(group):
    group.add_argument("--resolution", type=int, default=512,
                       help="Training images are resized and cropped to this size (a multiple of 8).")
    group.add_argument("--center_crop", action="store_true", help="Crop the centre of each image, not at random.")
    group.add_argument("--random_flip", action="store_true", help="Flip images horizontally at random.")
    group.add_argument("--image_interpolation_mode", default="lanczos", choices=INTERPOLATION_MODES,
                       help="Resampling filter used to resize the training images.")
    group.add_argument("--dataloader_num_workers", type=int, default=0, help="Data-loading worker processes.")


def add_training_args(group):
    group.add_argument("--seed", type=int, default=None,
                       help="Random seed; with one, a resumed run continues exactly as an uninterrupted one.")
    group.add_argument("--rank", type=int, default=4, help="LoRA rank r: each adapted W gets W + B A, A: r x in.")
    group.add_argument("--lora_dropout", type=float, default=0.0, help="Dropout on the LoRA branch's input.")
    group.add_argument("--train_batch_size", type=int, default=1, help="Images per step and process.")
    group.add_argument("--num_train_epochs", type=int, default=100,
                       help="Passes over the data; ignored when --max_train_steps is given.")
    group.add_argument("--max_train_steps", type=int, default=None, help="Total optimizer steps.")
    group.add_argument("--gradient_accumulation_steps", type=int, default=1,
                       help="Batches whose gradients are summed before one optimizer step.")
    group.add_argument("--gradient_checkpointing", action="store_true",
                       help="Recompute activations in the backward pass: less memory, slower.")
    group.add_argument("--learning_rate", type=float, default=1e-4, help="AdamW learning rate.")
    group.add_argument("--scale_lr", action="store_true",
                       help="Multiply --learning_rate by batch size x accumulation steps x processes.")
    group.add_argument("--lr_scheduler", default="constant", choices=LR_SCHEDULERS, help="Learning-rate schedule.")
    group.add_argument("--lr_warmup_steps", type=int, default=0, help="Linear warm-up steps of the schedule.")
    group.add_argument("--lr_num_cycles", type=int, default=1, help="Restarts of cosine_with_restarts.")
    group.add_argument("--lr_power", type=float, default=1.0, help="Power of the polynomial schedule.")
    group.add_argument("--use_8bit_adam", action="store_true", help="bitsandbytes' 8-bit AdamW (CUDA only).")
    group.add_argument("--adam_beta1", type=float, default=0.9, help="AdamW beta1.")
    group.add_argument("--adam_beta2", type=float, default=0.999, help="AdamW beta2.")
    group.add_argument("--adam_epsilon", type=float, default=1e-8, help="AdamW epsilon.")
    group.add_argument("--adam_weight_decay", type=float, default=1e-2, help="AdamW weight decay.")
    group.add_argument("--max_grad_norm", type=float, default=1.0, help="Gradient clipping norm.")
    group.add_argument("--snr_gamma", type=float, default=None, help="Min-SNR loss weighting gamma (paper: 5.0).")
    group.add_argument("--noise_offset", type=float, default=0.0,
                       help="Offset noise scale (about 0.1 helps very dark or bright images).")
    group.add_argument("--mixed_precision", default=None, choices=["no", "fp16", "bf16"],
                       help="Precision of the frozen weights and activations (None: accelerate launch's, else no).")
    group.add_argument("--allow_tf32", action="store_true", help="Let fp32 matrix products use TF32 on Ampere+.")


def add_validation_args(group):
    group.add_argument("--validation_prompt", default=None, help="Prompt for the validation images (None: none).")
    group.add_argument("--num_validation_images", type=int, default=4, help="Images per validation.")
    group.add_argument("--validation_epochs", type=int, default=1,
                       help="Validate every this many epochs, and once after training from the saved file.")
    group.add_argument("--num_inference_steps", type=int, default=30,
                       help="Denoising steps of validation (and DreamBooth class) images.")


# Float flags and their ranges: (low, low included, high, high included); every value must be finite.
# max_grad_norm <= 0 would reverse (negative) or cancel (0) every update.
FLOAT_RANGES = {
    "learning_rate": (0, False, math.inf, False), "adam_epsilon": (0, False, math.inf, False),
    "lr_power": (0, False, math.inf, False), "max_grad_norm": (0, False, math.inf, False),
    "snr_gamma": (0, False, math.inf, False), "adam_weight_decay": (0, True, math.inf, False),
    "noise_offset": (0, True, math.inf, False), "prior_loss_weight": (0, True, math.inf, False),
    "adam_beta1": (0, True, 1, False), "adam_beta2": (0, True, 1, False), "lora_dropout": (0, True, 1, False),
}
AT_LEAST_ONE = ["rank", "train_batch_size", "num_train_epochs", "gradient_accumulation_steps", "checkpointing_steps",
                "validation_epochs", "num_validation_images", "num_inference_steps", "lr_num_cycles",
                "max_train_steps", "checkpoints_total_limit", "max_train_samples", "num_class_images",
                "sample_batch_size"]


def check_numbers(args):
    """Raise a UsageError for the first number flag of ``args`` out of its range (None: not given)."""
    for name in AT_LEAST_ONE:
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise UsageError(f"--{name} must be at least 1, got {value}")
    for name in ("lr_warmup_steps", "dataloader_num_workers"):
        if getattr(args, name) < 0:
            raise UsageError(f"--{name} must be >= 0, got {getattr(args, name)}")
    for name, (low, low_ok, high, high_ok) in FLOAT_RANGES.items():
        value = getattr(args, name, None)
        if value is None:
            continue
        above = low <= value if low_ok else low < value
        below = value <= high if high_ok else value < high
        if not (math.isfinite(value) and above and below):
            if high < math.inf:
                allowed = f"in {'[' if low_ok else '('}{low}, {high}{']' if high_ok else ')'}"
            else:
                allowed = f">= {low}" if low_ok else "positive"
            raise UsageError(f"--{name} must be {allowed if math.isfinite(value) else 'finite and ' + allowed}, "
                             f"got {value}")
    if args.resolution < 8 or args.resolution % 8 != 0:
        raise UsageError(f"--resolution must be a positive multiple of 8 (the VAE downsamples by 8), "
                         f"got {args.resolution}")


def check_common_args(args):
    """Reject bad values before anything is loaded or written. Sets ``args.mixed_precision`` and
    ``args.resume_path`` (the checkpoint folder to resume from, or None)."""
    check_numbers(args)
    args.mixed_precision = args.mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if args.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise UsageError("--mixed_precision=fp16 needs a CUDA GPU; use --mixed_precision=no "
                         "(or MIXED_PRECISION=no for the shell scripts) on a CPU")
    if args.use_8bit_adam:
        check_8bit_adam()
    check_tracker(args.report_to)
    model = args.pretrained_model_name_or_path
    if model.startswith(("/", ".", "~")) and not Path(model).expanduser().is_dir():
        raise UsageError(f"--pretrained_model_name_or_path {model} is not a folder")
    if Path(args.output_dir).exists() and not Path(args.output_dir).is_dir():
        raise UsageError(f"--output_dir {args.output_dir} exists and is not a folder")
    args.resume_path = find_checkpoint(args)
    if args.resume_path is not None:
        check_resume_matches(args)


def check_output_dir_free(args):
    """Raise a UsageError when a new run would write into an earlier run's --output_dir: its LoRA file
    and same-numbered checkpoints would be overwritten, and a later "latest" could resume the wrong run.
    Run last before the first write, so that bad data is reported first."""
    if args.resume_path is not None or args.overwrite_output_dir or not earlier_results(args):
        return
    names = ", ".join(path.name + ("/" if path.is_dir() else "") for path in earlier_results(args)[:4])
    raise UsageError(f"--output_dir {args.output_dir} holds an earlier run ({names}): continue it with "
                     f"--resume_from_checkpoint=latest, pick another --output_dir, or replace it with "
                     f"--overwrite_output_dir")


def earlier_results(args):
    """What a run writes in --output_dir that is there already: the LoRA file, checkpoints (complete or
    not), validation images and the tracker folder."""
    out = Path(args.output_dir)
    if not out.is_dir():
        return []
    found = [out / LORA_WEIGHTS_NAME, *sorted(out.glob("checkpoint-*")), out / "validation"]
    if not Path(args.logging_dir).is_absolute():
        found.append(out / args.logging_dir)
    return [path for path in found if path.exists()]


def remove_earlier_results(args):
    """--overwrite_output_dir: delete what ``earlier_results`` finds, so that nothing of the earlier run
    is mixed with this one (a later --resume_from_checkpoint=latest would pick its checkpoints)."""
    for path in earlier_results(args):
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def check_8bit_adam():
    """Raise a UsageError unless bitsandbytes' 8-bit AdamW can run here (CUDA and the package)."""
    if not torch.cuda.is_available():
        raise UsageError("--use_8bit_adam needs a CUDA GPU (bitsandbytes' 8-bit optimizers run on CUDA only)")
    try:
        import bitsandbytes  # noqa: F401
    except Exception as error:  # a missing package, or one built for another CUDA, fails in many ways
        raise UsageError(f"--use_8bit_adam needs bitsandbytes (pip install bitsandbytes): {first_line(error)}")


def check_tracker(report_to):
    """Raise a UsageError when the --report_to tracker is not installed."""
    from accelerate.utils import is_comet_ml_available, is_tensorboard_available, is_wandb_available

    available = {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available,
                 "comet_ml": is_comet_ml_available}
    if report_to in available and not available[report_to]():
        raise UsageError(f"--report_to {report_to} needs the {report_to} package (pip install {report_to}), "
                         f"or use --report_to none")
