"""The course deliverables: the report built from results files (report/build_report.py), the
submission zip in the course's layout (report/make_submission.py), the README's length and the
FID grid script under a POSIX sh."""
import importlib.util
import json
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
STEPS, ETAS = [10, 20, 50, 100, 1000], [0.0, 0.2, 0.5, 1.0]
RUBRIC_HEADINGS = ["Task 1-1: DDIM on the Swiss roll", "Task 1-2: DDIM on images", "Task 2-1: LoRA on a visual style",
                   "Task 2-2: DreamBooth with LoRA on one subject", "The course's bars over training seeds",
                   "FID: steps × eta", "Dataset", "Generated images", "Discussion"]
# The course's example tree (the course README's "Submission" section), {ID} = 123.
COURSE_TREE = [
    "report.pdf",
    "task1/2d_plot_diffusion_todo/__init__.py", "task1/2d_plot_diffusion_todo/chamferdist.py",
    "task1/2d_plot_diffusion_todo/dataset.py", "task1/2d_plot_diffusion_todo/ddpm_tutorial.ipynb",
    "task1/2d_plot_diffusion_todo/ddpm.py", "task1/2d_plot_diffusion_todo/network.py",
    "task1/image_diffusion_todo/dataset.py", "task1/image_diffusion_todo/model.py",
    "task1/image_diffusion_todo/module.py", "task1/image_diffusion_todo/network.py",
    "task1/image_diffusion_todo/sampling.py", "task1/image_diffusion_todo/scheduler.py",
    "task1/image_diffusion_todo/train.py",
    "task2/123_task2-1_lora_weight.txt", "task2/123_task2-2_lora_weight.txt",
]


def load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "report" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def pdf_text(path):
    import fitz
    with fitz.open(path) as doc:
        # flags=0: ligatures expanded; whitespace joined, so a line break inside a phrase does not matter
        text = " ".join(" ".join(page.get_text(flags=0) for page in doc).split())
        return doc.page_count, text, sum(len(p.get_images()) for p in doc)


def fixture_grid(folder):
    """A results.json in fid_grid.py's schema with numbers no real run gives: FID 700 + 10 i + eta."""
    ddim = [{"steps": s, "eta": eta, "spacing": "leading", "fid": 700 + 10 * i + eta, "kid": 0.001 * i,
             "kid_se": 0.002, "seconds": 1.0} for i, s in enumerate(STEPS) for eta in ETAS]
    results = {"num_samples": 500, "num_gt": 500, "seed": 63, "T": 1000, "steps": STEPS, "etas": ETAS,
               "timestep_spacing": "leading", "extra_spacings": [], "extra_steps": [],
               "floor": {"fid": 611.25, "kid": 0.0, "kid_se": 0.001},
               "ddpm": {"steps": 1000, "fid": 633.75, "kid": 0.003, "kid_se": 0.002, "seconds": 9.0},
               "ddim": ddim,
               "comparisons": [{"a": "DDPM", "b": "floor (real vs. real)", "kid_difference": 0.0037,
                                "se": 0.0011, "z": 3.36}],
               "dpm_solver": [{"sde": False, "order": 2, "spacing": "leading", "steps": 7, "fid": 655.5, "kid": 0.01,
                               "kid_se": 0.002, "seconds": 0.5}]}
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps(results))
    return folder / "results.json", [f"{c['fid']:.2f}" for c in ddim]


