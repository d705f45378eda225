"""Task 2 test helpers: a tiny Stable Diffusion pipeline built offline, and running the wrappers.

The pipeline has Stable Diffusion 1.x's architecture family (UNet2DConditionModel with
cross-attention, AutoencoderKL, CLIP text encoder and BPE tokenizer, PNDM scheduler), a few
thousand times smaller, saved with ``save_pretrained`` so the training scripts load it exactly like
``CompVis/stable-diffusion-v1-4``. Its VAE downsamples by 2, so 32x32 images give 16x16 latents.
"""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

RESOLUTION = 32
# Flags every test run adds to a wrapper's own: tiny images, few denoising steps, CPU precision.
FAST_FLAGS = [f"--resolution={RESOLUTION}", "--num_inference_steps=2", "--num_validation_images=2",
              "--mixed_precision=no"]

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
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer_files", model_max_length=40)

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


def load_pipeline(model_dir: Path, lora_dir: Path | None = None):
    """A stock StableDiffusionPipeline, with ``load_lora_weights(lora_dir)`` when given."""
    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None)
    pipeline.set_progress_bar_config(disable=True)
    if lora_dir is not None:
        pipeline.load_lora_weights(lora_dir)
    return pipeline


def generate(pipeline, prompt: str, seed: int = 0) -> torch.Tensor:
    """Images [1, H, W, 3] in [0, 1] for ``prompt`` from a fixed seed."""
    generator = torch.Generator().manual_seed(seed)
    images = pipeline(prompt, num_inference_steps=3, generator=generator, output_type="np").images
    return torch.from_numpy(images)


def run_wrapper(script: Path, env: dict, args: list[str], home: Path) -> subprocess.CompletedProcess:
    """Run a shell wrapper as a student would (``sh scripts/x.sh ARGS``), offline, with a fresh
    Hugging Face home (no accelerate config file, no cached datasets)."""
    full_env = dict(os.environ)
    full_env.update(env)
    full_env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{full_env.get('PATH', '')}"
    full_env.update(HF_HUB_OFFLINE="1", HF_HOME=str(home))
    return subprocess.run(["sh", str(script), *args], env=full_env, capture_output=True, text=True, timeout=600,
                          stdin=subprocess.DEVNULL)


def tree_digest(folder: Path) -> str:
    """One hash over the names and bytes of every file under ``folder``."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def expected_lora_shapes(model: torch.nn.Module, suffixes: list[str], rank: int) -> dict[str, tuple]:
    """For each nn.Linear of ``model`` whose name ends in one of ``suffixes``: its LoRA tensors
    ``<name>.lora_A.weight`` [rank, in] and ``<name>.lora_B.weight`` [out, rank]."""
    shapes = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and any(name == s or name.endswith("." + s) for s in suffixes):
            shapes[f"{name}.lora_A.weight"] = (rank, module.in_features)
            shapes[f"{name}.lora_B.weight"] = (module.out_features, rank)
    return shapes
