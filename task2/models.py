"""Stable Diffusion's networks as the scripts load them, and LoRA adapters on them."""
from typing import NamedTuple

import torch

from cli import UsageError, first_line

# LoRA goes on the attention projections: query, key, value and output (Hu et al., 2021, Sec. 4.2).
UNET_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_ENCODER_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


class StableDiffusion(NamedTuple):
    """The parts of a Stable Diffusion checkpoint that training uses."""
    tokenizer: object
    noise_scheduler: object
    text_encoder: torch.nn.Module
    vae: torch.nn.Module
    unet: torch.nn.Module


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
    """The tokenizer, the training noise scheduler and the three networks, frozen, on the accelerator's
    device, as a StableDiffusion."""
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
        raise UsageError(f"cannot load the model {model_name!r}: {first_line(error)}") from error
    if args.prediction_type is not None:
        noise_scheduler.register_to_config(prediction_type=args.prediction_type)
    for model in (text_encoder, vae, unet):
        model.requires_grad_(False)
        model.to(accelerator.device)
    return StableDiffusion(tokenizer, noise_scheduler, text_encoder, vae, unet)


def load_pipeline(args, dtype, **components):
    """The base model as a StableDiffusionPipeline without safety checker, with ``components`` (e.g.
    the UNet being trained) in place of the base model's, for validation and class images."""
    from diffusers import StableDiffusionPipeline

    try:
        pipeline = StableDiffusionPipeline.from_pretrained(
            args.pretrained_model_name_or_path, dtype=dtype, safety_checker=None, feature_extractor=None,
            requires_safety_checker=False, **hub_kwargs(args), **components)
    except (OSError, ValueError) as error:
        raise UsageError(f"cannot load the model {args.pretrained_model_name_or_path!r}: "
                         f"{first_line(error)}") from error
    if args.prediction_type is not None:
        pipeline.scheduler.register_to_config(prediction_type=args.prediction_type)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


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


def tokenize(tokenizer, prompts):
    """Token ids [B, tokenizer.model_max_length], padded and truncated like Stable Diffusion's pipeline."""
    return tokenizer(prompts, max_length=tokenizer.model_max_length, padding="max_length", truncation=True,
                     return_tensors="pt").input_ids
