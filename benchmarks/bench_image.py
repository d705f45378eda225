"""Task 1-2 speed on the CPU, as ratios measured in one run (absolute times depend on the machine).

    .venv/bin/python benchmarks/bench_image.py [--threads N]

1. DDIM with S steps costs S/T of DDPM's sampling time: (DDIM time / DDPM time) / (S / T) should be
   within 1 +- 0.15. Measured with a small UNet and T = 200 to keep the run short (the ratio is
   about the sampler, not the network or T); DDPM and DDIM runs are interleaved, so a change in
   the machine's load during the run affects both alike.
2. One scheduler step costs under 2% of one forward pass of the course UNet (64x64, batch 16).
3. The course UNet: parameter count, one forward pass and one training step (batch 16, 64x64).
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "task1" / "image_diffusion_todo"))
from model import DiffusionModule  # noqa: E402
from network import UNet  # noqa: E402
from scheduler import DDIMScheduler, DDPMScheduler  # noqa: E402

T = 1000
RATIO_T = 200
DDIM_STEPS = (10, 20, 50)
ROUNDS = 3


def timed(fn, repeats, warm_up=True):
    """Median wall time of fn() over `repeats` calls (after one warm-up call): seconds."""
    if warm_up:
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def ddim_vs_ddpm():
    print(f"1. DDIM vs DDPM sampling time (small UNet: ch=32, ch_mult=[1,2,2], 1 res block, 32x32, batch 4, "
          f"T={RATIO_T}; median of {ROUNDS} interleaved rounds)")
    torch.manual_seed(0)
    network = UNet(T=RATIO_T, image_resolution=32, ch=32, ch_mult=[1, 2, 2], attn=[1], num_res_blocks=1).eval()
    samplers = {"ddpm": DiffusionModule(network, DDPMScheduler(RATIO_T, 1e-4, 0.02))}
    for steps in DDIM_STEPS:
        samplers[steps] = DiffusionModule(
            network, DDIMScheduler(RATIO_T, 1e-4, 0.02, num_inference_timesteps=steps, eta=0.0))
    samplers[DDIM_STEPS[0]].sample(4)  # warm-up
    seconds = {name: [] for name in samplers}
    for _ in range(ROUNDS):
        for name, sampler in samplers.items():
            seconds[name].append(timed(lambda: sampler.sample(4), repeats=1, warm_up=False))
    ddpm_seconds = statistics.median(seconds["ddpm"])
    print(f"   DDPM, {RATIO_T} steps: {ddpm_seconds:.2f} s")
    for steps in DDIM_STEPS:
        ddim_seconds = statistics.median(seconds[steps])
        ratio = ddim_seconds / ddpm_seconds
        verdict = "ok" if abs(ratio / (steps / RATIO_T) - 1) <= 0.15 else "OUTSIDE 15%"
        print(f"   DDIM, {steps:3d} steps: {ddim_seconds:.3f} s; time ratio {ratio:.4f} vs S/T "
              f"{steps / RATIO_T:.4f} -> {ratio / (steps / RATIO_T):.3f} x S/T ({verdict})")


def step_overhead(unet):
    """Returns the forward time of the course UNet (64x64, batch 16), in seconds."""
    print("2. Scheduler step vs course UNet forward (64x64, batch 16)")
    x_t, net_out, noise = (torch.randn(16, 3, 64, 64) for _ in range(3))
    t_batch = torch.full((16,), 500)
    with torch.no_grad():
        forward_seconds = timed(lambda: unet(x_t, t_batch), repeats=2)
    print(f"   UNet forward: {forward_seconds * 1e3:.0f} ms")
    ddpm = DDPMScheduler(T, 1e-4, 0.02)
    ddim = DDIMScheduler(T, 1e-4, 0.02, num_inference_timesteps=50, eta=0.5)
    t = torch.tensor(500)
    cases = {
        "DDPM step (noise predictor)": lambda: ddpm.step(x_t, t, net_out, "noise", noise=noise),
        "DDPM step (mean predictor)": lambda: ddpm.step(x_t, t, net_out, "mean", noise=noise),
        "DDIM step (noise predictor, eta 0.5)": lambda: ddim.step(x_t, t, net_out, "noise", noise=noise),
        "DDIM step (x0 predictor, eta 0.5)": lambda: ddim.step(x_t, t, net_out, "x0", noise=noise),
        "DDIM step + drawing its noise": lambda: ddim.step(x_t, t, net_out, "noise", noise=torch.randn_like(x_t)),
    }
    for name, fn in cases.items():
        step_seconds = timed(fn, repeats=200)
        share = step_seconds / forward_seconds
        print(f"   {name}: {step_seconds * 1e6:.0f} us = {100 * share:.4f}% of a forward "
              f"({'ok' if share < 0.02 else 'OVER 2%'})")
    return forward_seconds


def course_unet_costs(unet, forward_seconds):
    print("3. Course UNet (ch=128, ch_mult=[1,2,2,2], attn=[1], num_res_blocks=4, dropout=0.1), 64x64, batch 16")
    print(f"   parameters: {sum(p.numel() for p in unet.parameters()):,}")
    ddpm = DiffusionModule(unet, DDPMScheduler(T, 1e-4, 0.02)).train()
    optimizer = torch.optim.Adam(unet.parameters(), lr=2e-4)

    def train_step(batch_size):
        loss = ddpm.get_loss(torch.rand(batch_size, 3, 64, 64) * 2 - 1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    train_step(2)  # warm-up on a small batch: allocates Adam's state
    train_seconds = timed(lambda: train_step(16), repeats=1, warm_up=False)
    print(f"   forward pass (no grad, from 2.): {forward_seconds:.2f} s; "
          f"training step (loss, backward, Adam): {train_seconds:.2f} s")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice; on a CPU shared with other jobs, "
                             "1 thread gives steadier numbers)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, CPU, {torch.get_num_threads()} threads")
    start = time.perf_counter()
    ddim_vs_ddpm()
    torch.manual_seed(0)
    unet = UNet().eval()
    forward_seconds = step_overhead(unet)
    course_unet_costs(unet, forward_seconds)
    print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
