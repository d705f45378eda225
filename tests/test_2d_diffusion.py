"""Task 1-1: the Swiss-roll DDPM/DDIM, checked against closed forms, brute force and diffusers."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from conftest import TASK1_2D, TASK1_IMAGE, diffusers_ddim_timesteps, load_module

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
    cd = chamferdist.chamfer_distance(a, b)
    assert cd == pytest.approx(brute_force_chamfer(a, b), rel=1e-9)
    assert chamferdist.chamfer_distance(a, a) == 0.0
    # The course's returns a numpy float64, and its notebook prints cd.item().
    assert type(cd) is np.float64 and type(cd.item()) is float


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


def diffusers_ddim(timestep_spacing: str, num_steps: int) -> DDIMScheduler:
    reference = DDIMScheduler(num_train_timesteps=T, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                              clip_sample=False, set_alpha_to_one=True, steps_offset=0,
                              timestep_spacing=timestep_spacing)
    reference.set_timesteps(num_steps)
    return reference


@pytest.mark.parametrize("spacing, num_steps", [("leading", 7), ("leading", 50), ("leading", 333),
                                                ("trailing", 10), ("trailing", 50), ("trailing", 200)])
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ddim_trajectory_matches_diffusers(course, spacing, num_steps, eta):
    """Whole trajectories on the same noise. Trailing only where S divides T: otherwise diffusers
    steps to t - T // S, which is not the next timestep of its own sub-sequence."""
    ddpm, *_ = course
    module = make_module(course)
    reference = diffusers_ddim(spacing, num_steps)
    timesteps, prev_timesteps = ddpm.ddim_timesteps(T, num_steps, spacing)
    assert timesteps.tolist() == reference.timesteps.tolist()

    ours = theirs = torch.randn(64, 2, generator=torch.Generator().manual_seed(1))
    for t, t_prev in zip(timesteps, prev_timesteps):
        noise = noise_for(int(t), ours.shape)
        ours = module.ddim_p_sample(ours, t, t_prev, eta=eta, noise=noise)
        eps = module.network(theirs, t)
        theirs = reference.step(eps, int(t), theirs, eta=eta, variance_noise=noise).prev_sample
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
def test_ddim_subsequences_equal_diffusers(course, spacing):
    """Every S in 1..T (the trailing formula once drifted from diffusers' for 50 of them, e.g. S = 48)."""
    ddpm, *_ = course
    for num_steps in range(1, T + 1):
        expected = diffusers_ddim_timesteps(T, num_steps, spacing)
        assert ddpm.ddim_timesteps(T, num_steps, spacing)[0].tolist() == expected, num_steps


def test_both_task1_folders_use_one_spacing_rule(course):
    """The 2D folder's ddim_timesteps and the image folder's ddim_sub_sequence agree for every
    spacing and S, quadratic (which diffusers lacks) included."""
    ddpm, *_ = course
    image_scheduler = load_module(TASK1_IMAGE, "scheduler")
    for spacing in ddpm.TIMESTEP_SPACINGS:
        for num_steps in range(1, T + 1):
            ours = ddpm.ddim_timesteps(T, num_steps, spacing)
            theirs = image_scheduler.ddim_sub_sequence(T, num_steps, spacing)
            assert all(torch.equal(a, b) for a, b in zip(ours, theirs)), (spacing, num_steps)


def test_both_task1_folders_carry_the_same_atomic_writer():
    """Each course folder runs on its own (flat imports, its own zip entry), so each has a copy of
    atomic_write.py; the copies must not drift apart."""
    assert (TASK1_2D / "atomic_write.py").read_bytes() == (TASK1_IMAGE / "atomic_write.py").read_bytes()


def test_quadratic_spacing_is_the_ddim_authors_formula(course):
    ddpm, *_ = course
    for num_steps in range(2, 30):  # no repeats up to S = 1 + sqrt(0.8 T) = 29
        formula = [int(v) for v in np.linspace(0, np.sqrt(0.8 * T), num_steps) ** 2]  # tau = int(linspace ** 2)
        assert len(set(formula)) == num_steps
        assert ddpm.ddim_timesteps(T, num_steps, "quadratic")[0].tolist() == formula[::-1]
    # From S = 30 on the formula repeats small timesteps; each repeat moves to one above its
    # predecessor. S = 50: the formula starts 0, 0, 1, 2, 5, 8, 11, 16, ...
    formula = [int(v) for v in np.linspace(0, np.sqrt(0.8 * T), 50) ** 2]
    assert formula[:8] == [0, 0, 1, 2, 5, 8, 11, 16]
    tau = ddpm.ddim_timesteps(T, 50, "quadratic")[0].flip(0).tolist()
    assert tau[:4] == [0, 1, 2, 3] and tau[4:] == formula[4:]


