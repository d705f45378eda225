"""DPM-Solver++ multistep (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of
Diffusion Probabilistic Models", https://arxiv.org/abs/2211.01095): an extra few-step sampler
beside DDIM, for the same trained network. The course's DDIM (ddpm.py) is unchanged.

DDIM with eta = 0 and DPM-Solver++ both solve the probability-flow ODE of the diffusion. Written
in lambda_t = log(alpha_t / sigma_t), half the log-SNR, with alpha_t = sqrt(alpha_bar_t) and
sigma_t = sqrt(1 - alpha_bar_t), its exact solution from s to t, in the data-prediction form of
DPM-Solver++, is

    x_t = (sigma_t / sigma_s) x_s + sigma_t * integral_{lambda_s}^{lambda_t} e^lambda x0_theta(x_lambda, lambda) dlambda

where x0_theta is the network's prediction of the clean sample. Holding x0_theta constant over the
step gives DDIM (order 1); a linear (order 2) or quadratic (order 3) fit through the predictions
of the previous steps, which cost no extra network call, gives the multistep solvers. With
h = lambda_t - lambda_s, phi_1 = e^{-h} - 1, the step is

    order 1:  x_t = (sigma_t / sigma_s0) x_s0 - alpha_t phi_1 D0
    order 2:  ... - 0.5 alpha_t phi_1 D1                          (Algorithm 2, DPM-Solver++(2M))
    order 3:  x_t = (sigma_t / sigma_s0) x_s0 - alpha_t phi_1 D0 + alpha_t phi_2 D1 - alpha_t phi_3 D2,
              phi_2 = phi_1 / h + 1, phi_3 = phi_2 / h - 1/2   (the third-order multistep update of
              the authors' code, also diffusers' DPMSolverMultistepScheduler)

with D0 the newest prediction and D1, D2 divided differences of the predictions in lambda, scaled
by h (see multistep_update). The first steps lack history and use order 1, then 2 (warm-up); the
last step goes to sigma = 0, lambda = +inf, where only order 1 is defined and it returns D0: the
clean sample. With lower_order_final, runs of fewer than 15 steps also take at most order 2 on the
step before the last (diffusers' default; it steadies the few-step end).

SDE-DPM-Solver++ (stochastic=True; diffusers' algorithm_type="sde-dpmsolver++") solves the reverse
SDE instead of the ODE, with the same fits of x0_theta. Its exact solution from s to t adds fresh
noise z ~ N(0, I) and pulls harder towards x0_theta:

    x_t = (sigma_t / sigma_s) e^{-h} x_s + 2 alpha_t integral_{lambda_s}^{lambda_t} e^{-2 (lambda_t - lambda)} x0_theta dlambda
          + sigma_t sqrt(1 - e^{-2h}) z

    order 1:  x_t = (sigma_t / sigma_s0) e^{-h} x_s0 + alpha_t (1 - e^{-2h}) D0 + sigma_t sqrt(1 - e^{-2h}) z
    order 2:  ... + 0.5 alpha_t (1 - e^{-2h}) D1

Order 1 is DDIM with eta = 1 (both are DDPM's posterior step over the sub-sequence), as the ODE's
order 1 is DDIM with eta = 0; orders 1 and 2 only, as diffusers. Noise is drawn at every step, the
last included (where its weight is 0), after the network call: the draws of DDIM's eta > 0.
"""
from typing import Optional

import numpy as np
import torch

from ddpm import TIMESTEP_SPACINGS, check_denoises, ddim_timesteps, extract

SOLVER_SPACINGS = TIMESTEP_SPACINGS + ("logsnr",)
SOLVER_ORDERS = (1, 2, 3)
SDE_SOLVER_ORDERS = (1, 2)
PREDICTORS = ("noise", "x0", "mean")


def logsnr_timesteps(alphas_cumprod: torch.Tensor, num_steps: int) -> torch.Tensor:
    """S timesteps evenly spaced in lambda (uniform log-SNR, the step schedule of the DPM-Solver
    papers), from lambda(T - 1) to lambda(0): [S] int64, descending.

    Each lambda on the grid becomes a timestep by linear interpolation of lambda_t between
    neighbouring integers t, rounded to the nearest (half to even), as diffusers' use_lu_lambdas does.
    Near t = 0 lambda changes by more than the grid's step from one integer to the next (T = 1000,
    linear betas: from S = 39 on), and rounding gives a timestep twice; diffusers keeps the repeat (a
    step with h = 0, where the multistep update divides by zero). Here a repeat moves to one above
    its predecessor, as ddim_timesteps does for "quadratic" (and, should that pass T - 1, the top
    ones move down), so the S timesteps are distinct.
    """
    alpha_bar = alphas_cumprod.double().cpu().numpy()
    T = len(alpha_bar)
    lambdas = 0.5 * (np.log(alpha_bar) - np.log1p(-alpha_bar))  # lambda_t, decreasing in t
    grid = np.linspace(lambdas[-1], lambdas[0], num_steps)  # from the noisiest to the cleanest
    # np.interp needs increasing abscissae: read t off the reversed (increasing) lambdas
    t = np.interp(grid, lambdas[::-1], np.arange(T)[::-1]).round().astype(np.int64)[::-1].copy()
    for i in range(1, num_steps):  # ascending now
        t[i] = max(t[i], t[i - 1] + 1)
    t[-1] = min(t[-1], T - 1)
    for i in range(num_steps - 2, -1, -1):
        t[i] = min(t[i], t[i + 1] - 1)
    return torch.from_numpy(t[::-1].copy())


