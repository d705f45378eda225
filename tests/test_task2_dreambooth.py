"""Task 2-2: scripts/train_dreambooth_lora.sh with prior preservation and --train_text_encoder, run
for real on a tiny Stable Diffusion; a stock diffusers pipeline loads both LoRAs it writes."""
import re
import shutil

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import TASK2
from task2_tiny_pipeline import (FAST_FLAGS, RESOLUTION, expected_lora_shapes, generate, load_pipeline, run_wrapper,
                                 tiny_pipeline_dir, tree_digest)

SAMPLE_CAT = TASK2 / "sample_data" / "dreambooth-cat"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return tiny_pipeline_dir(tmp_path_factory)


def test_dreambooth_generates_missing_class_images_then_trains_unet_and_text_encoder_lora(tiny_model, tmp_path):
    from transformers import CLIPTextModel
    from diffusers import UNet2DConditionModel

    # One class image is already there, under the name the generator would pick first.
    class_dir = tmp_path / "class"
    class_dir.mkdir()
    shutil.copy(SAMPLE_CAT / "cat_0.png", class_dir / "class_0000.png")
    own_class_image = (class_dir / "class_0000.png").read_bytes()
    digest_before = tree_digest(tiny_model)

    result = run_wrapper(
        TASK2 / "scripts" / "train_dreambooth_lora.sh",
        {"MODEL_NAME": str(tiny_model), "CLASS_DIR": str(class_dir), "OUTPUT_DIR": str(tmp_path / "out")},
        [*FAST_FLAGS, "--max_train_steps=2", "--learning_rate=1e-2", "--with_prior_preservation",
         "--class_prompt=a photo of a cat", "--num_class_images=3", "--train_text_encoder"],
        tmp_path / "hf")
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]

    # The two missing class images were generated with the base model, the user's one kept as it was.
    assert "Generating 2 class images" in log
    assert sorted(p.name for p in class_dir.iterdir()) == ["class_0000.png", "class_0001.png", "class_0002.png"]
    assert (class_dir / "class_0000.png").read_bytes() == own_class_image
    for name in ("class_0001.png", "class_0002.png"):
        assert Image.open(class_dir / name).size == (RESOLUTION, RESOLUTION)
    # Training used the 4 sample photos of the cat and the 3 class images.
    assert re.search(r"Training on 4 instance images .* and 3 class images", log)

    # The file holds LoRA tensors for the UNet's and the text encoder's attention projections, nothing else.
    weights = load_file(tmp_path / "out" / "pytorch_lora_weights.safetensors")
    unet = UNet2DConditionModel.from_pretrained(tiny_model, subfolder="unet")
    text_encoder = CLIPTextModel.from_pretrained(tiny_model, subfolder="text_encoder")
    expected = {f"unet.{k}": v for k, v in expected_lora_shapes(unet, ["to_q", "to_k", "to_v", "to_out.0"], 4).items()}
    expected.update({f"text_encoder.{k}": v for k, v in
                     expected_lora_shapes(text_encoder, ["q_proj", "k_proj", "v_proj", "out_proj"], 4).items()})
    assert any(k.startswith("text_encoder.") for k in expected)
    assert {k: tuple(v.shape) for k, v in weights.items()} == expected
    reported = int(re.search(r"Trainable parameters: (\d+)", log).group(1))
    assert reported == sum(v.numel() for v in weights.values())
    assert tree_digest(tiny_model) == digest_before

    # A stock pipeline loads both parts: the text encoder's output and the images change.
    base = load_pipeline(tiny_model)
    with_lora = load_pipeline(tiny_model, tmp_path / "out")
    ids = base.tokenizer("a photo of sks cat", return_tensors="pt").input_ids
    with torch.no_grad():
        base_embedding = base.text_encoder(ids)[0]
        lora_embedding = with_lora.text_encoder(ids)[0]
    assert (lora_embedding - base_embedding).abs().max() > 1e-4
    assert (generate(with_lora, "a photo of sks cat") - generate(base, "a photo of sks cat")).abs().max() > 1e-3
    assert (tmp_path / "out" / "validation" / "epoch_0001.png").is_file()
