"""Task 2-1: scripts/train_lora.sh and scripts/train_lora_custom.sh run for real on a tiny Stable
Diffusion, and a stock diffusers pipeline loads what they write; the inference notebook runs."""
import base64
import io
import re

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import TASK2
from task2_tiny_pipeline import (FAST_FLAGS, RESOLUTION, expected_lora_shapes, generate, load_pipeline, run_wrapper,
                                 tiny_pipeline_dir, tree_digest)

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
SAMPLE_STYLE = TASK2 / "sample_data" / "artistic-custom"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return tiny_pipeline_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def naruto_wrapper_run(tiny_model, tmp_path_factory):
    """scripts/train_lora.sh with DATASET_NAME pointing at a local dataset folder (the hub is offline),
    rank 4, 2 steps, a large learning rate so that 2 steps visibly change the output."""
    tmp = tmp_path_factory.mktemp("train_lora_sh")
    digest_before = tree_digest(tiny_model)
    result = run_wrapper(TASK2 / "scripts" / "train_lora.sh",
                         {"MODEL_NAME": str(tiny_model), "DATASET_NAME": str(SAMPLE_STYLE),
                          "OUTPUT_DIR": str(tmp / "out")},
                         [*FAST_FLAGS, "--max_train_steps=2", "--learning_rate=1e-2"], tmp / "hf")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return tmp / "out", result.stdout + result.stderr, digest_before


def test_train_lora_sh_trains_only_lora_and_the_stock_pipeline_loads_it(tiny_model, naruto_wrapper_run):
    from diffusers import UNet2DConditionModel

    out, log, digest_before = naruto_wrapper_run
    weights = load_file(out / "pytorch_lora_weights.safetensors")

    # Exactly one A [r, in] and one B [out, r] for each attention projection of the UNet, nothing else.
    base_unet = UNet2DConditionModel.from_pretrained(tiny_model, subfolder="unet")
    expected = {f"unet.{k}": v for k, v in expected_lora_shapes(base_unet, UNET_TARGETS, rank=4).items()}
    assert expected
    assert {k: tuple(v.shape) for k, v in weights.items()} == expected
    # The trainable count the script reports is the LoRA count, r * (in + out) per projection.
    reported = int(re.search(r"Trainable parameters: (\d+)", log).group(1))
    assert reported == sum(int(np.prod(shape)) for shape in expected.values())
    # The base model is untouched, and a stock pipeline with the LoRA draws different images.
    assert tree_digest(tiny_model) == digest_before
    base = load_pipeline(tiny_model)
    with_lora = load_pipeline(tiny_model, out)
    assert torch.equal(generate(base, "a house"), generate(base, "a house"))
    difference = (generate(with_lora, "a house") - generate(base, "a house")).abs().max()
    assert difference > 1e-3
    # Validation images of the wrapper's prompt, one grid of 2 at the training resolution.
    grid = Image.open(out / "validation" / "epoch_0001.png")
    assert grid.size == (2 * RESOLUTION, RESOLUTION)


def test_custom_wrapper_resumes_from_its_latest_checkpoint(tiny_model, tmp_path):
    """train_lora_custom.sh on the repo's sample folder: checkpoints every step, keeps 2; a second
    run with --resume_from_checkpoint latest continues at the saved step; a third run with nothing
    left to do writes back exactly the LoRA tensors of the checkpoint it resumed from."""
    script = TASK2 / "scripts" / "train_lora_custom.sh"
    env = {"MODEL_NAME": str(tiny_model), "OUTPUT_DIR": str(tmp_path / "out")}
    flags = [*FAST_FLAGS, "--checkpointing_steps=1", "--checkpoints_total_limit=2"]
    out = tmp_path / "out"

    first = run_wrapper(script, env, [*flags, "--max_train_steps=3"], tmp_path / "hf")
    assert first.returncode == 0, first.stderr[-3000:]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]

    second = run_wrapper(script, env, [*flags, "--max_train_steps=5", "--resume_from_checkpoint=latest"],
                         tmp_path / "hf")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "checkpoint-3 at step 3" in second.stdout + second.stderr
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-5"]
    # AdamW counted 3 restored steps plus 2 new ones; the learning-rate schedule too.
    optimizer = torch.load(out / "checkpoint-5" / "optimizer.bin", weights_only=True)
    assert all(int(state["step"]) == 5 for state in optimizer["state"].values())
    assert torch.load(out / "checkpoint-5" / "scheduler.bin", weights_only=True)["last_epoch"] == 5

    third = run_wrapper(script, env, [*flags, "--max_train_steps=5", "--resume_from_checkpoint=latest"],
                        tmp_path / "hf")
    assert third.returncode == 0, third.stderr[-3000:]
    assert "Finished at step 5" in third.stdout + third.stderr
    saved = load_file(out / "checkpoint-5" / "pytorch_lora_weights.safetensors")
    final = load_file(out / "pytorch_lora_weights.safetensors")
    assert saved.keys() == final.keys() and all(torch.equal(saved[k], final[k]) for k in saved)
    assert any(k.endswith("lora_B.weight") and saved[k].abs().max() > 0 for k in saved)  # B starts at zero

    difference = (generate(load_pipeline(tiny_model, out), "a house")
                  - generate(load_pipeline(tiny_model), "a house")).abs().max()
    assert difference > 0


def notebook_images(notebook) -> list[np.ndarray]:
    """The PNG images a notebook's cells displayed, in order."""
    images = []
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            data = output.get("data", {})
            if "image/png" in data:
                images.append(np.asarray(Image.open(io.BytesIO(base64.b64decode(data["image/png"])))))
    return images


def test_inference_notebook_runs_headless_with_the_tiny_model_and_lora(tiny_model, naruto_wrapper_run,
                                                                         monkeypatch, tmp_path):
    import nbformat
    from nbclient import NotebookClient

    out, _, _ = naruto_wrapper_run
    prompts = ["a house", "a cute bear", "a photo of sks cat"]
    monkeypatch.setenv("MODEL_NAME", str(tiny_model))
    monkeypatch.setenv("LORA_PATH", str(out))
    monkeypatch.setenv("PROMPTS", "|".join(prompts))
    monkeypatch.setenv("NUM_INFERENCE_STEPS", "3")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    notebook = nbformat.read(TASK2 / "lora_inference.ipynb", as_version=4)
    # Run a copy from the course folder, as a student would; the repository's file stays as it is.
    NotebookClient(notebook, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(TASK2)}}).execute()

    base_grid, lora_grid = notebook_images(notebook)
    assert base_grid.shape[:2] == lora_grid.shape[:2] == (RESOLUTION, len(prompts) * RESOLUTION)
    assert not np.array_equal(base_grid, lora_grid)
    # The grid without LoRA is what a stock pipeline draws for the first prompt from the notebook's seed.
    torch.manual_seed(10)
    pipeline = load_pipeline(tiny_model)
    first = (pipeline(prompts[0], num_inference_steps=3, output_type="np").images[0] * 255).round().astype(np.uint8)
    assert np.abs(base_grid[:, :RESOLUTION, :3].astype(int) - first.astype(int)).max() <= 1
