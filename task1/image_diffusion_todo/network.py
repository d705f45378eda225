"""The noise-prediction UNet (Ho et al. 2020), with an optional class embedding for
classifier-free guidance (Ho & Salimans 2022). Defaults are the course's hyperparameters."""
from typing import List, Optional

import torch
import torch.nn as nn
from module import DownSample, ResBlock, Swish, TimeEmbedding, UpSample, group_norm
from torch.nn import init


class UNet(nn.Module):
    """x_t: [B, 3, R, R], timestep: [B] or 0-d, class_label: [B] or None -> [B, 3, R, R].

    ch_mult gives the channel multiplier of each resolution level (each level but the last halves
    the resolution), attn the levels with self-attention. With use_cfg, class_label 0 is the null
    class and 1..num_classes the real ones; in training, labels are dropped to 0 with probability
    cfg_dropout.
    """

    def __init__(self, T: int = 1000, image_resolution: int = 64, ch: int = 128, ch_mult: List[int] = (1, 2, 2, 2),
                 attn: List[int] = (1,), num_res_blocks: int = 4, dropout: float = 0.1, use_cfg: bool = False,
                 cfg_dropout: float = 0.1, num_classes: Optional[int] = None):
        super().__init__()
        ch_mult, attn = list(ch_mult), list(attn)
        if any(i >= len(ch_mult) for i in attn):
            raise ValueError(f"attn levels {attn} out of range for {len(ch_mult)} levels")
        if image_resolution % 2 ** (len(ch_mult) - 1):
            raise ValueError(f"image_resolution {image_resolution} is not divisible by 2^{len(ch_mult) - 1}")
        if use_cfg and not num_classes:
            raise ValueError("use_cfg needs num_classes")
        # everything needed to rebuild this network (stored in checkpoints)
        self.config = dict(T=T, image_resolution=image_resolution, ch=ch, ch_mult=ch_mult, attn=attn,
                           num_res_blocks=num_res_blocks, dropout=dropout, use_cfg=use_cfg,
                           cfg_dropout=cfg_dropout, num_classes=num_classes)
        self.image_resolution = image_resolution
        self.use_cfg = use_cfg
        self.cfg_dropout = cfg_dropout

        tdim = ch * 4
        self.time_embedding = TimeEmbedding(tdim)
        if use_cfg:
            self.class_embedding = nn.Embedding(num_classes + 1, tdim)

        self.head = nn.Conv2d(3, ch, kernel_size=3, stride=1, padding=1)
        self.downblocks = nn.ModuleList()
        skip_chs = [ch]  # channels of every skip connection, consumed in reverse by the up path
        now_ch = ch
        for level, mult in enumerate(ch_mult):
            out_ch = ch * mult
            for _ in range(num_res_blocks):
                self.downblocks.append(ResBlock(now_ch, out_ch, tdim, dropout, attn=level in attn))
                now_ch = out_ch
                skip_chs.append(now_ch)
            if level != len(ch_mult) - 1:
                self.downblocks.append(DownSample(now_ch))
                skip_chs.append(now_ch)

        self.middleblocks = nn.ModuleList([
            ResBlock(now_ch, now_ch, tdim, dropout, attn=True),
            ResBlock(now_ch, now_ch, tdim, dropout, attn=False),
        ])

        self.upblocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(ch_mult))):
            out_ch = ch * mult
            for _ in range(num_res_blocks + 1):
                self.upblocks.append(ResBlock(skip_chs.pop() + now_ch, out_ch, tdim, dropout, attn=level in attn))
                now_ch = out_ch
            if level != 0:
                self.upblocks.append(UpSample(now_ch))

        self.tail = nn.Sequential(
            group_norm(now_ch),
            Swish(),
            nn.Conv2d(now_ch, 3, 3, stride=1, padding=1),
        )
        init.xavier_uniform_(self.head.weight)
        init.zeros_(self.head.bias)
        init.xavier_uniform_(self.tail[-1].weight, gain=1e-5)
        init.zeros_(self.tail[-1].bias)

    def forward(self, x, timestep, class_label=None):
        timestep = torch.as_tensor(timestep, device=x.device)
        temb = self.time_embedding(timestep.expand(x.shape[0]) if timestep.ndim == 0 else timestep)

        if self.use_cfg and class_label is not None:
            if self.training:
                if torch.any(class_label == 0):
                    raise ValueError("class label 0 is the null class; training labels must be >= 1")
                # drop the condition with probability cfg_dropout, so one network learns both
                # p(x | class) and p(x)  (Ho & Salimans 2022, Algorithm 1)
                drop = torch.rand(class_label.shape, device=class_label.device) < self.cfg_dropout
                class_label = torch.where(drop, torch.zeros_like(class_label), class_label)
            temb = temb + self.class_embedding(class_label)

        h = self.head(x)
        skips = [h]
        for layer in self.downblocks:
            h = layer(h, temb)
            skips.append(h)
        for layer in self.middleblocks:
            h = layer(h, temb)
        for layer in self.upblocks:
            if isinstance(layer, ResBlock):
                h = torch.cat([h, skips.pop()], dim=1)
            h = layer(h, temb)
        return self.tail(h)
