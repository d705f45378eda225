"""Task 1-1: the Swiss-roll DDPM/DDIM, checked against closed forms, brute force and diffusers."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from conftest import TASK1_2D, load_module

T = 1000


@pytest.fixture(scope="module")
def course():
    """The course folder's modules, imported flat as the course runs them."""
    ddpm = load_module(TASK1_2D, "ddpm")
    network = load_module(TASK1_2D, "network")
    chamferdist = load_module(TASK1_2D, "chamferdist")
    dataset = load_module(TASK1_2D, "dataset")
    return ddpm, network, chamferdist, dataset


DATA_MEAN = torch.tensor([1.0, -0.5])
DATA_STD = 0.5


class GaussianDenoiser(torch.nn.Module):
    """The exact eps-prediction E[eps | x_t] when x_0 ~ N(DATA_MEAN, DATA_STD^2 I).

    Marginally x_t ~ N(sqrt(a) mu, (a s^2 + 1 - a) I) with a = alpha_bar_t, so
    E[eps | x_t] = sqrt(1 - a) (x_t - sqrt(a) mu) / (a s^2 + 1 - a): a perfect network in closed form.
    """

    def __init__(self):
        super().__init__()
        betas = torch.linspace(1e-4, 0.02, T, dtype=torch.float64)
        self.register_buffer("alpha_bar", torch.cumprod(1 - betas, 0).float())
        self.dummy = torch.nn.Parameter(torch.zeros(()))  # DiffusionModule.device reads a parameter

    def forward(self, x, t):
        a = self.alpha_bar[torch.as_tensor(t).long()].reshape(-1, 1).to(x.dtype)
        return (1 - a).sqrt() * (x - a.sqrt() * DATA_MEAN.to(x.dtype)) / (a * DATA_STD**2 + 1 - a)


def make_module(course, mode="linear", network=None):
    ddpm, *_ = course
    scheduler = ddpm.BaseScheduler(T, beta_1=1e-4, beta_T=0.02, mode=mode)
    return ddpm.DiffusionModule(network or GaussianDenoiser(), scheduler)


