"""experiments/image_experiment.py (the CPU Task 1-2 experiment), experiments/fid_grid.py and
experiments/fid_grid.sh.

The quick mode runs every stage for real on tiny sizes: the stand-in data, the FID classifier,
train.py, sampling.py for DDPM, a DDIM grid and the quadratic-spacing rows, FID and KID. Its
numbers are checked against the files the stages wrote (sampling.json) and against
measure_fid.py's CLI run on the same images; the grid's sample cache against checkpoints
rewritten in place, shrinking sample counts and stray files.
"""
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TASK1_FID, TASK1_IMAGE, load_module

# One BLAS/OpenMP thread per child process: two processes' threads would wait on each other.
SINGLE_THREAD = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def run(command, cwd, env=None, timeout=600):
    return subprocess.run([str(part) for part in command], cwd=cwd, capture_output=True, text=True,
                          env={**(env or os.environ), **SINGLE_THREAD}, timeout=timeout)


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("image_experiment") / "quick"
    result = run([sys.executable, "-m", "experiments.image_experiment", "--quick", "--out", out],
                 TASK1_IMAGE)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, json.loads((out / "results.json").read_text()), result.stdout


def setting_names(results):
    main = [f"ddim_steps{s}_eta{e:g}" for e in results["etas"] for s in results["steps"]]
    extra = [f"ddim_{spacing}_steps{s}_eta{e:g}" for spacing in results["extra_spacings"]
             for e in results["etas"] for s in results["extra_steps"]]
    return ["ddpm"] + main + extra


def test_quick_run_tabulates_every_setting(quick):
    out, results, stdout = quick
    config = results["config"]
    grid = config["grid"]
    assert results["steps"] == grid["ddim_steps"] and results["etas"] == grid["etas"]
    assert results["timestep_spacing"] == "leading" and results["extra_spacings"] == ["quadratic"]
    assert results["T"] == config["unet"]["num_diffusion_train_timesteps"]
    assert results["ddpm"]["steps"] == results["T"]
    expected = ([(s, e, "leading") for s in grid["ddim_steps"] for e in grid["etas"]]
                + [(s, e, "quadratic") for s in grid["extra_steps"] for e in grid["etas"]])
    assert sorted((r["steps"], r["eta"], r["spacing"]) for r in results["ddim"]) == sorted(expected)
    for row in results["ddim"] + [results["ddpm"], results["floor"]]:
        assert np.isfinite(row["fid"]) and row["fid"] > 0
        assert np.isfinite(row["kid"]) and row["kid_se"] > 0
    assert all(row["seconds"] > 0 for row in results["ddim"] + [results["ddpm"]])
    assert results["num_samples"] == results["num_gt"] == grid["num_samples"]
    assert 0 <= results["classifier_val_accuracy"] <= 1
    assert set(results["stage_seconds"]) == {"data", "classifier", "unet", "grid", "few_step"}

    for name in setting_names(results):
        samples = sorted((out / "samples" / name).glob("*.png"))
        assert len(samples) == grid["num_samples"], name
        assert Image.open(samples[0]).size == (config["image_size"],) * 2
        assert Image.open(out / "grids" / f"{name}.png").size[0] == 8 * config["image_size"]
    assert Image.open(out / "fid_vs_steps.png").format == "PNG"

    # the times are sampling.py's own (reverse process only)
    summary = json.loads((out / "samples" / "ddpm" / "sampling.json").read_text())
    assert results["ddpm"]["seconds"] == summary["seconds"]
    assert summary["sample_method"] == "ddpm" and summary["num_samples"] == grid["num_samples"]


