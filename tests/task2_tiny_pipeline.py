"""A tiny Stable Diffusion pipeline for the Task 2 tests, built offline.

Same architecture family as Stable Diffusion 1.x (UNet2DConditionModel with cross-attention,
AutoencoderKL, CLIP text encoder and BPE tokenizer, PNDM scheduler), a few thousand times
smaller, saved with ``save_pretrained`` so the training scripts load it exactly like
``CompVis/stable-diffusion-v1-4``. Its VAE downsamples by 2, so 32x32 images give 16x16 latents.
"""
import json
from pathlib import Path

import torch

RESOLUTION = 32

_built: dict[str, Path] = {}


def _write_tokenizer_files(folder: Path) -> None:
    """A CLIP BPE vocabulary of single characters: every lowercase prompt tokenizes.

    CLIP marks the last character of a word with ``</w>``; with no merges, a word becomes one
    token per character.
    """
    characters = [chr(c) for c in range(ord("a"), ord("z") + 1)] + list("0123456789.,!?'-")
    tokens = ["<|startoftext|>", "<|endoftext|>"] + characters + [c + "</w>" for c in characters]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")


def build_tiny_pipeline(folder: Path) -> Path:
    """Build the tiny pipeline deterministically and save it under ``folder``."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    _write_tokenizer_files(folder / "tokenizer_files")
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer_files", model_max_length=32)

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=RESOLUTION // 2,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=16,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=16,
        sample_size=RESOLUTION,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=tokenizer.model_max_length,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    # Stable Diffusion 1.x's own scheduler configuration.
    scheduler = PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        skip_prk_steps=True,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    pipeline = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    model_dir = folder / "tiny-sd"
    pipeline.save_pretrained(model_dir)
    return model_dir


def tiny_pipeline_dir(tmp_path_factory) -> Path:
    """The tiny pipeline's folder, built once per test session."""
    if "model" not in _built:
        _built["model"] = build_tiny_pipeline(tmp_path_factory.mktemp("tiny_sd"))
    return _built["model"]


def generate(model_dir: Path, lora_dir: Path | None, prompt: str, seed: int = 0) -> torch.Tensor:
    """Images [1, H, W, 3] in [0, 1] from a stock StableDiffusionPipeline, with a LoRA if given."""
    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None)
    pipeline.set_progress_bar_config(disable=True)
    if lora_dir is not None:
        pipeline.load_lora_weights(lora_dir)
    generator = torch.Generator().manual_seed(seed)
    images = pipeline(prompt, num_inference_steps=3, generator=generator, output_type="np").images
    return torch.from_numpy(images)
