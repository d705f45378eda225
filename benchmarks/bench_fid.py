"""Task 1-2's Frechet distance: time and accuracy of its two routes against scipy's sqrtm.

    .venv/bin/python benchmarks/bench_fid.py

On 2048-d features with a decaying spectrum, as Inception's are, at N = 150 and 1000 images per set
(fewer images than dimensions: singular covariances), it computes the trace term
Tr((sigma1 sigma2)^{1/2}) four ways:
- scipy.linalg.sqrtm(sigma1 @ sigma2), the course's and pytorch-fid's route;
- measure_fid.trace_sqrt_product (two symmetric eigendecompositions; frechet_distance's route);
- measure_fid.frechet_distance_of_features (the singular values of X1 X2^T; Scorer's route);
- the arbiter: sqrtm in the span of set 1's centred features, where sigma1 has full rank and the
  square root is well posed (Tr is invariant there: sigma1 vanishes outside that span).
Exits non-zero when a bound is missed: the feature route agrees with the arbiter to a relative
MAX_RELATIVE_ERROR (1e-8) and is at least MIN_SPEEDUP (20) times faster than sqrtm in the same run.
The other two routes' errors are printed, not bounded: both carry the rounding noise of the
covariances' null space through a square root.
"""
import sys
import time
import warnings
from pathlib import Path

import numpy as np
from scipy import linalg

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "task1" / "image_diffusion_todo"))
from fid import measure_fid  # noqa: E402

DIMENSIONS = 2048
MAX_RELATIVE_ERROR = 1e-8
MIN_SPEEDUP = 20


def features(rng, n, shift):
    """[n, DIMENSIONS] Gaussian features whose variances fall off as 1/k, mean shifted by ``shift``."""
    scales = 1 / np.sqrt(np.arange(1, DIMENSIONS + 1))
    return rng.standard_normal((n, DIMENSIONS)) * scales + shift


def span_trace(x1, x2):
    """The arbiter: Tr((sigma1 sigma2)^{1/2}) by sqrtm in the span Q of x1's centred rows."""
    centred_1, centred_2 = x1 - x1.mean(0), x2 - x2.mean(0)
    basis, _ = np.linalg.qr(centred_1.T)
    basis = basis[:, :len(x1) - 1]  # centred rows span n - 1 dimensions
    sigma1 = basis.T @ (centred_1.T @ centred_1) @ basis / (len(x1) - 1)
    sigma2 = basis.T @ (centred_2.T @ centred_2) @ basis / (len(x2) - 1)
    return float(np.trace(linalg.sqrtm(sigma1 @ sigma2)).real)


def timed(fn):
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def trace_term_of_fid(fid, x1, x2):
    """The trace term a Frechet distance implies: (|mu1 - mu2|^2 + Tr sigma1 + Tr sigma2 - fid) / 2."""
    gap = x1.mean(0) - x2.mean(0)
    traces = np.trace(np.cov(x1, rowvar=False)) + np.trace(np.cov(x2, rowvar=False))
    return (gap @ gap + traces - fid) / 2


def main() -> int:
    failures = []
    rng = np.random.default_rng(0)
    for n in (150, 1000):
        x1, x2 = features(rng, n, 0.0), features(rng, n, 0.05)
        sigma1, sigma2 = np.cov(x1, rowvar=False), np.cov(x2, rowvar=False)
        exact = span_trace(x1, x2)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Matrix is singular"
            sqrtm_value, sqrtm_seconds = timed(lambda: float(np.trace(linalg.sqrtm(sigma1 @ sigma2)).real))
        eigh_value, eigh_seconds = timed(lambda: measure_fid.trace_sqrt_product(sigma1, sigma2))
        fid, feature_seconds = timed(lambda: measure_fid.frechet_distance_of_features(x1, x2))
        feature_value = trace_term_of_fid(fid, x1, x2)
        print(f"N = {n} per set, D = {DIMENSIONS}: trace term {exact:.9f} (sqrtm in the span)")
        for name, value, seconds in [("scipy sqrtm", sqrtm_value, sqrtm_seconds),
                                     ("trace_sqrt_product", eigh_value, eigh_seconds),
                                     ("frechet_distance_of_features", feature_value, feature_seconds)]:
            print(f"  {name:29s} {seconds:8.3f} s  relative error {abs(value - exact) / exact:.1e}")
        error = abs(feature_value - exact) / exact
        speedup = sqrtm_seconds / feature_seconds
        print(f"  feature route: {speedup:.0f}x faster than sqrtm (bound {MIN_SPEEDUP}x), "
              f"relative error {error:.1e} (bound {MAX_RELATIVE_ERROR:.0e})")
        if error > MAX_RELATIVE_ERROR:
            failures.append(f"N = {n}: feature route off by {error:.1e} relative")
        if speedup < MIN_SPEEDUP:
            failures.append(f"N = {n}: feature route only {speedup:.1f}x faster than sqrtm")
    for failure in failures:
        print("FAILED:", failure)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