def fixture_run(folder, colour):
    (folder / "validation").mkdir(parents=True)
    Image.new("RGB", (128, 32), colour).save(folder / "validation" / "final.png")
    return folder


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The report built twice: from fixture results (a grid and two Task 2 runs), and with none."""
    build = load("build_report")
    # the user's own results, if this clone has any, must not leak into either build
    build.GRID_RESULTS, build.LORA_RUNS, build.DREAMBOOTH_RUNS = Path("/nonexistent/results.json"), [], []
    tmp = tmp_path_factory.mktemp("report")
    grid, cells = fixture_grid(tmp / "grid")
    with_results = tmp / "with" / "report.pdf"
    with_results.parent.mkdir()
    build.main(["--grid_results", str(grid), "--lora_run", str(fixture_run(tmp / "lora", "red")),
                "--dreambooth_run", str(fixture_run(tmp / "db", "blue")),
                "--out_md", str(with_results.with_suffix(".md")), "--out_pdf", str(with_results)])
    without = tmp / "without" / "report.pdf"
    without.parent.mkdir()
    build.main(["--out_md", str(without.with_suffix(".md")), "--out_pdf", str(without)])
    return {"with": pdf_text(with_results), "without": pdf_text(without), "cells": cells}


def test_report_holds_the_rubric_and_the_fixture_numbers(built):
    pages, text, images = built["with"]
    assert pages >= 4
    for heading in RUBRIC_HEADINGS:
        assert heading in text, heading
    # the FID table in the course's shape: all 20 cells of the fixture, the DDPM and floor FIDs
    for cell in built["cells"]:
        assert cell in text, cell
    assert "633.75" in text and "611.25" in text and "3.4" in text  # DDPM, floor, the comparison's z
    assert "655.50" in text  # the grid's DPM-Solver++ row
    assert "CPU stand-in, not AFHQ" not in text
    assert "Not run yet: generated images" not in text
    assert "Left to right: real" not in text  # the stand-in's sample grids are not shown with a user's grid


def test_report_without_results_labels_the_stand_in_and_names_the_commands(built):
    _, text, _ = built["without"]
    assert "CPU stand-in, not AFHQ" in text
    assert "sh scripts/train_lora_custom.sh" in text and "sh scripts/train_dreambooth_lora.sh" in text
    # the course's bars: one row per committed seed file, read from report/results_2d_course*.json
    runs = [json.loads(p.read_text()) for p in (ROOT / "report").glob("results_2d_course*.json")]
    for run in runs:
        assert f"{run['ddpm']['cd']:.2f}" in text
    assert f"of {len(runs)}" in text


def table_numbers(markdown):
    """Every decimal number in the markdown's table rows."""
    rows = [line for line in markdown.splitlines() if line.startswith("|")]
    return set(re.findall(r"-?\d+\.\d+", "\n".join(rows)))


def test_committed_report_is_built_and_whole():
    """report.pdf holds every table number of report.md: nothing cut off at a page's foot (MuPDF can
    place content below a page after a table that ends there), and the PDF is built from this report.md."""
    markdown = (ROOT / "report" / "report.md").read_text()
    assert markdown.startswith("<!-- Generated by report/build_report.py")
    pages, text, _ = pdf_text(ROOT / "report" / "report.pdf")
    assert pages >= 4 and all(heading in text for heading in RUBRIC_HEADINGS)
    numbers = table_numbers(markdown)
    assert len(numbers) > 100 and not {n for n in numbers if n.replace("-", "−") not in text and n not in text}


def run_submission(tmp_path, *args):
    return subprocess.run([sys.executable, ROOT / "report" / "make_submission.py", *map(str, args)],
                          cwd=tmp_path, capture_output=True, text=True)


def test_submission_zip_has_the_course_layout(tmp_path):
    result = run_submission(tmp_path, "--id", "123", "--lora_link_1", "https://example.org/a",
                            "--lora_link_2", "https://example.org/b", "--out", tmp_path)
    assert result.returncode == 0, result.stderr
    with zipfile.ZipFile(tmp_path / "123_lab2.zip") as archive:
        infos = archive.infolist()
        names = [i.filename for i in infos]
        assert set(COURSE_TREE) <= set(names)
        assert archive.read("task2/123_task2-1_lora_weight.txt").decode().strip() == "https://example.org/a"
        assert archive.read("task2/123_task2-2_lora_weight.txt").decode().strip() == "https://example.org/b"
    for info in infos:
        assert info.file_size <= 5 * 1024 * 1024, info.filename
        assert not info.filename.endswith((".ckpt", ".safetensors", ".pt", ".pth", ".png", ".jpg")), info.filename
        assert not {"data", "results", "runs", "sample_data", "__pycache__"} & set(Path(info.filename).parts)
        top = info.filename.split("/")[0]
        assert top in ("report.pdf", "task1", "task2")
    assert [n for n in names if n.startswith("task2/")] == COURSE_TREE[-2:]