@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing", "quadratic"])
def test_every_spacing_steps_to_the_next_timestep_and_ends_clean(course, spacing):
    """For every S from 1 to T: S distinct timesteps in [0, T-1], descending; each step goes to the
    next one of the sub-sequence (not to t - T // S, as diffusers' DDIM does under linspace) and
    the last to -1 (alpha_bar = 1, a clean sample). All but trailing end at t = 0; trailing ends
    at round(T / S) - 1, where diffusers' ends."""
    ddpm, *_ = course
    for num_steps in range(1, T + 1):
        timesteps, prev_timesteps = ddpm.ddim_timesteps(T, num_steps, spacing)
        tau = timesteps.tolist()
        assert len(tau) == num_steps and len(set(tau)) == num_steps, num_steps
        assert all(a > b for a, b in zip(tau, tau[1:])) and 0 <= tau[-1] and tau[0] <= T - 1, num_steps
        assert prev_timesteps.tolist() == tau[1:] + [-1], num_steps
        assert tau[-1] == (round(T / num_steps) - 1 if spacing == "trailing" else 0), num_steps
    # diffusers' linspace would step 999 -> 899 at S = 10; the next timestep is 888.
    if spacing == "linspace":
        timesteps, prev_timesteps = ddpm.ddim_timesteps(T, 10, spacing)
        assert (timesteps[0].item(), prev_timesteps[0].item()) == (999, 888)


@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing", "quadratic"])
def test_last_ddim_step_lands_on_the_clean_sample(course, spacing):
    """The last step (to prev = -1) returns the predicted x_0 itself, with no noise even at eta = 1:
    with the exact Gaussian denoiser, x_0 = (x_t - sqrt(1 - a) eps) / sqrt(a) in closed form."""
    ddpm, *_ = course
    module = make_module(course)
    timesteps, prev_timesteps = ddpm.ddim_timesteps(T, 10, spacing)
    t, t_prev = timesteps[-1], prev_timesteps[-1]
    xt = torch.randn(64, 2, dtype=torch.float64)
    module.double()
    x0 = module.ddim_p_sample(xt, t, t_prev, eta=1.0, noise=torch.randn(64, 2, dtype=torch.float64))
    a = module.var_scheduler.alphas_cumprod[t]
    expected = (xt - (1 - a).sqrt() * module.network(xt, t)) / a.sqrt()
    torch.testing.assert_close(x0, expected, atol=1e-12, rtol=0)


def test_ddim_loop_follows_the_subsequence(course, monkeypatch):
    ddpm, *_ = course
    module = make_module(course)
    steps = []
    step = module.ddim_p_sample
    monkeypatch.setattr(module, "ddim_p_sample",
                        lambda xt, t, t_prev, eta: steps.append((int(t), int(t_prev))) or step(xt, t, t_prev, eta))
    module.ddim_p_sample_loop((8, 2), num_inference_timesteps=10, eta=0.5, timestep_spacing="linspace")
    timesteps, prev_timesteps = ddpm.ddim_timesteps(T, 10, "linspace")
    assert steps == list(zip(timesteps.tolist(), prev_timesteps.tolist()))


def test_ddim_all_steps_eta_one_is_ddpm_with_posterior_variance(course):
    module = make_module(course)
    torch.manual_seed(7)
    ddpm_samples = module.p_sample_loop((256, 2))
    torch.manual_seed(7)
    ddim_samples = module.ddim_p_sample_loop((256, 2), num_inference_timesteps=T, eta=1.0)
    torch.testing.assert_close(ddim_samples, ddpm_samples, atol=1e-4, rtol=0)


