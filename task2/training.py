"""The training loop both scripts share: they differ only in their data and their loss.

It runs in one process or in several (``NUM_PROCESSES=2 sh scripts/...``, i.e. ``accelerate launch
--multi_gpu``): each process trains on its share of every batch and the main process alone writes files.
Every setting comes from ``args``, the parsed command line.
"""
import math
import os
from pathlib import Path

import torch
from tqdm.auto import tqdm

from checkpoints import checkpoint_step, register_lora_checkpoint_hooks, save_checkpoint
from cli import UsageError, first_line
from lora_weights import LORA_WEIGHTS_NAME, save_lora_weights
from loss import noise_and_target
from options import remove_earlier_results
from validation import log_validation, validation_pipeline


def make_accelerator(args, project_name):
    """The Accelerator of a run: precision, accumulation, trackers under OUTPUT_DIR/logs, seeds.

    Several processes on a machine without CUDA need ``cpu=True`` for accelerate to join them with
    gloo; otherwise each would train alone. With --seed the data order comes from a seeded sampler
    (epoch e is shuffled with seed + e), so a resumed run sees the batches the uninterrupted one would.
    """
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed

    several_cpu_processes = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    accelerator = Accelerator(
        cpu=several_cpu_processes, gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision, log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=args.output_dir,
                                            logging_dir=str(Path(args.output_dir) / args.logging_dir)),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=args.seed is not None, data_seed=args.seed))
    if args.overwrite_output_dir and args.resume_path is None and accelerator.is_main_process:
        remove_earlier_results(args)
    accelerator.wait_for_everyone()
    if args.seed is not None:
        # Each process its own noise and timesteps, reproducibly.
        set_seed(args.seed, device_specific=True)
    if args.allow_tf32:
        torch.backends.cuda.matmul.fp32_precision = "tf32"
        torch.backends.cudnn.conv.fp32_precision = "tf32"
    if args.report_to != "none":
        # Trackers take numbers and strings only.
        config = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}
        accelerator.init_trackers(project_name, config=config)
    return accelerator


def make_dataloader(args, dataset, collate):
    """Shuffled batches of ``dataset``. The loader has its own generator: by default a new iterator draws
    the workers' base seed from the global RNG, so a run resumed mid-epoch (one iterator more than the
    uninterrupted run) would draw all later noise, timesteps and flips from a shifted stream."""
    generator = torch.Generator()
    if args.seed is None:
        generator.seed()
    else:
        generator.manual_seed(args.seed)
    return torch.utils.data.DataLoader(dataset, batch_size=args.train_batch_size, shuffle=True, collate_fn=collate,
                                       num_workers=args.dataloader_num_workers, generator=generator)


def make_optimizer(args, parameters, num_processes):
    """AdamW (bitsandbytes' 8-bit AdamW with --use_8bit_adam) over ``parameters``; with --scale_lr the
    learning rate grows with the samples per step: batch x accumulation steps x processes."""
    if args.scale_lr:
        args.learning_rate *= args.train_batch_size * args.gradient_accumulation_steps * num_processes
    if args.use_8bit_adam:
        import bitsandbytes

        optimizer_class = bitsandbytes.optim.AdamW8bit
    else:
        optimizer_class = torch.optim.AdamW
    return optimizer_class(parameters, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                           eps=args.adam_epsilon, weight_decay=args.adam_weight_decay)


def training_length(args, batches_per_epoch):
    """(steps per epoch, total steps, epochs), counting optimizer steps; ``batches_per_epoch`` is what
    one process gets from the prepared (sharded) data loader."""
    steps_per_epoch = math.ceil(batches_per_epoch / args.gradient_accumulation_steps)
    max_train_steps = args.max_train_steps or args.num_train_epochs * steps_per_epoch
    return steps_per_epoch, max_train_steps, math.ceil(max_train_steps / steps_per_epoch)


def prepare(args, accelerator, sd, optimizer, max_train_steps):
    """accelerate's wrappers of the trained models, the optimizer and the --lr_scheduler schedule,
    with the checkpoint hooks; the UNet first, then (--train_text_encoder) the text encoder."""
    from diffusers.optimization import get_scheduler

    # accelerate steps a prepared scheduler once per process at each optimizer step.
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer,
                                 num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=max_train_steps * accelerator.num_processes,
                                 num_cycles=args.lr_num_cycles, power=args.lr_power)
    trained_models = [sd.unet, sd.text_encoder] if args.train_text_encoder else [sd.unet]
    *trained_models, optimizer, lr_scheduler = accelerator.prepare(*trained_models, optimizer, lr_scheduler)
    register_lora_checkpoint_hooks(accelerator, *trained_models)
    return trained_models, optimizer, lr_scheduler


def resume(args, accelerator):
    """Restore the checkpoint --resume_from_checkpoint named (checked by check_resume_matches); the
    step it was saved at, or 0."""
    if args.resume_path is None:
        if args.resume_from_checkpoint == "latest":
            accelerator.print(f"No checkpoint in {args.output_dir}: starting a new run.")
        return 0
    try:
        accelerator.load_state(str(args.resume_path))
    except (OSError, RuntimeError, KeyError, ValueError) as error:
        raise UsageError(f"cannot resume from {args.resume_path}: {first_line(error)}; "
                         f"resume from another checkpoint") from error
    global_step = checkpoint_step(args.resume_path)
    accelerator.print(f"Resumed from {args.resume_path} at step {global_step}.")
    return global_step


