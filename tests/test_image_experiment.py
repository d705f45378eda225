"""image_experiment.py (the CPU Task 1-2 experiment), fid_grid.py and scripts/fid_grid.sh.

The quick mode runs every stage for real on tiny sizes: the stand-in data, the FID classifier,
train.py, sampling.py for DDPM and a DDIM grid, and FID. Its numbers are checked against the
files the stages wrote (sampling.json) and against measure_fid.py's CLI run on the same images.
"""
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import TASK1_FID, TASK1_IMAGE


# One BLAS/OpenMP thread per child process: on a busy 2-core machine, 2 threads per process
# made scipy's sqrtm (2048 x 2048) and PyTorch several times slower in our measurements.
SINGLE_THREAD = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def run(command, cwd, env=None, timeout=600):
    return subprocess.run([str(part) for part in command], cwd=cwd, capture_output=True, text=True,
                          env={**(env or os.environ), **SINGLE_THREAD}, timeout=timeout)


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("image_experiment") / "quick"
    result = run([sys.executable, "image_experiment.py", "--quick", "--out", out], TASK1_IMAGE)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, json.loads((out / "results.json").read_text()), result.stdout


def setting_names(results):
    return ["ddpm"] + [f"ddim_steps{s}_eta{e:g}" for e in results["etas"] for s in results["steps"]]


def test_quick_run_tabulates_every_setting(quick):
    out, results, stdout = quick
    config = results["config"]
    grid = config["grid"]
    assert results["steps"] == grid["ddim_steps"] and results["etas"] == grid["etas"]
    assert results["T"] == config["unet"]["num_diffusion_train_timesteps"]
    assert results["ddpm"]["steps"] == results["T"]
    assert sorted((r["steps"], r["eta"]) for r in results["ddim"]) == sorted(
        (s, e) for s in grid["ddim_steps"] for e in grid["etas"])
    for row in results["ddim"] + [results["ddpm"]]:
        assert np.isfinite(row["fid"]) and row["fid"] > 0 and row["seconds"] > 0
    assert np.isfinite(results["floor_fid"])
    assert results["num_samples"] == results["num_gt"] == grid["num_samples"]
    assert 0 <= results["classifier_val_accuracy"] <= 1
    assert set(results["stage_seconds"]) == {"data", "classifier", "unet", "grid"}

    for name in setting_names(results):
        samples = sorted((out / "samples" / name).glob("*.png"))
        assert len(samples) == grid["num_samples"]
        assert Image.open(samples[0]).size == (config["image_size"],) * 2
        assert Image.open(out / "grids" / f"{name}.png").size[0] == 8 * config["image_size"]
    assert Image.open(out / "fid_vs_steps.png").format == "PNG"

    # the times are sampling.py's own (reverse process only)
    summary = json.loads((out / "samples" / "ddpm" / "sampling.json").read_text())
    assert results["ddpm"]["seconds"] == summary["seconds"]
    assert summary["sample_method"] == "ddpm" and summary["num_samples"] == grid["num_samples"]


def test_results_md_has_the_course_layout(quick):
    """Rows eta, columns steps, the values of results.json; DDPM, the floor and the accuracy."""
    out, results, stdout = quick
    markdown = (out / "results.md").read_text()
    header = "| eta \\ steps | " + " | ".join(str(s) for s in results["steps"]) + " |"
    assert header in markdown
    fid = {(r["steps"], r["eta"]): r["fid"] for r in results["ddim"]}
    for eta in results["etas"]:
        row = f"| {eta:g} | " + " | ".join(f"{fid[(s, eta)]:.2f}" for s in results["steps"]) + " |"
        assert row in markdown
    assert f"DDPM ({results['T']} steps): {results['ddpm']['fid']:.2f}" in markdown
    assert f"{results['floor_fid']:.2f}" in markdown
    assert f"{results['classifier_val_accuracy']:.4f}" in markdown
    assert markdown.strip() in stdout  # the report is also printed


def test_grid_fid_is_measure_fid_on_the_same_images(quick, tmp_path, python_exe):
    """The DDPM entry equals the course's CLI run on the generated folder and the same real
    images (N evenly spaced images of the sorted validation split)."""
    out, results, _ = quick
    real = sorted((out / "data" / "val").rglob("*.png"))
    chosen = [real[i] for i in np.linspace(0, len(real) - 1, results["num_gt"]).round().astype(int)]
    for i, path in enumerate(chosen):
        shutil.copy(path, tmp_path / f"{i}.png")
    result = run([python_exe, "measure_fid.py", tmp_path, out / "samples" / "ddpm",
                  "--ckpt", out / "fid" / "standin_inception_v3.ckpt",
                  "--img_size", results["fid_img_size"], "--device", "cpu"], TASK1_FID)
    assert result.returncode == 0, result.stderr
    fid = float(re.search(r"^FID: (\S+)$", result.stdout, re.MULTILINE).group(1))
    assert results["ddpm"]["fid"] == pytest.approx(fid, rel=1e-6)


def test_a_second_run_reuses_the_finished_stages(quick):
    out, results, _ = quick
    result = run([sys.executable, "image_experiment.py", "--quick", "--out", out], TASK1_IMAGE)
    assert result.returncode == 0, result.stderr
    for stage in ("data", "classifier", "unet", "grid"):
        assert f"== {stage}: done in an earlier run" in result.stdout
    again = json.loads((out / "results.json").read_text())
    assert again["ddim"] == results["ddim"] and again["ddpm"] == results["ddpm"]


def test_fid_grid_script(quick, tmp_path):
    """scripts/fid_grid.sh CKPT GT_DIR, as on a GPU, with tiny settings passed through."""
    out, results, _ = quick
    script = TASK1_IMAGE / "scripts" / "fid_grid.sh"
    env = {**os.environ, "PYTHON": sys.executable, "OUT_DIR": str(tmp_path / "grid")}

    usage = run(["bash", script], tmp_path, env)
    assert usage.returncode == 2 and usage.stderr.startswith("usage:")
    missing = run(["bash", script, tmp_path / "none.ckpt", out / "data" / "val"], tmp_path, env)
    assert missing.returncode != 0 and "Traceback" not in missing.stderr
    assert "none.ckpt" in missing.stderr.strip() and "\n" not in missing.stderr.strip()

    gt_dir = tmp_path / "real"
    gt_dir.mkdir()
    for path in sorted((out / "data" / "val").rglob("*.png"))[::4]:
        shutil.copy(path, gt_dir / f"{path.parent.name}_{path.name}")
    # relative paths are taken from where the script is called, not from its folder
    result = run(["bash", script, os.path.relpath(out / "unet" / "last.ckpt", tmp_path), "real",
                  "--num_samples", 4, "--batch_size", 4, "--ddim_steps", 5, "--etas", 0.5,
                  "--fid_ckpt", out / "fid" / "standin_inception_v3.ckpt", "--fid_img_size", 75,
                  "--fid_device", "cpu"], tmp_path, env)
    assert result.returncode == 0, result.stderr[-3000:]
    grid = json.loads((tmp_path / "grid" / "results.json").read_text())
    assert grid["T"] == results["T"] and grid["num_gt"] == 6
    assert [(r["steps"], r["eta"]) for r in grid["ddim"]] == [(5, 0.5)]
    assert "| eta \\ steps | 5 |" in (tmp_path / "grid" / "results.md").read_text()
