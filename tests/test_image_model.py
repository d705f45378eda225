"""Task 1-2 DiffusionModule, UNet and checkpoints, on tiny UNets (CPU)."""
import os
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import TASK1_IMAGE, load_module

model_mod = load_module(TASK1_IMAGE, "model")
# the modules model.py itself imported (loading them again would make classes that differ from its own)
network, scheduler = sys.modules["network"], sys.modules["scheduler"]

T = 20
RES = 16


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def tiny_unet(use_cfg=False, dropout=0.0):
    return network.UNet(T=T, image_resolution=RES, ch=32, ch_mult=[1, 2], attn=[1], num_res_blocks=1,
                        dropout=dropout, use_cfg=use_cfg, cfg_dropout=0.1, num_classes=3 if use_cfg else None)


def tiny_module(predictor="noise", use_cfg=False, mode="linear"):
    torch.manual_seed(0)
    return model_mod.DiffusionModule(tiny_unet(use_cfg), scheduler.DDPMScheduler(T, 1e-4, 0.2, mode),
                                     predictor=predictor)


def test_course_unet_shapes_and_size():
    unet = network.UNet()  # the course's defaults
    assert unet.config["ch"] == 128 and unet.config["num_res_blocks"] == 4 and unet.config["ch_mult"] == [1, 2, 2, 2]
    # the same architecture written out by hand: head, 4 levels x 4 res blocks (+3 down samplers),
    # 2 middle blocks, 4 levels x 5 res blocks (+3 up samplers), tail; 58.75M parameters
    assert sum(p.numel() for p in unet.parameters()) == 58_753_283
    x = torch.randn(1, 3, 32, 32)
    unet32 = network.UNet(image_resolution=32, ch=32, ch_mult=[1, 2, 2], num_res_blocks=1)
    assert unet32(x, torch.tensor([5])).shape == x.shape


@pytest.mark.parametrize("predictor", ["noise", "x0", "mean"])
def test_get_loss_targets(predictor):
    """get_loss = MSE(network(x_t, t), target) with the target of each predictor, recomputed here."""
    ddpm = tiny_module(predictor)
    ddpm.eval()
    x0 = torch.rand(4, 3, RES, RES) * 2 - 1
    noise = torch.randn_like(x0)
    torch.manual_seed(1)
    loss = ddpm.get_loss(x0, noise=noise)
    torch.manual_seed(1)
    t = torch.randint(0, T, (4,))
    ab = ddpm.var_scheduler.alphas_cumprod[t].view(-1, 1, 1, 1).double()
    ab_prev = torch.where(t > 0, ddpm.var_scheduler.alphas_cumprod[(t - 1).clamp(min=0)], torch.ones(())).view(-1, 1, 1, 1).double()
    x_t = (ab.sqrt() * x0 + (1 - ab).sqrt() * noise).float()
    beta = 1 - ab / ab_prev
    target = {
        "noise": noise,
        "x0": x0,
        # DDPM eq. 7
        "mean": (ab_prev.sqrt() * beta / (1 - ab) * x0 + (1 - beta).sqrt() * (1 - ab_prev) / (1 - ab) * x_t).float(),
    }[predictor]
    with torch.no_grad():
        expected = F.mse_loss(ddpm.network(x_t, t), target)
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-6)
    # get_loss dispatches to the course's get_loss_<predictor>
    torch.manual_seed(1)
    torch.testing.assert_close(getattr(ddpm, f"get_loss_{predictor}")(x0, noise=noise), loss, rtol=0, atol=0)


@pytest.mark.parametrize("predictor", ["noise", "x0", "mean"])
def test_get_loss_decreases(predictor):
    ddpm = tiny_module(predictor)
    torch.manual_seed(0)
    data = (torch.rand(8, 3, RES, RES) > 0.5).float() * 1.6 - 0.8  # a fixed small batch of "images"
    optimizer = torch.optim.Adam(ddpm.network.parameters(), lr=2e-3)

    def eval_loss():
        torch.manual_seed(123)  # the same t and noise every time
        with torch.no_grad():
            return sum(ddpm.get_loss(data).item() for _ in range(4)) / 4

    before = eval_loss()
    for _ in range(40):
        loss = ddpm.get_loss(data)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = eval_loss()
    assert after < 0.7 * before, (before, after)


