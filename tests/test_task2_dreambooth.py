"""Task 2-2: scripts/train_dreambooth_lora.sh with prior preservation and --train_text_encoder, run
for real on a tiny Stable Diffusion; the LoRA file it writes loads, every adapter landing, both in this
project's diffusers/transformers/peft and in the course's (diffusers 0.35.1, transformers 4.56.2,
peft 0.17.1), where the TAs load the submitted weights."""
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import REPO, TASK2
from task2_lora_load_check import check
from task2_tiny_pipeline import (FAST_FLAGS, RESOLUTION, expected_lora_file, generate, load_pipeline, run_wrapper,
                                 tree_digest)

SAMPLE_CAT = TASK2 / "sample_data" / "dreambooth-cat"
# The course's pins (../course_template/requirements.txt of the assignment) that load a LoRA ...
COURSE_PINS = ["diffusers==0.35.1", "transformers==4.56.2", "peft==0.17.1"]
# ... and what they need that this project's venv has at other versions: accelerate and safetensors at
# the course's own pins, and what pip resolves for the course's requirements.txt where transformers 4.56
# excludes ours (huggingface_hub < 1.0, tokenizers < 0.23). Everything else, torch included, is the venv's.
COURSE_DEPENDENCIES = ["accelerate==1.10.1", "safetensors==0.6.2", "huggingface_hub==0.36.2", "tokenizers==0.22.2"]


@pytest.fixture(scope="module")
def dreambooth_run(tiny_model, tmp_path_factory):
    """The DreamBooth wrapper, one process: 2 steps with prior preservation (1 of 3 class images there
    already) and --train_text_encoder, a large learning rate so that 2 steps visibly change the output."""
    tmp = tmp_path_factory.mktemp("dreambooth")
    class_dir = tmp / "class"
    class_dir.mkdir()
    shutil.copy(SAMPLE_CAT / "cat_0.png", class_dir / "class_0000.png")  # the name the generator would pick first
    own_class_image = (class_dir / "class_0000.png").read_bytes()
    digest_before = tree_digest(tiny_model)
    result = run_wrapper(
        TASK2 / "scripts" / "train_dreambooth_lora.sh",
        {"MODEL_NAME": str(tiny_model), "CLASS_DIR": str(class_dir), "OUTPUT_DIR": str(tmp / "out")},
        [*FAST_FLAGS, "--max_train_steps=2", "--learning_rate=1e-2", "--with_prior_preservation",
         "--class_prompt=a photo of a cat", "--num_class_images=3", "--train_text_encoder", "--report_to=none"],
        tmp / "hf")
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    return {"out": tmp / "out", "class_dir": class_dir, "log": log, "own_class_image": own_class_image,
            "digest_before": digest_before}


def test_dreambooth_generates_missing_class_images_then_trains_unet_and_text_encoder_lora(tiny_model,
                                                                                           dreambooth_run):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    out, class_dir, log = dreambooth_run["out"], dreambooth_run["class_dir"], dreambooth_run["log"]
    # The two missing class images were generated with the base model, the user's one kept as it was.
    assert "Generating 2 class images" in log
    assert sorted(p.name for p in class_dir.iterdir()) == ["class_0000.png", "class_0001.png", "class_0002.png"]
    assert (class_dir / "class_0000.png").read_bytes() == dreambooth_run["own_class_image"]
    for name in ("class_0001.png", "class_0002.png"):
        assert Image.open(class_dir / name).size == (RESOLUTION, RESOLUTION)
    # Training used the 4 sample photos of the cat and the 3 class images.
    assert re.search(r"Training on 4 instance images .* and 3 class images", log)

    # The file holds LoRA tensors for the UNet's and the text encoder's attention projections, nothing
    # else, under the names diffusers' examples write for SD 1.x.
    weights = load_file(out / "pytorch_lora_weights.safetensors")
    unet = UNet2DConditionModel.from_pretrained(tiny_model, subfolder="unet")
    text_encoder = CLIPTextModel.from_pretrained(tiny_model, subfolder="text_encoder")
    expected = expected_lora_file(unet, text_encoder, rank=4)
    assert any(k.startswith("text_encoder.text_model.") for k in expected)
    assert {k: tuple(v.shape) for k, v in weights.items()} == expected
    reported = int(re.search(r"Trainable parameters: (\d+)", log).group(1))
    assert reported == sum(v.numel() for v in weights.values())
    assert tree_digest(tiny_model) == dreambooth_run["digest_before"]

    # A stock pipeline loads both parts: the text encoder's output and the images change.
    base = load_pipeline(tiny_model)
    with_lora = load_pipeline(tiny_model, out)
    ids = base.tokenizer("a photo of sks cat", return_tensors="pt").input_ids
    with torch.no_grad():
        base_embedding = base.text_encoder(ids)[0]
        lora_embedding = with_lora.text_encoder(ids)[0]
    assert (lora_embedding - base_embedding).abs().max() > 1e-4
    assert (generate(with_lora, "a photo of sks cat") - generate(base, "a photo of sks cat")).abs().max() > 1e-3
    # 2 steps end inside the first epoch: no validation during training, one from the saved file after it.
    assert sorted(p.name for p in (out / "validation").iterdir()) == ["final.png"]


