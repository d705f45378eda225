"""Timesteps fitted to one trained model: an extra beyond the DPM-Solver++ paper's spacings, for
the fewest network calls, where the S calls fall matters most.

Each of the fixed spacings (quadratic, logsnr, ...) is one rule for every model. Here the S
timesteps are chosen for the trained model at hand, with the model as its own reference: the fit
minimises the mean Chamfer distance between the solver's samples and the model's own DDPM samples
(1000 calls), over a few fixed draws of x_T and of the SDE's noise. The
reference data set is never used, and the draws are not those run_experiment.py evaluates on.

The search is coordinate descent on integers: starting from a spacing (quadratic), move one
timestep by +-delta when that lowers the objective, keeping the timesteps strictly descending in
[0, T - 1]; sweep until no move helps, then halve delta. Every candidate sees the same draws
(common random numbers), so a move is judged on the sampler's change, not on new noise.
"""
import torch
from tqdm import tqdm

from chamferdist import chamfer_distance
from dpm_solver import check_order, solve

FIT_DRAWS = 8  # draws of x_T (and SDE noise) per evaluation of the objective
FIT_MOVES = (64, 32, 16, 8, 4)  # the deltas of the coordinate descent, largest first
# Draw j of the fit is seeded by FIT_SEED + j: never one of run_experiment's evaluation draws
# (seed + 1000 k, k < 1000).
FIT_SEED = 10 ** 6


def solver_cds(model, timesteps: torch.Tensor, order: int, stochastic: bool, reference: torch.Tensor,
               seeds) -> list:
    """CD to reference ([N, 2]) of the solver's samples at these timesteps, one per seed: x_T (N
    points) and the SDE's noise drawn after torch.manual_seed(seed). The CD is computed where
    reference lies."""
    cds = []
    for seed in seeds:
        torch.manual_seed(seed)
        x_T = torch.randn(tuple(reference.shape), device=model.device)
        sample = solve(model, x_T, timesteps, order, stochastic=stochastic)
        cds.append(float(chamfer_distance(sample.to(reference.device), reference)))
    return cds


def fit_objective(model, timesteps: torch.Tensor, order: int, stochastic: bool, target: torch.Tensor,
                  num_draws: int = FIT_DRAWS) -> float:
    """Mean CD between the solver's samples at these timesteps and target ([N, 2], the model's own
    DDPM samples), over num_draws seeded draws of x_T (N points each) and of the SDE's noise."""
    with torch.random.fork_rng():  # the caller's random stream is left as it was
        cds = solver_cds(model, timesteps, order, stochastic, target, [FIT_SEED + draw for draw in range(num_draws)])
    return sum(cds) / num_draws


def move(timesteps: list, i: int, delta: int, num_train_timesteps: int):
    """timesteps with the i-th moved by delta, or None if they would not stay strictly descending in
    [0, T - 1]."""
    moved = timesteps[i] + delta
    upper = timesteps[i - 1] - 1 if i > 0 else num_train_timesteps - 1
    lower = timesteps[i + 1] + 1 if i + 1 < len(timesteps) else 0
    return timesteps[:i] + [moved] + timesteps[i + 1:] if lower <= moved <= upper else None


def fit_timesteps(model, initial: torch.Tensor, order: int, stochastic: bool, target: torch.Tensor,
                  num_draws: int = FIT_DRAWS, moves=FIT_MOVES, progress: bool = False):
    """Coordinate descent from initial ([S] int64, descending) -> (fitted [S] int64, the objective at
    initial, the objective at the fit); see the module docstring."""
    check_order(order, stochastic)
    T = model.var_scheduler.num_train_timesteps

    def objective(timesteps: list) -> float:
        return fit_objective(model, torch.tensor(timesteps), order, stochastic, target, num_draws)

    best = initial.tolist()
    start = best_value = objective(best)
    bar = tqdm(desc=f"fitting {len(best)} timesteps", unit="try", leave=False, disable=not progress)
    for delta in moves:
        improved = True
        while improved:
            improved = False
            for i in range(len(best)):  # each move starts from the best so far
                for signed_delta in (delta, -delta):
                    candidate = move(best, i, signed_delta, T)
                    if candidate is None:
                        continue
                    value = objective(candidate)
                    bar.update()
                    if value < best_value:
                        best, best_value, improved = candidate, value, True
                        bar.set_postfix(objective=f"{best_value:.3f}")
    bar.close()
    return torch.tensor(best), start, best_value


@torch.no_grad()
def ddpm_target(model, num_points: int) -> torch.Tensor:
    """The fit's reference: num_points DDPM samples of the model (1000 calls), seeded apart from
    every evaluation draw -> [num_points, 2]."""
    with torch.random.fork_rng():
        torch.manual_seed(FIT_SEED - 1)
        return model.p_sample_loop((num_points, 2))
