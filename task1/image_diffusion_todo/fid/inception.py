"""Inception-v3, laid out the way the course's FID classifier is (block1..block4 + final_fc).

The course measures FID with an Inception-v3 that it trained from scratch as a 3-class
classifier on AFHQ (cat, dog, wild) and saved as ``afhq_inception_v3.ckpt``, a plain
``state_dict``. This file rebuilds that network so the checkpoint loads with ``strict=True``:
the layers are torchvision's Inception-v3 (Szegedy et al., "Rethinking the Inception
Architecture for Computer Vision", 2016) without the auxiliary head, grouped as

    block1  Conv2d_1a..2b + max-pool       [B, 3, H, W]    -> [B, 64, ~H/4, ~W/4]
    block2  Conv2d_3b..4a + max-pool                       -> [B, 192, ~H/8, ~W/8]
    block3  Mixed_5b..5d (A), 6a (B), 6b..6e (C)           -> [B, 768, ~H/16, ~W/16]
    block4  Mixed_7a (D), 7b..7c (E) + global average pool -> [B, 2048]
    final_fc  2048 -> num_classes (3 for AFHQ)

FID uses the 2048-d pooled output of block4 (``features``); ``final_fc`` is only used to
train the network as a classifier (``experiments/train_classifier.py``).

Inputs are RGB in [-1, 1] (``measure_fid.image_transform``). The strided convolutions and
poolings need at least ``MIN_INPUT_SIZE`` = 75 pixels a side: at 64x64 Mixed_7a's 3x3 stride-2
convolution would see a 2x2 map and fail, which is why the course resizes to 256.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

MIN_INPUT_SIZE = 75
FEATURE_DIM = 2048


class BasicConv2d(nn.Module):
    """Convolution (no bias) -> batch norm -> ReLU, the unit every Inception branch is made of."""

    def __init__(self, in_channels, out_channels, **conv_kwargs):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **conv_kwargs)
        # eps = 1e-3 as in the TensorFlow original and torchvision; the checkpoint's running
        # statistics were accumulated with it.
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def avg_pool_3x3(x):
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1)


def max_pool_3x3_stride_2(x):
    return F.max_pool2d(x, kernel_size=3, stride=2)


class InceptionA(nn.Module):
    """Mixed_5b..5d: 1x1 | 5x5 | double 3x3 | pool, at constant resolution."""

    def __init__(self, in_channels, pool_features):
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(in_channels, pool_features, kernel_size=1)

    def forward(self, x):
        branch1x1 = self.branch1x1(x)
        branch5x5 = self.branch5x5_2(self.branch5x5_1(x))
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        branch_pool = self.branch_pool(avg_pool_3x3(x))
        return torch.cat([branch1x1, branch5x5, branch3x3dbl, branch_pool], dim=1)


class InceptionB(nn.Module):
    """Mixed_6a: grid reduction (stride 2), 288 -> 768 channels."""

    def __init__(self, in_channels):
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x):
        branch3x3 = self.branch3x3(x)
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([branch3x3, branch3x3dbl, max_pool_3x3_stride_2(x)], dim=1)


class InceptionC(nn.Module):
    """Mixed_6b..6e: 7x7 convolutions factorised into 1x7 and 7x1."""

    def __init__(self, in_channels, channels_7x7):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x):
        branch1x1 = self.branch1x1(x)
        branch7x7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        branch7x7dbl = x
        for conv in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3,
                     self.branch7x7dbl_4, self.branch7x7dbl_5):
            branch7x7dbl = conv(branch7x7dbl)
        branch_pool = self.branch_pool(avg_pool_3x3(x))
        return torch.cat([branch1x1, branch7x7, branch7x7dbl, branch_pool], dim=1)


class InceptionD(nn.Module):
    """Mixed_7a: grid reduction (stride 2), 768 -> 1280 channels."""

    def __init__(self, in_channels):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x):
        branch3x3 = self.branch3x3_2(self.branch3x3_1(x))
        branch7x7x3 = x
        for conv in (self.branch7x7x3_1, self.branch7x7x3_2, self.branch7x7x3_3,
                     self.branch7x7x3_4):
            branch7x7x3 = conv(branch7x7x3)
        return torch.cat([branch3x3, branch7x7x3, max_pool_3x3_stride_2(x)], dim=1)


class InceptionE(nn.Module):
    """Mixed_7b..7c: 3x3 convolutions split into parallel 1x3 and 3x1, -> 2048 channels."""

    def __init__(self, in_channels):
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x):
        branch1x1 = self.branch1x1(x)
        branch3x3 = self.branch3x3_1(x)
        branch3x3 = torch.cat([self.branch3x3_2a(branch3x3), self.branch3x3_2b(branch3x3)], dim=1)
        branch3x3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        branch3x3dbl = torch.cat(
            [self.branch3x3dbl_3a(branch3x3dbl), self.branch3x3dbl_3b(branch3x3dbl)], dim=1
        )
        branch_pool = self.branch_pool(avg_pool_3x3(x))
        return torch.cat([branch1x1, branch3x3, branch3x3dbl, branch_pool], dim=1)


class InceptionV3(nn.Module):
    """The course's FID network. ``for_train=True``: ``forward`` returns class logits
    [B, num_classes] (training as a classifier); ``False``: the 2048-d features [B, 2048]."""

    def __init__(self, for_train=False, num_classes=3):
        super().__init__()
        self.for_train = for_train
        self.block1 = nn.Sequential(
            BasicConv2d(3, 32, kernel_size=3, stride=2),
            BasicConv2d(32, 32, kernel_size=3),
            BasicConv2d(32, 64, kernel_size=3, padding=1),
            nn.MaxPool2d(kernel_size=3, stride=2),
        )
        self.block2 = nn.Sequential(
            BasicConv2d(64, 80, kernel_size=1),
            BasicConv2d(80, 192, kernel_size=3),
            nn.MaxPool2d(kernel_size=3, stride=2),
        )
        self.block3 = nn.Sequential(
            InceptionA(192, pool_features=32),
            InceptionA(256, pool_features=64),
            InceptionA(288, pool_features=64),
            InceptionB(288),
            InceptionC(768, channels_7x7=128),
            InceptionC(768, channels_7x7=160),
            InceptionC(768, channels_7x7=160),
            InceptionC(768, channels_7x7=192),
        )
        self.block4 = nn.Sequential(
            InceptionD(768),
            InceptionE(1280),
            InceptionE(2048),
            nn.AdaptiveAvgPool2d(output_size=(1, 1)),
        )
        self.final_fc = nn.Linear(FEATURE_DIM, num_classes)
        self._init_weights()

    def _init_weights(self):
        # torchvision's initialisation for Inception-v3 trained from scratch, which is how
        # the course trained its classifier.
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.trunc_normal_(module.weight, mean=0.0, std=0.1, a=-2, b=2)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def features(self, x):
        """x: [B, 3, H, W] in [-1, 1], H, W >= 75 -> pooled features [B, 2048]."""
        for block in (self.block1, self.block2, self.block3, self.block4):
            x = block(x)
        return torch.flatten(x, 1)

    def forward(self, x):
        features = self.features(x)
        return self.final_fc(features) if self.for_train else features
