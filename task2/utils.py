"""Helpers shared by train_lora.py, train_dreambooth_lora.py and lora_inference.ipynb.

The two training scripts differ only in their data and their loss; everything else they share
lives here: the common command-line flags and their checks, model loading, LoRA injection and
saving, the noise-prediction loss, checkpoints, validation images and the training loop itself.
The loop runs in one process or in several (``NUM_PROCESSES=2 sh scripts/...``, i.e.
``accelerate launch --multi_gpu``): each process trains on its share of every batch and the main
process alone writes files.
"""
import argparse
import contextlib
import math
import os
import random
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from tqdm.auto import tqdm

LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
# LoRA goes on the attention projections: query, key, value and output (Hu et al., 2021, Sec. 4.2).
UNET_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_ENCODER_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
# torchvision's resampling filters, by the names --image_interpolation_mode takes.
INTERPOLATION_MODES = ["nearest", "nearest_exact", "bilinear", "bicubic", "box", "hamming", "lanczos"]
REPORT_TO = ["tensorboard", "wandb", "comet_ml", "all", "none"]


def seed_everything(seed=2024):
    """Seed Python, NumPy and PyTorch (CPU and CUDA), and make cuDNN deterministic."""
    os.environ["PYTHONHASHSEED"] = str(seed)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def image_grid(imgs, rows, cols):
    """Paste ``rows * cols`` PIL images of one size into a single image, row by row."""
    assert len(imgs) == rows * cols, f"{len(imgs)} images do not fill a {rows}x{cols} grid"
    w, h = imgs[0].size
    grid = Image.new("RGB", size=(cols * w, rows * h))
    for i, img in enumerate(imgs):
        grid.paste(img, box=(i % cols * w, i // cols * h))
    return grid


def exit_with_error(message):
    """Bad input: one line on stderr, exit status 1, no traceback."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(1)


def first_line(error):
    """The first line of an exception's message (its type when the message is empty), for exit_with_error."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad command line in one line, like every other bad input."""

    def error(self, message):
        exit_with_error(f"{message} (see --help)")


# ---------------------------------------------------------------------------------------------
# Files: images in, atomic writes out
# ---------------------------------------------------------------------------------------------


def list_images(folder):
    """Image files directly inside ``folder``, sorted by name."""
    return sorted(p for p in Path(folder).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def check_images_readable(folder):
    """Exit with an error naming the first image file under ``folder`` that PIL cannot read."""
    for path in sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS):
        try:
            with Image.open(path) as image:
                image.verify()
        except OSError as error:
            exit_with_error(f"cannot read the image {path}: {error}")


def upright_rgb(image):
    """``image`` as RGB, turned the way its EXIF orientation tag says: a phone stores a portrait photo
    as landscape pixels plus "rotate 90 degrees", which viewers apply and PIL does not."""
    return ImageOps.exif_transpose(image).convert("RGB")


def load_image(path):
    """The image file at ``path``, upright and RGB."""
    with Image.open(path) as image:
        return upright_rgb(image)


def temporary_path(path):
    """Where ``atomic_write`` writes ``path`` before renaming it: a hidden name in the same folder."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp")


def _remove(path):
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def _fsync(path):
    """Flush ``path`` (a file or a folder's list of names) to the disk."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


@contextlib.contextmanager
def atomic_write(path):
    """Write the file or folder ``path`` all or nothing.

    Yields ``temporary_path(path)``, a fresh name in the same folder; what the body writes there
    (a file, or a folder with files in it) is fsynced and renamed to ``path``, replacing an older
    one, when the body returns, and removed when it raises. A crash never leaves a half-written
    ``path``.
    """
    path = Path(path)
    tmp = temporary_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove(tmp)
    try:
        yield tmp
        for written in [tmp, *tmp.rglob("*")]:
            _fsync(written)
        # os.replace cannot put a folder over a non-empty one; only a re-run of the same step gets here.
        if path.is_dir():
            shutil.rmtree(path)
        os.replace(tmp, path)
        _fsync(path.parent)
    except BaseException:
        _remove(tmp)
        raise


def save_image_atomic(image, path):
    """Write a PIL image so that a crash never leaves a half-written file at ``path``."""
    with atomic_write(path) as tmp:
        image.save(tmp, format=Path(path).suffix.lstrip(".").upper().replace("JPG", "JPEG"))


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def add_common_args(parser: argparse.ArgumentParser):
    """Flags both training scripts take. Defaults follow the diffusers example scripts."""
    model = parser.add_argument_group("model")
    model.add_argument("--pretrained_model_name_or_path", required=True,
                       help="Stable Diffusion: a hub name (CompVis/stable-diffusion-v1-4) or a local folder.")
    model.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit) of the model.")
    model.add_argument("--variant", default=None,
                       help='Weights variant of the model\'s networks, e.g. "fp16" (files *.fp16.safetensors).')
    model.add_argument("--tokenizer_name", default=None,
                       help="Load the tokenizer from here instead of the model's tokenizer/ folder.")
    model.add_argument("--cache_dir", default=None, help="Where downloaded models and datasets are stored.")
    model.add_argument("--prediction_type", default=None, choices=["epsilon", "v_prediction"],
                       help="Train the UNet to predict this (default: what the model's scheduler says; "
                            "epsilon for SD 1.x). Validation images use it too.")

    out = parser.add_argument_group("output, checkpoints, logging")
    out.add_argument("--output_dir", required=True,
                     help="Where pytorch_lora_weights.safetensors, checkpoint-N/, validation/ and logs/ are written.")
    out.add_argument("--checkpointing_steps", type=int, default=500,
                     help="Save a resumable checkpoint-N/ every this many steps.")
    out.add_argument("--checkpoints_total_limit", type=int, default=None,
                     help="Keep at most this many checkpoints (the oldest are deleted).")
    out.add_argument("--resume_from_checkpoint", default=None,
                     help='"latest" (the newest checkpoint in --output_dir), a checkpoint-N name in --output_dir, '
                          "or a path to a checkpoint folder.")
    out.add_argument("--report_to", default="tensorboard", choices=REPORT_TO,
                     help="Where loss, learning rate and validation images are logged (tensorboard: "
                          "OUTPUT_DIR/logs, view with `tensorboard --logdir OUTPUT_DIR/logs`).")
    out.add_argument("--logging_dir", default="logs", help="Tracker folder, relative to --output_dir.")

    data = parser.add_argument_group("images")
    data.add_argument("--resolution", type=int, default=512,
                      help="Training images are resized and cropped to this size (a multiple of 8).")
    data.add_argument("--center_crop", action="store_true",
                      help="Crop the centre of each image (default: a random crop).")
    data.add_argument("--random_flip", action="store_true", help="Flip images horizontally at random.")
    data.add_argument("--image_interpolation_mode", default="lanczos", choices=INTERPOLATION_MODES,
                      help="Resampling filter used to resize the training images.")
    data.add_argument("--dataloader_num_workers", type=int, default=0, help="Data-loading worker processes.")

    train = parser.add_argument_group("training")
    train.add_argument("--seed", type=int, default=None,
                       help="Random seed for a reproducible run (a resumed run then continues exactly).")
    train.add_argument("--rank", type=int, default=4, help="LoRA rank r: each adapted W gets W + B A, A: r x in.")
    train.add_argument("--lora_dropout", type=float, default=0.0, help="Dropout on the LoRA branch's input.")
    train.add_argument("--train_batch_size", type=int, default=1, help="Images per step and process.")
    train.add_argument("--num_train_epochs", type=int, default=100,
                       help="Passes over the data; ignored when --max_train_steps is given.")
    train.add_argument("--max_train_steps", type=int, default=None,
                       help="Total optimizer steps; overrides --num_train_epochs.")
    train.add_argument("--gradient_accumulation_steps", type=int, default=1,
                       help="Batches whose gradients are summed before one optimizer step.")
    train.add_argument("--gradient_checkpointing", action="store_true",
                       help="Recompute activations in the backward pass: less memory, about 20%% slower.")
    train.add_argument("--learning_rate", type=float, default=1e-4, help="AdamW learning rate.")
    train.add_argument("--scale_lr", action="store_true",
                       help="Multiply --learning_rate by batch size x accumulation steps x processes.")
    train.add_argument("--lr_scheduler", default="constant",
                       choices=["linear", "cosine", "cosine_with_restarts", "polynomial", "constant",
                                "constant_with_warmup"],
                       help="Learning-rate schedule.")
    train.add_argument("--lr_warmup_steps", type=int, default=0, help="Linear warm-up steps of the schedule.")
    train.add_argument("--lr_num_cycles", type=int, default=1, help="Restarts of cosine_with_restarts.")
    train.add_argument("--lr_power", type=float, default=1.0, help="Power of the polynomial schedule.")
    train.add_argument("--use_8bit_adam", action="store_true",
                       help="bitsandbytes' 8-bit AdamW (needs a CUDA GPU and `pip install bitsandbytes`).")
    train.add_argument("--adam_beta1", type=float, default=0.9, help="AdamW beta1.")
    train.add_argument("--adam_beta2", type=float, default=0.999, help="AdamW beta2.")
    train.add_argument("--adam_epsilon", type=float, default=1e-8, help="AdamW epsilon.")
    train.add_argument("--adam_weight_decay", type=float, default=1e-2, help="AdamW weight decay.")
    train.add_argument("--max_grad_norm", type=float, default=1.0, help="Gradient clipping norm.")
    train.add_argument("--snr_gamma", type=float, default=None,
                       help="Min-SNR loss weighting with this gamma (5.0 is the paper's value); off by default.")
    train.add_argument("--noise_offset", type=float, default=0.0,
                       help="Offset noise: add this times a per-channel N(0, 1) constant to the noise "
                            "(about 0.1 lets the model learn very dark and very bright images).")
    train.add_argument("--mixed_precision", default=None, choices=["no", "fp16", "bf16"],
                       help="Precision of the frozen weights and activations (fp16 needs a CUDA GPU). "
                            "Default: what `accelerate launch --mixed_precision` says, else no.")
    train.add_argument("--allow_tf32", action="store_true",
                       help="Let float32 matrix products use TF32 on Ampere or newer GPUs: faster, 10-bit mantissa.")

    validation = parser.add_argument_group("validation")
    validation.add_argument("--validation_prompt", default=None,
                            help="Prompt for the validation images (none: no validation).")
    validation.add_argument("--num_validation_images", type=int, default=4,
                            help="Validation images per validation.")
    validation.add_argument("--validation_epochs", type=int, default=1,
                            help="Validate every this many epochs; after training, a final validation loads "
                                 "the saved LoRA file into a fresh pipeline.")
    validation.add_argument("--num_inference_steps", type=int, default=30,
                            help="Denoising steps when generating validation (and DreamBooth class) images.")


def check_common_args(args):
    """Reject bad values before anything is loaded or written. Sets ``args.mixed_precision`` and
    ``args.resume_path`` (the checkpoint folder to resume from, or None)."""
    if args.rank < 1:
        exit_with_error(f"--rank must be at least 1, got {args.rank}")
    if args.resolution < 8 or args.resolution % 8 != 0:
        exit_with_error(f"--resolution must be a positive multiple of 8 (the VAE downsamples by 8), "
                        f"got {args.resolution}")
    positive = ["train_batch_size", "num_train_epochs", "gradient_accumulation_steps", "checkpointing_steps",
                "validation_epochs", "num_validation_images", "num_inference_steps", "lr_num_cycles"]
    positive += [name for name in ("max_train_steps", "checkpoints_total_limit") if getattr(args, name) is not None]
    for name in positive:
        if getattr(args, name) < 1:
            exit_with_error(f"--{name} must be at least 1, got {getattr(args, name)}")
    for name in ("learning_rate", "adam_epsilon", "lr_power"):
        if getattr(args, name) <= 0:
            exit_with_error(f"--{name} must be positive, got {getattr(args, name)}")
    for name in ("adam_beta1", "adam_beta2", "lora_dropout"):
        if not 0 <= getattr(args, name) < 1:
            exit_with_error(f"--{name} must be in [0, 1), got {getattr(args, name)}")
    for name in ("lr_warmup_steps", "adam_weight_decay", "noise_offset", "dataloader_num_workers"):
        if getattr(args, name) < 0:
            exit_with_error(f"--{name} must be >= 0, got {getattr(args, name)}")
    if args.snr_gamma is not None and args.snr_gamma <= 0:
        exit_with_error(f"--snr_gamma must be positive, got {args.snr_gamma}")

    args.mixed_precision = args.mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if args.mixed_precision == "fp16" and not torch.cuda.is_available():
        exit_with_error("--mixed_precision=fp16 needs a CUDA GPU; use --mixed_precision=no "
                        "(or MIXED_PRECISION=no for the shell scripts) on a CPU")
    if args.use_8bit_adam:
        check_8bit_adam()
    check_tracker(args.report_to)

    model = args.pretrained_model_name_or_path
    if model.startswith(("/", ".", "~")) and not Path(model).expanduser().is_dir():
        exit_with_error(f"--pretrained_model_name_or_path {model} is not a folder")
    if Path(args.output_dir).exists() and not Path(args.output_dir).is_dir():
        exit_with_error(f"--output_dir {args.output_dir} exists and is not a folder")
    args.resume_path = find_checkpoint(args)
    if args.resume_path is not None:
        check_resume_matches(args)


def check_8bit_adam():
    """Exit with one line unless bitsandbytes' 8-bit AdamW can run here (CUDA and the package)."""
    if not torch.cuda.is_available():
        exit_with_error("--use_8bit_adam needs a CUDA GPU (bitsandbytes' 8-bit optimizers run on CUDA only)")
    try:
        import bitsandbytes  # noqa: F401
    except Exception as error:  # a missing package, or one built for another CUDA, fails in many ways
        exit_with_error(f"--use_8bit_adam needs bitsandbytes (pip install bitsandbytes): {first_line(error)}")


def check_tracker(report_to):
    """Exit with one line when the --report_to tracker is not installed."""
    from accelerate.utils import is_comet_ml_available, is_tensorboard_available, is_wandb_available

    available = {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available,
                 "comet_ml": is_comet_ml_available}
    if report_to in available and not available[report_to]():
        exit_with_error(f"--report_to {report_to} needs the {report_to} package (pip install {report_to}), "
                        f"or use --report_to none")


# ---------------------------------------------------------------------------------------------
# Models and LoRA
# ---------------------------------------------------------------------------------------------


def weight_dtype(mixed_precision):
    """The dtype of the frozen networks under --mixed_precision; the trainable LoRA weights stay fp32."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision, torch.float32)


def hub_kwargs(args, variant=True):
    """What every from_pretrained of the model takes from the command line."""
    kwargs = {"revision": args.revision, "cache_dir": args.cache_dir}
    if variant:
        kwargs["variant"] = args.variant
    return kwargs


def load_models(args, accelerator):
    """Tokenizer, training noise scheduler, and the three networks of a Stable Diffusion checkpoint,
    frozen, on the accelerator's device."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    model_name = args.pretrained_model_name_or_path
    dtype = weight_dtype(accelerator.mixed_precision)
    try:
        if args.tokenizer_name:
            tokenizer = CLIPTokenizer.from_pretrained(args.tokenizer_name, **hub_kwargs(args, variant=False))
        else:
            tokenizer = CLIPTokenizer.from_pretrained(model_name, subfolder="tokenizer",
                                                      **hub_kwargs(args, variant=False))
        noise_scheduler = DDPMScheduler.from_pretrained(model_name, subfolder="scheduler",
                                                        **hub_kwargs(args, variant=False))
        text_encoder = CLIPTextModel.from_pretrained(model_name, subfolder="text_encoder", dtype=dtype,
                                                     **hub_kwargs(args))
        vae = AutoencoderKL.from_pretrained(model_name, subfolder="vae", dtype=dtype, **hub_kwargs(args))
        unet = UNet2DConditionModel.from_pretrained(model_name, subfolder="unet", dtype=dtype, **hub_kwargs(args))
    except (OSError, ValueError) as error:
        exit_with_error(f"cannot load the model {model_name!r}: {first_line(error)}")
    if args.prediction_type is not None:
        noise_scheduler.register_to_config(prediction_type=args.prediction_type)
    for model in (text_encoder, vae, unet):
        model.requires_grad_(False)
        model.to(accelerator.device)
    return tokenizer, noise_scheduler, text_encoder, vae, unet


def add_lora(model, rank, target_modules, dropout=0.0):
    """Wrap ``target_modules`` of ``model`` with trainable LoRA layers; all else stays frozen.

    lora_alpha = rank makes the LoRA scale alpha / r equal to 1, which is also what diffusers'
    ``load_lora_weights`` assumes for a file without adapter metadata. Gaussian A and zero B
    (``init_lora_weights="gaussian"``) make the adapted model start exactly at the base model.
    """
    from peft import LoraConfig

    model.add_adapter(LoraConfig(r=rank, lora_alpha=rank, lora_dropout=dropout, init_lora_weights="gaussian",
                                 target_modules=target_modules))


def count_parameters(models):
    """(trainable, total) parameter counts over ``models``."""
    params = [p for model in models for p in model.parameters()]
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def lora_layers(model):
    """The LoRA tensors of ``model`` under peft's names (``<module>.lora_A.weight``, ``.lora_B.weight``),
    fp32 on the CPU."""
    from peft.utils import get_peft_model_state_dict

    # No embedding layer is adapted; saying so spares peft a look-up of the base model's config.
    layers = get_peft_model_state_dict(model, save_embedding_layers=False)
    return {name: tensor.detach().float().contiguous().cpu() for name, tensor in layers.items()}


def save_lora_weights(folder, unet, text_encoder=None):
    """Write ``folder/pytorch_lora_weights.safetensors`` atomically, in diffusers' own SD 1.x layout.

    That is what the diffusers examples write through ``StableDiffusionPipeline.save_lora_weights``:
    ``unet.<module>.lora.down.weight`` / ``.lora.up.weight`` for the UNet and
    ``text_encoder.text_model.<module>.lora_linear_layer.down.weight`` / ``.up.weight`` for the text
    encoder. transformers 5 dropped CLIPTextModel's ``text_model.`` level; the file keeps it, since
    diffusers before 0.36 (the course's 0.35.1 with transformers 4.56) only maps keys with it and
    newer diffusers strip it when the model has no such level. So one file loads in both.
    """
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers

    text_encoder_layers = None
    if text_encoder is not None:
        text_encoder_layers = {name if name.startswith("text_model.") else f"text_model.{name}": tensor
                               for name, tensor in convert_state_dict_to_diffusers(lora_layers(text_encoder)).items()}
    with atomic_write(Path(folder) / LORA_WEIGHTS_NAME) as tmp:
        StableDiffusionPipeline.save_lora_weights(
            tmp.parent, unet_lora_layers=convert_state_dict_to_diffusers(lora_layers(unet)),
            text_encoder_lora_layers=text_encoder_layers, weight_name=tmp.name)


def read_lora_weights(folder):
    """The LoRA tensors of ``folder/pytorch_lora_weights.safetensors`` under peft's names, by model:
    ``{"unet": {...}, "text_encoder": {...}}`` (a model without adapters is absent).

    Reads this layout and the one this project wrote before (peft's names, ``unet.<module>.lora_A.weight``,
    text-encoder modules without ``text_model.``); the text encoder's names keep ``text_model.`` when the
    file has it.
    """
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft
    from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft
    from safetensors.torch import load_file

    state = load_file(Path(folder) / LORA_WEIGHTS_NAME)
    parts = {}
    for prefix in ("unet", "text_encoder"):
        part = {name.removeprefix(f"{prefix}."): tensor for name, tensor in state.items()
                if name.startswith(f"{prefix}.")}
        if part and prefix == "unet":
            parts[prefix] = convert_unet_state_dict_to_peft(part)
        elif part:
            parts[prefix] = convert_state_dict_to_peft(convert_state_dict_to_diffusers(part))
    return parts


def load_lora_weights(folder, unet, text_encoder=None):
    """Inverse of ``save_lora_weights``: copy the saved LoRA tensors into the models' adapters. Every
    adapter of the models must get a tensor and every tensor an adapter."""
    from peft import set_peft_model_state_dict

    parts = read_lora_weights(folder)
    for name, model in (("unet", unet), ("text_encoder", text_encoder)):
        if model is None:
            continue
        part = parts.get(name, {})
        if not hasattr(model, "text_model"):
            part = {key.removeprefix("text_model."): tensor for key, tensor in part.items()}
        result = set_peft_model_state_dict(model, part)
        missing = [key for key in result.missing_keys if "lora_" in key]
        if result.unexpected_keys or missing:
            raise ValueError(f"{folder} does not match the {name}'s adapters: "
                             f"unexpected {result.unexpected_keys[:3]}, missing {missing[:3]}")


def make_optimizer(args, parameters, num_processes):
    """AdamW (bitsandbytes' 8-bit AdamW with --use_8bit_adam) over ``parameters``; with --scale_lr the
    learning rate grows with the samples per step: batch x accumulation steps x processes."""
    if args.scale_lr:
        args.learning_rate *= args.train_batch_size * args.gradient_accumulation_steps * num_processes
    if args.use_8bit_adam:
        import bitsandbytes

        optimizer_class = bitsandbytes.optim.AdamW8bit
    else:
        optimizer_class = torch.optim.AdamW
    return optimizer_class(parameters, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                           eps=args.adam_epsilon, weight_decay=args.adam_weight_decay)


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def make_accelerator(args, project_name):
    """The Accelerator of a run: precision, accumulation, trackers under OUTPUT_DIR/logs, seeds.

    Several processes (``accelerate launch --multi_gpu`` or ``torchrun``) on a machine without CUDA
    need ``cpu=True`` for accelerate to join them with gloo; otherwise each would train alone. With
    --seed the data order comes from a seeded sampler (epoch e is shuffled with seed + e), so a
    resumed run sees the batches the uninterrupted one would have seen.
    """
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed

    several_cpu_processes = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    accelerator = Accelerator(
        cpu=several_cpu_processes, gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision, log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=args.output_dir,
                                            logging_dir=str(Path(args.output_dir) / args.logging_dir)),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=args.seed is not None, data_seed=args.seed))
    if args.seed is not None:
        # Each process its own noise and timesteps, reproducibly.
        set_seed(args.seed, device_specific=True)
    if args.allow_tf32:
        torch.backends.cuda.matmul.fp32_precision = "tf32"
        torch.backends.cudnn.conv.fp32_precision = "tf32"
    if args.report_to != "none":
        # Trackers take numbers and strings only.
        config = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}
        accelerator.init_trackers(project_name, config=config)
    return accelerator