def test_submission_refuses_missing_links_and_a_missing_pdf(tmp_path):
    missing_link = run_submission(tmp_path, "--id", "123", "--lora_link_1", "https://example.org/a", "--out", tmp_path)
    assert missing_link.returncode == 1 and "LORA_LINK_2" in missing_link.stderr
    assert len(missing_link.stderr.strip().splitlines()) == 1 and "Traceback" not in missing_link.stderr
    fake_root = tmp_path / "clone"
    shutil.copytree(ROOT / "task1" / "2d_plot_diffusion_todo", fake_root / "task1" / "2d_plot_diffusion_todo",
                    ignore=shutil.ignore_patterns("__pycache__"))
    no_pdf = run_submission(tmp_path, "--id", "123", "--lora_link_1", "a", "--lora_link_2", "b",
                            "--out", tmp_path, "--root", fake_root)
    assert no_pdf.returncode == 1 and "make report" in no_pdf.stderr
    assert len(no_pdf.stderr.strip().splitlines()) == 1
    assert not list(tmp_path.glob("*.zip*"))


def test_readme_is_a_first_page():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 250
    for readme in ["task1/2d_plot_diffusion_todo/README.md", "task1/image_diffusion_todo/README.md", "task2/README.md"]:
        assert (ROOT / readme).exists() and f"({readme})" in "\n".join(lines)


@pytest.mark.skipif(shutil.which("dash") is None, reason="dash is not installed")
def test_fid_grid_script_help_under_dash():
    script = ROOT / "task1" / "image_diffusion_todo" / "experiments" / "fid_grid.sh"
    result = subprocess.run(["dash", script, "--help"], capture_output=True, text=True,
                            env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable})
    assert result.returncode == 0, result.stderr
    assert "sh experiments/fid_grid.sh CKPT GT_DIR" in result.stdout and "--ckpt_path" in result.stdout


def test_readme_numbers_come_from_the_results_files():
    """The README's results at a glance are the committed results files' numbers, rounded."""
    readme = (ROOT / "README.md").read_text()
    report = ROOT / "report"
    for path in report.glob("results_2d_course*.json"):
        run = json.loads(path.read_text())
        ddim50 = next(r["cd"] for r in run["ddim"] if r["steps"] == 50 and r["eta"] == 0.0)
        assert f"| {run['seed']} | {run['ddpm']['cd']:.2f} | {ddim50:.2f} |" in readme, path.name
    improved = json.loads((report / "results_2d_improved.json").read_text())
    assert f"DDPM to CD {improved['ddpm']['cd']:.3f}" in readme
    assert f"floor of {improved['floor_cd']:.3f}" in readme
    demo = json.loads((report / "results_image_demo.json").read_text())
    assert f"DDPM FID {demo['ddpm']['fid']:.1f} against a floor of {demo['floor']['fid']:.1f}" in readme
    few_step = demo["few_step"]
    z = {(c["a"], c["b"]): c["z"] for c in few_step["comparisons"]}

    def against_ddim(sde, calls):
        return z[(f"{'SDE-' if sde else ''}DPM-Solver++(2M) {calls} calls, quadratic",
                  f"DDIM {calls} steps, eta {1 if sde else 0}")]

    assert (f"At N = {few_step['num_samples']}, DPM-Solver++(2M) with 10 network calls has a lower KID" in readme
            and f"(z = {against_ddim(False, 10):.1f})" in readme and f"(z = {against_ddim(True, 10):.1f})" in readme
            and f"(z = {against_ddim(False, 20):.1f} and {against_ddim(True, 20):.1f})" in readme)
    improved1 = json.loads((report / "results_2d_improved_seed1.json").read_text())

    def sde_2m(run, calls, spacing="quadratic"):
        row = next(r for r in run["dpm_solver"] if (r["sde"], r["order"], r["timestep_spacing"], r["steps"])
                   == (True, 2, spacing, calls))
        return f"{row['cd_mean']:.2f} ± {row['cd_se']:.2f}"

    assert (f"reaches CD {sde_2m(improved, 10, 'fitted')} at 10 calls ({sde_2m(improved, 10)} on the quadratic\n"
            f"timesteps), and {sde_2m(improved, 20)} at 20" in readme
            and f"seed 1: {sde_2m(improved1, 10, 'fitted')} and\n{sde_2m(improved1, 20)}" in readme)


