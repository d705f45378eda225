"""Noise-prediction network for 2D points: an MLP whose layers are modulated by the timestep."""
import math
from typing import List

import torch
import torch.nn as nn
import torch.nn.functional as F


class TimeEmbedding(nn.Module):
    """Sinusoidal embedding of the timestep followed by a two-layer MLP (as in DiT/GLIDE)."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t: torch.Tensor, dim: int, max_period: int = 10000) -> torch.Tensor:
        """t: [B] (may be fractional) -> [B, dim]: cos/sin at frequencies from 1 to 1/max_period."""
        half = dim // 2
        freqs = torch.exp(
            -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
        )
        args = t[:, None].float() * freqs[None]
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
        return embedding

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        if t.ndim == 0:
            t = t.unsqueeze(-1)
        return self.mlp(self.timestep_embedding(t, self.frequency_embedding_size))


class TimeLinear(nn.Module):
    """A linear layer whose output is scaled feature-wise by a learned function of t."""

    def __init__(self, dim_in: int, dim_out: int, num_timesteps: int):
        super().__init__()
        self.dim_in = dim_in
        self.dim_out = dim_out
        self.num_timesteps = num_timesteps

        self.time_embedding = TimeEmbedding(dim_out)
        self.fc = nn.Linear(dim_in, dim_out)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x: [B, dim_in], t: [B] or [] -> [B, dim_out]."""
        x = self.fc(x)
        alpha = self.time_embedding(t).view(-1, self.dim_out)
        return alpha * x


class SimpleNet(nn.Module):
    def __init__(self, dim_in: int, dim_out: int, dim_hids: List[int], num_timesteps: int):
        """epsilon_theta(x_t, t): TimeLinear layers dim_in -> dim_hids... -> dim_out, SiLU between.

        Args:
            dim_in: dimension of input
            dim_out: dimension of output
            dim_hids: dimensions of hidden features
            num_timesteps: number of timesteps
        """
        super().__init__()
        # Kept so that a checkpoint can rebuild the network without pickling it.
        self.config = dict(dim_in=dim_in, dim_out=dim_out, dim_hids=list(dim_hids), num_timesteps=num_timesteps)
        dims = [dim_in, *dim_hids, dim_out]
        self.layers = nn.ModuleList(
            TimeLinear(d_in, d_out, num_timesteps) for d_in, d_out in zip(dims[:-1], dims[1:])
        )

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Predict the noise in x_t.

        Args:
            x: the noisy data after t steps of forward diffusion, [B, dim_in]
            t: the timestep, [B] or a scalar tensor
        Returns:
            the predicted noise, [B, dim_out]
        """
        for layer in self.layers[:-1]:
            x = F.silu(layer(x, t))
        return self.layers[-1](x, t)