def image_transforms(args):
    """PIL image -> tensor [3, resolution, resolution] in [-1, 1], the VAE's input range."""
    from torchvision import transforms

    return transforms.Compose([
        transforms.Resize(args.resolution,
                          interpolation=transforms.InterpolationMode[args.image_interpolation_mode.upper()]),
        transforms.CenterCrop(args.resolution) if args.center_crop else transforms.RandomCrop(args.resolution),
        transforms.RandomHorizontalFlip() if args.random_flip else transforms.Lambda(lambda x: x),
        transforms.ToTensor(),
        transforms.Normalize([0.5], [0.5]),
    ])


def tokenize(tokenizer, prompts):
    """Token ids [B, tokenizer.model_max_length], padded and truncated like Stable Diffusion's pipeline."""
    return tokenizer(prompts, max_length=tokenizer.model_max_length, padding="max_length", truncation=True,
                     return_tensors="pt").input_ids


def noise_and_target(noise_scheduler, latents, noise_offset=0.0):
    """Draw t ~ U{0..T-1} and eps ~ N(0, I); return x_t, t and the UNet's regression target.

    x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps   (DDPM, Ho et al. 2020, Eq. 4)
    The target is eps for epsilon-prediction (SD 1.x) or v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x_0
    for v-prediction (SD 2.x). With ``noise_offset``, eps gets a constant per image and channel,
    noise_offset * N(0, 1) (offset noise, Guttenberg 2023), so the model can shift an image's mean
    brightness, which zero-mean noise at t = T never asks it to do.
    """
    noise = torch.randn_like(latents)
    if noise_offset:
        noise += noise_offset * torch.randn(latents.shape[0], latents.shape[1], 1, 1, device=latents.device,
                                            dtype=latents.dtype)
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],),
                              device=latents.device).long()
    noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
    if noise_scheduler.config.prediction_type == "epsilon":
        target = noise
    elif noise_scheduler.config.prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise ValueError(f"unsupported prediction type {noise_scheduler.config.prediction_type}")
    return noisy_latents, timesteps, target


