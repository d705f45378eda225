"""Task 2 test helpers: a tiny Stable Diffusion pipeline built offline, and running the wrappers.

The pipeline has Stable Diffusion 1.x's architecture family (UNet2DConditionModel with
cross-attention, AutoencoderKL, CLIP text encoder and BPE tokenizer, PNDM scheduler), a few
thousand times smaller, saved with ``save_pretrained`` so the training scripts load it exactly like
``CompVis/stable-diffusion-v1-4``. Its VAE downsamples by 2, so 32x32 images give 16x16 latents.
"""
import hashlib
import io
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from sd1_architecture import TINY, build_pipeline  # noqa: E402

RESOLUTION = TINY["vae"]["sample_size"]
# Flags every test run adds to a wrapper's own: tiny images, few denoising steps, CPU precision.
FAST_FLAGS = [f"--resolution={RESOLUTION}", "--num_inference_steps=2", "--num_validation_images=2",
              "--mixed_precision=no"]

_built: dict[str, Path] = {}


def build_tiny_pipeline(folder: Path) -> Path:
    """Build the tiny pipeline deterministically and save it under ``folder``."""
    return build_pipeline(folder, "tiny")


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


def _adapted_linears(model: torch.nn.Module, suffixes: list[str]):
    """(name, layer) of each nn.Linear of ``model`` whose name ends in one of ``suffixes``."""
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and any(name == s or name.endswith("." + s) for s in suffixes):
            yield name, module


def expected_lora_file(unet: torch.nn.Module, text_encoder: torch.nn.Module | None = None,
                       rank: int = 4) -> dict[str, tuple]:
    """Keys and shapes of a LoRA file in diffusers' SD 1.x layout (what its examples save) for these models.

    UNet (to_q, to_k, to_v, to_out.0): ``unet.<module>.lora.down.weight`` [rank, in] and
    ``.lora.up.weight`` [out, rank]. Text encoder (q_proj, k_proj, v_proj, out_proj):
    ``text_encoder.text_model.<module>.lora_linear_layer.down.weight`` / ``.up.weight``, with
    transformers 4's module path (transformers 5 dropped the ``text_model.`` level).
    """
    shapes = {}
    for name, layer in _adapted_linears(unet, ["to_q", "to_k", "to_v", "to_out.0"]):
        shapes[f"unet.{name}.lora.down.weight"] = (rank, layer.in_features)
        shapes[f"unet.{name}.lora.up.weight"] = (layer.out_features, rank)
    if text_encoder is not None:
        for name, layer in _adapted_linears(text_encoder, ["q_proj", "k_proj", "v_proj", "out_proj"]):
            name = name if name.startswith("text_model.") else f"text_model.{name}"
            shapes[f"text_encoder.{name}.lora_linear_layer.down.weight"] = (rank, layer.in_features)
            shapes[f"text_encoder.{name}.lora_linear_layer.up.weight"] = (layer.out_features, rank)
    return shapes


def free_port() -> int:
    """A TCP port nobody listens on now, for the processes of a multi-process run to meet on."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def lora_products(lora_file: Path) -> dict[str, torch.Tensor]:
    """The weight change B A [out, in] of each adapted layer in a LoRA file of diffusers' SD 1.x layout,
    keyed by ``unet.<module>`` / ``text_encoder.<module>`` as the file names the module. Parsed here by
    hand (``...lora.down/up.weight`` for the UNet, ``...lora_linear_layer.down/up.weight`` for the text
    encoder), not with diffusers' converters, so that it can check them."""
    from safetensors.torch import load_file

    tensors = load_file(lora_file)
    products = {}
    for key, down in tensors.items():
        for down_suffix, up_suffix in ((".lora.down.weight", ".lora.up.weight"),
                                       (".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight")):
            if key.endswith(down_suffix):
                module = key.removesuffix(down_suffix)
                products[module] = tensors[module + up_suffix].float() @ down.float()
    assert 2 * len(products) == len(tensors), f"{lora_file} holds tensors of another layout"
    return products


def merge_lora(pipeline, lora_file: Path, scale: float = 1.0) -> None:
    """Add ``scale`` x B A of every layer of ``lora_file`` to the pipeline's weights in place: what
    loading the LoRA at that scale must compute (its alpha / r is 1)."""
    for key, product in lora_products(lora_file).items():
        model_name, module_name = key.split(".", 1)
        model = getattr(pipeline, model_name)
        if not hasattr(model, "text_model"):  # transformers 5 flattened CLIPTextModel
            module_name = module_name.removeprefix("text_model.")
        with torch.no_grad():
            model.get_submodule(module_name).weight += scale * product.to(model.dtype)


def read_tensorboard(folder):
    """(scalars, images) of the tensorboard event files directly in ``folder``: {tag: [(step, value)]}
    and {tag: [(step, [H, W, 3] uint8 array)]}."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    scalars = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    images = {tag: [(e.step, np.asarray(Image.open(io.BytesIO(e.encoded_image_string)))) for e in events.Images(tag)]
              for tag in events.Tags()["images"]}
    return scalars, images
