"""Task 1-1 speed: the KD-tree Chamfer distance against brute force, and its memory at 100k points.

    .venv/bin/python benchmarks/bench_2d.py

Exits non-zero when a bound is missed:
- at N = 20,000 points per set, the KD-tree is at least MIN_SPEEDUP (10) times faster than brute
  force (the full distance matrix, built in chunks), measured in the same run;
- it agrees with brute force to a relative MAX_RELATIVE_DIFFERENCE (1e-9) at every N;
- at 100,000 x 100,000 points the call raises the process's peak memory by at most
  MAX_PEAK_GROWTH_MIB (256 MiB; a dense float32 distance matrix would be 37 GiB).
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

MIN_SPEEDUP = 10
MAX_RELATIVE_DIFFERENCE = 1e-9
MAX_PEAK_GROWTH_MIB = 256


def brute_force(a: torch.Tensor, b: torch.Tensor, chunk: int = 2048) -> float:
    """The same sum from the full distance matrix, built chunk by chunk."""
    a_to_b = torch.cat([torch.cdist(a[i:i + chunk], b).min(dim=1).values for i in range(0, len(a), chunk)])
    b_to_a = torch.cat([torch.cdist(b[i:i + chunk], a).min(dim=1).values for i in range(0, len(b), chunk)])
    return float((a_to_b.double() ** 2).sum() + (b_to_a.double() ** 2).sum())


def timed(fn):
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def main() -> int:
    failures = []
    rng = np.random.default_rng(0)
    # First, while the process is small: the peak RSS then shows what the KD-trees need.
    a, b = rng.normal(size=(100_000, 2)), rng.normal(size=(100_000, 2))
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    _, seconds = timed(lambda: chamfer_distance(a, b))
    growth_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    print(f"N = 100000 x 100000: KD-tree {seconds:.3f} s; peak RSS grew by {growth_mib:.0f} MiB "
          f"(bound {MAX_PEAK_GROWTH_MIB} MiB; a dense 100k x 100k float32 matrix would be 37 GiB)")
    if growth_mib > MAX_PEAK_GROWTH_MIB:
        failures.append(f"peak memory grew by {growth_mib:.0f} MiB > {MAX_PEAK_GROWTH_MIB} MiB at 100k points")

    print("Chamfer distance, KD-tree vs brute force (2D Gaussian point sets):")
    for n in (2_048, 20_000):
        a, b = rng.normal(size=(n, 2)), rng.normal(size=(n, 2))
        kd_value, kd_seconds = timed(lambda: chamfer_distance(a, b))
        bf_value, bf_seconds = timed(lambda: brute_force(torch.from_numpy(a), torch.from_numpy(b)))
        speedup, difference = bf_seconds / kd_seconds, abs(kd_value - bf_value) / bf_value
        print(f"  N = {n:>6}: KD-tree {kd_seconds:.3f} s, brute force {bf_seconds:.3f} s "
              f"(x{speedup:.0f}); relative difference {difference:.1e}")
        if difference > MAX_RELATIVE_DIFFERENCE:
            failures.append(f"N = {n}: KD-tree and brute force differ by {difference:.1e} > {MAX_RELATIVE_DIFFERENCE}")
        if n == 20_000 and speedup < MIN_SPEEDUP:
            failures.append(f"N = {n}: KD-tree only x{speedup:.1f} faster than brute force (bound x{MIN_SPEEDUP})")

    for failure in failures:
        print(f"bench_2d.py: FAILED: {failure}", file=sys.stderr)
    print("all bounds met" if not failures else f"{len(failures)} bound(s) missed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
