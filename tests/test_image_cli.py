"""Task 1-2 command-line tools end to end: train.py, sampling.py, dataset.py (tiny data, CPU)."""
import io
import json
import os
import re
import zipfile

import numpy as np
import pytest
import torch
from conftest import TASK1_IMAGE, assert_one_line_error, load_module, make_afhq_folder
from conftest import run_image_main as run_main
from conftest import run_image_script as run_cli
from PIL import Image

from conftest import AFHQ_CLASSES as CLASSES
T = 20
TINY_UNET = ["--image_resolution", "16", "--ch", "32", "--ch_mult", "1", "2", "--num_res_blocks", "1",
             "--num_diffusion_train_timesteps", str(T), "--batch_size", "4", "--num_workers", "0"]
SAMPLING_KEYS = {"ckpt_path", "sample_method", "ddim_steps", "eta", "solver_order", "timestep_spacing",
                 "num_samples", "seed", "use_ema", "num_processes", "seconds", "seconds_per_process"}


def snapshot(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir()} if folder.exists() else None


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny class-conditional run: 4 steps, then --resume to 6. Returns (save_dir, outputs)."""
    tmp = tmp_path_factory.mktemp("train")
    data = make_afhq_folder(tmp / "afhq")
    save_dir = tmp / "run"
    first = run_cli("train.py", "--data_root", data, "--save_dir", save_dir, *TINY_UNET, "--use_cfg",
                    "--train_num_steps", 4, "--log_interval", 2, "--sample_method", "ddim")
    assert first.returncode == 0, first.stderr[-3000:]
    ckpt_after_first = torch.load(save_dir / "last.ckpt", weights_only=True)
    second = run_cli("train.py", "--data_root", data, "--save_dir", save_dir, *TINY_UNET, "--use_cfg",
                     "--train_num_steps", 6, "--log_interval", 2, "--resume")
    assert second.returncode == 0, second.stderr[-3000:]
    return save_dir, data, ckpt_after_first, second


def test_train_writes_outputs_and_resumes(trained):
    save_dir, _, first_ckpt, second = trained
    assert first_ckpt["train_state"]["step"] == 4
    assert len(first_ckpt["train_state"]["losses"]) == 4
    for name in ("config.json", "loss.png", "samples_step0000002.png", "samples_step0000004.png",
                 "samples_step0000006.png"):
        assert (save_dir / name).is_file(), name
    assert Image.open(save_dir / "samples_step0000002.png").size[1] > 16  # a grid of 16x16 samples
    assert not [p for p in save_dir.iterdir() if p.name.startswith(".tmp")]  # no leftover temporary files

    ckpt = torch.load(save_dir / "last.ckpt", weights_only=True)
    assert "resuming at step 4" in second.stdout
    state = ckpt["train_state"]
    assert state["step"] == 6
    assert torch.equal(state["losses"][:4], first_ckpt["train_state"]["losses"])  # the history carried on
    assert len(state["losses"]) == 6
    assert ckpt["config"]["network"]["use_cfg"] and ckpt["config"]["network"]["num_classes"] == 3
    assert ckpt["config"]["scheduler"]["num_train_timesteps"] == T
    # resumed, not restarted: Adam's step counter continued and the weights moved on from step 4
    adam_steps = [s["step"] for s in state["optimizer"]["state"].values()]
    assert all(float(s) == 6 for s in adam_steps)
    changed = [not torch.equal(ckpt["state_dict"][k], first_ckpt["state_dict"][k]) for k in ckpt["state_dict"]]
    assert any(changed)


def sample(ckpt, out, *extra, run=run_main):
    return run("sampling.py", "--ckpt_path", ckpt, "--save_dir", out, "--num_samples", 3, "--batch_size", 2,
               *extra)


@pytest.mark.parametrize("method", [["--sample_method", "ddim", "--ddim_steps", 7, "--eta", 0.5, "--use_cfg",
                                     "--cfg_scale", 3.0],
                                    ["--sample_method", "ddpm"]])
def test_sampling_is_deterministic(trained, tmp_path, method):
    ckpt = trained[0] / "last.ckpt"
    # the first in sampling.py's own process, as students run it; the same bytes from the entry
    # point run again in this process
    runs = [sample(ckpt, tmp_path / f"run{i}", *method, "--seed", seed, run=run)
            for i, (seed, run) in enumerate([(5, run_cli), (5, run_main), (6, run_main)])]
    for result in runs:
        assert result.returncode == 0, result.stderr[-3000:]
    images = [snapshot(tmp_path / f"run{i}") for i in range(3)]
    pngs = [{k: v for k, v in imgs.items() if k.endswith(".png")} for imgs in images]
    assert sorted(pngs[0]) == ["0.png", "1.png", "2.png"]
    assert pngs[0] == pngs[1]  # same seed, byte-identical images
    assert pngs[0] != pngs[2]
    assert Image.open(tmp_path / "run0" / "0.png").size == (16, 16)

    summary = json.loads((tmp_path / "run0" / "sampling.json").read_text())
    assert set(summary) == SAMPLING_KEYS
    assert summary["sample_method"] == method[1] and summary["num_samples"] == 3 and summary["seed"] == 5
    assert summary["ckpt_path"] == str(ckpt)
    assert 0 < summary["seconds"] < 300
    assert summary["num_processes"] == 1 and summary["seconds_per_process"] == [summary["seconds"]]
    assert "1 process: 3 images (batches of up to 2)" in runs[0].stdout


@pytest.fixture
def filled_dir(tmp_path):
    """An output folder that already holds a result, which a failed run must leave alone."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "0.png").write_bytes(b"earlier result")
    return out


