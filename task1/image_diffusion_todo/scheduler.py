"""Noise schedules and reverse-process steps for DDPM and DDIM.

Notation follows the papers: beta_t is the per-step noise variance, alpha_t = 1 - beta_t,
alpha_bar_t = prod_{s<=t} alpha_s. DDPM = Ho et al. 2020 (https://arxiv.org/abs/2006.11239),
DDIM = Song et al. 2021 (https://arxiv.org/abs/2010.02502). Equation numbers refer to them.

Every step takes the network output for one of three parameterisations (`predictor`):
  noise: eps_theta(x_t, t), the noise in x_t
  x0:    the clean image x_0
  mean:  the DDPM posterior mean mu(x_t, x_0) of q(x_{t-1} | x_t, x_0)
All three are turned into a prediction of x_0 (and of eps) first, then into the update.

The arithmetic is written like diffusers' DDPMScheduler / DDIMScheduler (no clipping,
`set_alpha_to_one=True`), so in float32 the two agree bit for bit. Like diffusers, float32 loses
digits near t = 0 (1 - alpha_bar_t is small there; steps can be off from the exact value by ~1e-4):
`scheduler.double()` computes every step in float64.
"""
import math
from typing import Optional, Union

import numpy as np
import torch
import torch.nn as nn

SCHEDULES = ("linear", "quad", "cosine")
PREDICTORS = ("noise", "x0", "mean")
SIGMA_TYPES = ("small", "large")
TIMESTEP_SPACINGS = ("leading", "linspace", "trailing", "quadratic")

Timestep = Union[int, torch.Tensor]


def extract(input: torch.Tensor, t: Timestep, x: torch.Tensor) -> torch.Tensor:
    """Gather `input[t]` and shape it to broadcast against `x`.

    input: [T]; t: int, 0-d tensor or [B]; x: [B, C, H, W] -> [B or 1, 1, 1, 1].
    """
    t = torch.as_tensor(t, device=input.device).long().reshape(-1)
    out = input.gather(0, t)
    return out.reshape(t.shape[0], *([1] * (x.ndim - 1))).to(x.device)


def single_timestep(t: Timestep) -> int:
    """The timestep of a reverse step as an int. t: int, 0-d tensor, or [B] holding one value
    (a step moves the whole batch from t to the same earlier timestep)."""
    values = torch.as_tensor(t).reshape(-1)
    if values.numel() == 0 or (values != values[0]).any():
        raise ValueError(f"a reverse step needs one timestep for the whole batch, got {values.tolist()}")
    return int(values[0])


def make_betas(num_train_timesteps: int, beta_1: float, beta_T: float, mode: str) -> torch.Tensor:
    """beta_1..beta_T as a float32 tensor [T].

    linear: evenly spaced (DDPM). quad: evenly spaced in sqrt(beta), then squared
    (diffusers' "scaled_linear"). cosine: alpha_bar(t) = cos^2((t/T + s) / (1 + s) * pi/2),
    s = 0.008, beta_t = 1 - alpha_bar(t)/alpha_bar(t-1) capped at 0.999 (Nichol & Dhariwal 2021,
    eq. 17; diffusers' "squaredcos_cap_v2"); beta_1 and beta_T are not used by it.
    """
    T = num_train_timesteps
    if mode == "linear":
        return torch.linspace(beta_1, beta_T, T, dtype=torch.float32)
    if mode == "quad":
        return torch.linspace(beta_1**0.5, beta_T**0.5, T, dtype=torch.float32) ** 2
    if mode == "cosine":
        def alpha_bar(u):
            return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = [min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), 0.999) for i in range(T)]
        return torch.tensor(betas, dtype=torch.float32)
    raise ValueError(f"unknown beta schedule {mode!r}; choose one of {', '.join(SCHEDULES)}")


def check_eta(eta: float) -> None:
    """eta in [0, 1]: above 1, 1 - alpha_bar_prev - sigma_t^2 (eq. 12) can turn negative (NaN)."""
    if not 0 <= eta <= 1:
        raise ValueError(f"eta must be in [0, 1], got {eta}")


def check_predictor(predictor: str) -> None:
    if predictor not in PREDICTORS:
        raise ValueError(f"unknown predictor {predictor!r}; choose one of {', '.join(PREDICTORS)}")