def diffusion_loss(model_pred, target, timesteps, noise_scheduler, snr_gamma=None):
    """Mean squared error between prediction and target, [B, C, h, w] -> scalar.

    With ``snr_gamma``, each sample is weighted by min(SNR(t), gamma) / SNR(t) (Min-SNR, Hang et al. 2023,
    Eq. 8), with SNR(t) = alpha_bar_t / (1 - alpha_bar_t); for v-prediction the denominator is SNR(t) + 1.
    """
    per_sample = F.mse_loss(model_pred.float(), target.float(), reduction="none").mean(dim=[1, 2, 3])
    if snr_gamma is None:
        return per_sample.mean()
    alpha_bar = noise_scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
    snr = alpha_bar / (1 - alpha_bar)
    if noise_scheduler.config.prediction_type == "v_prediction":
        weight = torch.clamp(snr, max=snr_gamma) / (snr + 1)
    else:
        weight = torch.clamp(snr, max=snr_gamma) / snr
    return (per_sample * weight).mean()


def training_length(args, batches_per_epoch):
    """(steps per epoch, total steps, epochs), counting optimizer steps; ``batches_per_epoch`` is what
    one process gets from the prepared (sharded) data loader."""
    steps_per_epoch = math.ceil(batches_per_epoch / args.gradient_accumulation_steps)
    max_train_steps = args.max_train_steps or args.num_train_epochs * steps_per_epoch
    return steps_per_epoch, max_train_steps, math.ceil(max_train_steps / steps_per_epoch)


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------