def noise_for(step: int, shape, dtype=torch.float32):
    """The draw diffusers makes from torch.Generator().manual_seed(1000 + step)."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(1000 + step), dtype=dtype)


# --- Chamfer distance ---------------------------------------------------------------------------

def brute_force_chamfer(a: torch.Tensor, b: torch.Tensor) -> float:
    squared = torch.cdist(a.double(), b.double()) ** 2
    return float(squared.min(dim=1).values.sum() + squared.min(dim=0).values.sum())


@pytest.mark.parametrize("n, m, dim", [(1, 1, 2), (50, 70, 2), (300, 200, 2), (128, 90, 3)])
def test_chamfer_equals_brute_force(course, n, m, dim):
    _, _, chamferdist, _ = course
    generator = torch.Generator().manual_seed(n + m)
    a, b = torch.randn(n, dim, generator=generator), torch.randn(m, dim, generator=generator) * 2
    assert chamferdist.chamfer_distance(a, b) == pytest.approx(brute_force_chamfer(a, b), rel=1e-9)
    assert chamferdist.chamfer_distance(a, a) == 0.0


def test_chamfer_rejects_mismatched_dimensions(course):
    _, _, chamferdist, _ = course
    with pytest.raises(ValueError, match="same dimension"):
        chamferdist.chamfer_distance(torch.zeros(3, 2), torch.zeros(3, 3))


def test_chamfer_100k_points_needs_little_memory():
    """100,000 x 100,000 points in a fresh process: the call raises the process's peak memory by
    well under 1 GB (a dense distance matrix would need 37 GiB). The peak is read before and after
    the call, so what importing torch maps in (which varies between machines) is not counted."""
    script = (
        "import numpy as np, resource\n"
        "from chamferdist import chamfer_distance\n"
        "rng = np.random.default_rng(0)\n"
        "a, b = rng.normal(size=(100_000, 2)), rng.normal(size=(100_000, 2))\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "cd = chamfer_distance(a, b)\n"
        "print(cd, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=TASK1_2D, capture_output=True, text=True, check=True)
    cd, peak_growth_kib = out.stdout.split()
    assert 0 < float(cd) < 100_000
    assert int(peak_growth_kib) < 256 * 1024


# --- Forward process -------------------------------------------------------------------------------

def test_schedule_matches_closed_form(course):
    module = make_module(course, mode="quad")
    betas = np.linspace(1e-4**0.5, 0.02**0.5, T, dtype=np.float64) ** 2
    np.testing.assert_allclose(module.var_scheduler.betas.numpy(), betas, rtol=1e-6)
    np.testing.assert_allclose(module.var_scheduler.alphas_cumprod.numpy(), np.cumprod(1 - betas), rtol=1e-5)


@pytest.mark.parametrize("t", [0, 10, 500, 999])
def test_q_sample_mean_and_variance(course, t):
    module = make_module(course)
    alpha_bar = np.prod(1 - np.linspace(1e-4, 0.02, T, dtype=np.float64)[: t + 1])
    x0 = torch.tensor([[1.5, -2.0]]).repeat(200_000, 1)
    torch.manual_seed(0)
    xt = module.q_sample(x0, torch.full((len(x0),), t))
    np.testing.assert_allclose(xt.mean(0).numpy(), np.sqrt(alpha_bar) * np.array([1.5, -2.0]), atol=5e-3)
    np.testing.assert_allclose(xt.var(0).numpy(), [1 - alpha_bar] * 2, rtol=2e-2, atol=1e-6)


# --- Reverse process against diffusers -----------------------------------------------------------------

def test_ddpm_trajectory_matches_diffusers(course):
    # In float64 on both sides, with one schedule computed in float64 for both: in float32,
    # diffusers' beta_t = 1 - alpha_bar_t / alpha_bar_{t-1} (recomputed from the cumulative
    # product) and ours (the betas themselves) differ by up to 1e-3 relative near t = 0, and the
    # trajectories by 2e-5, which would hide a formula error as well as a looser tolerance would.
    module = make_module(course).double()
    reference = DDPMScheduler(num_train_timesteps=T, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                              variance_type="fixed_small", clip_sample=False)
    betas = torch.linspace(1e-4, 0.02, T, dtype=torch.float64)
    alphas_cumprod = torch.cumprod(1 - betas, dim=0)
    for scheduler in (module.var_scheduler, reference):
        scheduler.betas, scheduler.alphas, scheduler.alphas_cumprod = betas, 1 - betas, alphas_cumprod
    module.var_scheduler.alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
    reference.set_timesteps(T)
    ours = theirs = torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for t in reference.timesteps:
        t = int(t)
        ours = module.p_sample(ours, t, noise=noise_for(t, ours.shape, torch.float64))
        # diffusers draws its noise from the generator (only for t > 0): the same draw as noise_for.
        eps = module.network(theirs, torch.tensor(t))
        theirs = reference.step(eps, t, theirs, generator=torch.Generator().manual_seed(1000 + t)).prev_sample
    torch.testing.assert_close(ours, theirs, atol=1e-10, rtol=0)


@pytest.mark.parametrize("num_steps", [7, 50, 333])
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ddim_trajectory_matches_diffusers(course, num_steps, eta):
    module = make_module(course)
    reference = DDIMScheduler(num_train_timesteps=T, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                              clip_sample=False, set_alpha_to_one=True, steps_offset=0, timestep_spacing="leading")
    reference.set_timesteps(num_steps)
    timesteps, prev_timesteps = module.ddim_timesteps(T, num_steps)
    assert timesteps.tolist() == reference.timesteps.tolist()

    ours = theirs = torch.randn(64, 2, generator=torch.Generator().manual_seed(1))
    for t, t_prev in zip(timesteps, prev_timesteps):
        noise = noise_for(int(t), ours.shape)
        ours = module.ddim_p_sample(ours, t, t_prev, eta=eta, noise=noise)
        eps = module.network(theirs, t)
        theirs = reference.step(eps, int(t), theirs, eta=eta, variance_noise=noise).prev_sample
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_ddim_all_steps_eta_one_is_ddpm_with_posterior_variance(course):
    module = make_module(course)
    torch.manual_seed(7)
    ddpm_samples = module.p_sample_loop((256, 2))
    torch.manual_seed(7)
    ddim_samples = module.ddim_p_sample_loop((256, 2), num_inference_timesteps=T, eta=1.0)
    torch.testing.assert_close(ddim_samples, ddpm_samples, atol=1e-4, rtol=0)


def ddim_output_moments(num_steps: int, eta: float):
    """Mean and std per coordinate of DDIM's output with the exact Gaussian denoiser, in closed form.

    With eps_theta linear in x_t, one DDIM step is x' = A x + B + sigma z, so starting from
    x_T ~ N(0, I) the mean and variance follow m' = A m + B, v' = A^2 v + sigma^2. DDIM is not exact
    at finite S (its output is narrower than the data), which is why this, not N(mu, s^2), is the
    reference for S < T.
    """
    alpha_bar = np.cumprod(1 - np.linspace(1e-4, 0.02, T, dtype=np.float32).astype(np.float64))
    mu, s2 = DATA_MEAN.double().numpy(), DATA_STD**2
    mean, var = np.zeros(2), np.ones(2)
    ratio = T // num_steps
    for t in range(ratio * (num_steps - 1), -1, -ratio):
        a = alpha_bar[t]
        a_prev = alpha_bar[t - ratio] if t - ratio >= 0 else 1.0
        g = np.sqrt(1 - a) / (a * s2 + 1 - a)  # eps_theta = g (x - sqrt(a) mu)
        sigma = eta * np.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))
        direction = np.sqrt(1 - a_prev - sigma**2)
        A = np.sqrt(a_prev) * (1 - np.sqrt(1 - a) * g) / np.sqrt(a) + direction * g
        B = np.sqrt(a_prev) * np.sqrt(1 - a) * g * mu - direction * g * np.sqrt(a) * mu
        mean, var = A * mean + B, A**2 * var + sigma**2
    return mean, np.sqrt(var)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim10", "ddim50", "ddim50_eta1"])
def test_samplers_with_the_exact_denoiser_match_the_closed_form(course, sampler):
    module = make_module(course)
    torch.manual_seed(0)
    if sampler == "ddpm":
        samples = module.p_sample_loop((20_000, 2))
        expected_mean, expected_std = DATA_MEAN.numpy(), np.full(2, DATA_STD)
    else:
        steps, eta = (10, 0.0) if sampler == "ddim10" else (50, 1.0 if sampler.endswith("eta1") else 0.0)
        samples = module.ddim_p_sample_loop((20_000, 2), num_inference_timesteps=steps, eta=eta)
        expected_mean, expected_std = ddim_output_moments(steps, eta)
    # 20,000 samples: the standard error of the mean is 0.0035 and of the std 0.0025.
    np.testing.assert_allclose(samples.mean(0).numpy(), expected_mean, atol=0.015)
    np.testing.assert_allclose(samples.std(0).numpy(), expected_std, atol=0.012)


def test_ddim_eta_zero_is_deterministic(course):
    module = make_module(course)
    xt = torch.randn(32, 2)
    a = module.ddim_p_sample(xt, torch.tensor(500), torch.tensor(480), eta=0.0, noise=torch.randn(32, 2))
    b = module.ddim_p_sample(xt, torch.tensor(500), torch.tensor(480), eta=0.0, noise=torch.randn(32, 2))
    torch.testing.assert_close(a, b, atol=0, rtol=0)

    # The whole loop draws x_T and nothing else: the RNG afterwards is where one draw of x_T leaves it.
    torch.manual_seed(3)
    module.ddim_p_sample_loop((32, 2), num_inference_timesteps=20, eta=0.0)
    after_loop = torch.randn(4)
    torch.manual_seed(3)
    torch.randn(32, 2)
    assert torch.equal(after_loop, torch.randn(4))


def test_ddim_rejects_bad_settings(course):
    module = make_module(course)
    with pytest.raises(ValueError, match="num_inference_timesteps"):
        module.ddim_p_sample_loop((4, 2), num_inference_timesteps=0)
    with pytest.raises(ValueError, match="eta"):
        module.ddim_p_sample_loop((4, 2), num_inference_timesteps=10, eta=-0.1)


# --- Network, training, checkpoints --------------------------------------------------------------------

def test_simplenet_shapes_and_time_dependence(course):
    _, network, _, _ = course
    net = network.SimpleNet(dim_in=2, dim_out=2, dim_hids=[32, 32], num_timesteps=T)
    x = torch.randn(5, 2)
    assert net(x, torch.randint(0, T, (5,))).shape == (5, 2)
    assert net(x, torch.tensor(3)).shape == (5, 2)
    assert not torch.allclose(net(x, torch.tensor(3)), net(x, torch.tensor(900)))
    assert all(isinstance(layer, network.TimeLinear) for layer in net.layers)


def test_loss_goes_down(course):
    ddpm, network, _, dataset = course
    np.random.seed(0)
    torch.manual_seed(0)
    points = dataset.load_twodim(20_000, "swiss_roll")
    module = make_module(course, network=network.SimpleNet(2, 2, [64, 64], T))
    optimizer = torch.optim.Adam(module.network.parameters(), lr=1e-3)
    losses = []
    for _ in range(300):
        loss = module.compute_loss(points[torch.randint(len(points), (256,))])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert np.mean(losses[-50:]) < 0.8 * np.mean(losses[:50])


def test_checkpoint_round_trip_with_weights_only(course, tmp_path):
    ddpm, network, _, _ = course
    module = make_module(course, mode="quad", network=network.SimpleNet(2, 2, [16, 16], T))
    path = tmp_path / "model.ckpt"
    module.save(str(path))
    checkpoint = torch.load(path, weights_only=True)
    assert set(checkpoint) == {"config", "state_dict"}

    restored = ddpm.DiffusionModule(None, None)
    restored.load(str(path))
    assert restored.var_scheduler.config["mode"] == "quad"
    x, t = torch.randn(8, 2), torch.randint(0, T, (8,))
    torch.testing.assert_close(restored.network(x, t), module.network(x, t), atol=0, rtol=0)
    assert [p.name for p in tmp_path.iterdir()] == ["model.ckpt"]  # no temporary file left behind


def test_swiss_roll_is_normalised_as_the_course_does(course):
    *_, dataset = course
    np.random.seed(0)
    points = dataset.load_twodim(100_000, "swiss_roll").double()
    assert abs(points.mean()) < 1e-6  # one scalar mean over both coordinates
    assert points.std(unbiased=False) == pytest.approx(2.0, rel=1e-5)
    for name in dataset.DATASETS:
        assert dataset.load_twodim(1000, name).shape == (1000, 2)


# --- The experiment CLI and the notebook -------------------------------------------------------------------

def run_experiment(*args):
    return subprocess.run([sys.executable, "run_experiment.py", *args], cwd=TASK1_2D, capture_output=True, text=True)


def test_run_experiment_writes_results_in_the_documented_format(tmp_path):
    out = tmp_path / "out"
    result = run_experiment("--recipe", "course", "--seed", "0", "--out", str(out), "--iterations", "300",
                            "--ddim_steps", "10", "20", "--etas", "0", "1", "--num_samples", "256")
    assert result.returncode == 0, result.stderr
    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"recipe", "seed", "train_seconds", "floor_cd", "ddpm", "ddim"}
    assert results["recipe"] == "course" and results["seed"] == 0
    assert set(results["ddpm"]) == {"cd", "seconds"}
    assert [(row["steps"], row["eta"]) for row in results["ddim"]] == [(10, 0.0), (20, 0.0), (10, 1.0), (20, 1.0)]
    for row in results["ddim"]:
        assert set(row) == {"steps", "eta", "cd", "seconds"} and row["cd"] > 0 and row["seconds"] > 0
    assert 0 < results["floor_cd"] < results["ddpm"]["cd"]
    for name in ("results.md", "loss.png", "samples.png", "cd_time_vs_steps.png", "model.ckpt"):
        assert (out / name).stat().st_size > 0
    assert "| eta \\ steps | 10 | 20 |" in result.stdout


@pytest.mark.parametrize("args, message", [
    (["--recipe", "fancy"], "invalid choice"),
    (["--ddim_steps", "0"], "--ddim_steps must be between 1 and 1000"),
    (["--ddim_steps", "1001"], "--ddim_steps must be between 1 and 1000"),
    (["--etas", "-0.5"], "--etas must be >= 0"),
])
def test_run_experiment_bad_input(tmp_path, args, message):
    result = run_experiment("--out", str(tmp_path), *args)
    assert result.returncode != 0
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_run_experiment_unwritable_out_dir(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("keep me")
    result = run_experiment("--out", str(blocker / "results"))
    assert result.returncode != 0
    assert "cannot write to --out" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert blocker.read_text() == "keep me"


def test_tutorial_notebook_runs_headless(tmp_path):
    nbformat = pytest.importorskip("nbformat")
    from nbclient import NotebookClient

    notebook = nbformat.read(TASK1_2D / "ddpm_tutorial.ipynb", as_version=4)
    os.environ["DDPM_TUTORIAL_QUICK"] = "1"
    try:
        NotebookClient(notebook, timeout=600, kernel_name="python3",
                       resources={"metadata": {"path": str(TASK1_2D)}}).execute()
    finally:
        del os.environ["DDPM_TUTORIAL_QUICK"]
    outputs = "".join(
        output.get("text", "") for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs
    )
    assert "DDPM Chamfer distance" in outputs and "DDIM Chamfer distance" in outputs
    images = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs
              if "image/png" in o.get("data", {})]
    assert len(images) >= 4
