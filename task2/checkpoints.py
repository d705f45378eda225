"""Resumable checkpoints, ``output_dir/checkpoint-N/``: the LoRA file, the optimizer, the learning-rate
schedule and each process's random state, written all or nothing and checked before a resume."""
import contextlib
import os
import shutil
from pathlib import Path

from atomic_write import atomic_write, temporary_path
from cli import UsageError, first_line
from lora_weights import LORA_WEIGHTS_NAME, load_lora_weights, read_lora_weights, save_lora_weights


def checkpoint_step(path):
    """The step N of a ``checkpoint-N`` folder."""
    name = Path(path).name
    if not (name.startswith("checkpoint-") and name.removeprefix("checkpoint-").isdigit()):
        raise UsageError(f"{path} is not named checkpoint-N; give a checkpoint-N folder")
    return int(name.removeprefix("checkpoint-"))


def list_checkpoints(output_dir):
    """Complete checkpoint folders in ``output_dir``, oldest first."""
    if not Path(output_dir).is_dir():
        return []
    found = [p for p in Path(output_dir).glob("checkpoint-*")
             if p.name.removeprefix("checkpoint-").isdigit() and (p / LORA_WEIGHTS_NAME).is_file()]
    return sorted(found, key=checkpoint_step)


def find_checkpoint(args):
    """The checkpoint folder --resume_from_checkpoint names, or None (no flag; "latest" with no checkpoint).

    A relative name is read in --output_dir, as the diffusers examples do
    (``--resume_from_checkpoint=checkpoint-500``); a path that only exists from the working folder
    (``runs/x/checkpoint-500``) is taken as it is.
    """
    name = args.resume_from_checkpoint
    if name is None:
        return None
    if name == "latest":
        checkpoints = list_checkpoints(args.output_dir)
        return checkpoints[-1] if checkpoints else None
    path = Path(name).expanduser()
    candidates = [path] if path.is_absolute() else [Path(args.output_dir) / path, path]
    for candidate in candidates:
        if (candidate / LORA_WEIGHTS_NAME).is_file():
            checkpoint_step(candidate)
            return candidate
    raise UsageError(f"--resume_from_checkpoint {name}: no checkpoint folder (with {LORA_WEIGHTS_NAME}) at "
                     f"{' or '.join(str(c) for c in candidates)}")


def check_resume_matches(args):
    """Raise a UsageError when the checkpoint cannot continue this run: a damaged file, another set of
    adapted models (its tensors would not fit, or a newly adapted model would stay at its initial LoRA),
    another rank, or another number of processes (accelerate would skip the missing random states)."""
    from safetensors import SafetensorError

    path = Path(args.resume_path)
    try:
        parts = read_lora_weights(path)
    except (OSError, SafetensorError) as error:
        raise UsageError(f"cannot read {path / LORA_WEIGHTS_NAME}: {first_line(error)}; "
                         f"resume from another checkpoint") from error
    if "text_encoder" in parts and not args.train_text_encoder:
        raise UsageError(f"--resume_from_checkpoint {path} trained the text encoder's LoRA too, this run the "
                         f"UNet's only; resume it with train_dreambooth_lora.py --train_text_encoder")
    if "text_encoder" not in parts and args.train_text_encoder:
        raise UsageError(f"--resume_from_checkpoint {path} trained the UNet's LoRA only, this run adds "
                         f"--train_text_encoder, whose LoRA would start from scratch: start a new run in another "
                         f"--output_dir")
    ranks = {tensor.shape[0] for part in parts.values() for key, tensor in part.items() if "lora_A" in key}
    if ranks != {args.rank}:
        raise UsageError(f"--resume_from_checkpoint {path} has rank {sorted(ranks)}, this run --rank {args.rank}")
    check_state_files(path, int(os.environ.get("WORLD_SIZE", "1")))


def check_state_files(path, num_processes):
    """Load the optimizer, schedule and random-state files of checkpoint ``path`` as accelerate will
    (weights_only), so that a damaged one stops the run before anything is written: accelerate would
    skip a damaged random state without a word, and the run would not continue exactly."""
    from accelerate.utils import load

    names = ["optimizer.bin", "scheduler.bin"] + [f"random_states_{i}.pkl" for i in range(num_processes)]
    for name in names:
        if not (path / name).is_file():
            continue  # a checkpoint without it fails in accelerate's load_state, reported by training.resume
        try:
            load(path / name, map_location="cpu")
        except Exception as error:  # torch.load fails in many ways on a damaged file
            raise UsageError(f"cannot read {path / name}: {first_line(error)}; "
                             f"resume from another checkpoint") from error


def register_lora_checkpoint_hooks(accelerator, unet, text_encoder=None):
    """Make ``accelerator.save_state``/``load_state`` store the LoRA tensors only, not every frozen
    weight of the UNet. accelerate saves the optimizer, the schedule and the random states itself."""

    def save_hook(models, weights, folder):
        if accelerator.is_main_process:
            save_lora_weights(folder, accelerator.unwrap_model(unet),
                              accelerator.unwrap_model(text_encoder) if text_encoder is not None else None)
        weights.clear()

    def load_hook(models, folder):
        load_lora_weights(folder, accelerator.unwrap_model(unet),
                          accelerator.unwrap_model(text_encoder) if text_encoder is not None else None)
        models.clear()

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def save_checkpoint(accelerator, output_dir, step, total_limit):
    """Save ``output_dir/checkpoint-{step}``, then delete the oldest checkpoints beyond ``total_limit``.

    Every process calls this. The main process writes the LoRA tensors, optimizer and schedule into
    a temporary folder, each process adds its own random state (``random_states_{i}.pkl``, so that a
    resumed run draws the same noise on every process), and once all are done the main process
    renames the folder. Only checkpoints up to ``step`` take part in the pruning: one beyond it is
    from a later point of the run this one resumed, not this run's.
    """
    final = Path(output_dir) / f"checkpoint-{step}"
    writer = atomic_write(final) if accelerator.is_main_process else contextlib.nullcontext(temporary_path(final))
    with writer as tmp:
        accelerator.wait_for_everyone()  # the main process has cleared a stale temporary folder
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()  # every process has written its part
    if accelerator.is_main_process and total_limit is not None:
        own = [path for path in list_checkpoints(output_dir) if checkpoint_step(path) <= step]
        for old in own[:-total_limit]:
            shutil.rmtree(old)