def checkpoint_step(path):
    """The step N of a ``checkpoint-N`` folder."""
    name = Path(path).name
    if not (name.startswith("checkpoint-") and name.removeprefix("checkpoint-").isdigit()):
        exit_with_error(f"{path} is not named checkpoint-N")
    return int(name.removeprefix("checkpoint-"))


def list_checkpoints(output_dir):
    """Complete checkpoint folders in ``output_dir``, oldest first."""
    if not Path(output_dir).is_dir():
        return []
    found = [p for p in Path(output_dir).glob("checkpoint-*")
             if p.name.removeprefix("checkpoint-").isdigit() and (p / LORA_WEIGHTS_NAME).is_file()]
    return sorted(found, key=checkpoint_step)


def find_checkpoint(args):
    """The checkpoint folder --resume_from_checkpoint names, or None (no flag; "latest" with no checkpoint).

    A relative name is read in --output_dir, as the diffusers examples do
    (``--resume_from_checkpoint=checkpoint-500``); a path that only exists from the working folder
    (``runs/x/checkpoint-500``) is taken as it is.
    """
    name = args.resume_from_checkpoint
    if name is None:
        return None
    if name == "latest":
        checkpoints = list_checkpoints(args.output_dir)
        return checkpoints[-1] if checkpoints else None
    path = Path(name).expanduser()
    candidates = [path] if path.is_absolute() else [Path(args.output_dir) / path, path]
    for candidate in candidates:
        if (candidate / LORA_WEIGHTS_NAME).is_file():
            checkpoint_step(candidate)
            return candidate
    exit_with_error(f"--resume_from_checkpoint {name}: no checkpoint folder (with {LORA_WEIGHTS_NAME}) at "
                    f"{' or '.join(str(c) for c in candidates)}")


