"""Task 1-2 schedulers against diffusers' DDPMScheduler / DDIMScheduler (DESIGN.md section 5).

The "network" is the exact posterior of a Gaussian data distribution x_0 ~ N(mu, s^2 I), so the
trajectories behave like real sampling (no blow-up) and every predictor has a closed form.
Each test runs whole reverse trajectories with the same betas, timesteps and noise on both sides.

Predictors noise and x0 are compared in float32, as the two libraries run. The mean predictor
(no diffusers equivalent) and the identity DDIM(S=T, eta=1) = DDPM(small) are checks of the
formulas, so they run in float64 on the same float32-built schedule: in float32, diffusers' own
DDPM step is off from the exact value by up to ~2e-4 near t = 0 (1 - alpha_bar_t and
1 - alpha_bar_t / alpha_bar_{t-1} lose digits there), which would hide what is being tested.
"""
import numpy as np
import pytest
import torch
from conftest import TASK1_IMAGE, load_module
from diffusers import DDIMScheduler as HFDDIMScheduler
from diffusers import DDPMScheduler as HFDDPMScheduler

scheduler = load_module(TASK1_IMAGE, "scheduler")

T = 1000
BETA_1, BETA_T = 1e-4, 0.02
SHAPE = (2, 3, 8, 8)
TOL = 1e-5
HF_SCHEDULE = {"linear": "linear", "quad": "scaled_linear", "cosine": "squaredcos_cap_v2"}
HF_PREDICTION = {"noise": "epsilon", "x0": "sample"}

DATA_MEAN = 0.5 * torch.sin(torch.arange(np.prod(SHAPE), dtype=torch.float32)).reshape(SHAPE)
DATA_STD = 0.5


def gaussian_model(alphas_cumprod, x_t, t, predictor):
    """E[eps | x_t] or E[x_0 | x_t] for x_0 ~ N(DATA_MEAN, DATA_STD^2 I), in x_t's dtype."""
    alpha_bar = alphas_cumprod[int(t)].double()
    x = x_t.double()
    total_var = alpha_bar * DATA_STD**2 + 1 - alpha_bar
    residual = x - alpha_bar.sqrt() * DATA_MEAN.double()
    if predictor == "noise":
        out = (1 - alpha_bar).sqrt() * residual / total_var
    else:
        out = DATA_MEAN.double() + alpha_bar.sqrt() * DATA_STD**2 * residual / total_var
    return out.to(x_t.dtype)


def closed_form_mean(alphas_cumprod, x_t, t, eps):
    """mu_theta = (x_t - beta_t / sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_t)  (DDPM eq. 11)."""
    t = int(t)
    alpha_bar = alphas_cumprod[t].double()
    alpha_bar_prev = alphas_cumprod[t - 1].double() if t > 0 else torch.tensor(1.0, dtype=torch.float64)
    alpha = alpha_bar / alpha_bar_prev
    return ((x_t.double() - (1 - alpha) / (1 - alpha_bar).sqrt() * eps.double()) / alpha.sqrt()).to(x_t.dtype)


def to_float64(hf):
    """Run a diffusers scheduler in float64 on its own (float32-built) schedule."""
    for name in ("betas", "alphas", "alphas_cumprod", "one", "final_alpha_cumprod"):
        if hasattr(hf, name):
            setattr(hf, name, getattr(hf, name).double())
    return hf


def hf_ddpm(mode, predictor, sigma_type, dtype=torch.float32):
    hf = HFDDPMScheduler(
        num_train_timesteps=T, beta_start=BETA_1, beta_end=BETA_T, beta_schedule=HF_SCHEDULE[mode],
        variance_type={"small": "fixed_small", "large": "fixed_large"}[sigma_type], clip_sample=False,
        prediction_type=HF_PREDICTION.get(predictor, "epsilon"),
    )
    return to_float64(hf) if dtype == torch.float64 else hf