def test_checkpoint_round_trip(tmp_path):
    ddpm = tiny_module("x0", use_cfg=True, mode="cosine")
    path = tmp_path / "last.ckpt"
    ddpm.save(path, extra={"train_state": {"step": 7, "losses": torch.arange(3.0)}})
    raw = torch.load(path, weights_only=True)  # config + tensors only: no pickled classes
    assert set(raw) == {"config", "state_dict", "train_state"}
    assert raw["config"]["scheduler"] == {"num_train_timesteps": T, "beta_1": 1e-4, "beta_T": 0.2,
                                          "mode": "cosine", "sigma_type": "small"}
    assert raw["config"]["predictor"] == "x0"

    loaded = model_mod.DiffusionModule(None, None)
    loaded.load(path)
    assert loaded.predictor == "x0" and loaded.network.use_cfg
    assert isinstance(loaded.var_scheduler, scheduler.DDPMScheduler)
    torch.testing.assert_close(loaded.var_scheduler.betas, ddpm.var_scheduler.betas, rtol=0, atol=0)
    for (name, a), (_, b) in zip(ddpm.network.state_dict().items(), loaded.network.state_dict().items()):
        assert torch.equal(a, b), name
    x, t, label = torch.randn(2, 3, RES, RES), torch.tensor([3, 9]), torch.tensor([1, 3])
    ddpm.eval(), loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded.network(x, t, label), ddpm.network(x, t, label), rtol=0, atol=0)