def training_step(args, accelerator, sd, trained_models, batch, optimizer, lr_scheduler, compute_loss):
    """One forward and backward pass on ``batch`` (``pixel_values`` [B, 3, H, W] in [-1, 1],
    ``input_ids`` [B, L]), and an optimizer step once --gradient_accumulation_steps batches are summed.
    Returns the loss as a scalar tensor."""
    with accelerator.accumulate(*trained_models):
        latents = sd.vae.encode(batch["pixel_values"].to(sd.vae.dtype)).latent_dist.sample()
        latents = latents * sd.vae.config.scaling_factor
        noisy_latents, timesteps, target = noise_and_target(sd.noise_scheduler, latents, args.noise_offset)
        text_encoder = trained_models[1] if args.train_text_encoder else sd.text_encoder
        encoder_hidden_states = text_encoder(batch["input_ids"], return_dict=False)[0]
        model_pred = trained_models[0](noisy_latents, timesteps, encoder_hidden_states, return_dict=False)[0]
        loss = compute_loss(model_pred, target, timesteps)

        accelerator.backward(loss)
        if accelerator.sync_gradients:
            trained = [p for group in optimizer.param_groups for p in group["params"]]
            accelerator.clip_grad_norm_(trained, args.max_grad_norm)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad()
    return loss


def train(args, accelerator, sd, train_dataloader, optimizer, compute_loss):
    """Train the LoRA weights of ``sd`` (a models.StableDiffusion) for --max_train_steps (or
    --num_train_epochs) and save them to ``output_dir/pytorch_lora_weights.safetensors``; resume,
    checkpoints, logging and validation as the flags say.

    ``compute_loss(model_pred, target, timesteps)`` with model_pred, target: [B, C, h, w] and
    timesteps: [B] returns the scalar to minimise. With N processes each gets 1/N of every epoch's
    batches and the gradients are averaged, so one step sees N x --train_batch_size images.
    """
    # Shard the batches first: the epoch length and the schedule count the batches of one process.
    train_dataloader = accelerator.prepare(train_dataloader)
    steps_per_epoch, max_train_steps, num_epochs = training_length(args, len(train_dataloader))
    trained_models, optimizer, lr_scheduler = prepare(args, accelerator, sd, optimizer, max_train_steps)
    global_step = resume(args, accelerator)
    accelerator.print(f"{accelerator.num_processes} process(es), {steps_per_epoch} steps per epoch, "
                      f"training from step {global_step} to {max_train_steps}.")
    progress = tqdm(range(max_train_steps), initial=global_step, desc="Steps",
                    disable=not accelerator.is_local_main_process)
    first_epoch = global_step // steps_per_epoch
    step_loss = 0.0
    for epoch in range(first_epoch, num_epochs):
        if global_step >= max_train_steps:
            break
        for model in trained_models:
            model.train()
        train_dataloader.set_epoch(epoch)
        # accelerate passes the epoch on to the data set only in some configurations.
        train_dataloader.dataset.set_epoch(epoch)
        batches = train_dataloader
        if epoch == first_epoch and global_step % steps_per_epoch:
            done = (global_step % steps_per_epoch) * args.gradient_accumulation_steps
            batches = accelerator.skip_first_batches(train_dataloader, done)
        for batch in batches:
            loss = training_step(args, accelerator, sd, trained_models, batch, optimizer, lr_scheduler, compute_loss)
            # The logged loss: the mean over processes and accumulated batches of this step.
            step_loss += accelerator.reduce(loss.detach(), reduction="mean").item() / args.gradient_accumulation_steps
            if accelerator.sync_gradients:
                global_step += 1
                log_step(accelerator, progress, global_step, step_loss, lr_scheduler.get_last_lr()[0])
                step_loss = 0.0
                if global_step % args.checkpointing_steps == 0:
                    save_checkpoint(accelerator, args.output_dir, global_step, args.checkpoints_total_limit)
                if global_step >= max_train_steps:
                    break
        # The last epoch is validated after training, from the saved file.
        if (args.validation_prompt and accelerator.is_main_process and global_step < max_train_steps
                and (epoch + 1) % args.validation_epochs == 0):
            validate_during_training(args, accelerator, sd, trained_models, f"epoch_{epoch + 1:04d}", global_step)
    finish(args, accelerator, sd, trained_models, global_step)


def log_step(accelerator, progress, global_step, loss, learning_rate):
    accelerator.log({"loss": loss, "lr": learning_rate}, step=global_step)
    progress.update(1)
    progress.set_postfix(loss=f"{loss:.4f}", lr=learning_rate)


def validate_during_training(args, accelerator, sd, trained_models, name, step):
    text_encoder = trained_models[1] if args.train_text_encoder else sd.text_encoder
    pipeline = validation_pipeline(args, accelerator, unet=accelerator.unwrap_model(trained_models[0]),
                                   text_encoder=accelerator.unwrap_model(text_encoder), vae=sd.vae,
                                   tokenizer=sd.tokenizer)
    log_validation(args, accelerator, pipeline, name, step)


def finish(args, accelerator, sd, trained_models, global_step):
    """Save the LoRA file; validate as a user would: the base model from its files, then the saved file."""
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_lora_weights(args.output_dir, *[accelerator.unwrap_model(model) for model in trained_models])
        accelerator.print(f"Finished at step {global_step}: LoRA weights saved to "
                          f"{Path(args.output_dir) / LORA_WEIGHTS_NAME}")
        if args.validation_prompt:
            pipeline = validation_pipeline(args, accelerator, tokenizer=sd.tokenizer)
            pipeline.load_lora_weights(args.output_dir)
            log_validation(args, accelerator, pipeline, "final", global_step)
    accelerator.end_training()