def check_resume_matches(args):
    """Exit with one line when the checkpoint trained other models or another rank than this run would:
    its tensors would not fit, or the newly adapted model would silently stay at its initial LoRA."""
    from safetensors import SafetensorError

    try:
        parts = read_lora_weights(args.resume_path)
    except (OSError, SafetensorError) as error:
        exit_with_error(f"cannot read {Path(args.resume_path) / LORA_WEIGHTS_NAME}: {first_line(error)}")
    train_text_encoder = getattr(args, "train_text_encoder", False)
    if "text_encoder" in parts and not train_text_encoder:
        exit_with_error(f"--resume_from_checkpoint {args.resume_path} trained the text encoder's LoRA too, this run "
                        f"the UNet's only" + (" (add --train_text_encoder)" if hasattr(args, "train_text_encoder")
                                              else ""))
    if "text_encoder" not in parts and train_text_encoder:
        exit_with_error(f"--resume_from_checkpoint {args.resume_path} trained the UNet's LoRA only, this run adds "
                        f"--train_text_encoder, whose LoRA would start from scratch: start a new run in another "
                        f"--output_dir")
    ranks = {tensor.shape[0] for part in parts.values() for key, tensor in part.items() if "lora_A" in key}
    if ranks != {args.rank}:
        exit_with_error(f"--resume_from_checkpoint {args.resume_path} has rank {sorted(ranks)}, "
                        f"this run --rank {args.rank}")


