"""DPM-Solver++ (both Task 1 folders' dpm_solver.py) against diffusers' DPMSolverMultistepScheduler,
against this project's DDIM (order 1), against the exact Gaussian solution, and through sampling.py."""
import inspect
import json
import textwrap

import numpy as np
import pytest
import torch
from conftest import TASK1_2D, TASK1_IMAGE, load_module
from diffusers import DPMSolverMultistepScheduler
from diffusers.schedulers import scheduling_dpmsolver_multistep
from PIL import Image
from conftest import assert_one_line_error
from conftest import run_image_main as run_main

T = 1000
SPACINGS = ("leading", "linspace", "trailing", "quadratic", "logsnr")
DIFFUSERS_PREDICTION_TYPE = {"noise": "epsilon", "x0": "sample"}


class Float64DPMSolver(DPMSolverMultistepScheduler):
    """diffusers' scheduler with its step() unchanged but for two lines: diffusers 0.42 casts the
    sample and the SDE's noise to float32 at every step ("upcast"), which would cap any comparison
    at float32's ~1e-7. The test copies step()'s source without those casts; the asserts fail if
    the lines change."""


_STEP_SOURCE = textwrap.dedent(inspect.getsource(DPMSolverMultistepScheduler.step))
_CASTS = {"sample = sample.to(torch.float32)": "pass",
          "noise = variance_noise.to(device=model_output.device, dtype=torch.float32)": "noise = variance_noise"}
for _cast, _replacement in _CASTS.items():
    assert _STEP_SOURCE.count(_cast) == 1, "diffusers' DPMSolverMultistepScheduler.step changed: update the test"
    _STEP_SOURCE = _STEP_SOURCE.replace(_cast, _replacement)
_namespace = {}
exec(_STEP_SOURCE, vars(scheduling_dpmsolver_multistep), _namespace)
Float64DPMSolver.step = _namespace["step"]


@pytest.fixture(scope="module")
def two_d():
    return load_module(TASK1_2D, "ddpm"), load_module(TASK1_2D, "dpm_solver")


@pytest.fixture(scope="module")
def image():
    return load_module(TASK1_IMAGE, "scheduler"), load_module(TASK1_IMAGE, "dpm_solver")


class TimeDependentNet(torch.nn.Module):
    """A float64 stand-in network whose output depends on x and on t (a time-blind one would hide a
    step that calls the network at the wrong timestep), of the size of a real one's: about
    sigma_t x_t as a noise prediction, so the trajectories stay O(1). x: [B, D] or [B, C, H, W]."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor([1.3, -0.7, 0.4], dtype=torch.float64))

    def forward(self, x, t, *_):
        t = int(torch.as_tensor(t).reshape(-1)[0])
        sigma_t = (1 - alphas_cumprod64()[t]).sqrt()
        mixed = torch.tanh(self.scale[0] * x + self.scale[1] * x.roll(1, dims=-1))
        return sigma_t * x + self.scale[2] * mixed * np.cos(t / 300)


def alphas_cumprod64():
    return torch.cumprod(1 - torch.linspace(1e-4, 0.02, T, dtype=torch.float32), 0).double()


def diffusers_trajectory(x_T, timesteps, network, order, predictor, lower_order_final, noises=None):
    """diffusers' DPM-Solver++ at these timesteps, with the sigmas of the same float64 schedule;
    with noises (one [x_T.shape] per step), its SDE-DPM-Solver++ driven by them."""
    reference = Float64DPMSolver(num_train_timesteps=T, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                                 algorithm_type="dpmsolver++" if noises is None else "sde-dpmsolver++",
                                 solver_type="midpoint", solver_order=order,
                                 prediction_type=DIFFUSERS_PREDICTION_TYPE[predictor],
                                 lower_order_final=lower_order_final, final_sigmas_type="zero")
    reference.set_timesteps(timesteps=timesteps.tolist())
    assert torch.equal(reference.timesteps, timesteps)
    alpha_bar = alphas_cumprod64()[timesteps]
    # diffusers' sigma = sqrt((1 - alpha_bar) / alpha_bar), then 0: the clean sample
    reference.sigmas = torch.cat([((1 - alpha_bar) / alpha_bar).sqrt(), torch.zeros(1, dtype=torch.float64)])
    x = x_T.clone()
    for i, t in enumerate(reference.timesteps):
        x = reference.step(network(x, t), t, x, variance_noise=None if noises is None else noises[i]).prev_sample
    return x


def two_d_module(ddpm, network):
    return ddpm.DiffusionModule(network, ddpm.BaseScheduler(T)).double()


def image_trajectory(scheduler_module, x_T, network, predictor, noises=None):
    """DiffusionModule.sample's loop, on any scheduler of the image folder; noises: one per step."""
    x = x_T.clone()
    for i, t in enumerate(scheduler_module.timesteps):
        x = scheduler_module.step(x, t, network(x, t), predictor, noise=None if noises is None else noises[i])
    return x