def test_quick_run_has_the_few_step_rows_at_their_own_n(quick):
    """Stage few_step: DDIM (eta 0 and 1), DPM-Solver++(2M) and SDE-DPM-Solver++(2M) on the quadratic
    timesteps, no DDPM, at its own N, into OUT/few_step/, with each solver compared with its order 1
    (DDIM eta 0, eta 1) on the same timesteps."""
    out, results, _ = quick
    config = results["config"]["few_step"]
    few_step = results["few_step"]
    assert few_step["ddpm"] is None and few_step["num_samples"] == few_step["num_gt"] == config["num_samples"]
    assert few_step["num_samples"] != results["num_samples"]
    assert [(r["steps"], r["eta"], r["spacing"]) for r in few_step["ddim"]] == [(4, 0.0, "quadratic"),
                                                                                 (4, 1.0, "quadratic")]
    assert [(r["sde"], r["order"], r["steps"], r["spacing"]) for r in few_step["dpm_solver"]] == [
        (False, 2, 4, "quadratic"), (True, 2, 4, "quadratic")]
    assert json.loads((out / "few_step" / "results.json").read_text())["dpm_solver"] == few_step["dpm_solver"]
    for name in ("dpm_solver2_quadratic_steps4", "sde_dpm_solver2_quadratic_steps4"):
        assert len(list((out / "few_step" / "samples" / name).glob("*.png"))) == 6
    pairs = [(c["a"], c["b"]) for c in few_step["comparisons"]]
    assert ("DPM-Solver++(2M) 4 calls, quadratic", "DDIM 4 steps, eta 0") in pairs
    assert ("SDE-DPM-Solver++(2M) 4 calls, quadratic", "DDIM 4 steps, eta 1") in pairs
    assert "# Few-step samplers at N = 6" in (out / "results.md").read_text()


def test_results_hold_no_absolute_paths(quick):
    """Outputs meant to be committed name files relative to the output folder."""
    out, results, _ = quick
    assert results["ckpt_path"] == os.path.join("unet", "last.ckpt")
    assert results["gt_dir"] == os.path.join("data", "val")
    for name in ("results.json", "results.md", "stages.json"):
        text = (out / name).read_text()
        assert str(out) not in text and str(TASK1_IMAGE) not in text, name


def test_results_md_has_the_course_layout(quick):
    """Rows eta, columns steps, FID (KID x 10^3 +- SE) from results.json; DDPM, the floor, the
    quadratic table and the classifier's accuracy."""
    out, results, stdout = quick
    markdown = (out / "results.md").read_text()

    def cell(row):
        return f"{row['fid']:.1f} ({1e3 * row['kid']:.2f} +- {1e3 * row['kid_se']:.2f})"

    for spacing, steps in (("leading", results["steps"]), ("quadratic", results["extra_steps"])):
        rows = {(r["steps"], r["eta"]): r for r in results["ddim"] if r["spacing"] == spacing}
        assert f"DDIM, {spacing} timesteps:\n\n| eta \\ steps | " + " | ".join(map(str, steps)) + " |" in markdown
        for eta in results["etas"]:
            assert f"| {eta:g} | " + " | ".join(cell(rows[(s, eta)]) for s in steps) + " |" in markdown
    assert f"DDPM ({results['T']} steps): **{cell(results['ddpm'])}**" in markdown
    assert f"**{cell(results['floor'])}**" in markdown
    assert f"{results['classifier_val_accuracy']:.4f}" in markdown
    assert markdown.strip() in stdout  # the report is also printed

    # the contrasts in standard errors, e.g. DDPM against the floor
    ddpm_floor = results["comparisons"][0]
    difference = results["ddpm"]["kid"] - results["floor"]["kid"]
    se = np.sqrt(results["ddpm"]["kid_se"] ** 2 + results["floor"]["kid_se"] ** 2)
    assert (ddpm_floor["a"], ddpm_floor["b"]) == ("DDPM", "floor (real vs. real)")
    assert (ddpm_floor["kid_difference"], ddpm_floor["z"]) == pytest.approx((difference, difference / se))
    assert f"| DDPM | floor (real vs. real) | {1e3 * difference:.2f} +- {1e3 * se:.2f} | {difference / se:.2f} |" in markdown


def test_grid_scores_are_measure_fid_on_the_same_images(quick, tmp_path, python_exe):
    """The DDPM entry equals the course's CLI (with --kid) run on the generated folder and the
    same real images (N evenly spaced images of the sorted validation split)."""
    out, results, _ = quick
    real = sorted((out / "data" / "val").rglob("*.png"))
    chosen = [real[i] for i in np.linspace(0, len(real) - 1, results["num_gt"]).round().astype(int)]
    for i, path in enumerate(chosen):
        shutil.copy(path, tmp_path / f"{i}.png")
    result = run([python_exe, "measure_fid.py", tmp_path, out / "samples" / "ddpm",
                  "--ckpt", out / "fid" / "standin_inception_v3.ckpt",
                  "--img_size", results["fid_img_size"], "--device", "cpu", "--kid"], TASK1_FID)
    assert result.returncode == 0, result.stderr
    fid = float(re.search(r"^FID: (\S+)$", result.stdout, re.MULTILINE).group(1))
    kid, se = map(float, re.search(r"^KID: (\S+) \+- (\S+)$", result.stdout, re.MULTILINE).groups())
    assert results["ddpm"]["fid"] == pytest.approx(fid, rel=1e-6)
    # KID is symmetric in its two sets, so the order of the folders does not matter
    assert (results["ddpm"]["kid"], results["ddpm"]["kid_se"]) == pytest.approx((kid, se), rel=1e-6)