def build_report_without_2d_solver_rows(tmp_path):
    """build_report reading copies of report/results_2d_*.json in tmp_path without their "dpm_solver" rows."""
    build = load("build_report")
    for path in (ROOT / "report").glob("results_2d_*.json"):
        run = json.loads(path.read_text())
        run.pop("dpm_solver", None)
        (tmp_path / path.name).write_text(json.dumps(run))
    build.REPORT_DIR = tmp_path
    return build


def test_report_renders_the_2d_dpm_solver_rows_when_present(tmp_path):
    """The few-step table of Task 1-1 reads the "dpm_solver" key of report/results_2d_*.json: DDIM
    (the solvers' order 1), 2M, 3M and SDE-2M on the quadratic timesteps, the best row of all, and
    SDE-2M's z against 2M and against DDIM eta 1."""
    build = build_report_without_2d_solver_rows(tmp_path)
    assert "Not run yet" in build.dpm_solver_2d()
    run = json.loads((tmp_path / "results_2d_course.json").read_text())
    quadratic = {(False, 1): (50.0, 2.0), (True, 1): (40.0, 3.0), (False, 2): (30.0, 1.0), (False, 3): (35.0, 1.5),
                 (True, 2): (20.0, 2.0)}
    run["dpm_solver"] = [{"sde": sde, "order": order, "timestep_spacing": "quadratic", "steps": 10, "cd_mean": mean,
                          "cd_se": se, "cds": [mean] * 7} for (sde, order), (mean, se) in quadratic.items()]
    run["dpm_solver"].append({"sde": False, "order": 3, "timestep_spacing": "trailing", "steps": 10,
                              "cd_mean": 12.345, "cd_se": 0.5, "cds": [12.345] * 7})
    (tmp_path / "results_2d_course.json").write_text(json.dumps(run))
    line = next(line for line in build.dpm_solver_2d().splitlines() if line.startswith("| course, seed 0 | 10 |"))
    # z = (20 - 30) / sqrt(2^2 + 1^2) and (20 - 40) / sqrt(2^2 + 3^2)
    assert line == ("| course, seed 0 | 10 | 7 | 50.00 ± 2.00 | 40.00 ± 3.00 | 30.00 ± 1.00 | 35.00 ± 1.50 | "
                    "20.00 ± 2.00 | 12.35 ± 0.50 (3M, trailing) | -4.5 | -5.5 |")


def test_few_step_goal_verdict_says_met_missed_or_unresolved_and_by_how_many_standard_errors(tmp_path):
    """The improved recipe's SDE-DPM-Solver++(2M) rows (fitted timesteps where the run has them, else
    quadratic) against CD <= 2 at 10 calls and <= 0.6 at 20, from the results files: met or missed by
    2 standard errors or more, else unresolved."""
    build = build_report_without_2d_solver_rows(tmp_path)
    for name, cds in (("results_2d_improved.json", {("quadratic", 10): (2.6, 0.2), ("fitted", 10): (1.5, 0.2),
                                                    ("quadratic", 20): (0.75, 0.05)}),
                      ("results_2d_improved_seed1.json", {("quadratic", 10): (2.5, 0.25),
                                                          ("quadratic", 20): (0.55, 0.05)})):
        run = json.loads((tmp_path / name).read_text())
        run["dpm_solver"] = [{"sde": True, "order": 2, "timestep_spacing": spacing, "steps": calls,
                              "cd_mean": mean, "cd_se": se} for (spacing, calls), (mean, se) in cds.items()]
        (tmp_path / name).write_text(json.dumps(run))
    text = build.dpm_solver_2d_verdict()
    assert ("seed 0): 10 calls met (the bound 2 is 2.5 SE above the mean); "
            "20 calls missed (the bound 0.6 is 3.0 SE below the mean)." in text)
    assert ("seed 1: 10 calls missed (the bound 2 is 2.0 SE below the mean); "
            "20 calls unresolved (the bound 0.6 is 1.0 SE above the mean)." in text)
    assert build.dpm_solver_2d_goal(0) == "1.50 ± 0.20 at 10 calls (fitted) and 0.75 ± 0.05 at 20 calls (quadratic)"
    assert build.dpm_solver_2d_goal(1) == ("2.50 ± 0.25 at 10 calls (quadratic) and "
                                           "0.55 ± 0.05 at 20 calls (quadratic)")


