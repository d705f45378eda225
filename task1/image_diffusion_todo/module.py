"""Building blocks of the UNet in network.py (the DDPM UNet of Ho et al. 2020, as in the course).

Parameter names match the course's module.py, so checkpoints trained with either load in both.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn import init


# The course normalises with GroupNorm(32, C). The time embedding enters every ResBlock as a
# per-channel bias added just before block2's GroupNorm, and a group of ONE channel subtracts
# that bias with its own mean: with C = 32 the network cannot see t at all. Groups of at least
# two channels keep the differences between their channels' biases.
COURSE_NUM_GROUPS = 32
MIN_CHANNELS_PER_GROUP = 2


def num_groups(channels: int) -> int:
    """GroupNorm's group count for `channels`: the course's 32 where every group then holds at
    least MIN_CHANNELS_PER_GROUP channels (every C = 32k, k >= 2: the course UNet is unchanged),
    else the largest count below 32 that divides C and leaves each group 2 or more channels
    (C = 32: 16 groups of 2; C = 48: 24 of 2). Raises ValueError for C < 2, which no grouping
    can make see the time embedding.
    """
    for groups in range(min(COURSE_NUM_GROUPS, channels // MIN_CHANNELS_PER_GROUP), 0, -1):
        if channels % groups == 0:
            return groups
    raise ValueError(f"GroupNorm over {channels} channel(s): a group needs at least "
                     f"{MIN_CHANNELS_PER_GROUP} channels, or it normalises the time embedding away")


def group_norm(channels: int) -> nn.GroupNorm:
    """nn.GroupNorm(num_groups(channels), channels). Its weight and bias are [channels] for any
    group count, so a state_dict saved with another grouping loads without complaint."""
    return nn.GroupNorm(num_groups(channels), channels)


class Swish(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(x)


class TimeEmbedding(nn.Module):
    """t -> sinusoidal features of size `frequency_embedding_size` -> 2-layer MLP: [B] -> [B, hidden_size]."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )

    @staticmethod
    def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        """[cos(t w_i), sin(t w_i)] with w_i = max_period^(-i / (dim/2)), i < dim/2: [B] -> [B, dim]."""
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t.float()[:, None] * freqs[None]
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            embedding = F.pad(embedding, (0, 1))
        return embedding

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.timestep_embedding(t.reshape(-1), self.frequency_embedding_size))


class DownSample(nn.Module):
    """Stride-2 3x3 convolution: [B, C, H, W] -> [B, C, H/2, W/2]."""

    def __init__(self, in_ch: int):
        super().__init__()
        self.main = nn.Conv2d(in_ch, in_ch, 3, stride=2, padding=1)
        init.xavier_uniform_(self.main.weight)
        init.zeros_(self.main.bias)

    def forward(self, x, temb):
        return self.main(x)


class UpSample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 convolution: [B, C, H, W] -> [B, C, 2H, 2W]."""

    def __init__(self, in_ch: int):
        super().__init__()
        self.main = nn.Conv2d(in_ch, in_ch, 3, stride=1, padding=1)
        init.xavier_uniform_(self.main.weight)
        init.zeros_(self.main.bias)

    def forward(self, x, temb):
        return self.main(F.interpolate(x, scale_factor=2, mode="nearest"))


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions, with a residual connection."""

    def __init__(self, in_ch: int):
        super().__init__()
        self.group_norm = group_norm(in_ch)
        self.proj_q = nn.Conv2d(in_ch, in_ch, 1)
        self.proj_k = nn.Conv2d(in_ch, in_ch, 1)
        self.proj_v = nn.Conv2d(in_ch, in_ch, 1)
        self.proj = nn.Conv2d(in_ch, in_ch, 1)
        for conv in (self.proj_q, self.proj_k, self.proj_v, self.proj):
            init.xavier_uniform_(conv.weight)
            init.zeros_(conv.bias)
        # start close to the identity map
        init.xavier_uniform_(self.proj.weight, gain=1e-5)

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.group_norm(x)
        # [B, C, H, W] -> [B, H*W, C]
        q, k, v = (proj(h).flatten(2).transpose(1, 2) for proj in (self.proj_q, self.proj_k, self.proj_v))
        h = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(C)) v
        h = h.transpose(1, 2).reshape(B, C, H, W)
        return x + self.proj(h)


class ResBlock(nn.Module):
    """GroupNorm-Swish-Conv, + time embedding, GroupNorm-Swish-Dropout-Conv, + shortcut, [+ attention].

    x: [B, in_ch, H, W], temb: [B, tdim] -> [B, out_ch, H, W].
    """

    def __init__(self, in_ch: int, out_ch: int, tdim: int, dropout: float, attn: bool = False):
        super().__init__()
        self.block1 = nn.Sequential(
            group_norm(in_ch),
            Swish(),
            nn.Conv2d(in_ch, out_ch, 3, stride=1, padding=1),
        )
        self.temb_proj = nn.Sequential(
            Swish(),
            nn.Linear(tdim, out_ch),
        )
        self.block2 = nn.Sequential(
            group_norm(out_ch),
            Swish(),
            nn.Dropout(dropout),
            nn.Conv2d(out_ch, out_ch, 3, stride=1, padding=1),
        )
        self.shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()
        self.attn = AttnBlock(out_ch) if attn else nn.Identity()
        self.initialize()

    def initialize(self):
        for module in (self.block1[-1], self.temb_proj[-1], self.block2[-1], self.shortcut):
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                init.xavier_uniform_(module.weight)
                init.zeros_(module.bias)
        # the residual branch starts near zero, so each block starts near the identity
        init.xavier_uniform_(self.block2[-1].weight, gain=1e-5)

    def forward(self, x, temb):
        h = self.block1(x)
        h = h + self.temb_proj(temb)[:, :, None, None]
        h = self.block2(h)
        h = h + self.shortcut(x)
        return self.attn(h)