def ddim_sub_sequence(num_train_timesteps: int, num_inference_timesteps: int, timestep_spacing: str = "leading"):
    """DDIM's sub-sequence tau of S = num_inference_timesteps of the T training timesteps.

    Returns (timesteps, prev_timesteps), both [S] int64 and descending: the step from timesteps[i]
    goes to prev_timesteps[i] = timesteps[i + 1], the last one to -1, where alpha_bar = 1 (x_0).
      leading    tau_i = i (T // S), from 0: the course's and diffusers' default (DDIM App. D.2).
      linspace   tau_i = round(i (T - 1) / (S - 1)), from 0 to T - 1 (diffusers).
      trailing   tau = round(arange(T, 0, -T / S)[:S]) - 1, from T - 1 down (Lin et al. 2023,
                 Table 2); numpy's float arange as diffusers', which can give S + 1 points.
      quadratic  tau_i = int((i sqrt(0.8 T) / (S - 1))^2), dense near 0 (DDIM App. D.2); a repeat
                 moves to one above its predecessor, so S steps are S network calls that all work.
    leading, linspace and trailing equal diffusers' DDIMScheduler.timesteps; every step goes to the
    next timestep of tau (diffusers' goes to t - T // S, another point under linspace).
    The same rule, written the same way, as 2d_plot_diffusion_todo/ddpm.py's ddim_timesteps
    (each folder is run on its own, so each holds a copy; tests check both).
    """
    T, S = num_train_timesteps, num_inference_timesteps
    if not 1 <= S <= T:
        raise ValueError(f"num_inference_timesteps (the number of DDIM steps) must be in [1, {T}], got {S}")
    if timestep_spacing == "leading":
        ascending = np.arange(S) * (T // S)
    elif timestep_spacing == "linspace":
        ascending = np.linspace(0, T - 1, S).round()
    elif timestep_spacing == "trailing":
        ascending = (np.round(np.arange(T, 0, -T / S))[:S] - 1)[::-1]
    elif timestep_spacing == "quadratic":
        ascending = (np.linspace(0, np.sqrt(0.8 * T), S) ** 2).astype(np.int64)
        for i in range(1, S):
            ascending[i] = max(ascending[i], ascending[i - 1] + 1)
    else:
        raise ValueError(f"unknown timestep spacing {timestep_spacing!r}: "
                         f"timestep_spacing must be one of {', '.join(TIMESTEP_SPACINGS)}")
    timesteps = torch.from_numpy(ascending[::-1].astype(np.int64).copy())
    prev_timesteps = torch.cat([timesteps[1:], torch.tensor([-1])])
    return timesteps, prev_timesteps


def check_denoises(timesteps: torch.Tensor, timestep_spacing: str) -> None:
    """ValueError when a sub-sequence [S] (DDIM's, DPM-Solver++'s) is t = 0 alone (S = 1 under leading, linspace or
    quadratic): its one step starts where alpha_bar_0 ~ 1 and returns the noise x_T as x_0."""
    if int(timesteps[0]) == 0:
        raise ValueError(f"{len(timesteps)} step under {timestep_spacing} spacing visits only t = 0 and "
                         f"returns the noise x_T unchanged: use trailing spacing or more steps")


class BaseScheduler(nn.Module):
    """The forward process q(x_t | x_0) shared by DDPM and DDIM.

    Buffers (all [T], float32, index t = 0..T-1 for the paper's t = 1..T):
      betas, alphas, alphas_cumprod (alpha_bar_t), alphas_cumprod_prev (alpha_bar_{t-1}, 1 at t=0).
    """

    def __init__(self, num_train_timesteps: int, beta_1: float, beta_T: float, mode="linear"):
        super().__init__()
        if num_train_timesteps < 1:
            raise ValueError(f"num_train_timesteps must be >= 1, got {num_train_timesteps}")
        self.num_train_timesteps = num_train_timesteps
        self.num_inference_timesteps = num_train_timesteps
        self.beta_1, self.beta_T, self.mode = beta_1, beta_T, mode
        self.timesteps = torch.arange(num_train_timesteps - 1, -1, -1, dtype=torch.long)

        betas = make_betas(num_train_timesteps, beta_1, beta_T, mode)
        alphas = 1 - betas
        alphas_cumprod = torch.cumprod(alphas, dim=0)
        alphas_cumprod_prev = torch.cat([torch.ones(1), alphas_cumprod[:-1]])

        self.register_buffer("betas", betas)
        self.register_buffer("alphas", alphas)
        self.register_buffer("alphas_cumprod", alphas_cumprod)
        self.register_buffer("alphas_cumprod_prev", alphas_cumprod_prev)

    @property
    def config(self) -> dict:
        """What is needed to rebuild this noise schedule (stored in checkpoints)."""
        return {
            "num_train_timesteps": self.num_train_timesteps,
            "beta_1": self.beta_1,
            "beta_T": self.beta_T,
            "mode": self.mode,
        }

    def uniform_sample_t(self, batch_size, device: Optional[torch.device] = None) -> torch.LongTensor:
        """t ~ Uniform{0, ..., T-1}: [batch_size]."""
        return torch.randint(0, self.num_train_timesteps, (batch_size,), device=device)

    def add_noise(self, x_0: torch.Tensor, t: torch.Tensor, eps: Optional[torch.Tensor] = None):
        """Sample q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I)  (DDPM eq. 4).

        x_0: [B, C, H, W]; t: [B]; eps: [B, C, H, W] or None (drawn here).
        Returns x_t: [B, C, H, W] and the eps used.
        """
        if eps is None:
            eps = torch.randn_like(x_0)
        alpha_bar_t = extract(self.alphas_cumprod, t, x_0)
        x_t = alpha_bar_t**0.5 * x_0 + (1 - alpha_bar_t) ** 0.5 * eps
        return x_t, eps

    def posterior_mean(self, x_0: torch.Tensor, x_t: torch.Tensor, t: Timestep) -> torch.Tensor:
        """mu~_t(x_t, x_0), the mean of q(x_{t-1} | x_t, x_0)  (DDPM eq. 7)."""
        coef_x0, coef_xt = self._posterior_mean_coefs(t, x_t)
        return coef_x0 * x_0 + coef_xt * x_t

    def _posterior_mean_coefs(self, t: Timestep, x: torch.Tensor):
        alpha_bar_t = extract(self.alphas_cumprod, t, x)
        alpha_bar_prev = extract(self.alphas_cumprod_prev, t, x)
        # alpha_t and beta_t written through alpha_bar, as diffusers does (equal to the buffers
        # up to float32 rounding, and the form that also holds for a step that skips timesteps)
        alpha_t = alpha_bar_t / alpha_bar_prev
        beta_t = 1 - alpha_t
        coef_x0 = alpha_bar_prev**0.5 * beta_t / (1 - alpha_bar_t)
        coef_xt = alpha_t**0.5 * (1 - alpha_bar_prev) / (1 - alpha_bar_t)
        return coef_x0, coef_xt

    def predict_x0(self, x_t: torch.Tensor, t: Timestep, net_out: torch.Tensor, predictor: str) -> torch.Tensor:
        """The network's estimate of x_0, whatever it predicts. All tensors [B, C, H, W]."""
        if predictor == "noise":
            # invert DDPM eq. 4 (DDPM eq. 15)
            alpha_bar_t = extract(self.alphas_cumprod, t, x_t)
            return (x_t - (1 - alpha_bar_t) ** 0.5 * net_out) / alpha_bar_t**0.5
        if predictor == "x0":
            return net_out
        if predictor == "mean":
            # invert DDPM eq. 7 for x_0
            coef_x0, coef_xt = self._posterior_mean_coefs(t, x_t)
            return (net_out - coef_xt * x_t) / coef_x0
        check_predictor(predictor)


class DDPMScheduler(BaseScheduler):
    """Ancestral sampling x_t -> x_{t-1} ~ N(mu_theta(x_t, t), sigma_t^2 I)  (DDPM Algorithm 2).

    sigma_type "small": sigma_t^2 = beta~_t = (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) beta_t, the
    posterior variance; "large": sigma_t^2 = beta_t (DDPM section 3.2). The buffer `sigmas` [T]
    holds sigma_t (the course's name); each step recomputes its sigma_t in x_t's precision.
    """

    def __init__(self, num_train_timesteps: int, beta_1: float, beta_T: float, mode="linear", sigma_type="small"):
        super().__init__(num_train_timesteps, beta_1, beta_T, mode)
        if sigma_type not in SIGMA_TYPES:
            raise ValueError(f"unknown sigma_type {sigma_type!r}; choose one of {', '.join(SIGMA_TYPES)}")
        self.sigma_type = sigma_type
        self.register_buffer("sigmas", self._sigma(self.alphas_cumprod, self.alphas_cumprod_prev))

    @property
    def config(self) -> dict:
        return {**super().config, "sigma_type": self.sigma_type}

    def step(self, x_t: torch.Tensor, t: Timestep, net_out: torch.Tensor, predictor: str, *,
             noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        """One reverse step x_t -> x_{t-1}.

        x_t, net_out, noise: [B, C, H, W]; t: int, 0-d tensor or [B] holding one value;
        noise: the z of Algorithm 2 (drawn here when None; unused at t = 0).
        """
        t = single_timestep(t)
        if predictor == "noise":
            return self.step_predict_noise(x_t, t, net_out, noise=noise)
        if predictor == "x0":
            return self.step_predict_x0(x_t, t, net_out, noise=noise)
        if predictor == "mean":
            return self.step_predict_mean(x_t, t, net_out, noise=noise)
        check_predictor(predictor)

    def step_predict_noise(self, x_t, t, eps_theta, *, noise=None):
        """eps_theta -> x_0 (eq. 15) -> posterior mean (eq. 7), i.e. mu_theta of eq. 11."""
        x0_pred = self.predict_x0(x_t, t, eps_theta, "noise")
        return self._sample_prev(x_t, t, self.posterior_mean(x0_pred, x_t, t), noise)

    def step_predict_x0(self, x_t, t, x0_pred, *, noise=None):
        return self._sample_prev(x_t, t, self.posterior_mean(x0_pred, x_t, t), noise)

    def step_predict_mean(self, x_t, t, mean_theta, *, noise=None):
        return self._sample_prev(x_t, t, mean_theta, noise)

    def _sigma(self, alpha_bar_t: torch.Tensor, alpha_bar_prev: torch.Tensor) -> torch.Tensor:
        """sigma_t from alpha_bar_t and alpha_bar_{t-1}, in their precision."""
        beta_t = 1 - alpha_bar_t / alpha_bar_prev
        if self.sigma_type == "large":
            return beta_t**0.5
        # beta~_t; clamped as diffusers does (beta~ = 0 at t = 0, where no noise is added anyway)
        return ((1 - alpha_bar_prev) / (1 - alpha_bar_t) * beta_t).clamp(min=1e-20) ** 0.5

    def sigma(self, t: Timestep, x: torch.Tensor) -> torch.Tensor:
        """sigma_t, shaped to broadcast against x; computed in x's precision from alpha_bar."""
        return self._sigma(extract(self.alphas_cumprod, t, x), extract(self.alphas_cumprod_prev, t, x))

    def _sample_prev(self, x_t, t, mean, noise):
        """x_{t-1} = mean + sigma_t z, with z = 0 at the last step (Algorithm 2, line 3)."""
        if single_timestep(t) == 0:
            return mean
        if noise is None:
            noise = torch.randn_like(x_t)
        return mean + self.sigma(t, x_t) * noise


class DDIMScheduler(BaseScheduler):
    """DDIM sampling on S of the T training timesteps, with stochasticity eta (DDIM eq. 12, 16).

    The sub-sequence follows `timestep_spacing` (see ddim_sub_sequence): "leading" (the course's:
    T//S * (S-1), ..., T//S, 0), "linspace", "trailing" or "quadratic" (the DDIM paper's CIFAR-10
    choice). Each step goes to the next timestep of the sub-sequence; the last one to a clean image.
    eta = 0 is deterministic DDIM, eta = 1 with S = T is DDPM with the posterior variance; eta > 1
    would make 1 - alpha_bar_prev - sigma_t^2 negative (NaN images), so eta must lie in [0, 1].
    """

    def __init__(self, num_train_timesteps: int, beta_1: float, beta_T: float, mode: str = "linear",
                 num_inference_timesteps: int = 50, eta: float = 0.0, *, timestep_spacing: str = "leading"):
        super().__init__(num_train_timesteps, beta_1, beta_T, mode)
        check_eta(eta)
        if timestep_spacing not in TIMESTEP_SPACINGS:
            raise ValueError(f"unknown timestep spacing {timestep_spacing!r}; choose one of {', '.join(TIMESTEP_SPACINGS)}")
        self.eta = float(eta)
        self.timestep_spacing = timestep_spacing
        self.set_inference_timesteps(num_inference_timesteps)

    def set_inference_timesteps(self, num_inference_timesteps: int):
        """Use S = num_inference_timesteps steps (1 <= S <= T); sets `timesteps` ([S], descending)
        and `prev_timesteps` ([S], where each step goes)."""
        self.timesteps, self.prev_timesteps = ddim_sub_sequence(
            self.num_train_timesteps, num_inference_timesteps, self.timestep_spacing)
        self.num_inference_timesteps = num_inference_timesteps

    def previous_timestep(self, t: int) -> int:
        """Where the step from t goes: the next timestep of the sub-sequence, -1 after the last."""
        index = (self.timesteps == t).nonzero()
        if len(index) == 0:
            raise ValueError(f"t = {t} is not one of the DDIM timesteps ({self.timestep_spacing} spacing, "
                             f"S = {self.num_inference_timesteps}): {self.timesteps.tolist()}")
        return int(self.prev_timesteps[index[0, 0]])

    def step(self, x_t: torch.Tensor, t: Timestep, net_out: torch.Tensor, predictor: str, *,
             noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        """One DDIM step x_t -> x_{t_prev}, t_prev = the next timestep of the sub-sequence.

        x_t, net_out, noise: [B, C, H, W]; t: one of `self.timesteps` (int, 0-d tensor or [B]
        holding one value); noise: the eps_t of eq. 12 (drawn here when None and eta > 0).
        """
        t = single_timestep(t)
        t_prev = self.previous_timestep(t)
        alpha_bar_t = extract(self.alphas_cumprod, t, x_t)
        alpha_bar_prev = extract(self.alphas_cumprod, t_prev, x_t) if t_prev >= 0 else torch.ones_like(alpha_bar_t)

        # "predicted x_0" and the noise it implies (eq. 12, first term; eq. 9 inverted)
        x0_pred = self.predict_x0(x_t, t, net_out, predictor)
        eps_pred = net_out if predictor == "noise" else (x_t - alpha_bar_t**0.5 * x0_pred) / (1 - alpha_bar_t) ** 0.5

        # sigma_t(eta) = eta sqrt((1 - alpha_bar_prev) / (1 - alpha_bar_t)) sqrt(1 - alpha_bar_t / alpha_bar_prev)  (eq. 16)
        variance = (1 - alpha_bar_prev) / (1 - alpha_bar_t) * (1 - alpha_bar_t / alpha_bar_prev)
        sigma_t = self.eta * variance**0.5

        # "direction pointing to x_t"  (eq. 12, second term)
        direction = (1 - alpha_bar_prev - sigma_t**2) ** 0.5 * eps_pred
        x_prev = alpha_bar_prev**0.5 * x0_pred + direction
        if self.eta > 0:
            if noise is None:
                noise = torch.randn_like(x_t)
            # random noise  (eq. 12, third term)
            x_prev = x_prev + sigma_t * noise
        return x_prev


def build_scheduler(config: dict, sample_method: str = "ddpm", ddim_steps: int = 50, eta: float = 0.0, *,
                    timestep_spacing: str = "leading") -> BaseScheduler:
    """A DDPM or DDIM sampler on the noise schedule described by `config` (a scheduler's .config)."""
    schedule = {key: config[key] for key in ("num_train_timesteps", "beta_1", "beta_T", "mode")}
    if sample_method == "ddpm":
        return DDPMScheduler(**schedule, sigma_type=config.get("sigma_type", "small"))
    if sample_method == "ddim":
        return DDIMScheduler(**schedule, num_inference_timesteps=ddim_steps, eta=eta,
                             timestep_spacing=timestep_spacing)
    raise ValueError(f"unknown sample method {sample_method!r}; choose ddpm or ddim")
