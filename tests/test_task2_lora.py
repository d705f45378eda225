"""Task 2-1: scripts/train_lora.sh and scripts/train_lora_custom.sh run for real on a tiny Stable
Diffusion, and a stock diffusers pipeline loads what they write; tensorboard logs are read back; the
inference notebook runs."""
import base64
import io
import json
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from conftest import TASK2
from task2_tiny_pipeline import (FAST_FLAGS, RESOLUTION, expected_lora_file, generate, load_pipeline, merge_lora,
                                 read_tensorboard, run_wrapper, tree_digest)

SAMPLE_STYLE = TASK2 / "sample_data" / "artistic-custom"


@pytest.fixture(scope="module")
def naruto_wrapper_run(tiny_model, tmp_path_factory):
    """scripts/train_lora.sh with DATASET_NAME pointing at a local dataset folder (the hub is offline),
    rank 4, 5 steps over the 4 sample images (an epoch of 4 steps, validated, then one more step), a
    large learning rate so that a few steps visibly change the output, logging to tensorboard (the
    default), a checkpoint every step of which the wrapper keeps the last 2."""
    tmp = tmp_path_factory.mktemp("train_lora_sh")
    digest_before = tree_digest(tiny_model)
    result = run_wrapper(TASK2 / "scripts" / "train_lora.sh",
                         {"MODEL_NAME": str(tiny_model), "DATASET_NAME": str(SAMPLE_STYLE),
                          "OUTPUT_DIR": str(tmp / "out")},
                         [*FAST_FLAGS, "--max_train_steps=5", "--learning_rate=1e-2", "--checkpointing_steps=1"],
                         tmp / "hf")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return tmp / "out", result.stdout + result.stderr, digest_before


def test_train_lora_sh_trains_only_lora_and_the_stock_pipeline_loads_it(tiny_model, naruto_wrapper_run):
    from diffusers import UNet2DConditionModel

    out, log, digest_before = naruto_wrapper_run
    weights = load_file(out / "pytorch_lora_weights.safetensors")

    # Exactly one down [r, in] and one up [out, r] for each attention projection of the UNet, nothing else,
    # under the names diffusers' examples write.
    expected = expected_lora_file(UNet2DConditionModel.from_pretrained(tiny_model, subfolder="unet"), rank=4)
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
    # Validation grids of the wrapper's prompt: after epoch 1 (step 4), and after training from the saved file.
    for name in ("epoch_0001.png", "final.png"):
        assert Image.open(out / "validation" / name).size == (2 * RESOLUTION, RESOLUTION)
    assert sorted(p.name for p in (out / "validation").iterdir()) == ["epoch_0001.png", "final.png"]
    # A checkpoint each step, the 2 newest kept (--checkpoints_total_limit=2), no temporary folder left.
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-5"]
    assert not list(out.glob(".*"))


def test_train_lora_sh_logs_loss_lr_and_validation_images_to_tensorboard(naruto_wrapper_run):
    out, log, _ = naruto_wrapper_run
    scalars, images = read_tensorboard(out / "logs" / "train_lora")
    # One loss and one learning rate per optimizer step; the wrapper's schedule is constant.
    assert [step for step, _ in scalars["loss"]] == [1, 2, 3, 4, 5]
    assert all(np.isfinite(loss) and loss > 0 for _, loss in scalars["loss"])
    assert scalars["lr"] == [(step, pytest.approx(1e-2)) for step in range(1, 6)]
    # The validation images (2 per validation, as in the PNG grids): after epoch 1, and the final ones.
    # tensorboard stores each image of a batch as one tile of a grid.
    assert [step for step, _ in images["validation"]] == [4]
    assert [step for step, _ in images["final"]] == [5]
    final_grid = np.asarray(Image.open(out / "validation" / "final.png"))
    tile = images["final"][0][1]
    assert tile.shape[0] == RESOLUTION and tile.shape[1] >= 2 * RESOLUTION
    assert np.abs(tile[:, :2 * RESOLUTION, :3].astype(int) - final_grid.astype(int)).max() <= 1