def solver_timesteps(alphas_cumprod: torch.Tensor, num_steps: int, timestep_spacing: str = "quadratic"):
    """The S timesteps the solver calls the network at, [S] int64 descending: one of DDIM's
    sub-sequences (ddpm.ddim_timesteps) or "logsnr" (logsnr_timesteps)."""
    T = len(alphas_cumprod)
    if not 1 <= num_steps <= T:
        raise ValueError(f"the number of network calls must be between 1 and T={T}, got {num_steps}")
    if timestep_spacing == "logsnr":
        return logsnr_timesteps(alphas_cumprod, num_steps)
    if timestep_spacing not in TIMESTEP_SPACINGS:
        raise ValueError(f"unknown timestep spacing {timestep_spacing!r}; choose one of {', '.join(SOLVER_SPACINGS)}")
    timesteps = ddim_timesteps(T, num_steps, timestep_spacing)[0]
    check_denoises(timesteps, timestep_spacing)
    return timesteps


def step_order(i: int, num_steps: int, order: int, lower_order_final: bool = True) -> int:
    """The order of step i (0-based) of num_steps."""
    if i == num_steps - 1:
        return 1  # to sigma = 0: h = inf, and r = h_prev / h = 0 leaves D1 undefined
    k = min(order, i + 1)  # warm-up: step i has only i + 1 predictions
    if lower_order_final and num_steps < 15 and i == num_steps - 2:
        k = min(k, 2)
    return k


def solver_orders(stochastic: bool) -> tuple:
    """The orders of the ODE solver (1-3) or of the SDE solver (1-2)."""
    return SDE_SOLVER_ORDERS if stochastic else SOLVER_ORDERS


def check_order(order: int, stochastic: bool) -> None:
    """ValueError unless the ODE or the SDE solver (stochastic) has this order."""
    orders = solver_orders(stochastic)
    if order not in orders:
        raise ValueError(f"the {'SDE-' if stochastic else ''}DPM-Solver++ order must be one of {orders}, got {order}")