def image_solver(dpm_solver, num_steps, order, spacing, lower_order_final=True, stochastic=False):
    return dpm_solver.DPMSolverScheduler(T, 1e-4, 0.02, "linear", num_steps, order, timestep_spacing=spacing,
                                         lower_order_final=lower_order_final, stochastic=stochastic).double()


NOISE_SEED = 7


def step_noises(x_T, num_steps):
    """The z of every step as the 2D loop draws them after torch.manual_seed(NOISE_SEED) with x_T
    given: one randn_like per step."""
    torch.manual_seed(NOISE_SEED)
    return [torch.randn_like(x_T) for _ in range(num_steps)]


def x_T_for(folder):
    shape = (16, 2) if folder == "2d" else (2, 3, 4, 4)
    return torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def solver_run(folder, two_d, image, x_T, network, num_steps, order, spacing, predictor, lower_order_final=True,
               stochastic=False):
    """Either folder's solver from x_T; the SDE's noise is step_noises(x_T, num_steps) in both."""
    if folder == "2d":
        ddpm, dpm_solver = two_d
        torch.manual_seed(NOISE_SEED)
        return dpm_solver.dpm_solver_sample_loop(two_d_module(ddpm, network), x_T.shape, num_steps, order, spacing,
                                                 predictor=predictor, lower_order_final=lower_order_final,
                                                 stochastic=stochastic, x_T=x_T.clone())
    _, dpm_solver = image
    return image_trajectory(image_solver(dpm_solver, num_steps, order, spacing, lower_order_final, stochastic), x_T,
                            network, predictor, step_noises(x_T, num_steps) if stochastic else None)


@pytest.mark.parametrize("folder", ["2d", "image"])
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("predictor", ["noise", "x0"])
@pytest.mark.parametrize("num_steps, lower_order_final", [(7, True), (7, False), (20, True)])
def test_trajectory_equals_diffusers(two_d, image, folder, spacing, order, predictor, num_steps, lower_order_final):
    """Whole trajectories, float64, every spacing, the same explicit timesteps; below 15 steps
    lower_order_final changes the order of the step before the last (for order 3)."""
    _, dpm_solver = two_d if folder == "2d" else image
    timesteps = dpm_solver.solver_timesteps(alphas_cumprod64(), num_steps, spacing)
    network, x_T = TimeDependentNet(), x_T_for(folder)
    ours = solver_run(folder, two_d, image, x_T, network, num_steps, order, spacing, predictor, lower_order_final)
    theirs = diffusers_trajectory(x_T, timesteps, network, order, predictor, lower_order_final)
    torch.testing.assert_close(ours, theirs, atol=1e-10, rtol=0)


@pytest.mark.parametrize("folder", ["2d", "image"])
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("order", [1, 2])
@pytest.mark.parametrize("predictor", ["noise", "x0"])
def test_sde_trajectory_equals_diffusers(two_d, image, folder, spacing, order, predictor):
    """SDE-DPM-Solver++ against diffusers' sde-dpmsolver++ on the same noise, float64, 7 steps."""
    _, dpm_solver = two_d if folder == "2d" else image
    timesteps = dpm_solver.solver_timesteps(alphas_cumprod64(), 7, spacing)
    network, x_T = TimeDependentNet(), x_T_for(folder)
    ours = solver_run(folder, two_d, image, x_T, network, 7, order, spacing, predictor, stochastic=True)
    theirs = diffusers_trajectory(x_T, timesteps, network, order, predictor, True, step_noises(x_T, 7))
    torch.testing.assert_close(ours, theirs, atol=1e-10, rtol=0)
    ode = solver_run(folder, two_d, image, x_T, network, 7, order, spacing, predictor)
    assert (ours - ode).abs().max() > 1e-3  # the noise enters