def test_save_is_atomic(tmp_path, monkeypatch):
    """A crash while writing leaves the previous checkpoint intact and no temporary file behind."""
    path = tmp_path / "last.ckpt"
    tiny_module().save(path)
    before = path.read_bytes()
    with open(tmp_path / "plain", "wb"):  # the permissions a plain open() gives, not mkstemp's 0o600
        pass
    assert path.stat().st_mode == (tmp_path / "plain").stat().st_mode
    os.remove(tmp_path / "plain")

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(model_mod.torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        tiny_module("x0").save(path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["last.ckpt"]


@pytest.mark.parametrize("content", [b"", b"not a checkpoint", None])
def test_load_rejects_bad_checkpoints(tmp_path, content):
    path = tmp_path / "bad.ckpt"
    if content is None:  # a pickled module (the course's original format) must not be loaded
        # (torch.nn.Linear, not the course UNet: pickling that needs `network` importable by
        # name, which load_module deliberately leaves out of sys.modules between folders)
        torch.save({"hparams": {"network": torch.nn.Linear(2, 2)}, "state_dict": {}}, path)
    else:
        path.write_bytes(content)
    with pytest.raises(model_mod.CheckpointError, match="checkpoint"):
        model_mod.DiffusionModule(None, None).load(path)
    with pytest.raises(model_mod.CheckpointError, match="not found"):
        model_mod.DiffusionModule(None, None).load(tmp_path / "missing.ckpt")


def perturb(net):
    """Move the weights off their near-identity initialisation, so every input changes the output."""
    with torch.no_grad():
        for param in net.parameters():
            param.add_(0.05 * torch.randn_like(param))


def test_cfg_prediction_is_the_guidance_formula():
    ddpm = tiny_module(use_cfg=True)
    perturb(ddpm.network)
    ddpm.eval()
    x, t, label = torch.randn(3, 3, RES, RES), torch.tensor(7), torch.tensor([1, 2, 3])
    with torch.no_grad():
        cond = ddpm.network(x, t, label)
        uncond = ddpm.network(x, t, torch.zeros_like(label))
        assert (cond - uncond).abs().max() > 1e-3  # the class embedding matters
        torch.testing.assert_close(ddpm.predict(x, t, label, guidance_scale=1.0), cond)
        torch.testing.assert_close(ddpm.predict(x, t, label, guidance_scale=3.0), uncond + 3.0 * (cond - uncond),
                                   rtol=1e-4, atol=1e-4)  # batched 2B forward: float32 rounding


def test_cfg_training_drops_labels():
    unet = tiny_unet(use_cfg=True)
    perturb(unet)
    unet.cfg_dropout = 1.0  # every label dropped: the output must equal the null-class output
    x, t, label = torch.randn(2, 3, RES, RES), torch.tensor([4, 4]), torch.tensor([1, 2])
    unet.train()
    dropped = unet(x, t, label)
    unet.eval()
    torch.testing.assert_close(dropped, unet(x, t, torch.zeros_like(label)))
    unet.train()
    with pytest.raises(ValueError, match="null class"):
        unet(x, t, torch.tensor([0, 1]))


@pytest.mark.parametrize("sample_method", ["ddpm", "ddim"])
def test_sample_runs_and_is_reproducible(sample_method):
    ddpm = tiny_module(use_cfg=True)
    ddpm.var_scheduler = scheduler.build_scheduler(ddpm.var_scheduler.config, sample_method, ddim_steps=5, eta=0.5)
    ddpm.eval()
    label = torch.tensor([1, 3])
    run = [ddpm.sample(2, class_label=label, guidance_scale=2.0, generator=torch.Generator().manual_seed(s))
           for s in (0, 0, 1)]
    assert run[0].shape == (2, 3, RES, RES) and torch.isfinite(run[0]).all()
    assert torch.equal(run[0], run[1]) and not torch.equal(run[0], run[2])
    traj = ddpm.sample(2, return_traj=True, generator=torch.Generator().manual_seed(0))
    assert len(traj) == len(ddpm.var_scheduler.timesteps) + 1


def test_sample_follows_the_scheduler_steps():
    """sample() = x_T, then scheduler.step with the network output at each timestep, same noise."""
    ddpm = tiny_module("noise")
    ddpm.var_scheduler = scheduler.DDIMScheduler(T, 1e-4, 0.2, num_inference_timesteps=4, eta=1.0)
    ddpm.eval()
    out = ddpm.sample(2, generator=torch.Generator().manual_seed(5))
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, RES, RES, generator=gen)
    with torch.no_grad():
        for t in ddpm.var_scheduler.timesteps:
            x = ddpm.var_scheduler.step(x, t, ddpm.network(x, t), "noise", noise=torch.randn(2, 3, RES, RES, generator=gen))
    torch.testing.assert_close(out, x)


def test_cfg_network_without_a_label_samples_with_the_null_label():
    """sample(class_label=None) on a class-conditional network = the null label 0 (what it learnt
    for "no class"), not a conditioning it never saw; guidance_scale None means 1."""
    ddpm = tiny_module(use_cfg=True)
    perturb(ddpm.network)
    ddpm.var_scheduler = scheduler.DDIMScheduler(T, 1e-4, 0.2, num_inference_timesteps=4, eta=0.5)
    ddpm.eval()
    x, t = torch.randn(2, 3, RES, RES), torch.tensor(7)
    with torch.no_grad():  # the fixture can tell the two apart: no class embedding != the null one
        assert (ddpm.network(x, t, None) - ddpm.network(x, t, torch.zeros(2, dtype=torch.long))).abs().max() > 1e-3

    def draw(**kwargs):
        return ddpm.sample(2, generator=torch.Generator().manual_seed(3), **kwargs)

    null = draw(class_label=torch.zeros(2, dtype=torch.long))
    assert torch.equal(draw(), null)
    assert torch.equal(draw(guidance_scale=None), null)
    label = torch.tensor([1, 2])
    assert torch.equal(draw(class_label=label, guidance_scale=None), draw(class_label=label, guidance_scale=1.0))
