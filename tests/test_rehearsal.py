"""benchmarks/rehearsal.py at the tiny scale: every stage runs the real command, writes its outputs and
its figures; and its parts (the progress watcher, the memory hook, the course runs' lengths, the bounds)
against independent computations. The real-size run is `make rehearsal`, a benchmark, not a test."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import rehearsal  # noqa: E402

STAGES = ["afhq_data", "train", "train_resume", "sample_ddpm", "sample_ddim", "sample_dpm_solver", "fid", "sd_model",
          "lora_naruto", "lora_custom", "dreambooth", "stock_pipeline", "notebook", "submission"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """The whole rehearsal at the tiny scale, with the bf16 and gradient-checkpointing runs a GPU run adds
    (its fp16 ones need CUDA), DDPM to its end (the stop is tested below). Returns (process, results)."""
    out = tmp_path_factory.mktemp("rehearsal") / "rehearsal_cpu.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    process = subprocess.run([sys.executable, ROOT / "benchmarks" / "rehearsal.py", "--scale", "tiny", "--out", out,
                              "--variants", "bf16", "gradient_checkpointing", "--ddpm_steps", "1000"],
                             capture_output=True, text=True,
                             env=env, timeout=900, stdin=subprocess.DEVNULL)
    assert process.returncode == 0, process.stdout[-3000:] + process.stderr[-3000:]
    return process, json.loads(out.read_text())


def figures_of(results):
    return {stage["name"]: stage["figures"] for stage in results["stages"]}


def test_every_stage_runs_and_writes_its_figures(tiny_run):
    _, results = tiny_run
    variants = ["lora_naruto_bf16", "lora_naruto_gradient_checkpointing"]
    assert [s["name"] for s in results["stages"]] == STAGES[:11] + variants + STAGES[11:]
    for stage in results["stages"]:
        assert stage["ok"], stage
        assert stage["seconds"] > 0 and stage["figures"]["peak_rss_gib"] > 0, stage
        assert stage["commands"] and all("/tmp" not in c and str(ROOT) not in c for c in stage["commands"]), stage
    assert all(bound["met"] for bound in results["bounds"]), results["bounds"]


def test_task1_stages_write_their_outputs(tiny_run):
    figures = figures_of(tiny_run[1])
    assert figures["afhq_data"]["eval_images"] == figures["afhq_data"]["val_images"] == 12
    assert figures["train"]["seconds_per_step"] > 0 and figures["train"]["checkpoint_mb"] > 0
    assert figures["train_resume"]["resumed_at"] == 2
    for method in ("ddpm", "ddim", "dpm_solver"):
        assert figures[f"sample_{method}"]["images"] == figures[f"sample_{method}"]["batch"] == 4
        assert figures[f"sample_{method}"]["seconds_per_image_call"] > 0
    assert figures["sample_ddpm"]["num_train_timesteps"] == 20
    assert math.isfinite(figures["fid"]["fid"]) and figures["fid"]["images_per_folder"] == 12


def test_task2_stages_write_loras_that_load_and_change_the_images(tiny_run):
    figures = figures_of(tiny_run[1])
    for kind in ("lora_naruto", "lora_custom", "dreambooth", "lora_naruto_bf16",
                 "lora_naruto_gradient_checkpointing"):
        assert figures[kind]["lora_file_mb"] > 0 and "final.png" in figures[kind]["validation_images"], kind
        assert figures[kind]["seconds_per_step"] > 0, kind
    # a one-image data set: each epoch is one step, so the per-epoch validation ran before the final one
    assert figures["lora_naruto"]["validation_images"] == ["epoch_0001.png", "final.png"]
    assert figures["dreambooth"]["class_images"] == 2
    changes = figures["stock_pipeline"]["max_pixel_change_by_lora"]
    assert set(changes) == {"lora_naruto", "lora_custom", "dreambooth"} and all(c > 0 for c in changes.values())
    assert figures["notebook"]["image_grids"] == 4
    assert figures["submission"]["largest_file_mb"] <= 5


def test_projections_name_every_course_job(tiny_run):
    hours = tiny_run[1]["projected_hours"]
    assert set(hours) == {"train_100k_steps", "train_100k_steps_sample_grids_and_checkpoints",
                          "fid_grid_sampling_21_cells_500_images", "fid_grid_scoring", "lora_naruto_course_run",
                          "lora_custom_course_run", "dreambooth_course_run"}
    train = figures_of(tiny_run[1])["train"]
    assert hours["train_100k_steps"] == round(100_000 * train["seconds_per_step"] / 3600, 3)


def test_the_temporary_folder_is_removed(tiny_run):
    first_line = tiny_run[0].stdout.splitlines()[0]
    work = Path(first_line.rsplit(" in ", 1)[1])
    assert work.name.startswith("rehearsal-") and not work.exists()


def simulated_course_run(images, epochs=None, max_train_steps=None, validation_epochs=1):
    """(steps, validations) by stepping through task2/training.py's loop: batch 1, one process."""
    max_steps = max_train_steps or epochs * images
    step, validations, epoch = 0, 0, 0
    while step < max_steps:
        for _ in range(images):
            step += 1
            if step >= max_steps:
                break
        if step < max_steps and (epoch + 1) % validation_epochs == 0:
            validations += 1
        epoch += 1
    return step, validations + 1  # and the final one, from the saved file


def test_course_run_lengths_follow_the_wrappers_and_the_training_loop():
    assert rehearsal.wrapper_defaults("dreambooth") == simulated_course_run(4, max_train_steps=500, validation_epochs=50)
    assert rehearsal.wrapper_defaults("lora_custom") == simulated_course_run(4, epochs=100, validation_epochs=50)
    assert rehearsal.wrapper_defaults("lora_naruto") == simulated_course_run(1221, epochs=100, validation_epochs=1)


