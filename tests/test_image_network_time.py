"""Every UNet the Task 1-2 scripts can build sees the timestep (module.num_groups).

The time embedding enters each ResBlock as a per-channel bias just before block2's GroupNorm. A
group of one channel subtracts that bias with its own mean, so a network whose groups hold one
channel cannot depend on t whatever its weights: the course's GroupNorm(32, C) with C = 32 did
exactly that. The fixtures re-initialise every layer with PyTorch's defaults, so the near-zero
initial gains of the residual branches cannot hide a dependence (or its absence).
"""
import itertools
import sys

import pytest
import torch

from conftest import TASK1_IMAGE, load_module

image_experiment = load_module(TASK1_IMAGE, "experiments.image_experiment")
network = load_module(TASK1_IMAGE, "network")
module = sys.modules["module"]  # the module.py network.py uses (load_module reloads course modules)


def generic_weights(unet):
    """Every layer re-drawn with PyTorch's default initialisation; eval mode (no dropout)."""
    torch.manual_seed(0)
    for layer in unet.modules():
        if layer is not unet and hasattr(layer, "reset_parameters"):
            layer.reset_parameters()
    return unet.eval()


def time_sensitivity(unet, resolution=8):
    """max |out(t=900) - out(t=10)| / max |out(t=10)| on one input [1, 3, resolution, resolution]."""
    x = torch.randn(1, 3, resolution, resolution, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        early, late = unet(x, torch.tensor([10])), unet(x, torch.tensor([900]))
    return ((late - early).abs().max() / early.abs().max()).item()


def unet_from_train_flags(flags):
    """The UNet train.py builds from these flags (its build_model's arguments)."""
    return network.UNet(T=1000, image_resolution=8, ch=flags["ch"],
                        ch_mult=flags["ch_mult"], attn=flags["attn"],
                        num_res_blocks=flags["num_res_blocks"], dropout=flags["dropout"])


def test_num_groups_is_the_documented_rule():
    """Brute force: the most groups <= 32 that divide C and leave every group >= 2 channels."""
    for channels in range(2, 1100):
        expected = max(g for g in range(1, 33) if channels % g == 0 and channels // g >= 2)
        assert module.num_groups(channels) == expected, channels
    assert [module.num_groups(c) for c in (32, 48, 64, 96, 128, 256, 384)] == [16, 24, 32, 32, 32, 32, 32]
    with pytest.raises(ValueError, match="at least 2 channels"):
        module.num_groups(1)


@pytest.fixture(scope="module")
def course_unet():
    """The course's defaults (ch 128, ch_mult 1 2 2 2, attention at level 1), 58.8M parameters,
    built without its initialisation (generic_weights draws them once)."""
    with torch.device("meta"):
        unet = network.UNet()
    return generic_weights(unet.to_empty(device="cpu"))


def test_course_unet_keeps_the_course_groups(course_unet):
    norms = [m for m in course_unet.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert len(norms) > 40 and all(norm.num_groups == 32 for norm in norms)


# train.py accepts --ch in multiples of 32 and any --ch_mult / --num_res_blocks / --attn; the
# stand-in experiment's configs; the course's default (at 8x8 to keep it cheap).
TRAIN_FLAG_CONFIGS = [
    dict(ch=ch, ch_mult=ch_mult, attn=attn, num_res_blocks=blocks, dropout=0.0)
    for ch, (ch_mult, attn, blocks) in itertools.product(
        (32, 64), (([1, 1], [], 1), ([1, 2], [1], 2), ([2, 1, 1], [0], 1)))
]
STANDIN_CONFIGS = [image_experiment.FULL["unet"], image_experiment.QUICK["unet"]]


@pytest.mark.parametrize("flags", TRAIN_FLAG_CONFIGS + STANDIN_CONFIGS,
                         ids=lambda f: f"ch{f['ch']}-mult{''.join(map(str, f['ch_mult']))}"
                                       f"-attn{''.join(map(str, f['attn']))}-blocks{f['num_res_blocks']}")
def test_every_unet_the_scripts_build_depends_on_t(flags):
    unet = generic_weights(unet_from_train_flags(flags))
    for block in unet.modules():
        if isinstance(block, module.ResBlock):
            norm = block.block2[0]
            assert norm.num_channels // norm.num_groups >= 2
    assert time_sensitivity(unet) > 1e-2


def test_the_course_unet_depends_on_t(course_unet):
    assert time_sensitivity(course_unet) > 1e-2


def test_one_channel_per_group_was_blind_and_old_checkpoints_load_silently(monkeypatch):
    """The old rule, GroupNorm(32, C) everywhere, at ch = 32: the output does not move with t
    (what this file's tests would catch). Its state_dict has the same keys and shapes as the new
    network's, so an old ch = 32 checkpoint loads without complaint into a network that now
    computes something else."""
    flags = dict(ch=32, ch_mult=[1, 1], attn=[], num_res_blocks=1, dropout=0.0)  # the old demo's
    with monkeypatch.context() as patch:
        patch.setattr(module, "num_groups", lambda channels: 32)
        old = generic_weights(unet_from_train_flags(flags))
    assert time_sensitivity(old) < 1e-5

    new = unet_from_train_flags(flags).eval()
    new.load_state_dict(old.state_dict(), strict=True)
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        assert not torch.allclose(new(x, torch.tensor([10])), old(x, torch.tensor([10])), atol=1e-3)