@pytest.mark.parametrize("args, needle", [
    (["--sample_method", "ddim", "--ddim_steps", 0], "--ddim_steps"),
    (["--sample_method", "ddim", "--ddim_steps", T + 1], "--ddim_steps"),
    (["--sample_method", "ddim", "--eta", -0.5], "--eta"),
    (["--sample_method", "ddim", "--eta", 1.5], "--eta must be in [0, 1]"),
    (["--sample_method", "ddjm"], "ddjm"),
])
def test_sampling_rejects_bad_flags(trained, filled_dir, args, needle):
    before = snapshot(filled_dir)
    assert_one_line_error(sample(trained[0] / "last.ckpt", filled_dir, *args), needle)
    assert snapshot(filled_dir) == before


@pytest.mark.parametrize("kind", ["missing", "garbage", "truncated"])
def test_sampling_rejects_bad_checkpoints(trained, filled_dir, tmp_path, kind):
    ckpt = tmp_path / "bad.ckpt"
    if kind == "garbage":
        ckpt.write_bytes(b"\x00 not a checkpoint")
    elif kind == "truncated":
        ckpt.write_bytes((trained[0] / "last.ckpt").read_bytes()[:5000])
    before = snapshot(filled_dir)
    # sampling.py's own process once, as students run it
    assert_one_line_error(sample(ckpt, filled_dir, run=run_cli if kind == "missing" else run_main), str(ckpt))
    assert snapshot(filled_dir) == before


def train(data, save_dir, *extra, run=run_main):
    return run("train.py", "--data_root", data, "--save_dir", save_dir, *TINY_UNET, "--train_num_steps", 2,
                   "--log_interval", 2, *extra)


def test_train_rejects_bad_data(tmp_path):
    out = tmp_path / "out"
    # train.py's own process, as students run it; the other refusals run its entry point in this process
    assert_one_line_error(train(tmp_path / "nowhere", out, run=run_cli), "not found", "nowhere")

    empty = tmp_path / "empty"
    (empty / "train" / "cat").mkdir(parents=True)
    assert_one_line_error(train(empty, out), "no images")

    data = make_afhq_folder(tmp_path / "afhq", per_class=(2, 1))
    garbage = data / "train" / "dog" / "dog_999.png"
    garbage.write_bytes(b"this is not a png")
    assert_one_line_error(train(data, out), "unreadable image", str(garbage))
    assert not out.exists()  # nothing was written


@pytest.mark.parametrize("num_workers", ["0", "1"])
def test_train_names_an_image_that_fails_to_decode(tmp_path, num_workers):
    """A truncated file passes the header check; decoding it in a DataLoader (worker) must still give one line."""
    data = make_afhq_folder(tmp_path / "afhq", per_class=(1, 1), size=64)
    broken = data / "train" / "cat" / "cat_000.png"
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buffer, "PNG")
    broken.write_bytes(buffer.getvalue()[:2000])
    result = train(data, tmp_path / "out", "--num_workers", num_workers)
    # training had started, so its progress bar may precede the error; the error is still one line
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0] == result.stderr.strip().splitlines()[-1], result.stderr
    assert "unreadable image" in errors[0] and str(broken) in errors[0]
    assert not (tmp_path / "out" / "last.ckpt").exists()


