"""Task 2 bad input: one clear line on stderr, a non-zero exit, and nothing in OUTPUT_DIR touched."""
import json
import shutil

import pytest
import torch

from conftest import TASK2, load_module
from task2_tiny_pipeline import run_wrapper, tree_digest

SAMPLE_STYLE = TASK2 / "sample_data" / "artistic-custom"
SAMPLE_CAT = TASK2 / "sample_data" / "dreambooth-cat"


@pytest.fixture(scope="module")
def checkpoints(tiny_model, tmp_path_factory):
    """Checkpoint LoRA files of rank 4 as the scripts write them: the UNet's LoRA alone ("unet") and the
    UNet's and the text encoder's ("unet+text_encoder")."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    models = load_module(TASK2, "models")
    lora_weights = load_module(TASK2, "lora_weights")
    unet = UNet2DConditionModel.from_pretrained(tiny_model, subfolder="unet")
    text_encoder = CLIPTextModel.from_pretrained(tiny_model, subfolder="text_encoder")
    models.add_lora(unet, 4, models.UNET_LORA_TARGETS)
    models.add_lora(text_encoder, 4, models.TEXT_ENCODER_LORA_TARGETS)
    folder = tmp_path_factory.mktemp("checkpoints")
    lora_weights.save_lora_weights(folder / "unet", unet)
    lora_weights.save_lora_weights(folder / "unet+text_encoder", unet, text_encoder)
    return folder


@pytest.fixture
def earlier_run(tmp_path):
    """An OUTPUT_DIR holding the results of an earlier run, which a failed run must leave as they are."""
    out = tmp_path / "out"
    (out / "validation").mkdir(parents=True)
    (out / "pytorch_lora_weights.safetensors").write_bytes(b"weights of an earlier run")
    (out / "validation" / "epoch_0001.png").write_bytes(b"an earlier validation grid")
    return out


@pytest.mark.parametrize("case", ["missing data folder", "NUM_PROCESSES not a number", "MIXED_PRECISION fp8",
                                  "a second run into OUTPUT_DIR"])
def test_wrapper_with_bad_input_prints_one_line_and_exits(case, tiny_model, earlier_run, tmp_path):
    env = {"MODEL_NAME": str(tiny_model), "TRAIN_DATA_DIR": str(tmp_path / "missing"), "OUTPUT_DIR": str(earlier_run)}
    expected = f"error: --train_data_dir {tmp_path / 'missing'} is not a folder"
    if case == "NUM_PROCESSES not a number":
        env.update(TRAIN_DATA_DIR=str(SAMPLE_STYLE), NUM_PROCESSES="two")
        expected = "error: NUM_PROCESSES must be a positive integer, got 'two'"
    elif case == "MIXED_PRECISION fp8":
        env.update(TRAIN_DATA_DIR=str(SAMPLE_STYLE), MIXED_PRECISION="fp8")
        expected = "error: MIXED_PRECISION must be no, fp16 or bf16, got 'fp8'"
    elif case == "a second run into OUTPUT_DIR":
        # The wrapper fixes OUTPUT_DIR: run twice, the second run must not overwrite the first one's results.
        env.update(TRAIN_DATA_DIR=str(SAMPLE_STYLE))
        expected = (f"error: --output_dir {earlier_run} holds an earlier run (pytorch_lora_weights.safetensors, "
                    f"validation/): continue it with --resume_from_checkpoint=latest, pick another --output_dir, "
                    f"or replace it with --overwrite_output_dir")
    before = tree_digest(earlier_run)
    result = run_wrapper(TASK2 / "scripts" / "train_lora_custom.sh", env,
                         ["--resolution=32", "--max_train_steps=1", "--num_inference_steps=1",
                          "--num_validation_images=1"], tmp_path / "hf")
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [expected]
    assert "Traceback" not in result.stdout
    assert tree_digest(earlier_run) == before


def captioned_folder(folder, caption_key):
    """An imagefolder dataset of one sample image whose captions are under ``caption_key``."""
    (folder / "train").mkdir(parents=True)
    shutil.copy(SAMPLE_STYLE / "train" / "0000.png", folder / "train" / "0000.png")
    (folder / "train" / "metadata.jsonl").write_text(json.dumps({"file_name": "0000.png", caption_key: "a boat"}))
    return folder


# case -> (flags that differ from a good run (None: a flag without value), what the error line must say)
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
    "8-bit Adam on a CPU": ({"--use_8bit_adam": None},
                            "--use_8bit_adam needs a CUDA GPU (bitsandbytes' 8-bit optimizers run on CUDA only)"),
    "wandb not installed": ({"--report_to": "wandb"}, "--report_to wandb needs the wandb package"),
    "max_train_samples 0": ({"--max_train_samples": "0"}, "--max_train_samples must be at least 1, got 0"),
    "adam_beta1 1.5": ({"--adam_beta1": "1.5"}, "--adam_beta1 must be in [0, 1), got 1.5"),
    "negative noise offset": ({"--noise_offset": "-0.1"}, "--noise_offset must be >= 0, got -0.1"),
    "no such checkpoint": ({"--resume_from_checkpoint": "checkpoint-7"},
                           "--resume_from_checkpoint checkpoint-7: no checkpoint folder "
                           "(with pytorch_lora_weights.safetensors) at {tmp}/out/checkpoint-7 or checkpoint-7"),
    "damaged checkpoint": ({"--resume_from_checkpoint": "checkpoint-3"},
                           "cannot read {tmp}/out/checkpoint-3/pytorch_lora_weights.safetensors"),
    "checkpoint with text-encoder LoRA": ({"--resume_from_checkpoint": "checkpoint-3"},
                                          "--resume_from_checkpoint {tmp}/out/checkpoint-3 trained the text encoder's "
                                          "LoRA too, this run the UNet's only"),
    "checkpoint of another rank": ({"--resume_from_checkpoint": "checkpoint-3", "--rank": "8"},
                                   "--resume_from_checkpoint {tmp}/out/checkpoint-3 has rank [4], this run --rank 8"),
    "learning rate inf": ({"--learning_rate": "inf"}, "--learning_rate must be finite and positive, got inf"),
    "noise offset nan": ({"--noise_offset": "nan"}, "--noise_offset must be finite and >= 0, got nan"),
    "snr gamma nan": ({"--snr_gamma": "nan"}, "--snr_gamma must be finite and positive, got nan"),
    "max grad norm nan": ({"--max_grad_norm": "nan"}, "--max_grad_norm must be finite and positive, got nan"),
    "max grad norm -1": ({"--max_grad_norm": "-1"}, "--max_grad_norm must be positive, got -1.0"),
    "max grad norm 0": ({"--max_grad_norm": "0"}, "--max_grad_norm must be positive, got 0.0"),
    "row without caption": ({}, "{tmp}/data/train/metadata.jsonl line 2 has no caption under 'text' (got None)"),
    "row with null caption": ({}, "{tmp}/data/train/metadata.jsonl line 2 has no caption under 'text' (got None)"),
    "row naming a missing image": ({}, "{tmp}/data/train/metadata.jsonl line 2 names 0001.png, which is not in "
                                       "{tmp}/data/train"),
    "PNG with a bad CRC": ({}, "cannot read the image {tmp}/data/train/0000.png"),
}
# Rows a case puts in metadata.jsonl after the good one (a second image 0001.png is there unless said).
SECOND_ROW = {"row without caption": {"file_name": "0001.png"},
              "row with null caption": {"file_name": "0001.png", "text": None},
              "row naming a missing image": {"file_name": "0001.png", "text": "a ship"}}
# The checkpoint-3 a case puts in OUTPUT_DIR: one of the `checkpoints` fixture's, or damaged bytes.
CHECKPOINT_OF_CASE = {"damaged checkpoint": None, "checkpoint with text-encoder LoRA": "unet+text_encoder",
                      "checkpoint of another rank": "unet", "add the text encoder to a UNet checkpoint": "unet"}


def put_checkpoint(case, earlier_run, checkpoints):
    """Give ``earlier_run`` the checkpoint-3 that ``case`` needs, if any."""
    if case not in CHECKPOINT_OF_CASE:
        return
    folder = earlier_run / "checkpoint-3"
    if CHECKPOINT_OF_CASE[case] is None:
        folder.mkdir()
        (folder / "pytorch_lora_weights.safetensors").write_bytes(b"the disk filled up while writing this")
    else:
        shutil.copytree(checkpoints / CHECKPOINT_OF_CASE[case], folder)


def skip_where_valid(case):
    if case in ("fp16 on a CPU", "8-bit Adam on a CPU") and torch.cuda.is_available():
        pytest.skip("valid on a machine with CUDA")
    if case == "wandb not installed":
        from accelerate.utils import is_wandb_available

        if is_wandb_available():
            pytest.skip("wandb is installed")


@pytest.mark.parametrize("case", TRAIN_LORA_CASES)
def test_train_lora_rejects_bad_input(case, tiny_model, checkpoints, earlier_run, tmp_path, capsys):
    skip_where_valid(case)
    (tmp_path / "empty").mkdir()
    data = captioned_folder(tmp_path / "data", "caption" if case == "caption column absent" else "text")
    if case == "unreadable image":
        (data / "train" / "0000.png").write_bytes(b"not a PNG")
    if case == "PNG with a bad CRC":  # one byte of the pixel data changed: PIL raises SyntaxError, not OSError
        damaged = bytearray((data / "train" / "0000.png").read_bytes())
        damaged[len(damaged) // 2] ^= 0xFF
        (data / "train" / "0000.png").write_bytes(bytes(damaged))
    if case in SECOND_ROW:
        if case != "row naming a missing image":
            shutil.copy(SAMPLE_STYLE / "train" / "0001.png", data / "train" / "0001.png")
        with open(data / "train" / "metadata.jsonl", "a") as metadata:
            metadata.write("\n" + json.dumps(SECOND_ROW[case]) + "\n")
    put_checkpoint(case, earlier_run, checkpoints)
    overrides, expected = TRAIN_LORA_CASES[case]
    args = {"--pretrained_model_name_or_path": str(tiny_model), "--output_dir": str(earlier_run),
            "--train_data_dir": str(data), "--resolution": "32", "--mixed_precision": "no"}
    args.update({flag: value if value is None else value.format(tmp=tmp_path) for flag, value in overrides.items()})
    before = tree_digest(earlier_run)

    train_lora = load_module(TASK2, "train_lora")
    with pytest.raises(SystemExit) as exit_info:
        train_lora.main([flag if value is None else f"{flag}={value}" for flag, value in args.items()])

    assert exit_info.value.code == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected.format(tmp=tmp_path) in lines[0], lines
    assert tree_digest(earlier_run) == before


@pytest.mark.parametrize("case", ["missing instance folder", "no images", "unreadable image",
                                  "prior without class prompt", "rank 0", "fp16 class images on a CPU",
                                  "add the text encoder to a UNet checkpoint", "prior loss weight nan",
                                  "class prompt without prior preservation"])
def test_train_dreambooth_lora_rejects_bad_input(case, tiny_model, checkpoints, earlier_run, tmp_path, capsys):
    if case == "fp16 class images on a CPU" and torch.cuda.is_available():
        pytest.skip("valid on a machine with CUDA")
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
        "fp16 class images on a CPU": "--prior_generation_precision=fp16 needs a CUDA GPU",
        "add the text encoder to a UNet checkpoint": (f"--resume_from_checkpoint {earlier_run / 'checkpoint-3'} "
                                                      "trained the UNet's LoRA only, this run adds "
                                                      "--train_text_encoder"),
        "prior loss weight nan": "--prior_loss_weight must be finite and >= 0, got nan",
        "class prompt without prior preservation": "--class_prompt is used only with --with_prior_preservation",
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
    elif case == "fp16 class images on a CPU":
        flags = ["--with_prior_preservation", f"--class_data_dir={tmp_path / 'class'}", "--class_prompt=a cat",
                 "--prior_generation_precision=fp16"]
    elif case == "prior loss weight nan":
        flags = ["--with_prior_preservation", f"--class_data_dir={tmp_path / 'class'}", "--class_prompt=a cat",
                 "--prior_loss_weight=nan"]
    elif case == "class prompt without prior preservation":
        flags = [f"--class_data_dir={tmp_path / 'class'}", "--class_prompt=a cat"]
    elif case == "add the text encoder to a UNet checkpoint":
        put_checkpoint(case, earlier_run, checkpoints)
        flags = ["--train_text_encoder", "--resume_from_checkpoint=checkpoint-3"]
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


@pytest.mark.parametrize("kind", ["file", "folder"])
def test_a_failed_write_leaves_the_earlier_file_or_folder_and_no_temporary(kind, tmp_path):
    """atomic_write, which writes the LoRA file, the checkpoint folders and the images."""
    atomic_write = load_module(TASK2, "atomic_write").atomic_write
    path = tmp_path / ("weights.safetensors" if kind == "file" else "checkpoint-3")
    if kind == "file":
        path.write_bytes(b"earlier")
    else:
        path.mkdir()
        (path / "optimizer.bin").write_bytes(b"earlier")
    before = tree_digest(tmp_path)

    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_write(path) as tmp:
            if kind == "file":
                tmp.write_bytes(b"half of the new")
            else:
                tmp.mkdir()
                (tmp / "optimizer.bin").write_bytes(b"half of the new")
            raise RuntimeError("disk full")
    assert tree_digest(tmp_path) == before

    with atomic_write(path) as tmp:
        if kind == "file":
            tmp.write_bytes(b"new")
        else:
            tmp.mkdir()
            (tmp / "optimizer.bin").write_bytes(b"new")
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]
    assert (path if kind == "file" else path / "optimizer.bin").read_bytes() == b"new"