def register_lora_checkpoint_hooks(accelerator, unet, text_encoder=None):
    """Make ``accelerator.save_state``/``load_state`` store the LoRA tensors only.

    Without these hooks accelerate would save every weight of the UNet (3.4 GB for SD 1.4) in
    each checkpoint. The optimizer, learning-rate scheduler and random states are saved by
    accelerate itself.
    """

    def save_hook(models, weights, folder):
        if accelerator.is_main_process:
            save_lora_weights(folder, accelerator.unwrap_model(unet),
                              accelerator.unwrap_model(text_encoder) if text_encoder is not None else None)
        weights.clear()

    def load_hook(models, folder):
        load_lora_weights(folder, accelerator.unwrap_model(unet),
                          accelerator.unwrap_model(text_encoder) if text_encoder is not None else None)
        models.clear()

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def save_checkpoint(accelerator, output_dir, step, total_limit):
    """Save ``output_dir/checkpoint-{step}``, then delete the oldest checkpoints beyond ``total_limit``.

    Every process calls this. The main process writes the LoRA tensors, optimizer and schedule into
    a temporary folder, each process adds its own random state (``random_states_{i}.pkl``, so that a
    resumed run draws the same noise on every process), and once all are done the main process
    renames the folder.
    """
    final = Path(output_dir) / f"checkpoint-{step}"
    writer = atomic_write(final) if accelerator.is_main_process else contextlib.nullcontext(temporary_path(final))
    with writer as tmp:
        accelerator.wait_for_everyone()  # the main process has cleared a stale temporary folder
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()  # every process has written its part
    if accelerator.is_main_process and total_limit is not None:
        for old in list_checkpoints(output_dir)[:-total_limit]:
            shutil.rmtree(old)


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------


