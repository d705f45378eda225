"""Shared test helpers.

The course's folders import their modules flat (``from scheduler import extract``) and
both task1 folders have a ``dataset.py`` and a ``network.py``. ``load_module`` imports a
module from one folder while making sure no module of another folder is picked up from
``sys.modules``.
"""
import contextlib
import importlib
import io
import os
import subprocess
import sys
import unittest.mock
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
TASK1_2D = REPO / "task1" / "2d_plot_diffusion_todo"
TASK1_IMAGE = REPO / "task1" / "image_diffusion_todo"
TASK1_FID = TASK1_IMAGE / "fid"
TASK2 = REPO / "task2"
COURSE_FOLDERS = (TASK1_2D, TASK1_IMAGE, TASK1_FID, TASK2)

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _is_course_module(module) -> bool:
    file = getattr(module, "__file__", None)
    return file is not None and Path(file).resolve().parent in COURSE_FOLDERS


def load_module(folder: Path, name: str):
    """Import ``name`` from ``folder`` as the course does (flat, run from inside the folder).

    Course modules loaded earlier from any folder are dropped from ``sys.modules`` first, so
    ``network`` from one folder never shadows ``network`` from the other. Modules already
    imported keep working: they hold references to what they imported.
    """
    for module_name, module in list(sys.modules.items()):
        if _is_course_module(module):
            del sys.modules[module_name]
    sys.path.insert(0, str(folder))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(folder))


@pytest.fixture
def python_exe() -> str:
    """The interpreter running the tests, for CLI subprocesses."""
    return sys.executable


@pytest.fixture
def one_thread():
    """Torch on one thread for the test: tiny models run fastest so, and on a shared CPU
    multi-threaded runs are erratic (2 threads ran ~10x slower on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """Task 2: the folder of a tiny Stable Diffusion pipeline (tests/task2_tiny_pipeline.py), built once
    per session; tests must not change it."""
    from task2_tiny_pipeline import tiny_pipeline_dir

    return tiny_pipeline_dir(tmp_path_factory)


def diffusers_ddim_timesteps(num_train_timesteps: int, num_steps: int, spacing: str) -> list:
    """diffusers' DDIMScheduler(timestep_spacing=spacing).timesteps for S = num_steps, as a list.

    Under trailing, diffusers' floating-point arange(T, 0, -T / S) gives S + 1 values for some S
    (61, 103, ... at T = 1000), the last a timestep -1: the first S values are the sub-sequence.
    """
    from diffusers import DDIMScheduler

    reference = DDIMScheduler(num_train_timesteps=num_train_timesteps, timestep_spacing=spacing, steps_offset=0)
    reference.set_timesteps(num_steps)
    timesteps = reference.timesteps.tolist()
    if len(timesteps) == num_steps + 1:
        assert spacing == "trailing" and timesteps[-1] == -1, (spacing, num_steps)
        timesteps = timesteps[:-1]
    return timesteps


# --- Task 1-2 (image_diffusion_todo) ---------------------------------------------------------------

AFHQ_CLASSES = ("cat", "dog", "wild")


def run_image_script(script, *args, timeout=300):
    """Run a course script from inside its folder, as students do; one thread (the CPU is shared)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, script, *map(str, args)], cwd=TASK1_IMAGE, env=env,
                          capture_output=True, text=True, timeout=timeout)


def run_in_process(entry_point, argv, cwd):
    """``python argv...`` run from ``cwd``, but in this process: ``entry_point()`` (what the script's
    ``if __name__ == "__main__"`` block calls) with that sys.argv, its output captured and sys.exit
    turned into a return code as Python does -> CompletedProcess. The same one-line errors as a
    subprocess without ~3 s of starting Python and importing torch per call; tests of refusals use
    it, the scripts' own processes are run by the tests that sample and train."""
    stdout, stderr = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.chdir(cwd), contextlib.redirect_stdout(stdout), \
            contextlib.redirect_stderr(stderr), unittest.mock.patch.object(sys, "argv", argv):
        try:
            entry_point()
        except SystemExit as exit_:
            code = exit_.code
    if isinstance(code, str):  # sys.exit(message): Python prints the message and exits with 1
        stderr.write(code + "\n")
        code = 1
    return subprocess.CompletedProcess(argv, code or 0, stdout.getvalue(), stderr.getvalue())


def run_image_main(script, *args):
    """``python script args`` of a Task 1-2 script, in this process (run_in_process): its entry
    point ``run(main, parse_args(argv), ERRORS)``."""
    module = load_module(TASK1_IMAGE, Path(script).stem)
    argv = [script, *map(str, args)]
    return run_in_process(lambda: module.run(module.main, module.parse_args(argv[1:]), module.ERRORS),
                          argv, TASK1_IMAGE)


def assert_one_line_error(result, *needles):
    assert result.returncode != 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def make_afhq_folder(root, per_class=(6, 2), size=24, seed=0):
    """root/{train,val}/{cat,dog,wild}/*.png|jpg: random images, a different mean colour per class."""
    rng = np.random.default_rng(seed)
    for split, count in zip(("train", "val"), per_class):
        for c, name in enumerate(AFHQ_CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = np.clip(rng.normal(60 + 70 * c, 40, (size, size + 4, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / (f"{name}_{i:03d}." + ("jpg" if i % 2 else "png")))
    return root