def test_a_second_run_reuses_the_finished_stages(quick):
    out, results, _ = quick
    result = run([sys.executable, "-m", "experiments.image_experiment", "--quick", "--out", out],
                 TASK1_IMAGE)
    assert result.returncode == 0, result.stderr
    for stage in ("data", "classifier", "unet", "grid", "few_step"):
        assert f"== {stage}: done in an earlier run" in result.stdout
    again = json.loads((out / "results.json").read_text())
    assert again["ddim"] == results["ddim"] and again["ddpm"] == results["ddpm"]


@pytest.mark.parametrize("flags, message", [
    (["--etas", "0", "1.5"], "--etas must lie in [0, 1]"),
    (["--num_samples", "2"], "--num_samples and --num_gt must be at least 3"),
    (["--extra_spacings", "leading"], "repeats the main --timestep_spacing"),
])
def test_fid_grid_refuses_bad_flags_before_any_work(flags, message, tmp_path):
    fid_grid = load_module(TASK1_IMAGE, "experiments.fid_grid")
    args = fid_grid.build_parser().parse_args(
        ["--ckpt_path", str(tmp_path / "none.ckpt"), "--gt_dir", "x", "--out", str(tmp_path / "out"), *flags])
    with pytest.raises(fid_grid.UsageError, match=re.escape(message)):
        fid_grid.check_args(args)
    assert not (tmp_path / "out").exists()


