"""Helpers shared by train_lora.py, train_dreambooth_lora.py and lora_inference.ipynb.

The two training scripts differ only in their data and their loss; everything else they share
lives here: the common command-line flags and their checks, model loading, LoRA injection and
saving, the noise-prediction loss, checkpoints, validation images and the training loop itself.
"""
import argparse
import math
import os
import random
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
# LoRA goes on the attention projections: query, key, value and output (Hu et al., 2021, Sec. 4.2).
UNET_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_ENCODER_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


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


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad command line in one line, like every other bad input."""

    def error(self, message):
        exit_with_error(f"{message} (see --help)")


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


def save_image_atomic(image, path):
    """Write a PIL image so that a crash never leaves a half-written file at ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    image.save(tmp, format=path.suffix.lstrip(".").upper().replace("JPG", "JPEG"))
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def add_common_args(parser: argparse.ArgumentParser):
    """Flags both training scripts take. Defaults follow the diffusers example scripts."""
    parser.add_argument("--pretrained_model_name_or_path", required=True,
                        help="Stable Diffusion: a hub name (CompVis/stable-diffusion-v1-4) or a local folder.")
    parser.add_argument("--output_dir", required=True,
                        help="Where pytorch_lora_weights.safetensors, checkpoint-N/ and validation/ are written.")
    parser.add_argument("--seed", type=int, default=None, help="Random seed for a reproducible run.")
    parser.add_argument("--resolution", type=int, default=512,
                        help="Training images are resized and cropped to this size (a multiple of 8).")
    parser.add_argument("--center_crop", action="store_true",
                        help="Crop the centre of each image (default: a random crop).")
    parser.add_argument("--random_flip", action="store_true", help="Flip images horizontally at random.")
    parser.add_argument("--train_batch_size", type=int, default=1, help="Images per step (per device).")
    parser.add_argument("--num_train_epochs", type=int, default=100,
                        help="Passes over the data; ignored when --max_train_steps is given.")
    parser.add_argument("--max_train_steps", type=int, default=None,
                        help="Total optimizer steps; overrides --num_train_epochs.")
    parser.add_argument("--gradient_accumulation_steps", type=int, default=1,
                        help="Batches whose gradients are summed before one optimizer step.")
    parser.add_argument("--gradient_checkpointing", action="store_true",
                        help="Recompute activations in the backward pass: less memory, about 20%% slower.")
    parser.add_argument("--learning_rate", type=float, default=1e-4, help="AdamW learning rate.")
    parser.add_argument("--lr_scheduler", default="constant",
                        choices=["linear", "cosine", "cosine_with_restarts", "polynomial", "constant",
                                 "constant_with_warmup"],
                        help="Learning-rate schedule.")
    parser.add_argument("--lr_warmup_steps", type=int, default=0, help="Linear warm-up steps of the schedule.")
    parser.add_argument("--adam_weight_decay", type=float, default=1e-2, help="AdamW weight decay.")
    parser.add_argument("--max_grad_norm", type=float, default=1.0, help="Gradient clipping norm.")
    parser.add_argument("--rank", type=int, default=4, help="LoRA rank r: each adapted W gets W + B A, A: r x in.")
    parser.add_argument("--snr_gamma", type=float, default=None,
                        help="Min-SNR loss weighting with this gamma (5.0 is the paper's value); off by default.")
    parser.add_argument("--mixed_precision", default=None, choices=["no", "fp16", "bf16"],
                        help="Precision of the frozen weights and activations (fp16 needs a CUDA GPU). "
                             "Default: what `accelerate launch --mixed_precision` says, else no.")
    parser.add_argument("--validation_prompt", default=None,
                        help="Prompt for the validation images (none: no validation).")
    parser.add_argument("--num_validation_images", type=int, default=4, help="Validation images per validation.")
    parser.add_argument("--validation_epochs", type=int, default=1,
                        help="Save validation images every this many epochs (and at the end).")
    parser.add_argument("--num_inference_steps", type=int, default=30,
                        help="Denoising steps when generating validation (and DreamBooth class) images.")
    parser.add_argument("--checkpointing_steps", type=int, default=500,
                        help="Save a resumable checkpoint-N/ every this many steps.")
    parser.add_argument("--checkpoints_total_limit", type=int, default=None,
                        help="Keep at most this many checkpoints (the oldest are deleted).")
    parser.add_argument("--resume_from_checkpoint", default=None,
                        help='A checkpoint-N folder to resume from, or "latest" (the newest in --output_dir).')
    parser.add_argument("--dataloader_num_workers", type=int, default=0, help="Data-loading worker processes.")