def assert_every_adapter_landed(report):
    """``report`` of task2_lora_load_check.check: every tensor of the file in an adapter and back, with no
    warning about keys, and both models changed exactly as merging B A into their weights does."""
    assert report["not_landed_messages"] == []
    assert set(report["landed"]) == {"unet", "text_encoder"}
    for model_name, landed in report["landed"].items():
        assert landed["in_file"] > 0 and landed["in_model"] == landed["in_file"], (model_name, landed)
        assert landed["missing_from_model"] == landed["not_from_file"] == [], (model_name, landed)
        assert landed["max_value_difference"] == 0.0, (model_name, landed)
    assert report["text_encoder_change"] > 1e-4 and report["unet_change"] > 1e-5
    # LoRA's own scale alpha / r = 1: loading computes W x + B A x, which is (W + B A) x up to rounding.
    assert report["text_encoder_vs_merged"] < 1e-2 * report["text_encoder_change"]
    assert report["unet_vs_merged"] < 1e-2 * report["unet_change"]


def test_the_lora_file_loads_every_adapter_in_this_projects_versions(tiny_model, dreambooth_run):
    report = check(tiny_model, dreambooth_run["out"])
    assert report["versions"]["diffusers"] == "0.42.1" and report["versions"]["transformers"].startswith("5.")
    assert_every_adapter_landed(report)


def course_environment():
    """A folder with the course's diffusers, transformers and peft (and the few packages they need at
    other versions than this venv's), installed once with ``pip install --target`` and kept under
    .venv/ for the next run; to be put first on PYTHONPATH. Skips the test when the package index
    cannot be reached."""
    pins = COURSE_PINS + COURSE_DEPENDENCIES
    key = hashlib.sha256(" ".join([sys.implementation.cache_tag, *pins]).encode()).hexdigest()[:12]
    folder = REPO / ".venv" / f"course-env-{key}"
    if (folder / "diffusers").is_dir():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    # --no-deps with an explicit list: nothing of the venv (torch above all) is downloaded again.
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                              "--no-deps", "--no-compile", "--timeout=20", "--retries=1", "--target", str(tmp), *pins],
                             capture_output=True, text=True, timeout=900)
    if install.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        index = os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple").rstrip("/")
        try:
            urllib.request.urlopen(f"{index}/diffusers/", timeout=15).close()
        except OSError as error:
            pytest.skip(f"the package index {index} cannot be reached ({error}); the course's "
                        f"{', '.join(COURSE_PINS)} cannot be installed")
        pytest.fail(f"pip could not install the course's packages:\n{install.stdout[-2000:]}{install.stderr[-2000:]}")
    try:
        os.replace(tmp, folder)
    except OSError:  # another test run installed it meanwhile
        shutil.rmtree(tmp)
    return folder


def test_the_lora_file_loads_every_adapter_in_the_courses_versions(dreambooth_run, tmp_path):
    """The TAs' environment: diffusers 0.35.1, transformers 4.56.2, peft 0.17.1 (with this venv's torch).
    There the file written before (peft's names, transformers 5's text-encoder paths) failed with an
    IndexError in get_peft_kwargs."""
    environment = course_environment()
    result = subprocess.run(
        [sys.executable, str(REPO / "tests" / "task2_lora_load_check.py"), str(dreambooth_run["out"]),
         str(tmp_path / "tiny")],
        # Not HF_HUB_OFFLINE: diffusers 0.35 then wants load_lora_weights(..., weight_name=...) even for a
        # local folder, and a TA's plain load_lora_weights(folder) is what must work. Nothing here is remote.
        env={**{k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}, "PYTHONPATH": str(environment),
             "PYTHONNOUSERSITE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"},
        capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    versions = report["versions"]
    assert [f"{name}=={versions[name]}" for name in ("diffusers", "transformers", "peft")] == COURSE_PINS
    assert versions["torch"] == torch.__version__
    assert_every_adapter_landed(report)