@pytest.mark.parametrize("folder", ["2d", "image"])
def test_sde_solver_has_orders_one_and_two(two_d, image, folder):
    _, dpm_solver = two_d if folder == "2d" else image
    with pytest.raises(ValueError, match="SDE-DPM-Solver\\+\\+ order must be one of \\(1, 2\\), got 3"):
        solver_run(folder, two_d, image, x_T_for(folder), TimeDependentNet(), 7, 3, "quadratic", "noise",
                   stochastic=True)


def test_both_task1_folders_carry_the_same_solver_core(two_d, image):
    """Each course folder runs on its own (flat imports), so each has its dpm_solver.py; the
    solver itself (timesteps, orders, the update) must be the same text in both, but for the name
    of the folder's DDIM sub-sequence function. The samplers around it differ: a loop in 2D, a
    scheduler class for images."""
    (_, two_d_solver), (_, image_solver) = two_d, image
    for name in ("logsnr_timesteps", "solver_timesteps", "step_order", "solver_orders", "check_order",
                 "multistep_update"):
        two_d_source = inspect.getsource(getattr(two_d_solver, name))
        two_d_source = two_d_source.replace("ddpm.ddim_timesteps", "scheduler.ddim_sub_sequence")
        assert two_d_source.replace("ddim_timesteps", "ddim_sub_sequence") == inspect.getsource(
            getattr(image_solver, name)), name
    for name in ("SOLVER_SPACINGS", "SOLVER_ORDERS", "SDE_SOLVER_ORDERS"):
        assert getattr(two_d_solver, name) == getattr(image_solver, name), name


def test_lower_order_final_changes_order_three_below_15_steps(image):
    """So the lower_order_final cases above test something: the two settings differ for order 3."""
    network, x_T = TimeDependentNet(), x_T_for("image")
    runs = [solver_run("image", None, image, x_T, network, 7, 3, "quadratic", "noise", flag) for flag in (True, False)]
    assert (runs[0] - runs[1]).abs().max() > 1e-6


@pytest.mark.parametrize("folder", ["2d", "image"])
@pytest.mark.parametrize("num_steps", [5, 10, 20, 38])
def test_logsnr_timesteps_equal_diffusers_lu_lambdas(two_d, image, folder, num_steps):
    _, dpm_solver = two_d if folder == "2d" else image
    reference = DPMSolverMultistepScheduler(num_train_timesteps=T, beta_start=1e-4, beta_end=0.02,
                                            use_lu_lambdas=True, final_sigmas_type="zero")
    reference.set_timesteps(num_steps)
    assert torch.equal(dpm_solver.solver_timesteps(alphas_cumprod64(), num_steps, "logsnr"), reference.timesteps)


@pytest.mark.parametrize("num_steps", [39, 50, 200, 999, 1000])
def test_logsnr_timesteps_are_distinct_where_diffusers_repeats_one(image, num_steps):
    """From S = 39 (T = 1000, linear betas) rounding repeats a timestep near t = 0, which diffusers
    keeps; here every timestep is distinct, in [0, T - 1], descending, from T - 1 to 0."""
    _, dpm_solver = image
    timesteps = dpm_solver.solver_timesteps(alphas_cumprod64(), num_steps, "logsnr")
    assert len(timesteps) == num_steps and timesteps[0] == T - 1 and timesteps[-1] == 0
    assert (timesteps[1:] < timesteps[:-1]).all()
    if num_steps == 39:
        reference = DPMSolverMultistepScheduler(num_train_timesteps=T, use_lu_lambdas=True, final_sigmas_type="zero")
        reference.set_timesteps(num_steps)
        assert len(set(reference.timesteps.tolist())) < num_steps


@pytest.mark.parametrize("spacing", SPACINGS[:4])
@pytest.mark.parametrize("stochastic", [False, True])
def test_order_one_is_ddim_2d(two_d, spacing, stochastic):
    """Order 1 is DDIM with eta 0, for the SDE solver eta 1 on the same draws (ddim_p_sample's eta = 1
    steps draw their noise as the SDE solver does)."""
    ddpm, _ = two_d
    network, x_T = TimeDependentNet(), x_T_for("2d")
    module = two_d_module(ddpm, network)
    torch.manual_seed(NOISE_SEED)
    ddim = x_T.clone()
    for t, t_prev in zip(*ddpm.ddim_timesteps(T, 10, spacing)):
        ddim = module.ddim_p_sample(ddim, t, t_prev, eta=float(stochastic))
    solver = solver_run("2d", two_d, None, x_T, network, 10, 1, spacing, "noise", stochastic=stochastic)
    torch.testing.assert_close(solver, ddim, atol=1e-10, rtol=0)