def check_common_args(args):
    """Reject bad values before anything is loaded or written. Sets ``args.mixed_precision``."""
    if args.rank < 1:
        exit_with_error(f"--rank must be at least 1, got {args.rank}")
    if args.resolution < 8 or args.resolution % 8 != 0:
        exit_with_error(f"--resolution must be a positive multiple of 8 (the VAE downsamples by 8), "
                        f"got {args.resolution}")
    positive = ["train_batch_size", "num_train_epochs", "gradient_accumulation_steps", "checkpointing_steps",
                "validation_epochs", "num_validation_images", "num_inference_steps"]
    positive += [name for name in ("max_train_steps", "checkpoints_total_limit") if getattr(args, name) is not None]
    for name in positive:
        if getattr(args, name) < 1:
            exit_with_error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.learning_rate <= 0:
        exit_with_error(f"--learning_rate must be positive, got {args.learning_rate}")
    if args.lr_warmup_steps < 0:
        exit_with_error(f"--lr_warmup_steps must be >= 0, got {args.lr_warmup_steps}")
    if args.snr_gamma is not None and args.snr_gamma <= 0:
        exit_with_error(f"--snr_gamma must be positive, got {args.snr_gamma}")

    args.mixed_precision = args.mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if args.mixed_precision == "fp16" and not torch.cuda.is_available():
        exit_with_error("--mixed_precision=fp16 needs a CUDA GPU; use --mixed_precision=no "
                        "(or MIXED_PRECISION=no for the shell scripts) on a CPU")

    model = args.pretrained_model_name_or_path
    if model.startswith(("/", ".", "~")) and not Path(model).expanduser().is_dir():
        exit_with_error(f"--pretrained_model_name_or_path {model} is not a folder")
    if Path(args.output_dir).exists() and not Path(args.output_dir).is_dir():
        exit_with_error(f"--output_dir {args.output_dir} exists and is not a folder")
    if args.resume_from_checkpoint not in (None, "latest"):
        if not (Path(args.resume_from_checkpoint) / LORA_WEIGHTS_NAME).is_file():
            exit_with_error(f"--resume_from_checkpoint {args.resume_from_checkpoint} is not a checkpoint folder "
                            f"(no {LORA_WEIGHTS_NAME} in it)")
        checkpoint_step(args.resume_from_checkpoint)


# ---------------------------------------------------------------------------------------------
# Models and LoRA
# ---------------------------------------------------------------------------------------------


def load_models(model_name, accelerator):
    """Tokenizer, training noise scheduler, and the three networks of a Stable Diffusion checkpoint,
    frozen, on the accelerator's device."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    # The frozen networks run in the mixed-precision dtype; the trainable LoRA weights, added later, stay in fp32.
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    try:
        tokenizer = CLIPTokenizer.from_pretrained(model_name, subfolder="tokenizer")
        noise_scheduler = DDPMScheduler.from_pretrained(model_name, subfolder="scheduler")
        text_encoder = CLIPTextModel.from_pretrained(model_name, subfolder="text_encoder", dtype=dtype)
        vae = AutoencoderKL.from_pretrained(model_name, subfolder="vae", dtype=dtype)
        unet = UNet2DConditionModel.from_pretrained(model_name, subfolder="unet", dtype=dtype)
    except (OSError, ValueError) as error:
        exit_with_error(f"cannot load the model {model_name!r}: {str(error).strip().splitlines()[0]}")
    for model in (text_encoder, vae, unet):
        model.requires_grad_(False)
        model.to(accelerator.device)
    return tokenizer, noise_scheduler, text_encoder, vae, unet


def add_lora(model, rank, target_modules):
    """Wrap ``target_modules`` of ``model`` with trainable LoRA layers; all else stays frozen.

    lora_alpha = rank makes the LoRA scale alpha / r equal to 1, which is also what diffusers'
    ``load_lora_weights`` assumes for a file without adapter metadata. Gaussian A and zero B
    (``init_lora_weights="gaussian"``) make the adapted model start exactly at the base model.
    """
    from peft import LoraConfig

    model.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
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
    """Write ``folder/pytorch_lora_weights.safetensors`` atomically: keys ``unet.<peft name>`` (and
    ``text_encoder.<peft name>``), the layout ``StableDiffusionPipeline.load_lora_weights(folder)`` reads."""
    from diffusers import StableDiffusionPipeline

    Path(folder).mkdir(parents=True, exist_ok=True)
    tmp_name = f".{LORA_WEIGHTS_NAME}.tmp"
    StableDiffusionPipeline.save_lora_weights(
        folder, unet_lora_layers=lora_layers(unet),
        text_encoder_lora_layers=lora_layers(text_encoder) if text_encoder is not None else None,
        weight_name=tmp_name)
    os.replace(Path(folder) / tmp_name, Path(folder) / LORA_WEIGHTS_NAME)


def load_lora_weights(folder, unet, text_encoder=None):
    """Inverse of ``save_lora_weights``: copy the saved LoRA tensors into the models' adapters."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    state = load_file(Path(folder) / LORA_WEIGHTS_NAME)
    for prefix, model in (("unet.", unet), ("text_encoder.", text_encoder)):
        if model is not None:
            part = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
            result = set_peft_model_state_dict(model, part)
            if result.unexpected_keys:
                raise ValueError(f"{folder} does not match the model: unexpected {result.unexpected_keys[:3]}")


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def image_transforms(resolution, center_crop, random_flip):
    """PIL image -> tensor [3, resolution, resolution] in [-1, 1], the VAE's input range."""
    from torchvision import transforms

    return transforms.Compose([
        transforms.Resize(resolution, interpolation=transforms.InterpolationMode.BILINEAR),
        transforms.CenterCrop(resolution) if center_crop else transforms.RandomCrop(resolution),
        transforms.RandomHorizontalFlip() if random_flip else transforms.Lambda(lambda x: x),
        transforms.ToTensor(),
        transforms.Normalize([0.5], [0.5]),
    ])


