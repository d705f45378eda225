"""sampling.py in 1 process vs 2 (torchrun) on this machine's CPU, as ratios measured in one run.

    .venv/bin/python benchmarks/bench_sampling.py [--rounds 3] [--min_speedup 1.3]

1. Speed-up of 2 processes: a small checkpoint (random weights: the speed does not depend on them)
   is sampled by `python sampling.py` (1 process) and by `torchrun --nproc_per_node 2 sampling.py`,
   interleaved for --rounds rounds, every process on one thread. The two write the same PNG bytes
   (checked). The reverse-process time comes from each run's sampling.json: 1 process, its time;
   2 processes, the slower process's (the images are ready when it is done). Speed-up = median
   1-process time / median 2-process time; the script exits 1 below --min_speedup (1.3: 2 cores
   give at most 2, less when other jobs share them). Also printed: images per second per process,
   and each command's wall time from launch to exit (start-up included).
2. The cost of one generator per image: drawing a step's noise for a batch as B draws of
   [1, C, H, W] (sampling.py) against one draw of [B, C, H, W], next to one forward pass of the
   small UNet (the course UNet's forward costs ~100x more: bench_image.py).

measure_speedup() and noise_draw_cost() return the figures for other benchmarks to print.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import timeit
from pathlib import Path

import torch

IMAGE_FOLDER = Path(__file__).resolve().parents[1] / "task1" / "image_diffusion_todo"
sys.path.insert(0, str(IMAGE_FOLDER))
from model import DiffusionModule, randn_per_image  # noqa: E402
from network import UNet  # noqa: E402
import sampling  # noqa: E402
from scheduler import DDPMScheduler  # noqa: E402

T = 100
RESOLUTION = 32
SAMPLING_SETTINGS = dict(sample_method="ddim", ddim_steps=25, eta=0.5, num_samples=16, batch_size=4, seed=0)
MIN_SPEEDUP = 1.3


def small_unet():
    torch.manual_seed(0)
    return UNet(T=T, image_resolution=RESOLUTION, ch=32, ch_mult=[1, 2], attn=[1], num_res_blocks=1,
                dropout=0.0).eval()


def run_sampling(ckpt, save_dir, num_processes: int) -> dict:
    """sampling.py in num_processes processes of one thread -> its sampling.json + "wall_seconds"."""
    launcher = [sys.executable] if num_processes == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(num_processes)]
    command = [*launcher, *sampling.command(ckpt, save_dir, **SAMPLING_SETTINGS)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    result = subprocess.run(command, cwd=IMAGE_FOLDER, env=env, capture_output=True, text=True)
    wall_seconds = time.perf_counter() - start
    if result.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{result.stderr[-2000:]}")
    summary = json.loads((Path(save_dir) / sampling.SUMMARY_FILE).read_text())
    return {**summary, "wall_seconds": wall_seconds}


def pngs(folder) -> dict:
    return {p.name: p.read_bytes() for p in Path(folder).glob("*.png")}


def measure_speedup(num_processes: int = 2, rounds: int = 3) -> dict:
    """1 process vs num_processes, interleaved for `rounds` rounds (module docstring, part 1) ->
    {"speedup", "seconds": {1: [...], N: [...]}, "images_per_second_per_process": {1: x, N: x},
    "wall_seconds": {1: [...], N: [...]}, "same_images": bool}."""
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        ckpt = folder / "small.ckpt"
        DiffusionModule(small_unet(), DDPMScheduler(T, 1e-4, 0.02)).save(ckpt)
        counts = (1, num_processes)
        runs = {n: [] for n in counts}
        same_images = True
        for round_index in range(rounds):
            for n in counts:
                runs[n].append(run_sampling(ckpt, folder / f"{n}_{round_index}", n))
            same_images &= pngs(folder / f"1_{round_index}") == pngs(folder / f"{num_processes}_{round_index}")
    num_samples, batch_size = runs[1][0]["num_samples"], SAMPLING_SETTINGS["batch_size"]
    # the images are ready when the slowest process is done
    seconds = {n: [max(run["seconds_per_process"]) for run in runs[n]] for n in counts}
    per_process = {}  # each process's images / its time
    for n in counts:
        shares = [sum(map(len, share)) for share in sampling.split_batches(num_samples, batch_size, n)]
        per_process[n] = statistics.median(images / s for run in runs[n]
                                           for images, s in zip(shares, run["seconds_per_process"]))
    return {"speedup": statistics.median(seconds[1]) / statistics.median(seconds[num_processes]),
            "seconds": seconds, "images_per_second_per_process": per_process,
            "wall_seconds": {n: [run["wall_seconds"] for run in runs[n]] for n in counts},
            "same_images": same_images, "num_samples": num_samples}


def noise_draw_cost(batch_size: int = 16, resolution: int = 64, repeats: int = 20) -> dict:
    """Seconds (median) of one step's noise for a batch: per image (B generators), in one draw,
    and one forward pass of the small UNet at that batch and resolution (module docstring, part 2)."""
    shape = (batch_size, 3, resolution, resolution)
    generators = [torch.Generator().manual_seed(i) for i in range(batch_size)]
    generator = torch.Generator().manual_seed(0)
    unet = UNet(T=T, image_resolution=resolution, ch=32, ch_mult=[1, 2], attn=[1], num_res_blocks=1).eval()
    x, t = torch.randn(shape), torch.full((batch_size,), T // 2)

    def median_seconds(fn, n):
        return statistics.median(timeit.repeat(fn, number=1, repeat=n))

    with torch.no_grad():
        return {"per_image": median_seconds(lambda: randn_per_image(shape, generators, "cpu"), repeats),
                "one_draw": median_seconds(lambda: randn_per_image(shape, generator, "cpu"), repeats),
                "forward": median_seconds(lambda: unet(x, t), 3)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median taken)")
    parser.add_argument("--min_speedup", type=float, default=MIN_SPEEDUP,
                        help="exit 1 when 2 processes are not this much faster than 1")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; {os.cpu_count()} CPUs")

    print(f"1. sampling.py, 1 process vs 2 (one thread each; small UNet {RESOLUTION}x{RESOLUTION}, "
          f"{' '.join(sampling.command('CKPT', 'OUT', **SAMPLING_SETTINGS)[5:])}; median of {args.rounds} interleaved rounds)")
    result = measure_speedup(2, args.rounds)
    for n in (1, 2):
        print(f"   {n} process{'es' if n > 1 else ''}: reverse process {statistics.median(result['seconds'][n]):.2f} s "
              f"(rounds: {', '.join(f'{s:.2f}' for s in result['seconds'][n])}); "
              f"{result['images_per_second_per_process'][n]:.2f} images/s per process; "
              f"command wall time {statistics.median(result['wall_seconds'][n]):.1f} s with start-up")
    print(f"   same PNG bytes in 1 and 2 processes: {result['same_images']}")
    print(f"   speed-up of 2 processes: {result['speedup']:.2f} x (bound >= {args.min_speedup})")

    cost = noise_draw_cost()
    print(f"2. one step's noise for a batch of 16 at 64x64: {cost['per_image'] * 1e6:.0f} us per image "
          f"(16 generators) vs {cost['one_draw'] * 1e6:.0f} us in one draw; small UNet forward "
          f"{cost['forward'] * 1e3:.0f} ms: the per-image draws cost "
          f"{100 * (cost['per_image'] - cost['one_draw']) / cost['forward']:.3f} % of it")
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")

    failures = []
    if not result["same_images"]:
        failures.append("1 and 2 processes wrote different images")
    if result["speedup"] < args.min_speedup:
        failures.append(f"speed-up {result['speedup']:.2f} < {args.min_speedup}")
    if failures:
        sys.exit("FAILED: " + "; ".join(failures))
    print("OK")


if __name__ == "__main__":
    main()