@pytest.mark.parametrize("spacing", SPACINGS[:4])
@pytest.mark.parametrize("predictor", ["noise", "x0", "mean"])
@pytest.mark.parametrize("stochastic", [False, True])
def test_order_one_is_ddim_image(image, spacing, predictor, stochastic):
    """As in 2D: DDIM with eta 0, or with eta 1 for the SDE solver, on the same noise."""
    scheduler, dpm_solver = image
    network, x_T = (PosteriorMeanNet() if predictor == "mean" else TimeDependentNet()), x_T_for("image")
    noises = step_noises(x_T, 10)
    ddim = scheduler.DDIMScheduler(T, 1e-4, 0.02, "linear", 10, float(stochastic), timestep_spacing=spacing).double()
    solver = image_solver(dpm_solver, 10, 1, spacing, stochastic=stochastic)
    torch.testing.assert_close(image_trajectory(solver, x_T, network, predictor, noises),
                               image_trajectory(ddim, x_T, network, predictor, noises), atol=1e-10, rtol=0)


class PosteriorMeanNet(TimeDependentNet):
    """mu(x_t, x0_theta) of q(x_{t-1} | x_t, x_0) (DDPM Eq. 7), with TimeDependentNet's output as
    x0_theta: a mean predictor that holds exactly that x_0 prediction. beta_t is written as
    1 - alpha_bar_t / alpha_bar_{t-1}, equal to the float32 betas only to ~1e-7, which the division
    by coef_x0 ~ 1e-4 at large t would blow up to 1e-3."""

    def forward(self, x, t, *_):
        t = int(torch.as_tensor(t).reshape(-1)[0])
        alpha_bar = alphas_cumprod64()
        alpha_bar_prev = alpha_bar[t - 1] if t > 0 else torch.ones((), dtype=torch.float64)
        alpha_t = alpha_bar[t] / alpha_bar_prev
        coef_x0 = alpha_bar_prev.sqrt() * (1 - alpha_t) / (1 - alpha_bar[t])
        coef_xt = alpha_t.sqrt() * (1 - alpha_bar_prev) / (1 - alpha_bar[t])
        return coef_x0 * super().forward(x, t) + coef_xt * x


@pytest.mark.parametrize("folder", ["2d", "image"])
@pytest.mark.parametrize("order", [2, 3])
def test_mean_predictor_follows_the_x0_path(two_d, image, folder, order):
    x_T = x_T_for(folder)
    runs = [solver_run(folder, two_d, image, x_T, network, 10, order, "quadratic", predictor)
            for network, predictor in ((TimeDependentNet(), "x0"), (PosteriorMeanNet(), "mean"))]
    torch.testing.assert_close(runs[1], runs[0], atol=1e-10, rtol=0)


@pytest.mark.parametrize("folder", ["2d", "image"])
@pytest.mark.parametrize("order", [1, 2, 3])
def test_last_step_lands_on_the_clean_sample(two_d, image, folder, order):
    """The last step returns the network's x_0 at the last timestep itself (sigma = 0)."""
    network, x_T = TimeDependentNet(), x_T_for(folder)
    calls = []

    class Recording(TimeDependentNet):
        def forward(self, x, t, *_):
            out = network(x, t)
            calls.append((int(torch.as_tensor(t).reshape(-1)[0]), out))
            return out

    final = solver_run(folder, two_d, image, x_T, Recording(), 10, order, "trailing", "x0")
    assert len(calls) == 10 and calls[-1][0] == 99  # trailing ends at round(T / S) - 1, not 0
    torch.testing.assert_close(final, calls[-1][1], atol=0, rtol=0)


class GaussianX0(TimeDependentNet):
    """E[x_0 | x_t] when x_0 ~ N(MU, S^2 I): the exact x0-predictor. Its probability-flow ODE keeps
    z = (x_t - sqrt(a) MU) / sqrt(a S^2 + 1 - a) constant, so x_0 = MU + S z_T in closed form."""
    MU, S = 0.7, 0.3

    def forward(self, x, t, *_):
        a = alphas_cumprod64()[int(torch.as_tensor(t).reshape(-1)[0])]
        return self.MU + a.sqrt() * self.S**2 * (x - a.sqrt() * self.MU) / (a * self.S**2 + 1 - a)