def hf_ddim(mode, predictor, steps, dtype=torch.float32, spacing="leading"):
    hf = HFDDIMScheduler(
        num_train_timesteps=T, beta_start=BETA_1, beta_end=BETA_T, beta_schedule=HF_SCHEDULE[mode],
        clip_sample=False, set_alpha_to_one=True, steps_offset=0, timestep_spacing=spacing,
        prediction_type=HF_PREDICTION.get(predictor, "epsilon"),
    )
    hf.set_timesteps(steps)
    return to_float64(hf) if dtype == torch.float64 else hf


def dtype_for(predictor):
    return torch.float64 if predictor == "mean" else torch.float32


def initial_noise(seed, dtype):
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)


def network_outputs(ours, hf, x_ours, x_hf, t, predictor):
    """What each side is fed at step t: ours gets `predictor`'s output, diffusers eps or x0."""
    hf_pred = "x0" if predictor == "x0" else "noise"
    out_hf = gaussian_model(hf.alphas_cumprod, x_hf, t, hf_pred)
    out_ours = gaussian_model(ours.alphas_cumprod, x_ours, t, hf_pred)
    if predictor == "mean":
        out_ours = closed_form_mean(ours.alphas_cumprod, x_ours, t, out_ours)
    return out_ours, out_hf


def ddpm_max_diff(ours, hf, predictor, dtype, seed=0):
    """Max abs difference between the two DDPM trajectories over all steps."""
    gen_ours, gen_hf = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
    x_ours = x_hf = initial_noise(seed, dtype)
    worst = 0.0
    for t in ours.timesteps:
        out_ours, out_hf = network_outputs(ours, hf, x_ours, x_hf, t, predictor)
        # diffusers draws its noise only when t > 0; draw ours the same way
        noise = torch.randn(SHAPE, generator=gen_ours, dtype=dtype) if t > 0 else None
        x_ours = ours.step(x_ours, t, out_ours, predictor, noise=noise)
        x_hf = hf.step(out_hf, int(t), x_hf, generator=gen_hf).prev_sample
        assert x_ours.dtype == dtype
        worst = max(worst, (x_ours - x_hf).abs().max().item())
    assert x_ours.abs().max() < 10  # the trajectory stayed in a sensible range
    return worst


@pytest.mark.parametrize("mode", ["linear", "quad", "cosine"])
@pytest.mark.parametrize("sigma_type", ["small", "large"])
@pytest.mark.parametrize("predictor", ["noise", "x0", "mean"])
def test_ddpm_trajectory_matches_diffusers(mode, sigma_type, predictor):
    dtype = dtype_for(predictor)
    ours = scheduler.DDPMScheduler(T, BETA_1, BETA_T, mode, sigma_type=sigma_type).to(dtype)
    worst = ddpm_max_diff(ours, hf_ddpm(mode, predictor, sigma_type, dtype), predictor, dtype)
    assert worst < TOL, f"max abs difference {worst:.2e}"


def ddim_max_diff(ours, hf, predictor, eta, dtype, seed=0):
    assert torch.equal(ours.timesteps, hf.timesteps)
    gen = torch.Generator().manual_seed(seed)
    x_ours = x_hf = initial_noise(seed, dtype)
    worst = 0.0
    for t in ours.timesteps:
        out_ours, out_hf = network_outputs(ours, hf, x_ours, x_hf, t, predictor)
        noise = torch.randn(SHAPE, generator=gen).to(dtype)
        x_ours = ours.step(x_ours, t, out_ours, predictor, noise=noise)
        x_hf = hf.step(out_hf, int(t), x_hf, eta=eta, variance_noise=noise).prev_sample
        assert x_ours.dtype == dtype
        worst = max(worst, (x_ours - x_hf).abs().max().item())
    assert x_ours.abs().max() < 10
    return worst