def validation_pipeline(args, accelerator, **components):
    """A StableDiffusionPipeline of the base model without safety checker, on the accelerator's device,
    with ``components`` (e.g. the UNet being trained) in place of the base model's."""
    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline.from_pretrained(
        args.pretrained_model_name_or_path, dtype=weight_dtype(accelerator.mixed_precision), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False, **hub_kwargs(args), **components)
    if args.prediction_type is not None:
        pipeline.scheduler.register_to_config(prediction_type=args.prediction_type)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline.to(accelerator.device)


@torch.no_grad()
def log_validation(args, accelerator, pipeline, name, step):
    """Generate --num_validation_images for --validation_prompt with ``pipeline``; save them as one grid,
    ``output_dir/validation/{name}.png``, and log them to the trackers at ``step``."""
    generator = torch.Generator(device=accelerator.device)
    if args.seed is not None:
        generator.manual_seed(args.seed)
    with accelerator.autocast():
        images = pipeline([args.validation_prompt] * args.num_validation_images, height=args.resolution,
                          width=args.resolution, num_inference_steps=args.num_inference_steps,
                          generator=generator).images
    path = Path(args.output_dir) / "validation" / f"{name}.png"
    save_image_atomic(image_grid(images, 1, len(images)), path)
    tag = "final" if name == "final" else "validation"
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.log_images({tag: np.stack([np.asarray(image) for image in images])}, step=step,
                               dataformats="NHWC")
        elif hasattr(tracker, "log_images"):
            tracker.log_images({tag: [np.asarray(image) for image in images]}, step=step)
    accelerator.print(f"Validation images for {args.validation_prompt!r} saved to {path}")


# ---------------------------------------------------------------------------------------------
# The training loop
# ---------------------------------------------------------------------------------------------


