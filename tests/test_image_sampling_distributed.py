"""sampling.py across processes (issue 12): image i depends on (seed, i) alone, so 2 processes
(torchrun, gloo on the CPU) write the PNG bytes of 1 and --batch_size changes nothing; --use_ema;
DiffusionModule.sample with one generator per image.

The network has ch = 64 (2 channels per GroupNorm group), so its output depends on t and on the
class label; T = 20 keeps DDPM cheap. One torchrun launch serves every 2-process assertion.
"""
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO, TASK1_IMAGE, load_module

sampling = load_module(TASK1_IMAGE, "sampling")
# the modules sampling.py itself imported (loading them again would make classes that differ from its own)
model_mod, network, scheduler = sys.modules["model"], sys.modules["network"], sys.modules["scheduler"]

T = 20
RES = 8
COMMON = ["--num_samples", "7", "--batch_size", "2", "--seed", "11"]
METHODS = {"ddpm": ["--sample_method", "ddpm", "--use_cfg", "--cfg_scale", "3.0"],
           "ddim": ["--sample_method", "ddim", "--ddim_steps", "5", "--eta", "0.5"]}

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py; torchrun's processes get 1 thread too


def perturbed_unet(seed):
    """A tiny class-conditional UNet with its weights moved off their init (the tail starts near 0)."""
    torch.manual_seed(seed)
    unet = network.UNet(T=T, image_resolution=RES, ch=64, ch_mult=[1], attn=[0], num_res_blocks=1, dropout=0.0,
                        use_cfg=True, cfg_dropout=0.1, num_classes=3)
    with torch.no_grad():
        for param in unet.parameters():
            param.add_(0.05 * torch.randn_like(param))
    return unet.eval()


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """ema.ckpt: raw weights + other "ema_state_dict" weights (train.py --ema_decay's layout);
    ema_as_raw.ckpt: those EMA weights as its "state_dict", and no EMA entry."""
    folder = tmp_path_factory.mktemp("ckpts")
    raw, ema = perturbed_unet(0), perturbed_unet(1)
    schedule = scheduler.DDPMScheduler(T, 1e-4, 0.2)
    model_mod.DiffusionModule(raw, schedule).save(folder / "ema.ckpt", extra={"ema_state_dict": ema.state_dict()})
    model_mod.DiffusionModule(ema, schedule).save(folder / "ema_as_raw.ckpt")
    return folder


def sample_here(ckpt, out, *flags):
    """sampling.py's main in this process (one process): -> {name: PNG bytes}."""
    sampling.main(sampling.parse_args(["--ckpt_path", str(ckpt), "--save_dir", str(out), *map(str, flags)]))
    return pngs(out)


def pngs(folder):
    return {p.name: p.read_bytes() for p in folder.glob("*.png")}


@pytest.fixture(scope="module")
def one_process(ckpts, tmp_path_factory):
    folder = tmp_path_factory.mktemp("one")
    return {method: sample_here(ckpts / "ema.ckpt", folder / method, *COMMON, *flags)
            for method, flags in METHODS.items()}


@pytest.fixture(scope="module")
def two_processes(ckpts, tmp_path_factory):
    """Both METHODS sampled by 2 processes of one torchrun launch -> (completed process, {method: folder})."""
    folder = tmp_path_factory.mktemp("two")
    runs = [["--ckpt_path", str(ckpts / "ema.ckpt"), "--save_dir", str(folder / method), *COMMON, *flags]
            for method, flags in METHODS.items()]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    # --standalone: a free port of its own, so parallel launches on one machine do not collide
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(REPO / "tests" / "image_sampling_worker.py"), json.dumps(runs)],
                            cwd=TASK1_IMAGE, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result, {method: folder / method for method in METHODS}


@pytest.mark.parametrize("method", METHODS)
def test_two_processes_write_the_bytes_of_one(one_process, two_processes, method):
    reference = one_process[method]
    assert sorted(reference) == [f"{i}.png" for i in range(7)]
    # every image differs from every other: an image written under another's index would show
    assert len(set(reference.values())) == 7
    assert pngs(two_processes[1][method]) == reference


@pytest.mark.parametrize("method", METHODS)
def test_sampling_json_is_written_once_with_the_totals(two_processes, method):
    result, folders = two_processes
    folder = folders[method]
    assert sorted(p.name for p in folder.iterdir()) == sorted([*(f"{i}.png" for i in range(7)), "sampling.json"])
    summary = json.loads((folder / "sampling.json").read_text())
    assert summary["num_processes"] == 2 and summary["num_samples"] == 7
    assert len(summary["seconds_per_process"]) == 2 and all(s > 0 for s in summary["seconds_per_process"])
    assert summary["seconds"] == pytest.approx(sum(summary["seconds_per_process"]))
    # only the main process reports: the share once per run (7 images in batches of 2: 2 + 2 batches)
    assert result.stdout.count("2 processes: 4 + 3 images (batches of up to 2)") == len(METHODS)
    assert result.stdout.count(f"Saved 7 images to {folder} ") == 1