# trailing only where S divides T: elsewhere diffusers' DDIM steps to t - T // S, not to the next
# timestep of its own sub-sequence (see test_each_ddim_step_goes_to_the_next_timestep)
DDIM_STEPS = {"leading": (1, 7, 33, 50, 300), "trailing": (1, 10, 50, 200)}


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("mode", ["linear", "quad", "cosine"])
@pytest.mark.parametrize("predictor", ["noise", "x0", "mean"])
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ddim_trajectory_matches_diffusers(spacing, mode, predictor, eta):
    """noise and x0 in float32: bit for bit; mean (float64, no diffusers equivalent): to TOL."""
    dtype = dtype_for(predictor)
    ours = scheduler.DDIMScheduler(T, BETA_1, BETA_T, mode, num_inference_timesteps=50, eta=eta,
                                   timestep_spacing=spacing).to(dtype)
    for steps in DDIM_STEPS[spacing]:
        ours.set_inference_timesteps(steps)
        worst = ddim_max_diff(ours, hf_ddim(mode, predictor, steps, dtype, spacing), predictor, eta, dtype)
        if dtype == torch.float32:
            assert worst == 0, f"{steps} steps: max abs difference {worst:.2e}"
        assert worst < TOL, f"{steps} steps: max abs difference {worst:.2e}"


@pytest.mark.parametrize("mode", ["linear", "cosine"])
@pytest.mark.parametrize("predictor", ["noise", "x0", "mean"])
def test_ddim_all_steps_eta_one_is_ddpm_small(mode, predictor):
    ddpm = scheduler.DDPMScheduler(T, BETA_1, BETA_T, mode, sigma_type="small").double()
    ddim = scheduler.DDIMScheduler(T, BETA_1, BETA_T, mode, num_inference_timesteps=T, eta=1.0).double()
    assert torch.equal(ddim.timesteps, ddpm.timesteps)
    gen = torch.Generator().manual_seed(0)
    x_ddpm = x_ddim = initial_noise(0, torch.float64)
    worst = 0.0
    for t in ddpm.timesteps:
        noise = torch.randn(SHAPE, generator=gen, dtype=torch.float64)
        outs = []
        for sched, x in ((ddpm, x_ddpm), (ddim, x_ddim)):
            out = gaussian_model(sched.alphas_cumprod, x, t, "x0" if predictor == "x0" else "noise")
            outs.append(closed_form_mean(sched.alphas_cumprod, x, t, out) if predictor == "mean" else out)
        x_ddpm = ddpm.step(x_ddpm, t, outs[0], predictor, noise=noise)
        x_ddim = ddim.step(x_ddim, t, outs[1], predictor, noise=noise)
        worst = max(worst, (x_ddpm - x_ddim).abs().max().item())
    assert worst < 1e-9, f"max abs difference {worst:.2e}"


def test_step_draws_noise_when_not_given():
    ddim = scheduler.DDIMScheduler(T, BETA_1, BETA_T, num_inference_timesteps=10, eta=1.0)
    x, eps = torch.randn(SHAPE), torch.randn(SHAPE)
    torch.manual_seed(0)
    drawn = ddim.step(x, ddim.timesteps[0], eps, "noise")
    torch.manual_seed(0)
    given = ddim.step(x, ddim.timesteps[0], eps, "noise", noise=torch.randn(SHAPE))
    torch.testing.assert_close(drawn, given)
    # eta = 0 is deterministic
    ddim0 = scheduler.DDIMScheduler(T, BETA_1, BETA_T, num_inference_timesteps=10, eta=0.0)
    torch.testing.assert_close(ddim0.step(x, 900, eps, "noise"), ddim0.step(x, 900, eps, "noise"))


@pytest.mark.parametrize("bad", [0, -3, T + 1])
def test_ddim_rejects_bad_step_counts(bad):
    with pytest.raises(ValueError, match="DDIM steps"):
        scheduler.DDIMScheduler(T, BETA_1, BETA_T, num_inference_timesteps=bad)