def test_train_does_not_overwrite_or_resume_nothing(trained, tmp_path):
    save_dir, data, _, _ = trained
    before = snapshot(save_dir)
    assert_one_line_error(train(data, save_dir), "already exists", "--resume")
    assert_one_line_error(train(data, tmp_path / "fresh", "--resume"), "not found")
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "last.ckpt").write_bytes(b"garbage")
    assert_one_line_error(train(data, corrupt, "--resume"), "cannot read checkpoint")
    assert_one_line_error(train(data, tmp_path / "x", "--mode", "sigmoid"), "--mode")
    assert_one_line_error(train(data, tmp_path / "x", "--predictor", "v"), "--predictor")
    assert snapshot(save_dir) == before
    assert not (tmp_path / "x").exists()


def test_dataset_download_offline_is_one_clear_line(tmp_path):
    dest = tmp_path / "afhq"
    # nothing listens on port 9 of this machine: the same failure as being offline, without waiting
    result = run_cli("dataset.py", "--data_root", dest, "--url", "http://127.0.0.1:9/afhq.zip")
    assert_one_line_error(result, "could not download AFHQ", "--data_root")
    assert not dest.exists()


def test_download_unzips_into_afhq_layout(tmp_path):
    dataset = load_module(TASK1_IMAGE, "dataset")
    source = make_afhq_folder(tmp_path / "src" / "afhq", per_class=(1, 1))
    archive = tmp_path / "afhq.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in source.rglob("*"):
            zf.write(path, path.relative_to(source.parent))
    dest = tmp_path / "data" / "afhq"
    dataset.download_afhq(dest, url=archive.as_uri())
    assert sorted(p.name for p in (dest / "train").iterdir()) == list(CLASSES)
    module = dataset.AFHQDataModule(batch_size=2, num_workers=0, image_resolution=16, afhq_root=dest)
    images, labels = next(iter(module.train_dataloader()))
    assert images.shape == (2, 3, 16, 16) and -1 <= images.min() and images.max() <= 1
    assert set(module.train_ds.labels) == {1, 2, 3}  # sorted class index + 1; 0 is the null class
    assert [p.name for p in dest.parent.iterdir()] == ["afhq"]  # no temporary files left


# --- issue 18: bad floats, sample folders, paths, full disks, leftovers ---------------------------

@pytest.mark.parametrize("args, needle", [
    (["--use_cfg", "--cfg_scale", "nan"], "--cfg_scale must be a finite number"),
    (["--use_cfg", "--cfg_scale", "inf"], "--cfg_scale must be a finite number"),
    (["--sample_method", "ddim", "--ddim_steps", 1], "only t = 0"),
    (["--sample_method", "ddim", "--ddim_steps", 1, "--timestep_spacing", "quadratic"], "trailing"),
])
def test_sampling_refuses_settings_that_give_garbage(trained, filled_dir, args, needle):
    """NaN/inf guidance gives black PNGs; one DDIM step from t = 0 returns x_T as the image."""
    before = snapshot(filled_dir)
    assert_one_line_error(sample(trained[0] / "last.ckpt", filled_dir, *args), needle)
    assert snapshot(filled_dir) == before


def test_sampling_refuses_save_dirs_it_cannot_fill(trained, tmp_path):
    ckpt = trained[0] / "last.ckpt"
    a_file = tmp_path / "a_file"
    a_file.write_text("keep me")
    assert_one_line_error(sample(ckpt, a_file), "is a file")
    assert a_file.read_text() == "keep me"

    blocked = tmp_path / "blocked"
    (blocked / "0.png").mkdir(parents=True)
    assert_one_line_error(sample(ckpt, blocked), "folder named 0.png")
    assert [p.name for p in blocked.iterdir()] == ["0.png"]

    # an earlier run's 5 images: 3 new ones would leave 3.png and 4.png for measure_fid.py to score
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    for i in range(5):
        (earlier / f"{i}.png").write_bytes(b"earlier result")
    before = snapshot(earlier)
    assert_one_line_error(sample(ckpt, earlier), "3.png", "--num_samples 3")
    assert snapshot(earlier) == before

    if os.geteuid() != 0:  # root writes into read-only folders
        read_only = tmp_path / "read_only"
        read_only.mkdir(mode=0o500)
        assert_one_line_error(sample(ckpt, read_only), "cannot write to --save_dir")


