"""Task 2 on a GPU: memory and speed of one LoRA training step on Stable Diffusion 1.x, fp16 vs fp32.

    .venv/bin/python benchmarks/bench_lora.py                      # SD 1.x-sized networks, random weights
    .venv/bin/python benchmarks/bench_lora.py --model CompVis/stable-diffusion-v1-4   # the real weights

One step is what task2/train_lora.py does per image (LoRA, loss, noise: task2/models.py, loss.py): VAE
encode, text encoder, UNet forward and backward with rank-4 LoRA on the attention projections, an
AdamW step; 512x512, batch 1. "fp32" is the course's --mixed_precision=no; "fp16" is
--mixed_precision=fp16 (frozen weights in half precision, autocast, loss scaling, LoRA in fp32).
Each precision runs in its own process, so that its peak memory is its own. Without --model the
networks are built from SD 1.4's configurations (benchmarks/sd1_architecture.py) with random weights:
memory and time do not depend on the values of the weights, and no download is needed.

Bounds (exit status 1 when one is missed):
1. fp16 peak memory <= 11 GiB, the figure the diffusers documentation gives for LoRA on SD 1.x
   ("as little as 11 GB", README, Task 2).
2. fp16 peak memory <= 0.75 x fp32 peak memory (the frozen weights are 4.3 GB in fp32, half in fp16).
3. fp16 step time <= 0.8 x fp32 step time (the ratio within one run; absolute times depend on the GPU).

Without CUDA it prints "skipped: ..." and exits 0 (nothing to measure), or 2 with --require_gpu.
"""
import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "task2"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import models  # noqa: E402
import sd1_architecture  # noqa: E402
from loss import diffusion_loss, noise_and_target  # noqa: E402

RESOLUTION = 512
GIB = 2**30
MEMORY_LIMIT_GIB = 11.0
MEMORY_RATIO = 0.75
TIME_RATIO = 0.8


def sd1_models(model):
    """(vae, text_encoder, unet, noise_scheduler): ``model`` from the hub or a folder, or (None) SD 1.x's
    architecture with random weights."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    if model is not None:
        return (AutoencoderKL.from_pretrained(model, subfolder="vae"),
                CLIPTextModel.from_pretrained(model, subfolder="text_encoder"),
                UNet2DConditionModel.from_pretrained(model, subfolder="unet"),
                DDPMScheduler.from_pretrained(model, subfolder="scheduler"))
    with tempfile.TemporaryDirectory() as folder:
        unet, vae, text_encoder = sd1_architecture.build_networks("sd14", sd1_architecture.char_tokenizer(Path(folder)))
    betas = {name: sd1_architecture.SD1_SCHEDULER[name] for name in ("beta_start", "beta_end", "beta_schedule")}
    scheduler = DDPMScheduler(**betas, num_train_timesteps=1000)
    return vae, text_encoder, unet, scheduler


def measure(precision, model, steps):
    """Peak GPU memory (bytes) and median step time (s) of ``steps`` LoRA training steps (after 2 warm-up
    steps) at ``precision``: "fp32" or "fp16"."""
    from diffusers.training_utils import cast_training_params

    device = torch.device("cuda")
    dtype = models.weight_dtype("fp16" if precision == "fp16" else "no")
    vae, text_encoder, unet, noise_scheduler = sd1_models(model)
    for network in (vae, text_encoder, unet):
        network.requires_grad_(False)
        network.to(device, dtype=dtype)
    models.add_lora(unet, 4, models.UNET_LORA_TARGETS)
    cast_training_params(unet, dtype=torch.float32)
    lora_parameters = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(lora_parameters, lr=1e-4)
    scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16")
    pixels = torch.randn(1, 3, RESOLUTION, RESOLUTION, device=device).clamp(-1, 1)
    input_ids = torch.randint(0, 49407, (1, 77), device=device)

    def step():
        with torch.autocast("cuda", dtype=torch.float16, enabled=precision == "fp16"):
            with torch.no_grad():
                latents = vae.encode(pixels.to(dtype)).latent_dist.sample() * 0.18215
                encoder_hidden_states = text_encoder(input_ids)[0]
            noisy_latents, timesteps, target = noise_and_target(noise_scheduler, latents)
            model_pred = unet(noisy_latents, timesteps, encoder_hidden_states).sample
            loss = diffusion_loss(model_pred, target, timesteps, noise_scheduler)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(lora_parameters, 1.0)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return {"peak_bytes": torch.cuda.max_memory_allocated(), "step_seconds": statistics.median(times)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="SD 1.x hub name or folder (default: random weights).")
    parser.add_argument("--steps", type=int, default=10, help="Timed steps per precision.")
    parser.add_argument("--require_gpu", action="store_true", help="Exit 2 instead of 0 when CUDA is absent.")
    parser.add_argument("--child", choices=["fp32", "fp16"], help=argparse.SUPPRESS)
    args = parser.parse_args()

    if not torch.cuda.is_available():
        print("bench_lora: skipped: no CUDA GPU here (it measures GPU memory and speed)", file=sys.stderr)
        sys.exit(2 if args.require_gpu else 0)
    if args.child:
        print(json.dumps(measure(args.child, args.model, args.steps)))
        return

    print(f"LoRA training step, SD 1.x ({args.model or 'random weights'}), {RESOLUTION}x{RESOLUTION}, batch 1, "
          f"rank 4, median of {args.steps} steps, on {torch.cuda.get_device_name()}")
    results = {}
    for precision in ("fp32", "fp16"):
        command = [sys.executable, __file__, "--child", precision, "--steps", str(args.steps)]
        command += ["--model", args.model] if args.model else []
        child = subprocess.run(command, capture_output=True, text=True)
        if child.returncode != 0:
            print(child.stderr[-3000:], file=sys.stderr)
            sys.exit(f"bench_lora: the {precision} run failed")
        results[precision] = json.loads(child.stdout.strip().splitlines()[-1])
        print(f"  {precision}: peak memory {results[precision]['peak_bytes'] / GIB:.2f} GiB, "
              f"{results[precision]['step_seconds'] * 1000:.0f} ms per step")

    memory_ratio = results["fp16"]["peak_bytes"] / results["fp32"]["peak_bytes"]
    time_ratio = results["fp16"]["step_seconds"] / results["fp32"]["step_seconds"]
    checks = [
        (f"fp16 peak memory {results['fp16']['peak_bytes'] / GIB:.2f} GiB <= {MEMORY_LIMIT_GIB} GiB",
         results["fp16"]["peak_bytes"] <= MEMORY_LIMIT_GIB * GIB),
        (f"fp16 / fp32 peak memory {memory_ratio:.2f} <= {MEMORY_RATIO}", memory_ratio <= MEMORY_RATIO),
        (f"fp16 / fp32 step time {time_ratio:.2f} <= {TIME_RATIO}", time_ratio <= TIME_RATIO),
    ]
    for text, passed in checks:
        print(f"  {'ok    ' if passed else 'MISSED'} {text}")
    sys.exit(0 if all(passed for _, passed in checks) else 1)


if __name__ == "__main__":
    main()