def tokenize(tokenizer, prompts):
    """Token ids [B, tokenizer.model_max_length], padded and truncated like Stable Diffusion's pipeline."""
    return tokenizer(prompts, max_length=tokenizer.model_max_length, padding="max_length", truncation=True,
                     return_tensors="pt").input_ids


def noise_and_target(noise_scheduler, latents):
    """Draw t ~ U{0..T-1} and eps ~ N(0, I); return x_t, t and the UNet's regression target.

    x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps   (DDPM, Ho et al. 2020, Eq. 4)
    The target is eps for epsilon-prediction (SD 1.x) or v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x_0
    for v-prediction (SD 2.x).
    """
    noise = torch.randn_like(latents)
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
    """(steps per epoch, total steps, epochs), counting optimizer steps."""
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


def register_lora_checkpoint_hooks(accelerator, unet, text_encoder=None):
    """Make ``accelerator.save_state``/``load_state`` store the LoRA tensors only.

    Without these hooks accelerate would save every weight of the UNet (3.4 GB for SD 1.4) in
    each checkpoint. The optimizer, learning-rate scheduler and random states are saved by
    accelerate itself.
    """

    def save_hook(models, weights, folder):
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
    """Save ``output_dir/checkpoint-{step}`` (written to a temporary folder, then renamed), then
    delete the oldest checkpoints beyond ``total_limit``."""
    final = Path(output_dir) / f"checkpoint-{step}"
    tmp = Path(output_dir) / f".checkpoint-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    accelerator.save_state(str(tmp))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    if total_limit is not None:
        for old in list_checkpoints(output_dir)[:-total_limit]:
            shutil.rmtree(old)