def png_bytes(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.png"))}


def test_grid_samples_are_fresh(quick, tmp_path, capsys):
    """The grid's sample cache (fid_grid.sample with checkpoint_identity, what run_grid calls per
    setting): a copy of the checkpoint elsewhere reuses the samples (same content); a stray file
    in the folder, or the checkpoint rewritten in place, draws them again from an empty folder;
    fewer samples leave exactly that many."""
    fid_grid = load_module(TASK1_IMAGE, "experiments.fid_grid")
    out, results, _ = quick
    ckpt = tmp_path / "moved" / "last.ckpt"
    ckpt.parent.mkdir()
    shutil.copy(out / "unet" / "last.ckpt", ckpt)
    ddpm = fid_grid.Setting("ddpm", results["T"])
    ddim = fid_grid.Setting("ddim", results["steps"][0], results["etas"][0], "leading")
    for setting in (ddpm, ddim):
        shutil.copytree(out / "samples" / setting.name, tmp_path / setting.name)
    old = {setting: png_bytes(tmp_path / setting.name) for setting in (ddpm, ddim)}
    (tmp_path / ddim.name / "notes.txt").write_text("not a sample")

    def sample(num_samples):
        """Both settings as the quick run sampled them, but from ckpt -> the ones sampled now."""
        args = fid_grid.build_parser().parse_args([
            "--ckpt_path", str(ckpt), "--gt_dir", "unused", "--out", "unused",
            "--num_samples", str(num_samples), "--seed", str(results["seed"]),
            "--batch_size", str(results["config"]["grid"]["batch_size"]),
            *(["--use_ema"] if results["use_ema"] else [])])
        checkpoint = fid_grid.checkpoint_identity(ckpt)
        for setting in (ddpm, ddim):
            fid_grid.sample(args, setting, tmp_path / setting.name, checkpoint)
        return re.findall(r"^\[(\S+)\] sampling", capsys.readouterr().out, re.MULTILINE)

    # same content, other path: DDPM reused; the folder with a stray file drawn again, identically
    assert sample(results["num_samples"]) == [ddim.name]
    assert not (tmp_path / ddim.name / "notes.txt").exists()
    assert png_bytes(tmp_path / ddim.name) == old[ddim]
    assert png_bytes(tmp_path / ddpm.name) == old[ddpm]

    # the checkpoint rewritten in place (as train.py --resume does), and fewer samples
    checkpoint = torch.load(ckpt, weights_only=True)
    for weights in ("state_dict", "ema_state_dict"):
        checkpoint[weights]["tail.2.bias"] += 0.5
    torch.save(checkpoint, ckpt)
    assert sample(results["num_samples"] - 2) == [ddpm.name, ddim.name]
    for setting in (ddpm, ddim):
        folder = tmp_path / setting.name
        assert sorted(p.name for p in folder.iterdir()) == sorted(
            [f"{i}.png" for i in range(results["num_samples"] - 2)] + ["sampling.json", "setting.json"])
        recorded = json.loads((folder / "setting.json").read_text())
        assert recorded["ckpt_sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()
        assert png_bytes(folder)["0.png"] != old[setting]["0.png"]


def test_grid_passes_the_processes_through(quick, tmp_path):
    """--num_processes 2: sampling.py under torchrun (2 gloo processes), and the same PNG bytes
    as the quick run's 1 process wrote (image i depends on (seed, i) only)."""
    fid_grid = load_module(TASK1_IMAGE, "experiments.fid_grid")
    out, results, _ = quick
    ckpt = out / "unet" / "last.ckpt"
    setting = fid_grid.Setting("ddim", results["steps"][0], results["etas"][0], "leading")
    args = fid_grid.build_parser().parse_args([
        "--ckpt_path", str(ckpt), "--gt_dir", "unused", "--out", "unused", "--num_processes", "2",
        "--num_samples", str(results["num_samples"]), "--seed", str(results["seed"]),
        "--batch_size", str(results["config"]["grid"]["batch_size"]),
        *(["--use_ema"] if results["use_ema"] else [])])
    sampling = fid_grid.sample(args, setting, tmp_path / setting.name, fid_grid.checkpoint_identity(ckpt))
    assert sampling["num_processes"] == 2
    assert png_bytes(tmp_path / setting.name) == png_bytes(out / "samples" / setting.name)


def test_fid_grid_script(quick, tmp_path):
    """experiments/fid_grid.sh CKPT GT_DIR, as on a GPU, with tiny settings passed through (--skip_ddpm:
    the quick run already scores DDPM)."""
    out, results, _ = quick
    script = TASK1_IMAGE / "experiments" / "fid_grid.sh"
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
                  "--num_samples", 4, "--batch_size", 4, "--ddim_steps", 5, "--etas", 0.5, "--skip_ddpm",
                  "--fid_ckpt", out / "fid" / "standin_inception_v3.ckpt", "--fid_img_size", 75,
                  "--fid_device", "cpu"], tmp_path, env)
    assert result.returncode == 0, result.stderr[-3000:]
    grid = json.loads((tmp_path / "grid" / "results.json").read_text())
    assert grid["T"] == results["T"] and grid["num_gt"] == 6
    assert [(r["steps"], r["eta"]) for r in grid["ddim"]] == [(5, 0.5)]
    assert "| eta \\ steps | 5 |" in (tmp_path / "grid" / "results.md").read_text()


def test_fid_grid_dpm_solver_rows(quick, tmp_path):
    """--dpm_solver_steps rows (--dpm_solver_sde: SDE rows too) beside DDIM on the same timesteps,
    without DDPM (--skip_ddpm): order 1 is DDIM eta 0 (the SDE's: eta 1), so its images, FID and KID
    are DDIM's (up to a pixel level of rounding). Order 3 has no SDE row. (The quick run's few_step
    stage has the order-2 rows of both.)"""
    fid_grid = load_module(TASK1_IMAGE, "experiments.fid_grid")
    out, results, _ = quick
    args = fid_grid.build_parser().parse_args([
        "--ckpt_path", str(out / "unet" / "last.ckpt"), "--gt_dir", str(out / "data" / "val"),
        "--out", str(tmp_path / "grid"), "--num_samples", "8", "--batch_size", "8", "--skip_ddpm",
        "--ddim_steps", "4", "--etas", "0", "1", "--timestep_spacing", "quadratic", "--dpm_solver_steps", "4",
        "--dpm_solver_orders", "1", "3", "--dpm_solver_sde",
        "--fid_ckpt", str(out / "fid" / "standin_inception_v3.ckpt"),
        "--fid_img_size", "75", "--fid_device", "cpu", "--use_ema"])
    fid_grid.check_args(args)
    grid = fid_grid.run_grid(args)
    assert grid["ddpm"] is None and not (tmp_path / "grid" / "samples" / "ddpm").exists()
    assert [(r["sde"], r["order"]) for r in grid["dpm_solver"]] == [(False, 1), (False, 3), (True, 1)]
    assert {(r["spacing"], r["steps"]) for r in grid["dpm_solver"]} == {("quadratic", 4)}
    first, _, first_sde = grid["dpm_solver"]
    assert set(first) == {"sde", "order", "spacing", "steps", "fid", "kid", "kid_se", "seconds"}

    def pixels(name):
        return np.stack([np.asarray(Image.open(p), dtype=np.int16)
                         for p in sorted((tmp_path / "grid" / "samples" / name).glob("*.png"))])

    for solver, ddim in (("dpm_solver1", "eta0"), ("sde_dpm_solver1", "eta1")):
        assert np.abs(pixels(f"{solver}_quadratic_steps4") - pixels(f"ddim_quadratic_steps4_{ddim}")).max() <= 1
    assert first["fid"] == pytest.approx(grid["ddim"][0]["fid"], rel=1e-2) and first["fid"] != first_sde["fid"]
    saved = json.loads((tmp_path / "grid" / "results.json").read_text())
    assert saved["ddpm"] is None and saved["dpm_solver"] == grid["dpm_solver"]
    pairs = {(c["a"], c["b"]) for c in saved["comparisons"]}
    assert ("DPM-Solver++(3M) 4 calls, quadratic", "DDIM 4 steps, eta 0") in pairs
    assert ("SDE-DPM-Solver++(1M) 4 calls, quadratic", "DDIM 4 steps, eta 1") in pairs
    md = (tmp_path / "grid" / "results.md").read_text()
    assert "eta does not apply" in md and "| SDE-DPM-Solver++(1M), quadratic |" in md


