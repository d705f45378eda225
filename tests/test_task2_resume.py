"""Task 2 runs that continue or replace an earlier one, in one process: train_lora.py on the 4 sample
images, batch 1 (4 steps per epoch), seeded.

Run A trains 6 steps with a checkpoint at every step. Run B resumes A's checkpoint-2 (the middle of
the first epoch) to step 6 and must end bit-identical to A. Run C resumes checkpoint-2 in a copy of A's
whole folder and stops at step 3 with --checkpoints_total_limit=2: it may prune its own checkpoints
only, not A's later ones. Damaged optimizer or random-state files are refused before anything is written.
"""
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import TASK2, load_module
from task2_tiny_pipeline import read_tensorboard, tree_digest

SAMPLE_STYLE = TASK2 / "sample_data" / "artistic-custom"


def train_lora(model, output_dir, *flags):
    """train_lora.py in a subprocess (one process, no accelerate launch); its combined output."""
    command = [sys.executable, str(TASK2 / "train_lora.py"), f"--pretrained_model_name_or_path={model}",
               f"--output_dir={output_dir}", f"--train_data_dir={SAMPLE_STYLE}", "--resolution=32",
               "--mixed_precision=no", "--seed=0", "--learning_rate=1e-2", "--checkpointing_steps=1", "--random_flip",
               *flags]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=TASK2)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    return log


@pytest.fixture(scope="module")
def runs(tiny_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resume")
    train_lora(tiny_model, tmp / "a", "--max_train_steps=6", "--checkpoints_total_limit=10")
    (tmp / "b").mkdir()
    shutil.copytree(tmp / "a" / "checkpoint-2", tmp / "b" / "checkpoint-2")
    log_b = train_lora(tiny_model, tmp / "b", "--max_train_steps=6", "--resume_from_checkpoint=checkpoint-2")
    shutil.copytree(tmp / "a", tmp / "c")
    train_lora(tiny_model, tmp / "c", "--max_train_steps=3", "--checkpoints_total_limit=2", "--report_to=none",
               "--resume_from_checkpoint=checkpoint-2")
    return {"a": tmp / "a", "b": tmp / "b", "c": tmp / "c", "log_b": log_b, "tmp": tmp}


def test_a_run_resumed_mid_epoch_ends_bit_identical(runs):
    assert "1 process(es), 4 steps per epoch, training from step 2 to 6." in runs["log_b"]
    losses_a, _ = read_tensorboard(runs["a"] / "logs" / "train_lora")
    losses_b, _ = read_tensorboard(runs["b"] / "logs" / "train_lora")
    assert [step for step, _ in losses_b["loss"]] == [3, 4, 5, 6]
    assert losses_b["loss"] == losses_a["loss"][2:]
    final_a = load_file(runs["a"] / "pytorch_lora_weights.safetensors")
    final_b = load_file(runs["b"] / "pytorch_lora_weights.safetensors")
    assert final_a.keys() == final_b.keys()
    assert all(torch.equal(final_a[k], final_b[k]) for k in final_a)
    assert any(final_a[k].abs().max() > 0 for k in final_a if ".up." in k)


def test_pruning_keeps_the_checkpoints_of_the_run_that_was_resumed_from_later(runs):
    """C resumed A's checkpoint-2 with A's checkpoints 3-6 in the folder: its limit of 2 applies to the
    checkpoints up to its own step (2, 3), and A's later ones stay as they were."""
    names = sorted(p.name for p in runs["c"].glob("checkpoint-*"))
    assert names == ["checkpoint-2", "checkpoint-3", "checkpoint-4", "checkpoint-5", "checkpoint-6"]
    for step in (4, 5, 6):
        assert tree_digest(runs["c"] / f"checkpoint-{step}") == tree_digest(runs["a"] / f"checkpoint-{step}")


def test_a_new_run_into_a_used_folder_is_refused_unless_overwrite(tiny_model, runs, capsys):
    used = runs["tmp"] / "used"
    shutil.copytree(runs["a"], used)
    before = tree_digest(used)
    train_lora_module = load_module(TASK2, "train_lora")
    flags = [f"--pretrained_model_name_or_path={tiny_model}", f"--output_dir={used}",
             f"--train_data_dir={SAMPLE_STYLE}", "--resolution=32", "--mixed_precision=no", "--max_train_steps=1"]
    with pytest.raises(SystemExit) as exit_info:
        train_lora_module.main(flags)
    assert exit_info.value.code == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: --output_dir {used} holds an earlier run"), lines
    assert "--overwrite_output_dir" in lines[0]
    assert tree_digest(used) == before

    # With --overwrite_output_dir the earlier run's results are replaced, not mixed with the new ones.
    train_lora(tiny_model, used, "--max_train_steps=1", "--overwrite_output_dir", "--report_to=none")
    assert sorted(p.name for p in used.iterdir()) == ["checkpoint-1", "pytorch_lora_weights.safetensors"]


@pytest.mark.parametrize("damaged", ["optimizer.bin", "random_states_0.pkl"])
def test_a_damaged_state_file_is_refused_before_anything_is_written(damaged, tiny_model, runs, capsys):
    out = runs["tmp"] / f"damaged-{damaged}"
    shutil.copytree(runs["a"] / "checkpoint-2", out / "checkpoint-2")
    (out / "checkpoint-2" / damaged).write_bytes(b"the disk filled up while writing this")
    before = tree_digest(out)
    train_lora_module = load_module(TASK2, "train_lora")
    with pytest.raises(SystemExit) as exit_info:
        train_lora_module.main([f"--pretrained_model_name_or_path={tiny_model}", f"--output_dir={out}",
                                f"--train_data_dir={SAMPLE_STYLE}", "--resolution=32", "--mixed_precision=no",
                                "--max_train_steps=3", "--resume_from_checkpoint=latest"])
    assert exit_info.value.code == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: cannot read {out / 'checkpoint-2' / damaged}"), lines
    assert tree_digest(out) == before
