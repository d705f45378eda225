"""Task 1-1 speed: the KD-tree Chamfer distance against brute force, and its memory at 100k points.

    .venv/bin/python benchmarks/bench_2d.py

Times are ratios within one run (the machine may be shared); the DDIM-vs-DDPM sampling-time
ratios are measured by run_experiment.py itself (results.md, "DDIM time relative to DDPM").
"""
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "task1" / "2d_plot_diffusion_todo"))
from chamferdist import chamfer_distance  # noqa: E402


def brute_force(a: torch.Tensor, b: torch.Tensor, chunk: int = 2048) -> float:
    """The same sum from the full distance matrix, built chunk by chunk."""
    a_to_b = torch.cat([torch.cdist(a[i:i + chunk], b).min(dim=1).values for i in range(0, len(a), chunk)])
    b_to_a = torch.cat([torch.cdist(b[i:i + chunk], a).min(dim=1).values for i in range(0, len(b), chunk)])
    return float((a_to_b.double() ** 2).sum() + (b_to_a.double() ** 2).sum())


def timed(fn):
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def main():
    rng = np.random.default_rng(0)
    # First, while the process is small: the peak RSS then shows what the KD-trees need.
    a, b = rng.normal(size=(100_000, 2)), rng.normal(size=(100_000, 2))
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    _, seconds = timed(lambda: chamfer_distance(a, b))
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"N = 100000 x 100000: KD-tree {seconds:.3f} s; peak RSS of this process {rss_after / 1024:.0f} MiB "
          f"(grew by {(rss_after - rss_before) / 1024:.0f} MiB; a dense 100k x 100k float32 matrix would be 37 GiB)")

    print("Chamfer distance, KD-tree vs brute force (2D Gaussian point sets):")
    for n in (2_048, 20_000):
        a, b = rng.normal(size=(n, 2)), rng.normal(size=(n, 2))
        kd_value, kd_seconds = timed(lambda: chamfer_distance(a, b))
        bf_value, bf_seconds = timed(lambda: brute_force(torch.from_numpy(a), torch.from_numpy(b)))
        print(f"  N = {n:>6}: KD-tree {kd_seconds:.3f} s, brute force {bf_seconds:.3f} s "
              f"(x{bf_seconds / kd_seconds:.0f}); relative difference {abs(kd_value - bf_value) / bf_value:.1e}")


if __name__ == "__main__":
    main()