def test_custom_wrapper_resumes_from_the_latest_checkpoint(tiny_model, naruto_wrapper_run, tmp_path):
    """train_lora_custom.sh (the same sample images, from its folder) on a copy of train_lora.sh's
    OUTPUT_DIR with --resume_from_checkpoint=latest: continues at checkpoint-5, with the optimizer and
    the schedule, to step 7."""
    out = tmp_path / "out"
    shutil.copytree(naruto_wrapper_run[0], out)
    result = run_wrapper(TASK2 / "scripts" / "train_lora_custom.sh",
                         {"MODEL_NAME": str(tiny_model), "OUTPUT_DIR": str(out)},
                         [*FAST_FLAGS, "--max_train_steps=7", "--learning_rate=1e-2", "--checkpointing_steps=1",
                          "--resume_from_checkpoint=latest", "--report_to=none"], tmp_path / "hf")
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-3000:]
    assert "checkpoint-5 at step 5" in log and "Finished at step 7" in log
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-6", "checkpoint-7"]
    # AdamW counted 5 restored steps plus 2 new ones; the learning-rate schedule too.
    optimizer = torch.load(out / "checkpoint-7" / "optimizer.bin", weights_only=True)
    assert all(int(state["step"]) == 7 for state in optimizer["state"].values())
    assert torch.load(out / "checkpoint-7" / "scheduler.bin", weights_only=True)["last_epoch"] == 7
    saved = load_file(out / "checkpoint-7" / "pytorch_lora_weights.safetensors")
    final = load_file(out / "pytorch_lora_weights.safetensors")
    assert saved.keys() == final.keys() and all(torch.equal(saved[k], final[k]) for k in saved)
    before = load_file(naruto_wrapper_run[0] / "pytorch_lora_weights.safetensors")
    assert any(not torch.equal(before[k], final[k]) for k in final)  # steps 6 and 7 trained


def notebook_images(notebook) -> list[np.ndarray]:
    """The PNG images a notebook's cells displayed, in order."""
    images = []
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            data = output.get("data", {})
            if "image/png" in data:
                images.append(np.asarray(Image.open(io.BytesIO(base64.b64decode(data["image/png"])))))
    return images


def reference_grid(model_dir, prompts, lora_file=None, scale=1.0):
    """What the notebook must draw: a stock pipeline, with ``scale`` x B A of ``lora_file`` merged into
    its weights by hand, one image per prompt from torch seed 10, side by side [H, W * len(prompts), 3]."""
    pipeline = load_pipeline(model_dir)
    if lora_file is not None:
        merge_lora(pipeline, lora_file, scale)
    images = []
    for prompt in prompts:
        torch.manual_seed(10)
        images.append(np.asarray(pipeline(prompt, num_inference_steps=3).images[0]))
    return np.concatenate(images, axis=1)


def test_inference_notebook_draws_each_lora_alone_at_the_chosen_scale(tiny_model, naruto_wrapper_run, monkeypatch,
                                                                       tmp_path):
    """The notebook, headless: the base model, then two LoRAs one after the other at LORA_SCALE=3, from a
    model folder that names a safety checker it does not have (loading one would fail)."""
    import nbformat
    from diffusers import StableDiffusionPipeline
    from nbclient import NotebookClient

    lora, _, _ = naruto_wrapper_run
    # A second LoRA: the first one with B negated, so that it pulls the other way.
    opposite = tmp_path / "opposite"
    opposite.mkdir()
    tensors = load_file(lora / "pytorch_lora_weights.safetensors")
    save_file({k: -v if ".lora.up." in k else v for k, v in tensors.items()},
              opposite / "pytorch_lora_weights.safetensors")
    # Stable Diffusion 1.x's model_index.json names a safety checker and its feature extractor.
    model = tmp_path / "with-safety-checker"
    shutil.copytree(tiny_model, model)
    index = json.loads((model / "model_index.json").read_text())
    index.update(safety_checker=["stable_diffusion", "StableDiffusionSafetyChecker"],
                 feature_extractor=["transformers", "CLIPImageProcessor"], requires_safety_checker=True)
    (model / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(Exception):  # a pipeline that loads the safety checker cannot load this folder
        StableDiffusionPipeline.from_pretrained(model)

    prompts, scale = ["a house", "a cute bear", "a photo of sks cat"], 3.0
    monkeypatch.setenv("MODEL_NAME", str(model))
    monkeypatch.setenv("LORA_PATH", f"{lora}|{opposite}")
    monkeypatch.setenv("LORA_SCALE", str(scale))
    monkeypatch.setenv("PROMPTS", "|".join(prompts))
    monkeypatch.setenv("NUM_INFERENCE_STEPS", "3")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("SAFETY_CHECKER", raising=False)
    notebook = nbformat.read(TASK2 / "lora_inference.ipynb", as_version=4)
    # Run a copy from the course folder, as a student would; the repository's file stays as it is.
    NotebookClient(notebook, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(TASK2)}}).execute()

    base_grid, first_grid, second_grid = (grid[:, :, :3].astype(int) for grid in notebook_images(notebook))
    assert base_grid.shape[:2] == (RESOLUTION, len(prompts) * RESOLUTION)
    assert np.abs(base_grid - reference_grid(tiny_model, prompts)).max() <= 1
    # Each LoRA grid is the base model plus 3 x that LoRA's B A, and nothing of the other LoRA.
    for grid, lora_dir in ((first_grid, lora), (second_grid, opposite)):
        expected = reference_grid(tiny_model, prompts, lora_dir / "pytorch_lora_weights.safetensors", scale)
        assert np.abs(grid - expected).max() <= 1
        assert np.abs(grid - base_grid).max() > 8