def test_rejects_bad_eta_schedule_predictor():
    for eta in (-0.1, 1.5, float("nan")):  # eta > 1: 1 - alpha_bar_prev - sigma^2 < 0, NaN images
        with pytest.raises(ValueError, match=r"eta must be in \[0, 1\]"):
            scheduler.DDIMScheduler(T, BETA_1, BETA_T, eta=eta)
    with pytest.raises(ValueError, match="timestep spacing"):
        scheduler.DDIMScheduler(T, BETA_1, BETA_T, timestep_spacing="cubic")
    with pytest.raises(ValueError, match="schedule"):
        scheduler.DDPMScheduler(T, BETA_1, BETA_T, mode="sigmoid")
    with pytest.raises(ValueError, match="predictor"):
        scheduler.DDPMScheduler(T, BETA_1, BETA_T).step(torch.zeros(SHAPE), 5, torch.zeros(SHAPE), "velocity")


@pytest.mark.parametrize("sample_method", ["ddpm", "ddim"])
def test_step_takes_a_batch_holding_one_timestep(sample_method):
    sched = scheduler.build_scheduler(scheduler.DDPMScheduler(T, BETA_1, BETA_T).config, sample_method,
                                      ddim_steps=10, eta=0.5)
    x, out, noise = (torch.randn(SHAPE, generator=torch.Generator().manual_seed(i)) for i in range(3))
    t, other = int(sched.timesteps[3]), int(sched.timesteps[4])
    one = sched.step(x, t, out, "noise", noise=noise)
    assert torch.equal(sched.step(x, torch.full((SHAPE[0],), t), out, "noise", noise=noise), one)
    assert torch.equal(sched.step(x, torch.tensor(t), out, "noise", noise=noise), one)
    with pytest.raises(ValueError, match="one timestep for the whole batch"):
        sched.step(x, torch.tensor([t, other]), out, "noise", noise=noise)


def test_ddim_refuses_a_timestep_outside_its_sub_sequence():
    ddim = scheduler.DDIMScheduler(T, BETA_1, BETA_T, num_inference_timesteps=10)
    with pytest.raises(ValueError, match="not one of the DDIM timesteps"):
        ddim.step(torch.zeros(SHAPE), 950, torch.zeros(SHAPE), "noise")


# --- timestep spacings (DDIM paper Appendix D.2; diffusers; Lin et al. 2023) ---

@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
def test_sub_sequence_equals_diffusers_timesteps(spacing):
    hf = HFDDIMScheduler(num_train_timesteps=T, timestep_spacing=spacing, steps_offset=0)
    extra = []
    for steps in range(1, T + 1):
        hf.set_timesteps(steps)
        ours, _ = scheduler.ddim_sub_sequence(T, steps, spacing)
        theirs = hf.timesteps
        if len(theirs) == steps + 1:
            # diffusers' trailing arange can put a point a hair above 0: a timestep -1 (dropped here)
            assert spacing == "trailing" and theirs[-1] == -1
            extra.append(steps)
            theirs = theirs[:-1]
        assert torch.equal(ours, theirs), steps
    assert len(extra) < 100  # a few S (61, 103, ... for T = 1000), not a different rule


def test_quadratic_is_the_ddim_papers_sub_sequence():
    for steps in (1, 2, 10, 20, 29, 30, 50, 100, 1000):
        # the DDIM authors' code for "quad" skip (runners/diffusion.py)
        seq = [int(s) for s in list(np.linspace(0, np.sqrt(T * 0.8), steps) ** 2)]
        ours = scheduler.ddim_sub_sequence(T, steps, "quadratic")[0].flip(0).tolist()
        # a repeat (a step t -> t, from S > sqrt(0.8 T) + 1 = 29.3 on) moves to one above its predecessor
        assert (ours == seq) == (steps <= 29), steps
        assert ours == [i + max(seq[j] - j for j in range(i + 1)) for i in range(steps)], steps


