"""Validation images: --num_validation_images of --validation_prompt, saved as one grid under
``output_dir/validation/`` and logged to the trackers."""
from pathlib import Path

import numpy as np
import torch

from atomic_write import save_image_atomic
from models import load_pipeline, weight_dtype
from utils import image_grid


def validation_pipeline(args, accelerator, **components):
    """The base model's pipeline on the accelerator's device, with ``components`` (e.g. the UNet being
    trained) in place of the base model's."""
    return load_pipeline(args, weight_dtype(accelerator.mixed_precision), **components).to(accelerator.device)


@torch.no_grad()
def draw_validation_images(args, accelerator, pipeline):
    """--num_validation_images PIL images of --validation_prompt, one per call (a batch of all would need
    their memory at once), the UNet and text encoder in eval mode so that LoRA dropout is off."""
    pipeline.unet.eval()
    pipeline.text_encoder.eval()
    generator = torch.Generator(device=accelerator.device)
    if args.seed is not None:
        generator.manual_seed(args.seed)
    with accelerator.autocast():
        return [pipeline(args.validation_prompt, height=args.resolution, width=args.resolution,
                         num_inference_steps=args.num_inference_steps, generator=generator).images[0]
                for _ in range(args.num_validation_images)]


def log_validation(args, accelerator, pipeline, name, step):
    """Draw the validation images with ``pipeline``; save them as ``output_dir/validation/{name}.png``
    and log them to the trackers at ``step``."""
    images = draw_validation_images(args, accelerator, pipeline)
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
