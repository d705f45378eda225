"""DDPM (Ho et al. 2020) and DDIM (Song et al. 2021) for low-dimensional data.

Notation follows the papers: alpha_t = 1 - beta_t, alpha_bar_t = prod_{s<=t} alpha_s. Timesteps
are 0-indexed, t in {0, ..., T-1}; alpha_bar before the first step is 1.
"""
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from atomic_write import atomic_write
from network import SimpleNet


def default(value, fallback):
    """value unless it is None; else fallback (called if callable)."""
    if value is not None:
        return value
    return fallback() if callable(fallback) else fallback


def extract(input: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """input[t] reshaped to broadcast against x.

    input: [T], t: [B] or a scalar (int or tensor), x: [B, ...] -> [B, 1, ..., 1]
    """
    t = torch.as_tensor(t, device=input.device).long()
    if t.ndim == 0:
        t = t.unsqueeze(0)
    out = input.gather(0, t)
    return out.reshape(t.shape[0], *([1] * (x.ndim - 1)))


TIMESTEP_SPACINGS = ("leading", "linspace", "trailing", "quadratic")


def ddim_timesteps(num_train_timesteps: int, num_inference_timesteps: int, timestep_spacing: str = "leading"):
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
    The same rule, written the same way, as image_diffusion_todo/scheduler.py's ddim_sub_sequence
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


def check_eta(eta: float) -> None:
    """DDIM's eta interpolates between the deterministic sampler (0) and DDPM's posterior variance
    (1); above 1, 1 - alpha_bar_prev - sigma^2 can turn negative and the step would be NaN."""
    if not 0 <= eta <= 1:
        raise ValueError(f"eta must be in [0, 1], got {eta}")


class BaseScheduler(nn.Module):
    """Variance schedule of DDPM: beta_t, alpha_t and alpha_bar_t for t = 0..T-1."""

    def __init__(self, num_train_timesteps: int, beta_1: float = 1e-4, beta_T: float = 0.02, mode: str = "linear"):
        super().__init__()
        self.config = dict(num_train_timesteps=num_train_timesteps, beta_1=beta_1, beta_T=beta_T, mode=mode)
        self.num_train_timesteps = num_train_timesteps
        self.timesteps = torch.from_numpy(np.arange(0, num_train_timesteps)[::-1].copy().astype(np.int64))

        if mode == "linear":
            betas = torch.linspace(beta_1, beta_T, steps=num_train_timesteps)
        elif mode == "quad":
            betas = torch.linspace(beta_1**0.5, beta_T**0.5, num_train_timesteps) ** 2
        else:
            raise NotImplementedError(f"{mode} is not implemented.")

        alphas = 1 - betas
        alphas_cumprod = torch.cumprod(alphas, dim=0)
        # alpha_bar_{t-1}, with alpha_bar_{-1} = 1 (no noise before the first step).
        alphas_cumprod_prev = torch.cat([torch.ones(1), alphas_cumprod[:-1]])

        self.register_buffer("betas", betas)
        self.register_buffer("alphas", alphas)
        self.register_buffer("alphas_cumprod", alphas_cumprod)
        self.register_buffer("alphas_cumprod_prev", alphas_cumprod_prev)


class DiffusionModule(nn.Module):
    """A high-level wrapper of DDPM and DDIM.

    DDPM samples with p_sample / p_sample_loop; DDIM with ddim_p_sample / ddim_p_sample_loop.
    Every sampler takes an optional `noise` so that two samplers can be compared on the same draws.
    """

    def __init__(self, network: nn.Module, var_scheduler: BaseScheduler):
        super().__init__()
        self.network = network
        self.var_scheduler = var_scheduler

    @property
    def device(self):
        return next(self.network.parameters()).device

    @property
    def image_resolution(self):
        return getattr(self.network, "image_resolution", None)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Sample x_t ~ q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I)  (DDPM Eq. 4).

        x0: [B, D], t: [B] -> x_t: [B, D]
        """
        noise = default(noise, lambda: torch.randn_like(x0))
        alpha_bar_t = extract(self.var_scheduler.alphas_cumprod, t, x0)
        return alpha_bar_t.sqrt() * x0 + (1 - alpha_bar_t).sqrt() * noise

    @torch.no_grad()
    def p_sample(self, xt: torch.Tensor, t, *, noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        """One DDPM step x_t -> x_{t-1} (DDPM Algorithm 2, line 4).

        The variance is the posterior's, sigma_t^2 = beta_tilde_t = (1 - alpha_bar_{t-1}) /
        (1 - alpha_bar_t) * beta_t (DDPM Eq. 7): it is zero at t = 0, so the last step adds no noise.

        xt: [B, D], t: int or scalar tensor, noise: [B, D] or None -> x_{t-1}: [B, D]
        """
        t = torch.as_tensor(t, device=xt.device).long()
        scheduler = self.var_scheduler
        beta_t = extract(scheduler.betas, t, xt)
        alpha_t = extract(scheduler.alphas, t, xt)
        alpha_bar_t = extract(scheduler.alphas_cumprod, t, xt)
        alpha_bar_prev = extract(scheduler.alphas_cumprod_prev, t, xt)

        eps_theta = self.network(xt, t)
        # mu_theta(x_t, t) = (x_t - beta_t / sqrt(1 - alpha_bar_t) * eps_theta) / sqrt(alpha_t)  (Eq. 11)
        mean = (xt - beta_t / (1 - alpha_bar_t).sqrt() * eps_theta) / alpha_t.sqrt()
        variance = (1 - alpha_bar_prev) / (1 - alpha_bar_t) * beta_t
        noise = default(noise, lambda: torch.randn_like(xt))
        return mean + variance.sqrt() * noise

    @torch.no_grad()
    def p_sample_loop(self, shape) -> torch.Tensor:
        """DDPM Algorithm 2: x_T ~ N(0, I), then T steps of p_sample.

        shape: e.g. (num_points, 2) -> x_0: shape
        """
        xt = torch.randn(shape, device=self.device)
        for t in self.var_scheduler.timesteps:
            xt = self.p_sample(xt, t)
        return xt

    @torch.no_grad()
    def ddim_p_sample(self, xt: torch.Tensor, t, t_prev, eta: float = 0.0, *,
                      noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        """One DDIM step x_{tau_i} -> x_{tau_{i-1}} (DDIM Eq. 12).

        xt: [B, D]; t = tau_i and t_prev = tau_{i-1} (t_prev < 0 means the step to x_0); eta in
        [0, 1] scales the noise: 0 is the deterministic DDIM, 1 the DDPM posterior variance.
        noise: [B, D] or None; drawn only when eta > 0.
        """
        check_eta(eta)
        t = torch.as_tensor(t, device=xt.device).long()
        t_prev = torch.as_tensor(t_prev, device=xt.device).long()
        alpha_bar_t = extract(self.var_scheduler.alphas_cumprod, t, xt)
        alpha_bar_prev = (
            extract(self.var_scheduler.alphas_cumprod, t_prev, xt) if t_prev >= 0 else torch.ones_like(alpha_bar_t)
        )

        eps_theta = self.network(xt, t)
        # "predicted x_0" (Eq. 12, first term; also Eq. 9)
        x0_pred = (xt - (1 - alpha_bar_t).sqrt() * eps_theta) / alpha_bar_t.sqrt()
        # sigma_t(eta) (Eq. 16)
        sigma_t = eta * ((1 - alpha_bar_prev) / (1 - alpha_bar_t) * (1 - alpha_bar_t / alpha_bar_prev)).sqrt()
        # "direction pointing to x_t" (Eq. 12, second term)
        direction_to_xt = (1 - alpha_bar_prev - sigma_t**2).sqrt() * eps_theta
        x_t_prev = alpha_bar_prev.sqrt() * x0_pred + direction_to_xt
        if eta > 0:
            x_t_prev = x_t_prev + sigma_t * default(noise, lambda: torch.randn_like(xt))
        return x_t_prev

    @torch.no_grad()
    def ddim_p_sample_loop(self, shape, num_inference_timesteps: int = 50, eta: float = 0.0, *,
                           timestep_spacing: str = "leading") -> torch.Tensor:
        """The DDIM reverse process over the sub-sequence tau of num_inference_timesteps steps.

        shape: e.g. (num_points, 2); eta in [0, 1]: the stochasticity (0 = deterministic);
        timestep_spacing: how tau is chosen, one of TIMESTEP_SPACINGS (see ddim_timesteps;
        "leading" is the course's) -> x_0: shape
        """
        check_eta(eta)
        timesteps, prev_timesteps = ddim_timesteps(
            self.var_scheduler.num_train_timesteps, num_inference_timesteps, timestep_spacing
        )
        check_denoises(timesteps, timestep_spacing)
        xt = torch.randn(shape, device=self.device)
        for t, t_prev in zip(timesteps, prev_timesteps):
            xt = self.ddim_p_sample(xt, t, t_prev, eta)
        return xt

    def compute_loss(self, x0: torch.Tensor) -> torch.Tensor:
        """The simplified noise-matching loss ||eps - eps_theta(x_t, t)||^2 (DDPM Eq. 14).

        x0: [B, D] -> scalar; t ~ Uniform{0, ..., T-1}.
        """
        batch_size = x0.shape[0]
        t = torch.randint(0, self.var_scheduler.num_train_timesteps, size=(batch_size,), device=x0.device)
        noise = torch.randn_like(x0)
        xt = self.q_sample(x0, t, noise)
        return F.mse_loss(self.network(xt, t), noise)

    def save(self, file_path: str) -> None:
        """Write {"config", "state_dict"} (plain data and tensors: loads with weights_only=True), atomically."""
        config = {"network": self.network.config, "var_scheduler": self.var_scheduler.config}
        checkpoint = {"config": config, "state_dict": self.state_dict()}
        atomic_write(file_path, lambda f: torch.save(checkpoint, f))

    def load(self, file_path: str) -> None:
        """Rebuild the network and the schedule from a checkpoint written by save, and load its weights."""
        checkpoint = torch.load(file_path, map_location="cpu", weights_only=True)
        config = checkpoint["config"]
        self.network = SimpleNet(**config["network"])
        self.var_scheduler = BaseScheduler(**config["var_scheduler"])
        self.load_state_dict(checkpoint["state_dict"])