def test_comparisons_pair_each_solver_with_its_order_one_and_with_itself():
    """fid_grid.comparisons on a synthetic few-step results dict: DPM-Solver++ against DDIM eta 0,
    SDE-DPM-Solver++ against DDIM eta 1 on the same timesteps, each solver at its fewest against its
    most calls; difference a - b and se = hypot(se_a, se_b)."""
    fid_grid = load_module(TASK1_IMAGE, "experiments.fid_grid")

    def score(kid, kid_se):
        return {"fid": 1.0, "kid": kid, "kid_se": kid_se}

    results = {"timestep_spacing": "quadratic", "steps": [10, 20], "etas": [0.0, 1.0], "extra_spacings": [],
               "extra_steps": [], "T": 1000, "floor": None, "ddpm": None,
               "ddim": [{"steps": s, "eta": eta, "spacing": "quadratic", **score(0.05 + eta / 10, 0.004)}
                        for eta in (0.0, 1.0) for s in (10, 20)],
               "dpm_solver": [{"sde": sde, "order": 2, "spacing": "quadratic", "steps": s,
                               **score(0.01 * s / 10 + 0.02 * sde, 0.003)} for sde in (False, True) for s in (10, 20)]}
    solver_rows = {(c["a"], c["b"]): c for c in fid_grid.comparisons(results) if "DPM-Solver++" in c["a"]}
    assert set(solver_rows) == {
        ("DPM-Solver++(2M) 10 calls, quadratic", "DDIM 10 steps, eta 0"),
        ("DPM-Solver++(2M) 20 calls, quadratic", "DDIM 20 steps, eta 0"),
        ("SDE-DPM-Solver++(2M) 10 calls, quadratic", "DDIM 10 steps, eta 1"),
        ("SDE-DPM-Solver++(2M) 20 calls, quadratic", "DDIM 20 steps, eta 1"),
        ("DPM-Solver++(2M) 10 calls, quadratic", "DPM-Solver++(2M) 20 calls, quadratic"),
        ("SDE-DPM-Solver++(2M) 10 calls, quadratic", "SDE-DPM-Solver++(2M) 20 calls, quadratic")}
    sde_vs_ddim = solver_rows[("SDE-DPM-Solver++(2M) 10 calls, quadratic", "DDIM 10 steps, eta 1")]
    assert sde_vs_ddim["kid_difference"] == pytest.approx(0.03 - 0.15)
    assert sde_vs_ddim["se"] == pytest.approx(0.005) and sde_vs_ddim["z"] == pytest.approx(-0.12 / 0.005)
    itself = solver_rows[("DPM-Solver++(2M) 10 calls, quadratic", "DPM-Solver++(2M) 20 calls, quadratic")]
    assert itself["kid_difference"] == pytest.approx(-0.01) and itself["se"] == pytest.approx(0.003 * 2 ** 0.5)