def test_sampling_writes_each_png_atomically(trained, tmp_path, monkeypatch, capsys):
    """A full disk half-way through a PNG leaves no partial or 0-byte {i}.png (OSError is one of
    the errors sampling.py reports as one line)."""
    sampling = load_module(TASK1_IMAGE, "sampling")
    out = tmp_path / "out"
    written = []

    def save_then_fill_the_disk(image, fp, format=None, **params):
        if written:
            if isinstance(fp, (str, os.PathLike)):  # a save in place
                with open(fp, "wb") as f:
                    f.write(b"\x89PNG half")
            else:
                fp.write(b"\x89PNG half")
            raise OSError(28, "No space left on device")
        written.append(fp)
        return original(image, fp, format=format, **params)

    original = Image.Image.save
    monkeypatch.setattr(Image.Image, "save", save_then_fill_the_disk)
    args = sampling.parse_args(["--ckpt_path", str(trained[0] / "last.ckpt"), "--save_dir", str(out),
                                "--num_samples", "3", "--batch_size", "3", "--sample_method", "ddim",
                                "--ddim_steps", "2"])
    with pytest.raises(OSError, match="No space left on device"):
        sampling.main(args)
    assert sorted(p.name for p in out.iterdir()) == ["0.png"]  # the whole first image, nothing else
    assert Image.open(out / "0.png").size == (16, 16)
    assert OSError in sampling.ERRORS


def test_train_refuses_flags_and_paths_that_cannot_work(tmp_path):
    train = load_module(TASK1_IMAGE, "train")
    a_file = tmp_path / "a_file"
    a_file.write_text("keep me")
    for flags, needle in [(["--lr", "inf"], "--lr must be a finite number"), (["--lr", "nan"], "--lr"),
                          (["--num_workers", "-1"], "--num_workers must be >= 0"),
                          (["--ch_mult", "1", "0"], "--ch_mult values must be >= 1"),
                          (["--save_dir", str(a_file)], "is a file")]:
        with pytest.raises(train.UsageError, match=re.escape(needle)):
            train.check_args(train.parse_args(flags))
    assert a_file.read_text() == "keep me"


def test_train_full_disk_at_a_save_is_one_line_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    """The save fails with ENOSPC: one line, no .last.ckpt.*.tmp; a stale one a killed run left
    (SIGKILL cannot be caught) is removed when the next run starts."""
    train = load_module(TASK1_IMAGE, "train")
    data = make_afhq_folder(tmp_path / "afhq", per_class=(2, 1), size=16)
    save_dir = tmp_path / "run"
    save_dir.mkdir()
    (save_dir / ".last.ckpt.abc123.tmp").write_bytes(b"\0" * 1000)  # left by a killed run

    def full_disk(obj, f, *args, **kwargs):
        f.write(b"part of a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(train.torch, "save", full_disk)
    monkeypatch.setattr(train, "save_samples", lambda *args: None)
    args = train.parse_args(["--data_root", str(data), "--save_dir", str(save_dir), *map(str, TINY_UNET),
                             "--train_num_steps", "1", "--log_interval", "1"])
    with pytest.raises(SystemExit) as exit_info:
        train.run(train.main, args, train.ERRORS)
    assert str(exit_info.value.code).endswith("No space left on device")
    assert "\n" not in str(exit_info.value.code)
    assert not [p.name for p in save_dir.iterdir() if p.name.endswith(".tmp")]
    assert not (save_dir / "last.ckpt").exists()


def test_dataset_eval_dir_that_is_a_file_and_stale_temporary_folders(tmp_path):
    dataset = load_module(TASK1_IMAGE, "dataset")
    data = make_afhq_folder(tmp_path / "afhq", per_class=(1, 1), size=16)
    a_file = tmp_path / "a_file"
    a_file.write_text("keep me")
    with pytest.raises(dataset.DatasetError, match="is a file"):
        dataset.main(dataset.parse_args(["--data_root", str(data), "--eval_dir", str(a_file)]))
    assert a_file.read_text() == "keep me"

    stale = tmp_path / ".eval-tmp-killed"  # what a killed build leaves
    stale.mkdir()
    (stale / "cat_000.png").write_bytes(b"half")
    dataset.main(dataset.parse_args(["--data_root", str(data), "--eval_dir", str(tmp_path / "eval")]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "afhq", "eval"]


def test_convert_checkpoint_into_a_missing_folder_is_one_line(trained, tmp_path):
    target = tmp_path / "missing" / "converted.ckpt"
    assert_one_line_error(run_cli("convert_checkpoint.py", trained[0] / "last.ckpt", target), "no folder")
    assert not target.parent.exists()
