"""Task 2 bad input: one clear line on stderr, a non-zero exit, and nothing in OUTPUT_DIR touched."""
import json
import shutil

import pytest
import torch

from conftest import TASK2, load_module
from task2_tiny_pipeline import run_wrapper, tiny_pipeline_dir, tree_digest

SAMPLE_STYLE = TASK2 / "sample_data" / "artistic-custom"
SAMPLE_CAT = TASK2 / "sample_data" / "dreambooth-cat"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return tiny_pipeline_dir(tmp_path_factory)


@pytest.fixture
def earlier_run(tmp_path):
    """An OUTPUT_DIR holding the results of an earlier run, which a failed run must leave as they are."""
    out = tmp_path / "out"
    (out / "validation").mkdir(parents=True)
    (out / "pytorch_lora_weights.safetensors").write_bytes(b"weights of an earlier run")
    (out / "validation" / "epoch_0001.png").write_bytes(b"an earlier validation grid")
    return out


def test_wrapper_with_a_missing_data_folder_prints_one_line_and_exits(tiny_model, earlier_run, tmp_path):
    before = tree_digest(earlier_run)
    result = run_wrapper(TASK2 / "scripts" / "train_lora_custom.sh",
                         {"MODEL_NAME": str(tiny_model), "TRAIN_DATA_DIR": str(tmp_path / "missing"),
                          "OUTPUT_DIR": str(earlier_run)},
                         ["--resolution=32"], tmp_path / "hf")
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [f"error: --train_data_dir {tmp_path / 'missing'} is not a folder"]
    assert "Traceback" not in result.stdout
    assert tree_digest(earlier_run) == before


def captioned_folder(folder, caption_key):
    """An imagefolder dataset of one sample image whose captions are under ``caption_key``."""
    (folder / "train").mkdir(parents=True)
    shutil.copy(SAMPLE_STYLE / "train" / "0000.png", folder / "train" / "0000.png")
    (folder / "train" / "metadata.jsonl").write_text(json.dumps({"file_name": "0000.png", caption_key: "a boat"}))
    return folder


# case -> (flags that differ from a good run, what the error line must say)
TRAIN_LORA_CASES = {
    "caption column absent": ({}, "--caption_column 'text' is not a column of the dataset (columns: image, caption)"),
    "rank 0": ({"--rank": "0"}, "--rank must be at least 1, got 0"),
    "resolution 30": ({"--resolution": "30"}, "--resolution must be a positive multiple of 8"),
    "fp16 on a CPU": ({"--mixed_precision": "fp16"}, "--mixed_precision=fp16 needs a CUDA GPU"),
    "missing model folder": ({"--pretrained_model_name_or_path": "{tmp}/nowhere"},
                             "--pretrained_model_name_or_path {tmp}/nowhere is not a folder"),
    "data folder without metadata.jsonl": ({"--train_data_dir": "{tmp}/empty"},
                                           "--train_data_dir {tmp}/empty has no metadata.jsonl"),
    "unreadable image": ({}, "cannot read the image {tmp}/data/train/0000.png"),
}


@pytest.mark.parametrize("case", TRAIN_LORA_CASES)
def test_train_lora_rejects_bad_input(case, tiny_model, earlier_run, tmp_path, capsys):
    if case == "fp16 on a CPU" and torch.cuda.is_available():
        pytest.skip("fp16 is valid on this machine")
    (tmp_path / "empty").mkdir()
    data = captioned_folder(tmp_path / "data", "caption" if case == "caption column absent" else "text")
    if case == "unreadable image":
        (data / "train" / "0000.png").write_bytes(b"not a PNG")
    overrides, expected = TRAIN_LORA_CASES[case]
    args = {"--pretrained_model_name_or_path": str(tiny_model), "--output_dir": str(earlier_run),
            "--train_data_dir": str(data), "--resolution": "32", "--mixed_precision": "no"}
    args.update({flag: value.format(tmp=tmp_path) for flag, value in overrides.items()})
    before = tree_digest(earlier_run)

    train_lora = load_module(TASK2, "train_lora")
    with pytest.raises(SystemExit) as exit_info:
        train_lora.main([f"{flag}={value}" for flag, value in args.items()])

    assert exit_info.value.code == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected.format(tmp=tmp_path) in lines[0], lines
    assert tree_digest(earlier_run) == before


@pytest.mark.parametrize("case", ["missing instance folder", "no images", "unreadable image",
                                  "prior without class prompt", "rank 0"])
def test_train_dreambooth_lora_rejects_bad_input(case, tiny_model, earlier_run, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    args = {"--pretrained_model_name_or_path": str(tiny_model), "--output_dir": str(earlier_run),
            "--instance_data_dir": str(SAMPLE_CAT), "--instance_prompt": "a photo of sks cat",
            "--resolution": "32", "--mixed_precision": "no"}
    flags = []
    expected = {
        "missing instance folder": f"--instance_data_dir {tmp_path / 'nowhere'} is not a folder",
        "no images": f"--instance_data_dir {tmp_path / 'empty'} has no images",
        "unreadable image": f"cannot read the image {tmp_path / 'cat' / 'broken.jpg'}",
        "prior without class prompt": "--with_prior_preservation needs --class_data_dir and --class_prompt",
        "rank 0": "--rank must be at least 1, got 0",
    }[case]
    if case == "missing instance folder":
        args["--instance_data_dir"] = str(tmp_path / "nowhere")
    elif case == "no images":
        args["--instance_data_dir"] = str(tmp_path / "empty")
    elif case == "unreadable image":
        shutil.copytree(SAMPLE_CAT, tmp_path / "cat")
        (tmp_path / "cat" / "broken.jpg").write_bytes(b"not a JPEG")
        args["--instance_data_dir"] = str(tmp_path / "cat")
    elif case == "prior without class prompt":
        flags = ["--with_prior_preservation", f"--class_data_dir={tmp_path / 'class'}"]
    else:
        args["--rank"] = "0"
    before = tree_digest(earlier_run)

    train_dreambooth_lora = load_module(TASK2, "train_dreambooth_lora")
    with pytest.raises(SystemExit) as exit_info:
        train_dreambooth_lora.main([f"{flag}={value}" for flag, value in args.items()] + flags)

    assert exit_info.value.code == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], lines
    assert tree_digest(earlier_run) == before
    assert not (tmp_path / "class").exists()