def ddim_output_moments(timesteps, eta: float):
    """Mean and std per coordinate of DDIM's output with the exact Gaussian denoiser, in closed form.

    With eps_theta linear in x_t, one DDIM step is x' = A x + B + sigma z, so starting from
    x_T ~ N(0, I) the mean and variance follow m' = A m + B, v' = A^2 v + sigma^2. DDIM is not exact
    at finite S (its output is narrower than the data), which is why this, not N(mu, s^2), is the
    reference for S < T. timesteps: the sub-sequence, descending; each step goes to the next one,
    the last to alpha_bar = 1.
    """
    alpha_bar = np.cumprod(1 - np.linspace(1e-4, 0.02, T, dtype=np.float32).astype(np.float64))
    mu, s2 = DATA_MEAN.double().numpy(), DATA_STD**2
    mean, var = np.zeros(2), np.ones(2)
    for t, t_prev in zip(timesteps, [*timesteps[1:], None]):
        a = alpha_bar[t]
        a_prev = 1.0 if t_prev is None else alpha_bar[t_prev]
        g = np.sqrt(1 - a) / (a * s2 + 1 - a)  # eps_theta = g (x - sqrt(a) mu)
        sigma = eta * np.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))
        direction = np.sqrt(1 - a_prev - sigma**2)
        A = np.sqrt(a_prev) * (1 - np.sqrt(1 - a) * g) / np.sqrt(a) + direction * g
        B = np.sqrt(a_prev) * np.sqrt(1 - a) * g * mu - direction * g * np.sqrt(a) * mu
        mean, var = A * mean + B, A**2 * var + sigma**2
    return mean, np.sqrt(var)


@pytest.mark.parametrize("sampler", [None, ("leading", 10, 0.0), ("leading", 50, 0.0), ("leading", 50, 1.0),
                                     ("linspace", 10, 0.0), ("trailing", 10, 1.0), ("quadratic", 10, 0.0),
                                     ("quadratic", 50, 0.5)])
def test_samplers_with_the_exact_denoiser_match_the_closed_form(course, sampler):
    """DDPM (sampler None) and DDIM (spacing, steps, eta) with the exact denoiser of a Gaussian."""
    ddpm, *_ = course
    module = make_module(course)
    torch.manual_seed(0)
    if sampler is None:
        samples = module.p_sample_loop((20_000, 2))
        expected_mean, expected_std = DATA_MEAN.numpy(), np.full(2, DATA_STD)
    else:
        spacing, steps, eta = sampler
        samples = module.ddim_p_sample_loop((20_000, 2), num_inference_timesteps=steps, eta=eta,
                                            timestep_spacing=spacing)
        expected_mean, expected_std = ddim_output_moments(ddpm.ddim_timesteps(T, steps, spacing)[0].tolist(), eta)
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
    with pytest.raises(ValueError, match="timestep_spacing"):
        module.ddim_p_sample_loop((4, 2), timestep_spacing="cubic")
    # eta > 1 would make 1 - alpha_bar_prev - sigma^2 negative: a NaN sample, not an error.
    for eta in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"eta must be in \[0, 1\]"):
            module.ddim_p_sample_loop((4, 2), num_inference_timesteps=10, eta=eta)
        with pytest.raises(ValueError, match=r"eta must be in \[0, 1\]"):
            module.ddim_p_sample(torch.zeros(4, 2), 500, 400, eta=eta)


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


# --- Atomic writes ------------------------------------------------------------------------------------

def test_atomic_write_replaces_whole_files_and_keeps_the_old_one_on_failure(course, tmp_path, monkeypatch):
    ddpm, *_ = course
    path = tmp_path / "results.json"
    path.write_text("old")
    synced = []
    fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd) or fsync(fd))  # the os module ddpm.atomic_write calls

    def fail_halfway(f):
        f.write(b"half of the new")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        ddpm.atomic_write(str(path), fail_halfway)
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["results.json"]
    ddpm.atomic_write(str(path), lambda f: f.write(b"new"))
    assert path.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["results.json"]
    assert len(synced) == 1  # the new file was flushed to disk before the rename


# --- The course's notebook, the course recipe, the experiment CLI, our notebook ----------------------------