def multistep_update(x_s0: torch.Tensor, x0_preds, alpha_bars: torch.Tensor,
                     noise: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One DPM-Solver++ step of order k = len(x0_preds) from s0 to t.

    x_s0: [B, ...] the sample at s0; x0_preds: the k newest predictions of x_0, oldest first
    [..., D(s1), D(s0)], each [B, ...]; alpha_bars: [k + 1] alpha_bar at s_{k-1}, ..., s1, s0 and t
    (alpha_bar_t = 1: the clean sample); noise: [B, ...] the z of SDE-DPM-Solver++, None for the
    ODE solver -> x_t: [B, ...].
    """
    if alpha_bars[-1] == 1:
        return x0_preds[-1]  # sigma_t = 0, alpha_t = 1, e^{-h} = 0: x_t = D0
    alpha, sigma = alpha_bars.sqrt(), (1 - alpha_bars).sqrt()
    lambda_ = alpha.log() - sigma.log()
    alpha_t, sigma_t, sigma_s0 = alpha[-1], sigma[-1], sigma[-2]
    h = lambda_[-1] - lambda_[-2]
    D0 = x0_preds[-1]
    if noise is None:  # the ODE; order 1 is DDIM (eta = 0)
        decay, weight = sigma_t / sigma_s0, -alpha_t * torch.expm1(-h)  # weight = -alpha_t phi_1
        x_t = decay * x_s0 + weight * D0
    else:  # the SDE; order 1 is DDIM (eta = 1)
        one_minus_e_2h = -torch.expm1(-2 * h)  # 1 - e^{-2h}
        decay, weight = sigma_t / sigma_s0 * torch.exp(-h), alpha_t * one_minus_e_2h
        x_t = decay * x_s0 + weight * D0 + sigma_t * one_minus_e_2h.sqrt() * noise
    if len(x0_preds) == 1:
        return x_t
    # r0 = h_0 / h, the previous step relative to this one; D1_0 ~ h * dD/dlambda at s0
    h_0 = lambda_[-2] - lambda_[-3]
    r0 = h_0 / h
    D1_0 = (D0 - x0_preds[-2]) / r0
    if len(x0_preds) == 2:
        # the midpoint form, for both: Algorithm 2's D = (1 + 1/(2 r)) D(s0) - 1/(2 r) D(s1) for the ODE
        return x_t + 0.5 * weight * D1_0
    # order 3 (the ODE only): a quadratic through the last three predictions, D1 ~ h D', D2 ~ h^2 D'' / 2
    h_1 = lambda_[-3] - lambda_[-4]
    r1 = h_1 / h
    D1_1 = (x0_preds[-2] - x0_preds[-3]) / r1
    D1 = D1_0 + r0 / (r0 + r1) * (D1_0 - D1_1)
    D2 = (D1_0 - D1_1) / (r0 + r1)
    phi_1 = torch.expm1(-h)
    phi_2 = phi_1 / h + 1
    phi_3 = phi_2 / h - 0.5
    return x_t + alpha_t * phi_2 * D1 - alpha_t * phi_3 * D2


def predict_x0(var_scheduler, x_t: torch.Tensor, t: torch.Tensor, net_out: torch.Tensor, predictor: str):
    """The network's x_0 estimate, whatever it predicts. x_t, net_out: [B, D]; t: scalar tensor."""
    alpha_bar_t = extract(var_scheduler.alphas_cumprod, t, x_t)
    if predictor == "noise":
        return (x_t - (1 - alpha_bar_t).sqrt() * net_out) / alpha_bar_t.sqrt()  # DDPM Eq. 4 inverted
    if predictor == "x0":
        return net_out
    if predictor == "mean":
        # the posterior mean mu = coef_x0 x_0 + coef_xt x_t (DDPM Eq. 7), solved for x_0
        alpha_bar_prev = extract(var_scheduler.alphas_cumprod_prev, t, x_t)
        alpha_t = alpha_bar_t / alpha_bar_prev
        coef_x0 = alpha_bar_prev.sqrt() * (1 - alpha_t) / (1 - alpha_bar_t)
        coef_xt = alpha_t.sqrt() * (1 - alpha_bar_prev) / (1 - alpha_bar_t)
        return (net_out - coef_xt * x_t) / coef_x0
    raise ValueError(f"predictor must be one of {', '.join(PREDICTORS)}; got {predictor!r}")


@torch.no_grad()
def dpm_solver_sample_loop(model, shape, num_network_calls: int = 10, order: int = 2,
                           timestep_spacing: str = "quadratic", *, predictor: str = "noise",
                           lower_order_final: bool = True, stochastic: bool = False, x_T=None) -> torch.Tensor:
    """DPM-Solver++(order M) from x_T ~ N(0, I) to x_0 with num_network_calls network calls;
    SDE-DPM-Solver++ with stochastic=True.

    model: ddpm.DiffusionModule; shape: e.g. (num_points, 2); x_T: [shape] or None (drawn here);
    predictor: what model.network outputs (the course's network: noise) -> x_0: shape
    """
    timesteps = solver_timesteps(model.var_scheduler.alphas_cumprod, num_network_calls, timestep_spacing)
    x_T = torch.randn(shape, device=model.device) if x_T is None else x_T
    return solve(model, x_T, timesteps, order, predictor=predictor, lower_order_final=lower_order_final,
                 stochastic=stochastic)


@torch.no_grad()
def solve(model, x_T: torch.Tensor, timesteps: torch.Tensor, order: int, *, predictor: str = "noise",
          lower_order_final: bool = True, stochastic: bool = False) -> torch.Tensor:
    """The solver from x_T at any timesteps, e.g. fitted ones (fit_timesteps.py).

    x_T: [N, 2]; timesteps: [S] int64, strictly descending, the network's S calls -> x_0: [N, 2]
    """
    check_order(order, stochastic)
    alphas_cumprod = model.var_scheduler.alphas_cumprod
    timesteps = timesteps.to(alphas_cumprod.device)
    # alpha_bar along the path: at each timestep, then 1 at the clean end
    path = torch.cat([alphas_cumprod[timesteps], torch.ones_like(alphas_cumprod[:1])])
    x = x_T
    x0_preds = []
    for i, t in enumerate(timesteps):
        x0_preds.append(predict_x0(model.var_scheduler, x, t, model.network(x, t), predictor))
        k = step_order(i, len(timesteps), order, lower_order_final)
        noise = torch.randn_like(x) if stochastic else None
        x = multistep_update(x, x0_preds[-k:], path[i + 1 - k: i + 2], noise)
        x0_preds = x0_preds[-(SOLVER_ORDERS[-1] - 1):]  # keep only what a later step can use
    return x
