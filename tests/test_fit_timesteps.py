"""fit_timesteps.py (Task 1-1): the coordinate descent ends where no single move of its smallest
delta lowers its objective (checked by brute force), the objective is what it reports, and the
caller's random stream is untouched."""
import pytest
import torch
from conftest import TASK1_2D, load_module

T = 1000


@pytest.fixture(scope="module")
def fit():
    ddpm, network = load_module(TASK1_2D, "ddpm"), load_module(TASK1_2D, "network")
    fit_timesteps, dpm_solver = load_module(TASK1_2D, "fit_timesteps"), load_module(TASK1_2D, "dpm_solver")
    torch.manual_seed(0)
    # untrained, but it sees t (TimeLinear layers), so where the calls fall changes the samples
    model = ddpm.DiffusionModule(network.SimpleNet(2, 2, [16, 16], T), ddpm.BaseScheduler(T)).eval()
    target = torch.randn(64, 2) * 0.5 + 1.0
    return fit_timesteps, dpm_solver, model, target


@pytest.mark.parametrize("order, stochastic", [(2, False), (2, True)])
def test_fit_ends_at_a_local_minimum_of_its_objective(fit, order, stochastic):
    fit_timesteps, dpm_solver, model, target = fit
    initial = dpm_solver.solver_timesteps(model.var_scheduler.alphas_cumprod, 3, "quadratic")
    rng_before = torch.random.get_rng_state()
    fitted, before, after = fit_timesteps.fit_timesteps(model, initial, order, stochastic, target,
                                                        num_draws=2, moves=(64, 8, 1))
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # the fit's draws are its own

    def objective(timesteps):
        return fit_timesteps.fit_objective(model, torch.tensor(timesteps), order, stochastic, target, num_draws=2)

    assert before == objective(initial.tolist()) and after == objective(fitted.tolist())
    assert after < before  # an untrained model: the quadratic timesteps are no optimum
    fitted = fitted.tolist()
    assert all(a > b for a, b in zip(fitted, fitted[1:])) and 0 <= fitted[-1] and fitted[0] <= T - 1
    # brute force: every sequence one step of 1 away (strictly descending, in [0, T - 1]) is no better
    for i in range(len(fitted)):
        for delta in (1, -1):
            moved = fitted[:i] + [fitted[i] + delta] + fitted[i + 1:]
            if all(a > b for a, b in zip(moved, moved[1:])) and 0 <= moved[-1] and moved[0] <= T - 1:
                assert objective(moved) >= after


def test_fit_objective_is_the_solvers_mean_chamfer_distance_to_the_target(fit):
    """The objective's draw j: x_T from seed FIT_SEED + j, then the solver; the same as
    dpm_solver_sample_loop after that seed."""
    fit_timesteps, dpm_solver, model, target = fit
    chamfer = load_module(TASK1_2D, "chamferdist").chamfer_distance
    cds = []
    for draw in range(3):
        torch.manual_seed(fit_timesteps.FIT_SEED + draw)
        sample = dpm_solver.dpm_solver_sample_loop(model, tuple(target.shape), 5, 2, "quadratic", stochastic=True)
        cds.append(float(chamfer(sample, target)))
    timesteps = dpm_solver.solver_timesteps(model.var_scheduler.alphas_cumprod, 5, "quadratic")
    assert fit_timesteps.fit_objective(model, timesteps, 2, True, target, num_draws=3) == pytest.approx(
        sum(cds) / 3, rel=1e-12)


def test_fit_refuses_an_order_the_solver_lacks(fit):
    fit_timesteps, dpm_solver, model, target = fit
    initial = dpm_solver.solver_timesteps(model.var_scheduler.alphas_cumprod, 4, "quadratic")
    with pytest.raises(ValueError, match="SDE-DPM-Solver\\+\\+ order must be one of"):
        fit_timesteps.fit_timesteps(model, initial, 3, True, target)