def test_course_notebook_cells_run_against_this_folder(course):
    """The API calls of the course's own ddpm_tutorial.ipynb (its 2025 edition), in its order, with
    device = "cpu" and no other change, and its bars for full credit: DDPM CD < 20, DDIM CD < 40.
    Plots, widgets and progress bars are left out; every call into dataset.py, network.py, ddpm.py
    and chamferdist.py is here. The notebook sets no seed; this test does, to be repeatable.
    This is the suite's one full-size training (5000 iterations)."""
    ddpm_module, network_module, chamferdist_module, dataset_module = course
    np.random.seed(0)
    torch.manual_seed(0)

    # Cell 1: `from dataset import TwoDimDataClass, get_data_iterator`; the target and prior sets.
    TwoDimDataClass, get_data_iterator = dataset_module.TwoDimDataClass, dataset_module.get_data_iterator
    target_ds = TwoDimDataClass(dataset_type='swiss_roll', N=1000000, batch_size=256)
    prior_ds = TwoDimDataClass(dataset_type='gaussian_centered', N=1000000, batch_size=256)
    num_vis_particles = 500
    sample_f = target_ds[0:num_vis_particles]
    sample_b = prior_ds[0:num_vis_particles]
    assert sample_f.shape == sample_b.shape == (num_vis_particles, 2)

    # Cell 3: `from network import SimpleNet`, `from ddpm import BaseScheduler, DiffusionModule`;
    # the course's config (device "cuda:0" in the notebook) and build_ddpm.
    SimpleNet = network_module.SimpleNet
    BaseScheduler, DiffusionModule = ddpm_module.BaseScheduler, ddpm_module.DiffusionModule
    device = "cpu"
    config = {
        "num_diffusion_steps": 1000,
        "dim_hids": [128, 128, 128],
        "lr": 1e-3,
        "batch_size": 128,
        "num_train_iters": 5000,
        "device": device,
    }

    def build_ddpm(config):
        network = SimpleNet(dim_in=2, dim_out=2, dim_hids=config["dim_hids"],
                            num_timesteps=config["num_diffusion_steps"])
        var_scheduler = BaseScheduler(config["num_diffusion_steps"])
        return DiffusionModule(network, var_scheduler).to(config["device"])

    ddpm = build_ddpm(config)

    # Cell 5: q(x_t) at t = 0, 50, ..., 450, t given as a float tensor.
    for t in range(0, 500, 50):
        x_t = ddpm.q_sample(target_ds[:num_vis_particles].to(device), (torch.ones(num_vis_particles) * t).to(device))
        x_t = x_t.cpu()
        assert x_t.shape == (num_vis_particles, 2)

    # Cell 6 shows the course's picture ../assets/images/qs.png: no call into this folder.

    # Cell 8: training, with samples drawn at steps 0 and 4999.
    ddpm = build_ddpm(config)
    optimizer = torch.optim.Adam(ddpm.parameters(), lr=config["lr"])
    train_dl = torch.utils.data.DataLoader(target_ds, batch_size=config["batch_size"])
    train_iter = get_data_iterator(train_dl)
    losses = []
    for step in range(config["num_train_iters"]):
        optimizer.zero_grad()
        batch_x = next(train_iter)
        batch_x = batch_x.to(device)
        loss = ddpm.compute_loss(batch_x)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if step % 4999 == 0:
            with torch.no_grad():
                x0 = ddpm.p_sample_loop(shape=(num_vis_particles, 2)).cpu()
            assert x0.shape == (num_vis_particles, 2)

    # Cell 11: `from chamferdist import chamfer_distance`; DDPM on 2048 points, printed with
    # cd.item(). Then the same for DDIM, with the call cell 8 names for it:
    # ddpm.ddim_p_sample_loop(shape=...), at its defaults (50 steps, eta 0).
    chamfer_distance = chamferdist_module.chamfer_distance
    num_eval_particles = 2048
    cds = {}
    for name, sample_loop in (("DDPM", ddpm.p_sample_loop), ("DDIM", ddpm.ddim_p_sample_loop)):
        pc_ref = target_ds[:num_eval_particles]
        pc_gen = sample_loop(shape=(num_eval_particles, 2))
        pc_gen = pc_gen.reshape(1, num_eval_particles, 2)
        pc_ref = pc_ref.reshape(1, num_eval_particles, 2)
        with torch.no_grad():
            cd = chamfer_distance(
                pc_gen.reshape(-1, 2).cpu().numpy(),
                pc_ref.reshape(-1, 2).cpu().numpy(),
            )
        cds[name] = cd.item()
        pc_gen = pc_gen.reshape(num_eval_particles, 2).cpu().numpy()
        pc_ref = pc_ref.reshape(num_eval_particles, 2).cpu().numpy()
    print(f"course notebook, seed 0: DDPM CD {cds['DDPM']:.2f}, DDIM CD {cds['DDIM']:.2f}")
    assert np.mean(losses[-500:]) < 0.5 * np.mean(losses[:50])
    assert cds["DDPM"] < 20 and cds["DDIM"] < 40


