"""train.py past one process: data-parallel under torchrun (2 CPU processes, gloo), exact --resume,
EMA weights, the course's step-0 and per-log-step figures, the flags that go with them; and the
mixed-precision benchmark's training step.

Tiny data in AFHQ's layout and a tiny UNet that still depends on t (ch=64: 2 channels in each of
GroupNorm's 32 groups, so the time embedding is not normalised away). torchrun takes ~10 s to
start here, so the runs are shared between tests by module-scoped fixtures.
"""
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import REPO, TASK1_IMAGE, load_module, make_afhq_folder
from conftest import run_image_script as run_cli
from PIL import Image

RESOLUTION, GLOBAL_BATCH, STEPS, LOG_INTERVAL, SEED = 16, 8, 8, 4, 5
TINY = ["--image_resolution", RESOLUTION, "--ch", 64, "--ch_mult", 1, 2, "--num_res_blocks", 1,
        "--num_diffusion_train_timesteps", 20, "--batch_size", GLOBAL_BATCH, "--num_workers", 0, "--lr", 1e-3,
        "--warmup_steps", 1, "--log_interval", LOG_INTERVAL, "--seed", SEED, "--use_cfg"]


def torchrun(num_processes, *args, timeout=300):
    """train.py in num_processes CPU processes (gloo), from inside its folder; --standalone picks a free port."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(num_processes),
               "train.py", *map(str, args)]
    result = subprocess.run(command, cwd=TASK1_IMAGE, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


def load(path):
    return torch.load(path, weights_only=True)


def same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_afhq_folder(tmp_path_factory.mktemp("data") / "afhq")


@pytest.fixture(scope="module")
def two_process_runs(tmp_path_factory, data):
    """In 2 processes with EMA: STEPS steps at once; and STEPS / 2 steps, then --resume to STEPS
    (its command says --lr 0.5 and no --ema_decay: the checkpoint's recipe must win)."""
    tmp = tmp_path_factory.mktemp("two")
    runs = {"whole": tmp / "whole", "halves": tmp / "halves"}
    outputs = {"whole": torchrun(2, "--data_root", data, "--save_dir", runs["whole"], *TINY, "--ema_decay", 0.9,
                                 "--train_num_steps", STEPS)}
    torchrun(2, "--data_root", data, "--save_dir", runs["halves"], *TINY, "--ema_decay", 0.9,
             "--train_num_steps", STEPS // 2)
    first_half = load(runs["halves"] / "last.ckpt")
    outputs["resumed"] = torchrun(2, "--data_root", data, "--save_dir", runs["halves"], *TINY, "--lr", 0.5,
                                  "--train_num_steps", STEPS, "--resume")
    return runs, outputs, first_half


def test_two_processes_train_exactly_the_steps_into_one_checkpoint(two_process_runs):
    runs, outputs, _ = two_process_runs
    assert f"2 processes, global batch {GLOBAL_BATCH} = {GLOBAL_BATCH // 2} per process" in outputs["whole"].stdout
    assert outputs["whole"].stdout.count("save_dir:") == 1  # only the main process speaks
    folder = runs["whole"]
    assert [p.name for p in folder.iterdir() if "ckpt" in p.name] == ["last.ckpt"]  # no second copy, no temp file
    ckpt = load(folder / "last.ckpt")
    state = ckpt["train_state"]
    assert state["step"] == STEPS and len(state["losses"]) == STEPS
    assert all(int(s["step"]) == STEPS for s in state["optimizer"]["state"].values())  # Adam stepped STEPS times
    assert state["lr_scheduler"]["last_epoch"] == STEPS
    # one random state per process, and the processes draw different noise
    assert len(state["rng_states"]) == 2
    assert not torch.equal(state["rng_states"][0]["torch"], state["rng_states"][1]["torch"])
    losses = state["losses"]
    assert torch.isfinite(losses).all()
    assert losses[-3:].mean() < 0.93 * losses[:3].mean(), losses  # it learns (from ~1: the UNet starts at 0)


def test_figures_at_step_zero_and_every_log_step(two_process_runs):
    folder = two_process_runs[0]["whole"]
    for step in range(0, STEPS + 1, LOG_INTERVAL):
        assert (folder / f"samples_step{step:07d}.png").is_file()
        assert (folder / f"trajectory_step{step:07d}.png").is_file()
    assert (folder / "loss.png").is_file()

    tile = RESOLUTION + 2  # make_grid's default padding
    grid = np.asarray(Image.open(folder / f"samples_step{STEPS:07d}.png"))
    strip = np.asarray(Image.open(folder / f"trajectory_step{STEPS:07d}.png"))
    assert strip.shape == (tile + 2, 10 * tile + 2, 3)  # 10 moments of one sample's reverse process

    def frame(image, i):
        return image[2:2 + RESOLUTION, 2 + i * tile:2 + i * tile + RESOLUTION]

    assert np.array_equal(frame(strip, 9), frame(grid, 0))  # the strip ends at the grid's first sample
    # it starts at x_T ~ N(0, I): shown as x * 0.5 + 0.5 clipped to [0, 1], so P(|x| > 1) = 31.7% of
    # the pixels sit at 0 or 255
    saturated = np.isin(frame(strip, 0), (0, 255)).mean()
    assert 0.2 < saturated < 0.45, saturated
    assert not np.array_equal(frame(strip, 0), frame(strip, 9))


def test_resume_in_two_processes_continues_exactly(two_process_runs):
    runs, outputs, first_half = two_process_runs
    whole, resumed = load(runs["whole"] / "last.ckpt"), load(runs["halves"] / "last.ckpt")
    assert first_half["train_state"]["step"] == STEPS // 2
    assert "resuming at step 4" in outputs["resumed"].stdout
    # the checkpoint's recipe won over the command's, and the note names both values
    note = next(line for line in outputs["resumed"].stdout.splitlines() if line.startswith("note:"))
    assert "--lr 0.001 (this command said 0.5)" in note and "--ema_decay 0.9 (this command said None)" in note
    # weights, EMA, optimizer, data position and every process's random generators were restored:
    # the resumed run is the uninterrupted one, bit for bit
    assert torch.equal(resumed["train_state"]["losses"], whole["train_state"]["losses"])
    assert same_tensors(resumed["state_dict"], whole["state_dict"])
    assert same_tensors(resumed["ema_state_dict"], whole["ema_state_dict"])
    adam = [(s["exp_avg"], s["exp_avg_sq"]) for s in whole["train_state"]["optimizer"]["state"].values()]
    adam_resumed = [(s["exp_avg"], s["exp_avg_sq"]) for s in resumed["train_state"]["optimizer"]["state"].values()]
    assert all(torch.equal(a, b) for pair, pair_resumed in zip(adam, adam_resumed) for a, b in zip(pair, pair_resumed))
    assert not same_tensors(first_half["state_dict"], whole["state_dict"])  # it did train on


def test_ema_weights_are_saved_beside_the_weights(two_process_runs):
    ckpt = load(two_process_runs[0]["whole"] / "last.ckpt")
    ema, weights = ckpt["ema_state_dict"], ckpt["state_dict"]
    assert ema.keys() == weights.keys()
    assert all(ema[key].shape == weights[key].shape and ema[key].dtype == torch.float32 for key in ema)
    assert not same_tensors(ema, weights)
    # the sampler loads them like the weights themselves
    unet = load_module(TASK1_IMAGE, "network").UNet(**ckpt["config"]["network"])
    unet.load_state_dict(ema)


def test_update_ema_matches_its_closed_form():
    """With the weights held at theta, k updates give theta + decay^k (ema_0 - theta)."""
    train = load_module(TASK1_IMAGE, "train")
    torch.manual_seed(0)
    network, ema_network = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    ema_start = [p.detach().clone() for p in ema_network.parameters()]
    decay, k = 0.9, 5
    for _ in range(k):
        train.update_ema(ema_network, network, decay)
    for ema, theta, start in zip(ema_network.parameters(), network.parameters(), ema_start):
        torch.testing.assert_close(ema, theta + decay ** k * (start - theta), rtol=0, atol=1e-6)


@pytest.mark.parametrize("num_processes, accumulation_steps", [(1, 1), (2, 1), (2, 2), (4, 2)])
def test_global_batches_do_not_depend_on_the_number_of_processes(num_processes, accumulation_steps):
    train = load_module(TASK1_IMAGE, "train")
    num_images, global_batch, steps = 10, 8, 12  # epochs straddle global batches

    def stream(processes, accumulation, start_step=0):
        """The images of each step, the processes' micro-batches put together in slice order."""
        iterators = [iter(train.GlobalBatchSampler(num_images, global_batch, processes, p, accumulation, seed=3,
                                                   start_step=start_step)) for p in range(processes)]
        steps_seen = []
        for _ in range(steps - start_step):
            micro_batches = [[next(it) for _ in range(accumulation)] for it in iterators]
            # slice a * processes + p is process p's micro-batch a
            steps_seen.append([i for a in range(accumulation) for p in range(processes) for i in micro_batches[p][a]])
        return steps_seen

    one = stream(1, 1)
    assert stream(num_processes, accumulation_steps) == one
    flat = [i for step in one for i in step]
    for epoch in range(len(flat) // num_images):  # each epoch shows every image once
        assert sorted(flat[epoch * num_images:(epoch + 1) * num_images]) == list(range(num_images))
    assert flat[:num_images] != list(range(num_images))  # shuffled
    assert stream(num_processes, accumulation_steps, start_step=5) == one[5:]  # a resumed run continues the stream


def test_one_process_under_torchrun_equals_plain_python_and_resumes_a_two_process_run(two_process_runs, data,
                                                                                      tmp_path):
    """The 2-process checkpoint resumed by `python train.py` and by `torchrun --nproc_per_node 1` (DDP
    over one process): the same data stream, fresh random generators from --seed + step (said in a
    note), and the two one-process paths train alike, bit for bit."""
    results, checkpoints = [], []
    for name in ("plain", "launched"):
        folder = tmp_path / name
        shutil.copytree(two_process_runs[0]["whole"], folder)
        flags = ["--data_root", data, "--save_dir", folder, *TINY, "--ema_decay", 0.9, "--train_num_steps", STEPS + 2,
                 "--resume"]
        results.append(run_cli("train.py", *flags) if name == "plain" else torchrun(1, *flags))
        assert results[-1].returncode == 0, results[-1].stderr[-3000:]
        checkpoints.append(load(folder / "last.ckpt"))
    for result in results:
        assert f"1 process, global batch {GLOBAL_BATCH} = {GLOBAL_BATCH} per process" in result.stdout
        assert "random generators of 2 process(es), this run has 1" in result.stdout
        assert "--resume keeps" not in result.stdout  # the same recipe: nothing to note
    plain, launched = checkpoints
    assert plain["train_state"]["step"] == STEPS + 2 and len(plain["train_state"]["rng_states"]) == 1
    assert torch.equal(plain["train_state"]["losses"], launched["train_state"]["losses"])
    assert same_tensors(plain["state_dict"], launched["state_dict"])
    assert same_tensors(plain["ema_state_dict"], launched["ema_state_dict"])


@pytest.mark.parametrize("flags, needle", [
    (["--ema_decay", "1.5"], "--ema_decay"),
    (["--ema_decay", "0"], "--ema_decay"),
    (["--gradient_accumulation_steps", "0"], "--gradient_accumulation_steps"),
    (["--mixed_precision", "fp16"], "fp16 needs a CUDA GPU"),
])
def test_bad_training_flags_are_refused_before_anything_runs(flags, needle):
    """check_args runs first in main(), before any file is read or written; cli.run turns its
    UsageError into one line on stderr (tested for every CLI in test_image_cli.py)."""
    if "fp16" in flags and torch.cuda.is_available():
        pytest.skip("fp16 is allowed with CUDA")
    train = load_module(TASK1_IMAGE, "train")
    with pytest.raises(train.UsageError, match=needle):
        train.check_args(train.parse_args(flags))


@pytest.mark.parametrize("num_processes, flags, per_process", [
    (1, [], 16), (2, [], 8), (4, ["--gradient_accumulation_steps", "2"], 2),
    (3, [], None), (1, ["--gradient_accumulation_steps", "3"], None),
    (2, ["--batch_size", "6", "--gradient_accumulation_steps", "2"], None),
])
def test_the_global_batch_must_split_evenly(num_processes, flags, per_process):
    train = load_module(TASK1_IMAGE, "train")
    args = train.parse_args(flags)
    if per_process is not None:
        assert train.micro_batch_size(args, num_processes) == per_process
    else:
        with pytest.raises(train.UsageError, match=rf"--batch_size {args.batch_size} \(the global batch\) must be"):
            train.micro_batch_size(args, num_processes)


def test_benchmark_bf16_step_runs_in_bf16():
    """bench_image.py --device cuda compares these two training steps; here on the CPU, tiny."""
    bench = load_module(REPO / "benchmarks", "bench_image")
    unet = load_module(TASK1_IMAGE, "network").UNet(T=bench.T, image_resolution=16, ch=64, ch_mult=[1, 2],
                                                    num_res_blocks=1)
    dtypes = []
    unet.head.register_forward_hook(lambda module, inputs, output: dtypes.append(output.dtype))
    weights_before = unet.head.weight.detach().clone()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the CPU is shared: more threads only wait on each other
    try:
        for precision in ("fp32", "bf16"):
            bench.make_train_step(unet, torch.device("cpu"), precision, batch_size=2)()
    finally:
        torch.set_num_threads(threads)
    assert dtypes == [torch.float32, torch.bfloat16]
    assert unet.head.weight.dtype == torch.float32 and not torch.equal(unet.head.weight, weights_before)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_benchmark_cuda_mode_without_cuda_is_refused(monkeypatch):
    bench = load_module(REPO / "benchmarks", "bench_image")
    monkeypatch.setattr(sys, "argv", ["bench_image.py", "--device", "cuda"])
    with pytest.raises(SystemExit, match="--device cuda needs a CUDA GPU"):
        bench.main()