def test_denoising_progress_needs_two_sightings_and_measures_between_them(monkeypatch):
    clock = iter([10.0, 12.0, 16.0])
    monkeypatch.setattr(rehearsal.time, "perf_counter", lambda: next(clock))
    progress = rehearsal.DenoisingProgress(limit=3)
    assert not progress("batches:   0%|  | 0/1 [00:00<?, ?it/s]\rsampling:   0%|  | 0/1000 [00:00<?, ?it/s]")
    assert not progress("sampling:   0%|  | 3/1000 [00:05<1:00, 1.0s/it]")  # the limit, but one sighting
    assert progress("sampling:   0%|  | 3/1000 [00:05<1:00, 1.0s/it]\rsampling:   1%|  | 5/1000 [00:09<1:00, 1.0s/it]")
    assert progress.total == 1000 and progress.seconds_per_step() == (16.0 - 12.0) / (5 - 3)


def test_memory_hook_counts_a_process_alone_not_the_parent_it_was_forked_from(tmp_path):
    """A child started by a parent holding 600 MB records its own peak (100 MB), which getrusage's
    ru_maxrss would not (it folds in the pre-exec copy of the parent)."""
    log = tmp_path / "memory.jsonl"
    env = {**os.environ, "PYTHONPATH": str(rehearsal.HOOK_DIR), "REHEARSAL_MEMORY_LOG": str(log)}
    child = "import numpy; a = numpy.ones(100 * 2**20 // 8)"
    parent = ("import numpy, subprocess, sys; a = numpy.ones(600 * 2**20 // 8); "
              f"subprocess.run([sys.executable, '-c', {child!r}], check=True)")
    subprocess.run([sys.executable, "-c", parent], env=env, check=True)
    peaks = sorted(json.loads(line)["peak_rss_bytes"] for line in log.read_text().splitlines())
    assert len(peaks) == 2
    assert 100 * 2**20 < peaks[0] < 350 * 2**20 and peaks[1] > 600 * 2**20


def test_bounds_catch_a_wrong_lora_size_a_large_fp16_peak_and_a_slow_run():
    def record(lora_mb, fp16_gib, minutes):
        return {"total_seconds": minutes * 60, "stages": [
            {"name": "lora_custom", "ok": True, "figures": {"lora_file_mb": lora_mb}},
            {"name": "lora_naruto_fp16", "ok": True, "figures": {"lora_file_mb": 3.2, "cuda_max_allocated_gib": fp16_gib}},
            {"name": "submission", "ok": True, "figures": {"largest_file_mb": 1.4}}]}

    def missed(checks):
        return [text for text, passed in checks if not passed]

    assert missed(rehearsal.bounds(record(3.2, 9.0, 7), "cuda", "full")) == []
    assert len(missed(rehearsal.bounds(record(6.0, 9.0, 7), "cuda", "full"))) == 1
    assert len(missed(rehearsal.bounds(record(3.2, 12.0, 7), "cuda", "full"))) == 1
    assert len(missed(rehearsal.bounds(record(3.2, 9.0, 9), "cuda", "full"))) == 1
    assert missed(rehearsal.bounds(record(3.2, 9.0, 9), "cpu", "full")) == []


def test_a_stopped_command_is_interrupted_even_when_started_with_sigint_ignored(tmp_path):
    """As under `make rehearsal &`: the shell ignores SIGINT in background jobs and children inherit that.
    The runner restores Ctrl-C, so the command stops at once and its memory record is still written."""
    import signal

    r = rehearsal.Rehearsal("cpu", rehearsal.SCALES["tiny"], tmp_path, 2, 2, 3, ())
    (tmp_path / "logs").mkdir()
    (tmp_path / "memory").mkdir()
    counting = "import time\nfor i in range(600):\n    print('step', i, flush=True)\n    time.sleep(0.1)"
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        run = r.run("counting", [sys.executable, "-c", counting], tmp_path, stop=lambda log: "step 3" in log)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert run.stopped_early and run.returncode != 0 and run.seconds < 20
    assert "step 3" in run.log and "step 599" not in run.log
    assert run.peak_rss_bytes > 0


def test_readme_and_report_figures_come_from_the_committed_cpu_rehearsal():
    results = json.loads((ROOT / "report" / "rehearsal_cpu.json").read_text())
    assert results["scale"] == "full" and all(stage["ok"] for stage in results["stages"])
    assert all(bound["met"] for bound in results["bounds"])
    figures, hours = figures_of(results), results["projected_hours"]
    train, custom, dreambooth = figures["train"], figures["lora_custom"], figures["dreambooth"]
    task2_peak = max(figures[kind]["peak_rss_gib"] for kind in ("lora_naruto", "lora_custom", "dreambooth"))
    readme = " ".join((ROOT / "README.md").read_text().split())
    for text in [f"takes {train['seconds_per_step']:.0f} s per step at batch 16",
                 f"would take {hours['train_100k_steps']:,.0f} hours here",
                 f"at a peak RSS of {train['peak_rss_gib']:.1f} GiB",
                 f"{figures['sample_ddim']['seconds_per_image_call']:.2f} s per image and network call at batch 64",
                 f"a LoRA step at 512 px takes {custom['seconds_per_step']:.0f} s (DreamBooth with prior "
                 f"preservation: {dreambooth['seconds_per_step']:.0f} s) at up to {task2_peak:.1f} GiB",
                 f"each LoRA file is {custom['lora_file_mb']:.1f} MB",
                 f"about {results['total_seconds'] / 60:.0f} minutes on 2 cores"]:
        assert text in readme, text
    report = (ROOT / "report" / "report.md").read_text()
    assert f"{results['total_seconds'] / 60:.1f} minutes in all" in report