@pytest.fixture(scope="module")
def experiment():
    """run_experiment.py imported in-process (with its own imports of this folder's modules)."""
    return load_module(TASK1_2D, "run_experiment")


def test_course_recipe_trains_as_the_course_notebook(experiment):
    """train() with the course recipe gives bit for bit the weights of the course notebook's
    training cell (Adam over ddpm.parameters() at 1e-3, no warm-up, a DataLoader reading the
    target in order), over the first 60 iterations from the same seed."""
    recipe = experiment.replace(experiment.RECIPES["course"], num_iterations=60)
    np.random.seed(0)
    target = experiment.load_twodim(20_000, "swiss_roll")

    torch.manual_seed(1)
    ours, _ = experiment.train(experiment.build_model(recipe, "cpu"),
                               experiment.training_batches(recipe, target), recipe, progress=False)

    torch.manual_seed(1)
    ddpm = experiment.build_model(recipe, "cpu")  # cell 8, transcribed
    optimizer = torch.optim.Adam(ddpm.parameters(), lr=1e-3)
    train_iter = experiment.get_data_iterator(torch.utils.data.DataLoader(target, batch_size=128))
    for _ in range(60):
        optimizer.zero_grad()
        loss = ddpm.compute_loss(next(train_iter))
        loss.backward()
        optimizer.step()

    for name, value in ddpm.state_dict().items():
        assert torch.equal(ours.state_dict()[name], value), name
    # The batches are the target read in order, starting again after its end.
    batches = experiment.training_batches(experiment.replace(recipe, batch_size=8_000), target)
    assert [torch.equal(next(batches), target[i:i + 8_000]) for i in (0, 8_000)] == [True, True]
    assert torch.equal(next(batches), target[16_000:]) and torch.equal(next(batches), target[:8_000])


def run_experiment(*args):
    return subprocess.run([sys.executable, "run_experiment.py", *args], cwd=TASK1_2D, capture_output=True, text=True)