def train(args, accelerator, unet, text_encoder, vae, tokenizer, noise_scheduler, train_dataloader, optimizer,
          compute_loss, train_text_encoder=False):
    """Train the LoRA weights for --max_train_steps (or --num_train_epochs) and save them to
    ``output_dir/pytorch_lora_weights.safetensors``; resume, checkpoints, logging and validation images
    as the flags say; finally validate with the saved file loaded into a fresh pipeline.

    Each step: z_0 = VAE(x) * scaling_factor, z_t and the target from ``noise_and_target``, then
    ``compute_loss(model_pred, target, timesteps)`` with model_pred, target: [B, C, h, w] (UNet output
    and regression target) and timesteps: [B] must return the scalar to minimise. A batch holds
    ``pixel_values`` [B, 3, H, W] in [-1, 1] and ``input_ids`` [B, tokenizer.model_max_length].
    ``optimizer`` updates the LoRA weights of the UNet (and of the text encoder with ``train_text_encoder``);
    they follow the --lr_scheduler schedule. With N processes each gets 1/N of every epoch's batches
    and the gradients are averaged, so one step sees N x --train_batch_size images.
    """
    from diffusers.optimization import get_scheduler

    # Shard the batches first: the epoch length and the schedule count the batches of one process.
    train_dataloader = accelerator.prepare(train_dataloader)
    steps_per_epoch, max_train_steps, num_epochs = training_length(args, len(train_dataloader))
    # accelerate steps a prepared scheduler once per process at each optimizer step.
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer,
                                 num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=max_train_steps * accelerator.num_processes,
                                 num_cycles=args.lr_num_cycles, power=args.lr_power)
    trained_parameters = [p for group in optimizer.param_groups for p in group["params"]]
    if train_text_encoder:
        unet, text_encoder, optimizer, lr_scheduler = accelerator.prepare(unet, text_encoder, optimizer,
                                                                          lr_scheduler)
        trained_models = [unet, text_encoder]
    else:
        unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
        trained_models = [unet]
    register_lora_checkpoint_hooks(accelerator, unet, text_encoder if train_text_encoder else None)

    global_step = 0
    if args.resume_path is not None:
        accelerator.load_state(str(args.resume_path))
        global_step = checkpoint_step(args.resume_path)
        accelerator.print(f"Resumed from {args.resume_path} at step {global_step}.")
    elif args.resume_from_checkpoint == "latest":
        accelerator.print(f"No checkpoint in {args.output_dir}: starting a new run.")
    first_epoch = global_step // steps_per_epoch
    batches_done_in_epoch = (global_step % steps_per_epoch) * args.gradient_accumulation_steps
    accelerator.print(f"{accelerator.num_processes} process(es), {steps_per_epoch} steps per epoch, "
                      f"training from step {global_step} to {max_train_steps}.")
    progress = tqdm(range(max_train_steps), initial=global_step, desc="Steps",
                    disable=not accelerator.is_local_main_process)

    step_loss = 0.0
    for epoch in range(first_epoch, num_epochs):
        if global_step >= max_train_steps:
            break
        for model in trained_models:
            model.train()
        train_dataloader.set_epoch(epoch)
        batches = train_dataloader
        if epoch == first_epoch and batches_done_in_epoch > 0:
            batches = accelerator.skip_first_batches(train_dataloader, batches_done_in_epoch)
        for batch in batches:
            with accelerator.accumulate(*trained_models):
                latents = vae.encode(batch["pixel_values"].to(vae.dtype)).latent_dist.sample()
                latents = latents * vae.config.scaling_factor
                noisy_latents, timesteps, target = noise_and_target(noise_scheduler, latents, args.noise_offset)
                encoder_hidden_states = text_encoder(batch["input_ids"], return_dict=False)[0]
                model_pred = unet(noisy_latents, timesteps, encoder_hidden_states, return_dict=False)[0]
                loss = compute_loss(model_pred, target, timesteps)

                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(trained_parameters, args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
            # The logged loss: the mean over processes and accumulated batches of this step.
            step_loss += accelerator.reduce(loss.detach(), reduction="mean").item() / args.gradient_accumulation_steps

            if accelerator.sync_gradients:
                global_step += 1
                learning_rate = lr_scheduler.get_last_lr()[0]
                accelerator.log({"loss": step_loss, "lr": learning_rate}, step=global_step)
                progress.update(1)
                progress.set_postfix(loss=f"{step_loss:.4f}", lr=learning_rate)
                step_loss = 0.0
                if global_step % args.checkpointing_steps == 0:
                    save_checkpoint(accelerator, args.output_dir, global_step, args.checkpoints_total_limit)
                if global_step >= max_train_steps:
                    break

        # The last epoch is validated after training, from the saved file.
        if (args.validation_prompt and accelerator.is_main_process and global_step < max_train_steps
                and (epoch + 1) % args.validation_epochs == 0):
            pipeline = validation_pipeline(args, accelerator, unet=accelerator.unwrap_model(unet),
                                           text_encoder=accelerator.unwrap_model(text_encoder), vae=vae,
                                           tokenizer=tokenizer)
            log_validation(args, accelerator, pipeline, f"epoch_{epoch + 1:04d}", global_step)
            del pipeline

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_lora_weights(args.output_dir, accelerator.unwrap_model(unet),
                          accelerator.unwrap_model(text_encoder) if train_text_encoder else None)
        accelerator.print(f"Finished at step {global_step}: LoRA weights saved to "
                          f"{Path(args.output_dir) / LORA_WEIGHTS_NAME}")
        if args.validation_prompt:
            # As a user would: the base model from its files, then the saved LoRA file.
            pipeline = validation_pipeline(args, accelerator, tokenizer=tokenizer)
            pipeline.load_lora_weights(args.output_dir)
            log_validation(args, accelerator, pipeline, "final", global_step)
    accelerator.end_training()