@pytest.mark.parametrize("spacing", scheduler.TIMESTEP_SPACINGS)
def test_sub_sequences_never_repeat_and_end_on_a_clean_sample(spacing):
    for steps in (1, 2, 3, 7, 10, 16, 20, 50, 61, 100, 333, 999, 1000):
        timesteps, prev = scheduler.ddim_sub_sequence(T, steps, spacing)
        assert (timesteps[:-1] > timesteps[1:]).all(), steps  # strictly descending: no step repeats
        assert 0 <= timesteps.min() and timesteps.max() <= T - 1
        assert torch.equal(prev, torch.cat([timesteps[1:], torch.tensor([-1])]))  # each step to the next one
        assert timesteps[-1] == (round(T / steps) - 1 if spacing == "trailing" else 0), steps
        assert len(timesteps) == steps
    # the last step goes to alpha_bar = 1: x_prev is the predicted x_0 itself, whatever eta
    for eta in (0.0, 1.0):
        ddim = scheduler.DDIMScheduler(T, BETA_1, BETA_T, num_inference_timesteps=10, eta=eta,
                                       timestep_spacing=spacing).double()
        x, eps = (torch.randn(SHAPE, generator=torch.Generator().manual_seed(i), dtype=torch.float64) for i in range(2))
        last = ddim.timesteps[-1]
        torch.testing.assert_close(ddim.step(x, last, eps, "noise", noise=torch.randn_like(x)),
                                   ddim.predict_x0(x, last, eps, "noise"), rtol=0, atol=1e-12)


@pytest.mark.parametrize("spacing, steps", [("linspace", 10), ("linspace", 7), ("quadratic", 10),
                                            ("quadratic", 50), ("trailing", 7), ("leading", 7)])
@pytest.mark.parametrize("predictor", ["noise", "x0"])
def test_each_ddim_step_goes_to_the_next_timestep(spacing, steps, predictor):
    """DDIM with eta = 1 on a sub-sequence is ancestral DDPM on that sub-sequence (DDIM eq. 16):
    diffusers' DDPMScheduler with these custom timesteps, which steps from each to the next one."""
    ours = scheduler.DDIMScheduler(T, BETA_1, BETA_T, num_inference_timesteps=steps, eta=1.0,
                                   timestep_spacing=spacing).double()
    reference = hf_ddpm("linear", predictor, "small", torch.float64)
    reference.set_timesteps(timesteps=ours.timesteps.tolist())
    worst = ddpm_max_diff(ours, reference, predictor, torch.float64)
    assert worst < 1e-9, f"max abs difference {worst:.2e}"
    if spacing == "linspace":
        # diffusers' own DDIM goes to t - T // S instead (its issue #12633): a different trajectory
        ours32 = scheduler.DDIMScheduler(T, BETA_1, BETA_T, num_inference_timesteps=steps, eta=1.0,
                                         timestep_spacing=spacing)
        diffusers_ddim = hf_ddim("linear", predictor, steps, spacing=spacing)
        assert ddim_max_diff(ours32, diffusers_ddim, predictor, 1.0, torch.float32) > 1e-2


@pytest.mark.parametrize("spacing", ["leading", "linspace", "quadratic"])
def test_one_ddim_step_from_t_zero_is_refused(spacing):
    """S = 1 under these spacings is tau = [0] (as in diffusers, so DDIMScheduler keeps it): a step
    from alpha_bar_0 ~ 1 returns x_T as x_0. check_denoises, which sampling.py applies (tested in
    test_image_cli.py), refuses it and names the fix; trailing's tau = [T - 1] passes."""
    assert scheduler.ddim_sub_sequence(T, 1, spacing)[0].tolist() == [0]
    with pytest.raises(ValueError, match="only t = 0.*trailing"):
        scheduler.check_denoises(scheduler.ddim_sub_sequence(T, 1, spacing)[0], spacing)
    trailing = scheduler.DDIMScheduler(T, BETA_1, BETA_T, num_inference_timesteps=1, timestep_spacing="trailing")
    assert trailing.timesteps.tolist() == [T - 1]
    scheduler.check_denoises(trailing.timesteps, "trailing")