def test_run_experiment_writes_results_in_the_documented_format(tmp_path):
    out = tmp_path / "out"
    result = run_experiment("--recipe", "course", "--seed", "0", "--out", str(out), "--iterations", "300",
                            "--ddim_steps", "10", "20", "--etas", "0", "1", "--num_samples", "256",
                            "--timestep_spacing", "quadratic", "--timing_rounds", "1", "--solver_calls", "10", "20",
                            "--solver_draws", "4", "--fit_calls", "2")
    assert result.returncode == 0, result.stderr
    results = json.loads((out / "results.json").read_text())
    # DESIGN.md's schema, plus the fields added since.
    assert set(results) == {"recipe", "seed", "train_seconds", "floor_cd", "ddpm", "ddim", "train_cpu_seconds",
                            "recipe_config", "num_samples", "timestep_spacing", "spacings", "dpm_solver"}
    assert results["recipe"] == "course" and results["seed"] == 0 and results["timestep_spacing"] == "quadratic"
    assert results["recipe_config"]["num_iterations"] == 300 and results["num_samples"] == 256
    assert set(results["ddpm"]) == {"cd", "seconds", "cd_mean", "cd_se", "cds"}
    assert [(row["steps"], row["eta"]) for row in results["ddim"]] == [(10, 0.0), (20, 0.0), (10, 1.0), (20, 1.0)]
    for row in results["ddim"]:
        assert set(row) == {"steps", "eta", "cd", "seconds"} and row["cd"] > 0 and row["seconds"] > 0
    assert 0 < results["floor_cd"] < results["ddpm"]["cd"]
    # The spacing table: every spacing at every (steps, eta); the grid is the quadratic rows.
    spacing_cd = {(r["timestep_spacing"], r["steps"], r["eta"]): r["cd"] for r in results["spacings"]}
    spacing_cds = {(r["timestep_spacing"], r["steps"], r["eta"]): r["cds"] for r in results["spacings"]}
    spacings = ("leading", "linspace", "trailing", "quadratic")
    assert set(spacing_cd) == {(s, n, e) for s in spacings for n in (10, 20) for e in (0.0, 1.0)}
    assert all(spacing_cd[("quadratic", r["steps"], r["eta"])] == r["cd"] for r in results["ddim"])
    assert len(set(spacing_cd.values())) == len(spacing_cd)  # different sub-sequences, different samples
    # Over --sampling_seeds (default 3) draws of x_T: the first is the grid's, then mean and standard error.
    for row in [results["ddpm"], *results["spacings"]]:
        assert len(row["cds"]) == 3 and row["cds"][0] == row["cd"] and len(set(row["cds"])) == 3
        assert row["cd_mean"] == pytest.approx(np.mean(row["cds"]))
        assert row["cd_se"] == pytest.approx(np.std(row["cds"], ddof=1) / np.sqrt(3))
    # DPM-Solver++ (orders 1-3) and SDE-DPM-Solver++ (1-2): every spacing and number of calls, over
    # --solver_draws draws whose first ones are the DDIM rows' (order 1 is DDIM with eta 0, for the SDE
    # eta 1, up to float32 rounding, so its first CDs are the DDIM rows')
    solver = {(r["sde"], r["order"], r["timestep_spacing"], r["steps"]): r for r in results["dpm_solver"]}
    samplers = [(False, 1), (False, 2), (False, 3), (True, 1), (True, 2)]
    assert set(solver) == ({(sde, o, s, n) for sde, o in samplers for s in (*spacings, "logsnr") for n in (10, 20)}
                           | {(sde, o, "fitted", 2) for sde, o in samplers})
    # --fit_calls 2: each sampler's own fitted timesteps, the fit's objective before and after
    for sde, o in samplers:
        row = solver[(sde, o, "fitted", 2)]
        assert len(row["timesteps"]) == 2 and 999 >= row["timesteps"][0] > row["timesteps"][1] >= 0
        assert row["fit_objective"][1] <= row["fit_objective"][0] and row["fit_seconds"] > 0
    assert all(len(row["cds"]) == 4 and row["cds"][0] == row["cd"] for row in results["dpm_solver"])
    for sde, eta in ((False, 0.0), (True, 1.0)):
        for spacing in spacings:
            for n in (10, 20):
                np.testing.assert_allclose(solver[(sde, 1, spacing, n)]["cds"][:3], spacing_cds[(spacing, n, eta)],
                                           rtol=1e-3)
    for name in ("results.md", "loss.png", "samples.png", "cd_time_vs_steps.png", "cd_vs_steps_by_spacing.png",
                 "samples_by_spacing.png", "cd_vs_calls_dpm_solver.png", "model.ckpt"):
        assert (out / name).stat().st_size > 0
    assert "| eta \\ steps | 10 | 20 |" in result.stdout
    assert "| steps S | eta | leading | linspace | trailing | quadratic |" in result.stdout
    assert "| calls | sampler | leading | linspace | trailing | quadratic | logsnr | fitted |" in result.stdout
    assert str(tmp_path) not in (out / "results.json").read_text()  # no absolute path in the results