def test_batch_size_does_not_change_the_images(ckpts, one_process, tmp_path):
    """x_T, every step's noise and the class label of image i come from i's own generator."""
    for batch_size in (1, 7):
        flags = [*COMMON, *METHODS["ddpm"], "--batch_size", batch_size]  # the last --batch_size wins
        assert sample_here(ckpts / "ema.ckpt", tmp_path / f"b{batch_size}", *flags) == one_process["ddpm"]


def test_split_batches_deals_the_one_process_batches():
    shares = sampling.split_batches(num_samples=7, batch_size=2, num_processes=3)
    assert shares == [[range(0, 2), range(2, 4)], [range(4, 6)], [range(6, 7)]]
    assert sampling.split_batches(3, 4, 2) == [[range(0, 3)], []]  # a process may get nothing
    assert sampling.describe_split(shares, 2) == "3 processes: 4 + 2 + 1 images (batches of up to 2)"


def test_sample_with_one_generator_per_image(ckpts):
    """sample(generator=[g_0, .., g_B-1]) = each image alone, its x_T and noise drawn from its g_b."""
    ddpm = model_mod.DiffusionModule(None, None)
    ddpm.load(ckpts / "ema.ckpt")
    ddpm.var_scheduler = scheduler.DDIMScheduler(T, 1e-4, 0.2, num_inference_timesteps=4, eta=1.0)
    ddpm.eval()
    seeds, shape = (3, 4, 5), (1, 3, RES, RES)
    out = ddpm.sample(3, generator=[torch.Generator().manual_seed(s) for s in seeds])
    null_label = torch.zeros(1, dtype=torch.long)  # a class-conditional network sampled without labels
    for b, seed in enumerate(seeds):
        generator = torch.Generator().manual_seed(seed)
        x = torch.randn(shape, generator=generator)
        with torch.no_grad():
            for t in ddpm.var_scheduler.timesteps:
                noise = torch.randn(shape, generator=generator)
                x = ddpm.var_scheduler.step(x, t, ddpm.network(x, t, null_label), "noise", noise=noise)
        torch.testing.assert_close(out[b:b + 1], x)
    with pytest.raises(ValueError, match="2 generators for a batch of 3"):
        ddpm.sample(3, generator=[torch.Generator(), torch.Generator()])


def test_image_seeds_are_distinct_across_seeds_and_indices():
    seeds = {sampling.image_seed(seed, i) for seed in range(20) for i in range(50)}
    assert len(seeds) == 20 * 50  # seed + i would give 69 distinct values


def test_use_ema_samples_with_the_ema_weights(ckpts, tmp_path):
    flags = ["--num_samples", 3, "--sample_method", "ddim", "--ddim_steps", 5, "--eta", 0.5]
    ema = sample_here(ckpts / "ema.ckpt", tmp_path / "ema", *flags, "--use_ema")
    assert ema == sample_here(ckpts / "ema_as_raw.ckpt", tmp_path / "reference", *flags)
    assert ema != sample_here(ckpts / "ema.ckpt", tmp_path / "raw", *flags)  # the two weights draw other images
    assert json.loads((tmp_path / "ema" / "sampling.json").read_text())["use_ema"] is True


def test_use_ema_without_or_with_broken_ema_weights_stops(ckpts, tmp_path):
    with pytest.raises(sampling.UsageError, match=r"--use_ema: .*ema_as_raw.ckpt holds no EMA weights"):
        sample_here(ckpts / "ema_as_raw.ckpt", tmp_path / "out", "--use_ema")
    checkpoint = torch.load(ckpts / "ema.ckpt", weights_only=True)
    checkpoint["ema_state_dict"].pop("head.weight")
    torch.save(checkpoint, tmp_path / "broken.ckpt")
    with pytest.raises(sampling.CheckpointError, match="EMA weights of .*broken.ckpt do not match .*head.weight"):
        sample_here(tmp_path / "broken.ckpt", tmp_path / "out", "--use_ema")
    assert not (tmp_path / "out").exists()


def test_negative_seed_is_refused(ckpts, tmp_path):
    with pytest.raises(sampling.UsageError, match="--seed must be >= 0, got -1"):
        sample_here(ckpts / "ema.ckpt", tmp_path / "out", "--seed", -1)
