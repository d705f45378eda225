"""Stable Diffusion 1.4's architecture with random weights, saved as a diffusers folder, for work that
needs its size but not its weights (memory and time do not depend on the weights' values).

    .venv/bin/python benchmarks/sd1_architecture.py OUT_DIR               # SD 1.4's sizes (about 4.3 GB)
    .venv/bin/python benchmarks/sd1_architecture.py OUT_DIR --scale tiny  # the test suite's tiny model

The "sd14" configurations are those published with CompVis/stable-diffusion-v1-4 (unet/, vae/,
text_encoder/ and scheduler/config.json); the tokenizer is written here (a CLIP BPE vocabulary of
single characters, every lowercase prompt tokenizes), with SD's 77-token context. The folder loads
like the hub's model: StableDiffusionPipeline.from_pretrained(OUT_DIR), or --pretrained_model_name_or_path.
The safety checker is left out, as the training scripts and the inference notebook leave it out.
"""
import argparse
import json
from pathlib import Path

import torch

SD14 = {
    "unet": dict(sample_size=64, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280),
                 layers_per_block=2, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=768,
                 attention_head_dim=8, norm_num_groups=32),
    "vae": dict(in_channels=3, out_channels=3, block_out_channels=(128, 256, 512, 512),
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                layers_per_block=2, latent_channels=4, norm_num_groups=32, sample_size=512),
    "text_encoder": dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                         num_attention_heads=12, projection_dim=768, hidden_act="quick_gelu"),
    "model_max_length": 77,
}
# A few thousand times smaller; its VAE downsamples by 2, so 32x32 images give 16x16 latents.
TINY = {
    "unet": dict(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=4,
                 norm_num_groups=16),
    "vae": dict(in_channels=3, out_channels=3, block_out_channels=(32, 64),
                down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), latent_channels=4, norm_num_groups=16,
                sample_size=32),
    "text_encoder": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4),
    "model_max_length": 40,
}
SCALES = {"sd14": SD14, "tiny": TINY}
# Stable Diffusion 1.x's own scheduler configuration.
SD1_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True,
                     set_alpha_to_one=False, steps_offset=1)


def write_tokenizer_files(folder: Path) -> None:
    """vocab.json and merges.txt of a CLIP BPE vocabulary of single characters.

    CLIP marks the last character of a word with ``</w>``; with no merges, a word becomes one
    token per character.
    """
    characters = [chr(c) for c in range(ord("a"), ord("z") + 1)] + list("0123456789.,!?'-")
    tokens = ["<|startoftext|>", "<|endoftext|>"] + characters + [c + "</w>" for c in characters]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")


def char_tokenizer(folder: Path, scale: str = "sd14"):
    """The CLIPTokenizer of write_tokenizer_files, written to ``folder``, with ``scale``'s context length."""
    from transformers import CLIPTokenizer

    write_tokenizer_files(folder)
    return CLIPTokenizer.from_pretrained(folder, model_max_length=SCALES[scale]["model_max_length"])


def build_networks(scale: str, tokenizer):
    """(unet, vae, text_encoder) of ``scale`` ("sd14" or "tiny"), random weights from seed 0."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    config = SCALES[scale]
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**config["unet"])
    vae = AutoencoderKL(**config["vae"])
    text_config = {"vocab_size": len(tokenizer), **config["text_encoder"]}
    text_encoder = CLIPTextModel(CLIPTextConfig(
        **text_config, max_position_embeddings=tokenizer.model_max_length, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    return unet, vae, text_encoder


def build_pipeline(folder: Path, scale: str = "sd14") -> Path:
    """Build the pipeline of ``scale`` deterministically and save it as ``folder/<scale>-sd``; returns that path."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    tokenizer = char_tokenizer(folder / "tokenizer_files", scale)
    unet, vae, text_encoder = build_networks(scale, tokenizer)
    pipeline = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                       scheduler=PNDMScheduler(**SD1_SCHEDULER), safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
    model_dir = folder / f"{scale}-sd"
    pipeline.save_pretrained(model_dir)
    return model_dir


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out_dir", type=Path, help="the pipeline is saved in OUT_DIR/<scale>-sd")
    parser.add_argument("--scale", choices=sorted(SCALES), default="sd14")
    args = parser.parse_args()
    print(build_pipeline(args.out_dir, args.scale))


if __name__ == "__main__":
    main()