def test_run_experiment_refuses_eta_above_one_before_training(tmp_path):
    """The real command line: one line on stderr, exit 2, no traceback, nothing written."""
    result = run_experiment("--out", str(tmp_path / "out"), "--etas", "0", "1.5")
    assert result.returncode == 2
    assert result.stderr.strip() == "run_experiment.py: error: --etas: eta must be in [0, 1], got 1.5"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args, message", [
    (["--recipe", "fancy"], "invalid choice"),
    (["--timestep_spacing", "cubic"], "invalid choice"),
    (["--ddim_steps", "0"], "--ddim_steps must be between 1 and 1000"),
    (["--ddim_steps", "1001"], "--ddim_steps must be between 1 and 1000"),
    (["--etas", "-0.5"], "--etas: eta must be in [0, 1], got -0.5"),
    (["--etas", "1.5"], "--etas: eta must be in [0, 1], got 1.5"),
    (["--etas", "nan"], "--etas: eta must be in [0, 1], got nan"),
    (["--iterations", "0"], "--iterations must be >= 1"),
    (["--fit_calls", "0"], "--fit_calls must be between 1 and 1000"),
    (["--sampling_seeds", "0"], "--sampling_seeds must be >= 1"),
])
def test_run_experiment_bad_input(experiment, tmp_path, capsys, monkeypatch, args, message):
    """In-process (the subprocess test above covers the real command line): refused before any data
    or training, with one line."""
    monkeypatch.setattr(experiment, "load_twodim", lambda *a, **k: pytest.fail("drew data before refusing"))
    monkeypatch.setattr(experiment, "train", lambda *a, **k: pytest.fail("trained before refusing"))
    with pytest.raises(SystemExit) as exit_info:
        experiment.main(["--out", str(tmp_path / "out"), *args])
    assert exit_info.value.code == 2
    stderr = capsys.readouterr().err
    assert message in stderr and len(stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_run_experiment_unwritable_out_dir(experiment, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("keep me")
    with pytest.raises(SystemExit) as exit_info:
        experiment.main(["--out", str(blocker / "results")])
    assert exit_info.value.code == 2
    stderr = capsys.readouterr().err
    assert "cannot write to --out" in stderr and len(stderr.strip().splitlines()) == 1
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


# --- issue 18: a DDIM sub-sequence that never denoises; an --out that holds a run --------------------------

@pytest.mark.parametrize("spacing", ["leading", "linspace", "quadratic"])
def test_one_ddim_step_from_t_zero_is_refused(course, spacing):
    """S = 1 is tau = [0] here (as in diffusers): the one step returns x_T as x_0. Trailing's is 999."""
    ddpm, *_ = course
    module = make_module(course)
    assert ddpm.ddim_timesteps(T, 1, spacing)[0].tolist() == [0]
    with pytest.raises(ValueError, match="only t = 0.*trailing"):
        module.ddim_p_sample_loop((4, 2), num_inference_timesteps=1, timestep_spacing=spacing)
    assert module.ddim_p_sample_loop((4, 2), num_inference_timesteps=1, timestep_spacing="trailing").shape == (4, 2)


def test_spacing_table_never_marks_a_cell_that_never_denoises(experiment, tmp_path):
    """S = 1: only trailing denoises; the other spacings get no CD (not x_T's CD, shown as best)."""
    module = experiment.DiffusionModule(GaussianDenoiser(), experiment.BaseScheduler(T, beta_1=1e-4, beta_T=0.02))
    reference = torch.randn(64, 2) * DATA_STD + DATA_MEAN
    args = experiment.parse_args(["--out", str(tmp_path / "out"), "--ddim_steps", "1", "2", "--etas", "0",
                                  "--timestep_spacing", "trailing", "--sampling_seeds", "2", "--timing_rounds", "1"])
    ddpm, ddim, spacing_rows, samples = experiment.evaluate(module, reference, args, progress=False)
    never = {(r["timestep_spacing"], r["steps"]) for r in spacing_rows if r["cd_mean"] is None}
    assert never == {("leading", 1), ("linspace", 1), ("quadratic", 1)}
    results = {"recipe": "course", "seed": 0, "train_seconds": 1.0, "train_cpu_seconds": 1.0, "floor_cd": 0.1,
               "ddpm": ddpm, "ddim": ddim, "timestep_spacing": "trailing", "spacings": spacing_rows}
    row = next(line for line in experiment.results_markdown(results).splitlines() if line.startswith("| 1 | 0.0 |"))
    cells = [cell.strip() for cell in row.strip("|").split("|")][2:]
    assert [cell.startswith("n/a") for cell in cells] == [True, True, False, True]
    assert cells[2].startswith("**")  # the one cell that denoises is the best


def test_run_experiment_refuses_a_used_out_and_steps_that_never_denoise(experiment, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(experiment, "load_twodim", lambda *a, **k: pytest.fail("drew data before refusing"))
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.ckpt").write_bytes(b"an earlier run's model")
    for argv, message in [(["--out", str(out)], "holds an earlier run (model.ckpt): pass --overwrite"),
                          (["--out", str(tmp_path / "new"), "--ddim_steps", "1"], "--ddim_steps 1: 1 step under leading"),
                          (["--out", str(tmp_path / "new"), "--solver_calls", "1"], "--solver_calls 1: 1 step under leading")]:
        with pytest.raises(SystemExit) as exit_info:
            experiment.main(argv)
        assert exit_info.value.code == 2
        stderr = capsys.readouterr().err
        assert message in stderr and len(stderr.strip().splitlines()) == 1, stderr
    assert [p.name for p in out.iterdir()] == ["model.ckpt"] and (out / "model.ckpt").read_bytes() == b"an earlier run's model"
    assert not (tmp_path / "new").exists()
    assert experiment.parse_args(["--out", str(out), "--overwrite"]).overwrite