def resume(accelerator, args):
    """Load the checkpoint named by --resume_from_checkpoint; return the step it was saved at (0: none)."""
    if args.resume_from_checkpoint is None:
        return 0
    if args.resume_from_checkpoint == "latest":
        checkpoints = list_checkpoints(args.output_dir)
        if not checkpoints:
            accelerator.print(f"No checkpoint in {args.output_dir}: starting a new run.")
            return 0
        path = checkpoints[-1]
    else:
        path = Path(args.resume_from_checkpoint)
    accelerator.load_state(str(path))
    step = checkpoint_step(path)
    accelerator.print(f"Resumed from {path} at step {step}.")
    return step


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def save_validation_images(args, accelerator, unet, text_encoder, vae, tokenizer, epoch):
    """Generate ``--num_validation_images`` for ``--validation_prompt`` with the model being trained and
    save them as one grid, ``output_dir/validation/epoch_{epoch:04d}.png``."""
    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline.from_pretrained(
        args.pretrained_model_name_or_path, unet=accelerator.unwrap_model(unet),
        text_encoder=accelerator.unwrap_model(text_encoder), vae=vae, tokenizer=tokenizer,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipeline.set_progress_bar_config(disable=True)
    generator = torch.Generator(device=accelerator.device)
    if args.seed is not None:
        generator.manual_seed(args.seed)
    with accelerator.autocast():
        images = pipeline([args.validation_prompt] * args.num_validation_images, height=args.resolution,
                          width=args.resolution, num_inference_steps=args.num_inference_steps,
                          generator=generator).images
    folder = Path(args.output_dir) / "validation"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"epoch_{epoch:04d}.png"
    save_image_atomic(image_grid(images, 1, len(images)), path)
    accelerator.print(f"Validation images for {args.validation_prompt!r} saved to {path}")


# ---------------------------------------------------------------------------------------------
# The training loop
# ---------------------------------------------------------------------------------------------


def train(args, accelerator, unet, text_encoder, vae, tokenizer, noise_scheduler, train_dataloader, optimizer,
          compute_loss, train_text_encoder=False):
    """Train the LoRA weights for --max_train_steps (or --num_train_epochs) and save them to
    ``output_dir/pytorch_lora_weights.safetensors``; resume, checkpoints and validation images as the
    flags say.

    Each step: z_0 = VAE(x) * scaling_factor, z_t and the target from ``noise_and_target``, then
    ``compute_loss(model_pred, target, timesteps)`` with model_pred, target: [B, C, h, w] (UNet output
    and regression target) and timesteps: [B] must return the scalar to minimise. A batch holds
    ``pixel_values`` [B, 3, H, W] in [-1, 1] and ``input_ids`` [B, tokenizer.model_max_length].
    ``optimizer`` updates the LoRA weights of the UNet (and of the text encoder with ``train_text_encoder``);
    they follow the --lr_scheduler schedule.
    """
    from diffusers.optimization import get_scheduler

    steps_per_epoch, max_train_steps, num_epochs = training_length(args, len(train_dataloader))
    # accelerate steps a prepared scheduler once per process at each optimizer step.
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer,
                                 num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=max_train_steps * accelerator.num_processes)
    trained_parameters = [p for group in optimizer.param_groups for p in group["params"]]
    if train_text_encoder:
        unet, text_encoder, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(
            unet, text_encoder, optimizer, train_dataloader, lr_scheduler)
        trained_models = [unet, text_encoder]
    else:
        unet, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(
            unet, optimizer, train_dataloader, lr_scheduler)
        trained_models = [unet]
    register_lora_checkpoint_hooks(accelerator, unet, text_encoder if train_text_encoder else None)

    global_step = resume(accelerator, args)
    first_epoch = global_step // steps_per_epoch
    batches_done_in_epoch = (global_step % steps_per_epoch) * args.gradient_accumulation_steps
    accelerator.print(f"{steps_per_epoch} steps per epoch, training from step {global_step} to {max_train_steps}.")
    progress = tqdm(range(max_train_steps), initial=global_step, desc="Steps",
                    disable=not accelerator.is_local_main_process)

    for epoch in range(first_epoch, num_epochs):
        if global_step >= max_train_steps:
            break
        for model in trained_models:
            model.train()
        batches = train_dataloader
        if epoch == first_epoch and batches_done_in_epoch > 0:
            batches = accelerator.skip_first_batches(train_dataloader, batches_done_in_epoch)
        for batch in batches:
            with accelerator.accumulate(*trained_models):
                latents = vae.encode(batch["pixel_values"].to(vae.dtype)).latent_dist.sample()
                latents = latents * vae.config.scaling_factor
                noisy_latents, timesteps, target = noise_and_target(noise_scheduler, latents)
                encoder_hidden_states = text_encoder(batch["input_ids"], return_dict=False)[0]
                model_pred = unet(noisy_latents, timesteps, encoder_hidden_states, return_dict=False)[0]
                loss = compute_loss(model_pred, target, timesteps)

                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(trained_parameters, args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()

            if accelerator.sync_gradients:
                global_step += 1
                progress.update(1)
                progress.set_postfix(loss=f"{loss.item():.4f}", lr=lr_scheduler.get_last_lr()[0])
                if global_step % args.checkpointing_steps == 0 and accelerator.is_main_process:
                    save_checkpoint(accelerator, args.output_dir, global_step, args.checkpoints_total_limit)
                if global_step >= max_train_steps:
                    break

        finished = global_step >= max_train_steps
        if args.validation_prompt and accelerator.is_main_process and (
                (epoch + 1) % args.validation_epochs == 0 or finished):
            save_validation_images(args, accelerator, unet, text_encoder, vae, tokenizer, epoch + 1)
        if finished:
            break

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_lora_weights(args.output_dir, accelerator.unwrap_model(unet),
                          accelerator.unwrap_model(text_encoder) if train_text_encoder else None)
        accelerator.print(f"Finished at step {global_step}: LoRA weights saved to "
                          f"{Path(args.output_dir) / LORA_WEIGHTS_NAME}")
    accelerator.end_training()