def test_fitted_timesteps_table_pairs_each_fitted_row_with_its_quadratic_row_draw_by_draw(tmp_path):
    build = build_report_without_2d_solver_rows(tmp_path)
    assert "Not run yet" in build.dpm_solver_2d_fitted()
    quadratic, fitted = [2.0, 3.0, 4.0], [1.5, 2.0, 3.8]
    run = json.loads((tmp_path / "results_2d_improved.json").read_text())
    run["dpm_solver"] = [{"sde": True, "order": 2, "timestep_spacing": spacing, "steps": 10, "cds": cds,
                          "cd_mean": float(np.mean(cds)), "cd_se": float(np.std(cds, ddof=1) / np.sqrt(3)), **extra}
                         for spacing, cds, extra in (("quadratic", quadratic, {}),
                                                     ("fitted", fitted, {"timesteps": [700, 300, 20, 4]}))]
    (tmp_path / "results_2d_improved.json").write_text(json.dumps(run))
    differences = np.subtract(fitted, quadratic)
    paired = f"{differences.mean():+.2f} ± {differences.std(ddof=1) / np.sqrt(3):.2f}"
    line = next(line for line in build.dpm_solver_2d_fitted().splitlines() if line.startswith("| improved, seed 0"))
    assert line == f"| improved, seed 0 | 10 | SDE-2M | 3.00 ± 0.58 | 2.43 ± 0.70 | {paired} | 700, 300, 20, 4 |"


def test_report_renders_the_few_step_stage_when_present():
    """make image-demo's few_step results (OUT/few_step/results.json, nested as "few_step"): a row per
    sampler, a column per number of calls, and the stage's KID contrasts."""
    build = load("build_report")

    def score(fid, kid):
        return {"fid": fid, "kid": kid, "kid_se": 0.002}

    few_step = {"num_samples": 2000, "timestep_spacing": "quadratic", "floor": score(1.5, 0.0001),
                "ddim": [{"steps": s, "eta": eta, "spacing": "quadratic", **score(10 * s + eta, 0.01)}
                         for eta in (0.0, 1.0) for s in (10, 20)],
                "dpm_solver": [{"sde": sde, "order": 2, "spacing": "quadratic", "steps": s,
                                **score(s / 10 + sde, 0.004)} for sde in (False, True) for s in (10, 20)],
                "comparisons": [{"a": "DPM-Solver++(2M) 10 calls, quadratic", "b": "DDIM 10 steps, eta 0",
                                 "kid_difference": -0.006, "se": 0.0028, "z": -2.1}]}
    text = build.few_step_table(few_step)
    assert "At N = 2000" in text and "floor 1.50 (0.1 ± 2.0)" in text
    assert "| quadratic: sampler \\ calls | 10 | 20 |" in text
    assert "| DDIM, eta 0 | 100.00 (10.0 ± 2.0) | 200.00 (10.0 ± 2.0) |" in text
    assert "| DDIM, eta 1 | 101.00 (10.0 ± 2.0) | 201.00 (10.0 ± 2.0) |" in text
    assert "| DPM-Solver++(2M) | 1.00 (4.0 ± 2.0) | 2.00 (4.0 ± 2.0) |" in text
    assert "| SDE-DPM-Solver++(2M) | 2.00 (4.0 ± 2.0) | 3.00 (4.0 ± 2.0) |" in text
    assert "| DPM-Solver++(2M) 10 calls, quadratic | DDIM 10 steps, eta 0 | -6.0 ± 2.8 | -2.10 | resolved |" in text