def test_error_against_the_exact_ode_solution_falls_with_the_order(image):
    """Higher order, smaller error, and faster convergence as the calls double (logsnr steps)."""
    x_T = x_T_for("image")
    a_T = alphas_cumprod64()[T - 1]
    exact = GaussianX0.MU + GaussianX0.S * (x_T - a_T.sqrt() * GaussianX0.MU) / (a_T * GaussianX0.S**2 + 1 - a_T).sqrt()
    error = {(order, n): (solver_run("image", None, image, x_T, GaussianX0(), n, order, "logsnr", "x0") - exact)
             .abs().max().item() for order in (1, 2, 3) for n in (20, 40)}
    for n in (20, 40):
        assert error[(3, n)] < error[(2, n)] < error[(1, n)]
    assert error[(2, 20)] / error[(2, 40)] > 1.5 * error[(1, 20)] / error[(1, 40)]


def test_steps_out_of_order_are_refused(image):
    _, dpm_solver = image
    solver = image_solver(dpm_solver, 5, 2, "quadratic")
    x = x_T_for("image")
    solver.step(x, solver.timesteps[0], x, "x0")
    with pytest.raises(ValueError, match="not the next"):
        solver.step(x, solver.timesteps[2], x, "x0")


# --- sampling.py --sample_method dpm_solver, sde_dpm_solver ---------------------------------------

@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    """A tiny untrained UNet (T = 20) saved as train.py saves it."""
    network, model, scheduler = (load_module(TASK1_IMAGE, name) for name in ("network", "model", "scheduler"))
    torch.manual_seed(0)
    unet = network.UNet(T=20, image_resolution=8, ch=32, ch_mult=[1], attn=[], num_res_blocks=1, dropout=0.0)
    path = tmp_path_factory.mktemp("ckpt") / "last.ckpt"
    model.DiffusionModule(unet, scheduler.DDPMScheduler(20, 1e-4, 0.02, "linear")).save(path)
    return path


def read_pixels(folder):
    return np.stack([np.asarray(Image.open(folder / f"{i}.png"), dtype=np.int16) for i in range(3)])


@pytest.mark.parametrize("method, eta", [("dpm_solver", 0), ("sde_dpm_solver", 1)])
def test_sampling_cli_order_one_writes_ddim_images(tiny_ckpt, tmp_path, method, eta):
    """Order 1 of the ODE solver is DDIM with eta 0, of the SDE solver DDIM with eta 1 (same seed:
    the same x_T and step noise per image)."""
    common = ["--ckpt_path", tiny_ckpt, "--num_samples", 3, "--batch_size", 3, "--ddim_steps", 5,
              "--timestep_spacing", "quadratic", "--seed", 7]
    solver = run_main("sampling.py", *common, "--save_dir", tmp_path / "solver", "--sample_method", method,
                      "--solver_order", 1)
    ddim = run_main("sampling.py", *common, "--save_dir", tmp_path / "ddim", "--sample_method", "ddim", "--eta", eta)
    assert solver.returncode == 0 and ddim.returncode == 0, solver.stderr[-2000:] + ddim.stderr[-2000:]
    summary = json.loads((tmp_path / "solver" / "sampling.json").read_text())
    assert summary["sample_method"] == method and summary["solver_order"] == 1 and summary["ddim_steps"] == 5
    assert json.loads((tmp_path / "ddim" / "sampling.json").read_text())["solver_order"] is None
    # float32 rounding of two equal formulas may move a pixel by one level, no more
    assert np.abs(read_pixels(tmp_path / "solver") - read_pixels(tmp_path / "ddim")).max() <= 1


def test_sampling_cli_refuses_order_three_for_the_sde_solver(tiny_ckpt, tmp_path):
    result = run_main("sampling.py", "--ckpt_path", tiny_ckpt, "--save_dir", tmp_path / "out",
                      "--sample_method", "sde_dpm_solver", "--solver_order", 3)
    assert_one_line_error(result, "--solver_order 3", "SDE-DPM-Solver++")
    assert not (tmp_path / "out").exists()


def test_sampling_cli_refuses_logsnr_for_ddim(tiny_ckpt, tmp_path):
    result = run_main("sampling.py", "--ckpt_path", tiny_ckpt, "--save_dir", tmp_path / "out",
                     "--sample_method", "ddim", "--timestep_spacing", "logsnr")
    assert_one_line_error(result, "--timestep_spacing logsnr", "DPM-Solver++")
    assert not (tmp_path / "out").exists()
