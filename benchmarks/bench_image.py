"""Task 1-2 speed, as ratios measured in one run (absolute times depend on the machine). Every
ratio has a bound; the script ends with status 1, naming the bounds it missed, when one is missed.

    .venv/bin/python benchmarks/bench_image.py [--threads N]     # on the CPU: 1-3, 5 and 6
    .venv/bin/python benchmarks/bench_image.py --only 6          # one CPU measurement (here 6)
    .venv/bin/python benchmarks/bench_image.py --device cuda     # on a GPU: 4

1. DDIM with S steps costs S/T of DDPM's sampling time. Bound: (DDIM time / DDPM time) / (S / T)
   within 1 +- 0.15. Measured with a small UNet and T = 200 to keep the run short (the ratio is
   about the sampler, not the network or T); DDPM and DDIM runs are interleaved, so a change in
   the machine's load during the run affects both alike.
2. One scheduler step costs little next to the network. Bound: under 2% of one forward pass of
   the course UNet (64x64, batch 16).
3. The course UNet: parameter count, one forward pass and one training step (batch 16, 64x64);
   reported, no bound.
4. (--device cuda) One training step of the course UNet (batch 16, 64x64, Adam) in float32 and
   with bf16 autocast, as `train.py --mixed_precision bf16` runs it (accelerate autocasts the
   forward pass; weights, gradients and Adam stay float32): median step time and peak GPU memory.
   Bounds: bf16 step time < float32 step time, bf16 peak memory < float32 peak memory.
5. sampling.py across processes (bench_sampling.measure_speedup: `python sampling.py` vs
   `torchrun --nproc_per_node 2 sampling.py`, interleaved, one thread per process): images per
   second per process, and the 2-process speed-up. Bounds: the same PNG bytes, speed-up >= 1.3 on
   2 cores (bench_sampling.py alone also reports the cost of one noise generator per image).
6. DPM-Solver++ (dpm_solver.py) costs what DDIM costs per network call: its multistep update is a
   few tensor operations next to the network. Bound: (DPM-Solver++ time / DDIM eta 0 time) at the
   same number of calls within 1 +- 0.15, orders 2 and 3, and (SDE-DPM-Solver++(2M) time / DDIM
   eta 1 time) likewise (both draw noise at every step), the small UNet of 1., interleaved rounds.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "task1" / "image_diffusion_todo"))
from dpm_solver import DPMSolverScheduler  # noqa: E402
from model import DiffusionModule  # noqa: E402
from network import UNet  # noqa: E402
from scheduler import DDIMScheduler, DDPMScheduler  # noqa: E402

import bench_sampling  # noqa: E402  (beside this file)

T = 1000
RATIO_T = 200
DDIM_STEPS = (10, 20, 50)
ROUNDS = 3
DDIM_RATIO_TOLERANCE = 0.15
SOLVER_RATIO_TOLERANCE = 0.15
SOLVER_ROUNDS = 5  # its samplers take a second or two each: more rounds steady the medians
CPU_MEASUREMENTS = (1, 2, 3, 5, 6)
MAX_STEP_SHARE = 0.02
PRECISION_STEPS = 10


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


def verdict(ok: bool, bound: str, missed: list) -> str:
    """'ok', or 'MISSED' after appending `bound` (what missed which bound) to `missed`."""
    if not ok:
        missed.append(bound)
    return "ok" if ok else "MISSED"


def small_unet():
    torch.manual_seed(0)
    return UNet(T=RATIO_T, image_resolution=32, ch=32, ch_mult=[1, 2, 2], attn=[1], num_res_blocks=1).eval()


def interleaved_sampling_seconds(samplers: dict, rounds: int = ROUNDS) -> dict:
    """{name: DiffusionModule} -> {name: median seconds of .sample(4) over `rounds` interleaved rounds}."""
    next(iter(samplers.values())).sample(4)  # warm-up
    seconds = {name: [] for name in samplers}
    for _ in range(rounds):
        for name, sampler in samplers.items():
            seconds[name].append(timed(lambda: sampler.sample(4), repeats=1, warm_up=False))
    return {name: statistics.median(values) for name, values in seconds.items()}


def ddim_vs_ddpm(missed):
    print(f"1. DDIM vs DDPM sampling time (small UNet: ch=32, ch_mult=[1,2,2], 1 res block, 32x32, batch 4, "
          f"T={RATIO_T}; median of {ROUNDS} interleaved rounds)")
    network = small_unet()
    samplers = {"ddpm": DiffusionModule(network, DDPMScheduler(RATIO_T, 1e-4, 0.02))}
    for steps in DDIM_STEPS:
        samplers[steps] = DiffusionModule(
            network, DDIMScheduler(RATIO_T, 1e-4, 0.02, num_inference_timesteps=steps, eta=0.0))
    seconds = interleaved_sampling_seconds(samplers)
    ddpm_seconds = seconds["ddpm"]
    print(f"   DDPM, {RATIO_T} steps: {ddpm_seconds:.2f} s")
    for steps in DDIM_STEPS:
        ddim_seconds = seconds[steps]
        ratio = ddim_seconds / ddpm_seconds
        relative = ratio / (steps / RATIO_T)
        ok = abs(relative - 1) <= DDIM_RATIO_TOLERANCE
        bound = f"DDIM {steps} steps: {relative:.3f} x S/T, not within 1 +- {DDIM_RATIO_TOLERANCE}"
        print(f"   DDIM, {steps:3d} steps: {ddim_seconds:.3f} s; time ratio {ratio:.4f} vs S/T "
              f"{steps / RATIO_T:.4f} -> {relative:.3f} x S/T ({verdict(ok, bound, missed)})")


def dpm_solver_vs_ddim(missed):
    print(f"6. DPM-Solver++ vs DDIM (eta 0), SDE-DPM-Solver++ vs DDIM (eta 1), time per network call (the small "
          f"UNet of 1., batch 4, T={RATIO_T}, quadratic timesteps; median of {SOLVER_ROUNDS} interleaved rounds)")
    network = small_unet()
    solvers = {"DPM-Solver++(2M)": (2, False), "DPM-Solver++(3M)": (3, False), "SDE-DPM-Solver++(2M)": (2, True)}
    samplers = {}
    for calls in DDIM_STEPS:
        for eta in (0.0, 1.0):
            samplers[(f"DDIM eta {eta:g}", calls)] = DiffusionModule(network, DDIMScheduler(
                RATIO_T, 1e-4, 0.02, num_inference_timesteps=calls, eta=eta, timestep_spacing="quadratic"))
        for name, (order, stochastic) in solvers.items():
            samplers[(name, calls)] = DiffusionModule(network, DPMSolverScheduler(
                RATIO_T, 1e-4, 0.02, num_inference_timesteps=calls, order=order, timestep_spacing="quadratic",
                stochastic=stochastic))
    seconds = interleaved_sampling_seconds(samplers, SOLVER_ROUNDS)
    for (name, calls), solver_seconds in seconds.items():
        if name not in solvers:
            continue
        ddim = f"DDIM eta {1 if solvers[name][1] else 0}"  # each solver's order 1
        ratio = solver_seconds / seconds[(ddim, calls)]
        ok = abs(ratio - 1) <= SOLVER_RATIO_TOLERANCE
        bound = f"{name} {calls} calls: {ratio:.3f} x {ddim}'s time, not within 1 +- {SOLVER_RATIO_TOLERANCE}"
        print(f"   {name}, {calls:3d} calls: {solver_seconds:.3f} s vs {ddim} {seconds[(ddim, calls)]:.3f} s -> "
              f"{ratio:.3f} x ({verdict(ok, bound, missed)})")


def step_overhead(unet, missed):
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
        ok = share < MAX_STEP_SHARE
        bound = f"{name}: {100 * share:.2f}% of a forward, not under {100 * MAX_STEP_SHARE:.0f}%"
        print(f"   {name}: {step_seconds * 1e6:.0f} us = {100 * share:.4f}% of a forward ({verdict(ok, bound, missed)})")
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


def make_train_step(unet, device, precision, batch_size=16):
    """One training step (loss, backward, Adam) of `unet` on random 64x64 images, the loss computed
    under autocast to bfloat16 when precision is "bf16" (float32 weights and optimizer either way)."""
    resolution = unet.image_resolution
    ddpm = DiffusionModule(unet, DDPMScheduler(T, 1e-4, 0.02).to(device)).train()
    optimizer = torch.optim.Adam(unet.parameters(), lr=2e-4)
    x0 = torch.rand(batch_size, 3, resolution, resolution, device=device) * 2 - 1

    def train_step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = ddpm.get_loss(x0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return train_step


def precision_costs(device, repeats=PRECISION_STEPS, **unet_config):
    """{precision: (median seconds of a training step, peak GPU memory in bytes or None on a CPU)}
    for "fp32" and "bf16", each on a fresh UNet(**unet_config) (default: the course's)."""
    costs = {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        unet = UNet(T=T, **unet_config).to(device)
        train_step = make_train_step(unet, device, precision)
        for _ in range(2):  # warm-up: Adam's state, the kernels' first launch
            train_step()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        seconds = timed(train_step, repeats, warm_up=False)
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        costs[precision] = (seconds, peak)
        del unet, train_step
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return costs


def precision_comparison(device, missed):
    print(f"4. Course UNet training step (batch 16, 64x64, Adam) on {torch.cuda.get_device_name(device)}: "
          f"float32 vs bf16 autocast, median of {PRECISION_STEPS} steps")
    costs = precision_costs(device)
    for precision, (seconds, peak) in costs.items():
        print(f"   {precision}: {seconds * 1e3:.1f} ms per step ({16 / seconds:.0f} images/s), "
              f"peak memory {peak / 2 ** 30:.2f} GiB")
    (fp32_seconds, fp32_peak), (bf16_seconds, bf16_peak) = costs["fp32"], costs["bf16"]
    time_ratio, memory_ratio = bf16_seconds / fp32_seconds, bf16_peak / fp32_peak
    for what, ratio in (("step time", time_ratio), ("peak memory", memory_ratio)):
        bound = f"bf16 {what} {ratio:.3f} x fp32, not under 1"
        print(f"   bf16 / fp32 {what}: {ratio:.3f} ({verdict(ratio < 1, bound, missed)})")


def sampling_speedup(missed):
    """5. The sampler's throughput per process and the speed-up of 2 processes over 1."""
    result = bench_sampling.measure_speedup(2)
    per_process = result["images_per_second_per_process"]
    print(f"5. sampling.py: {per_process[1]:.2f} images/s in 1 process, {per_process[2]:.2f} images/s per "
          f"process in 2 (small UNet, one thread each; median of 3 interleaved rounds)")
    verdict(result["same_images"], "1 and 2 processes wrote different images", missed)
    bound = f"2-process speed-up {result['speedup']:.2f}, not >= {bench_sampling.MIN_SPEEDUP}"
    print(f"   speed-up of 2 processes: {result['speedup']:.2f} x "
          f"({verdict(result['speedup'] >= bench_sampling.MIN_SPEEDUP, bound, missed)})")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cpu: measurements 1-3 and 5; cuda: the float32 vs bf16 training step (4)")
    parser.add_argument("--gpu", type=int, default=0, help="CUDA device index for --device cuda")
    parser.add_argument("--only", type=int, nargs="+", choices=CPU_MEASUREMENTS, default=CPU_MEASUREMENTS,
                        help="on the CPU, run only these measurements (2 and 3 go together)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice; on a CPU shared with other jobs, "
                             "1 thread gives steadier numbers)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit(f"{sys.argv[0]}: error: --device cuda needs a CUDA GPU (none found)")
    if args.device == "cuda" and not 0 <= args.gpu < torch.cuda.device_count():
        sys.exit(f"{sys.argv[0]}: error: --gpu {args.gpu}: there are {torch.cuda.device_count()} CUDA devices")
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    missed = []
    if args.device == "cuda":
        print(f"torch {torch.__version__}, CUDA {torch.version.cuda}")
        precision_comparison(torch.device("cuda", args.gpu), missed)
    else:
        print(f"torch {torch.__version__}, CPU, {torch.get_num_threads()} threads")
        if 1 in args.only:
            ddim_vs_ddpm(missed)
        if {2, 3} & set(args.only):
            torch.manual_seed(0)
            unet = UNet().eval()
            forward_seconds = step_overhead(unet, missed)
            course_unet_costs(unet, forward_seconds)
        if 5 in args.only:
            sampling_speedup(missed)
        if 6 in args.only:
            dpm_solver_vs_ddim(missed)
    print(f"total {time.perf_counter() - start:.0f} s")
    if missed:
        sys.exit(f"{len(missed)} bound(s) missed: " + "; ".join(missed))


if __name__ == "__main__":
    main()
