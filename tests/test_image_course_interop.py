"""Task 1-2 and what a student of the course brings (issue 8): Lab-1 checkpoints, the course's
sampling flags, the course's FID reference set, the course's public names and signatures.

A Lab-1 checkpoint is what the course's DiffusionModule.save writes: torch.save({"hparams":
{"network": <UNet object>, "var_scheduler": <DDPMScheduler object>[, "predictor": str]},
"state_dict": DiffusionModule.state_dict()}). The tests write such files themselves: this folder's
UNet without the attributes the course's lacks (config), and a DDPMScheduler with the course's
buffers and attributes, pickled under the course's module and class names (network.UNet,
module.ResBlock, scheduler.DDPMScheduler, ...). Networks have ch = 64 (2 channels per GroupNorm
group), so their output depends on t.
"""
import importlib
import inspect
import os
import pickletools
import shutil
import subprocess
import sys
import zipfile
from unittest import mock

import numpy as np
import pytest
import torch
from conftest import TASK1_IMAGE, load_module
from PIL import Image

model_mod = load_module(TASK1_IMAGE, "model")


def _import_beside_model(name):
    """Import a module of the image folder against the modules model.py already imported."""
    sys.path.insert(0, str(TASK1_IMAGE))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(TASK1_IMAGE))


network, scheduler, course_module = sys.modules["network"], sys.modules["scheduler"], sys.modules["module"]
course_checkpoint = sys.modules["course_checkpoint"]
sampling, dataset, convert = (_import_beside_model(name) for name in ("sampling", "dataset", "convert_checkpoint"))

T = 20
RES = 16
COURSE_GLOBALS = {"network UNet", "module ResBlock", "module TimeEmbedding", "module AttnBlock",
                  "module DownSample", "module UpSample", "scheduler DDPMScheduler"}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def run_cli(script, *args):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, script, *map(str, args)], cwd=TASK1_IMAGE, env=env,
                          capture_output=True, text=True, timeout=300)


def assert_one_line_error(result, *needles):
    assert result.returncode != 0, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def course_unet(use_cfg=False, seed=0):
    """The course's UNet as its save() pickles it: no config attribute, weights off their init."""
    torch.manual_seed(seed)
    unet = network.UNet(T=T, image_resolution=RES, ch=64, ch_mult=[1, 2], attn=[1], num_res_blocks=1, dropout=0.1,
                        use_cfg=use_cfg, cfg_dropout=0.2, num_classes=3 if use_cfg else None)
    with torch.no_grad():
        for param in unet.parameters():
            param.add_(0.05 * torch.randn_like(param))
    del unet.config
    return unet.eval()


def course_scheduler(mode="linear", beta_1=1e-4, beta_T=0.02, betas=None):
    """The course's DDPMScheduler: buffers betas, alphas, alphas_cumprod, sigmas; attributes
    num_train_timesteps, num_inference_timesteps, timesteps, schedule_mode, sigma_type."""
    sched = scheduler.DDPMScheduler(T, beta_1, beta_T, mode)
    if betas is not None:
        sched.betas = betas
    del sched._buffers["alphas_cumprod_prev"]
    del sched.beta_1, sched.beta_T, sched.mode
    sched.schedule_mode = mode
    return sched


def write_lab1(path, unet, sched, predictor=None):
    """torch.save as the course's DiffusionModule.save does (the 2026 template also stores the predictor)."""
    hparams = {"network": unet, "var_scheduler": sched}
    if predictor is not None:
        hparams["predictor"] = predictor
    state_dict = torch.nn.ModuleDict({"network": unet, "var_scheduler": sched}).state_dict()
    # pickle finds the classes by their module names, as in the course's own folder
    with mock.patch.dict(sys.modules, {"network": network, "module": course_module, "scheduler": scheduler}):
        torch.save({"hparams": hparams, "state_dict": state_dict}, path)
    return path


def pickled_globals(path):
    with zipfile.ZipFile(path) as archive:
        data = archive.read(next(n for n in archive.namelist() if n.endswith("data.pkl")))
    return {arg for op, arg, _ in pickletools.genops(data) if op.name == "GLOBAL"}


def network_inputs(use_cfg):
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(3, 3, RES, RES, generator=generator)
    return x, torch.tensor([2, 9, 17]), torch.tensor([1, 3, 0]) if use_cfg else None


@pytest.mark.parametrize("use_cfg, mode, beta_1, beta_T, predictor", [
    (False, "linear", 1e-4, 0.02, None),  # the 2025 template: no predictor stored
    (True, "quad", 2e-4, 0.03, "x0"),
    (False, "cosine", 1e-4, 0.02, "mean"),
])
def test_lab1_checkpoint_loads_as_the_network_it_holds(tmp_path, use_cfg, mode, beta_1, beta_T, predictor):
    unet, sched = course_unet(use_cfg), course_scheduler(mode, beta_1, beta_T)
    path = write_lab1(tmp_path / "lab1.ckpt", unet, sched, predictor)
    assert COURSE_GLOBALS <= pickled_globals(path)  # the course's classes, pickled by name
    with pytest.raises(Exception, match="Weights only load failed"):  # not loadable as plain tensors
        torch.load(path, weights_only=True)

    ddpm = model_mod.DiffusionModule(None, None)
    checkpoint = ddpm.load(path)
    assert checkpoint["config"]["network"] == {
        "T": T, "image_resolution": RES, "ch": 64, "ch_mult": [1, 2], "attn": [1], "num_res_blocks": 1,
        "dropout": 0.1, "use_cfg": use_cfg, "cfg_dropout": 0.2, "num_classes": 3 if use_cfg else None}
    schedule = ddpm.var_scheduler.config
    assert (schedule["mode"], schedule["num_train_timesteps"]) == (mode, T)
    if mode != "cosine":  # cosine does not use beta_1 / beta_T
        assert (schedule["beta_1"], schedule["beta_T"]) == (beta_1, beta_T)
    assert torch.equal(ddpm.var_scheduler.betas, sched.betas)
    assert checkpoint["config"]["predictor"] == predictor and ddpm.predictor == (predictor or "noise")

    x, t, label = network_inputs(use_cfg)
    ddpm.network.eval()
    with torch.no_grad():
        expected = unet(x, t, label)
        assert (unet(x, t.flip(0), label) - expected).abs().max() > 1e-3  # the network sees t
        assert (ddpm.network(x, t, label) - expected).abs().max() < 1e-5


def test_a_schedule_that_is_none_of_ours_is_refused(tmp_path):
    sigmoid = 1e-4 + (0.02 - 1e-4) * torch.sigmoid(torch.linspace(-6, 6, T))
    path = write_lab1(tmp_path / "lab1.ckpt", course_unet(), course_scheduler(betas=sigmoid))
    with pytest.raises(model_mod.CheckpointError, match="not a linear, quad or cosine schedule"):
        model_mod.load_checkpoint(path)
    for mode in scheduler.SCHEDULES:  # and the three are told apart from their betas alone
        betas = scheduler.make_betas(1000, 1e-4, 0.02, mode)
        assert course_checkpoint.identify_schedule(betas)["mode"] == mode


class Hostile:
    """An object whose unpickling calls function(*args): what a malicious checkpoint does."""

    def __init__(self, function, *args):
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


def hostile_files(folder, marker):
    """Checkpoints that try to create `marker` while loading, in every way a pickle can call."""
    import builtins
    touch = ["touch", str(marker)]
    files = {}
    for name, payload in [("os.system", Hostile(os.system, " ".join(touch))),
                          ("builtins.eval", Hostile(builtins.eval, f"open({str(marker)!r}, 'w')")),
                          ("subprocess.call", Hostile(subprocess.call, touch))]:
        files[name] = folder / f"{name}.ckpt"
        torch.save({"hparams": {"network": payload, "var_scheduler": None}, "state_dict": {}}, files[name])
    # protocol 0's INST opcode (a call too), written into a torch.save archive by hand
    files["os.system (INST)"] = folder / "inst.ckpt"
    torch.save({}, folder / "empty.ckpt")
    with zipfile.ZipFile(folder / "empty.ckpt") as source, zipfile.ZipFile(files["os.system (INST)"], "w") as out:
        for name in source.namelist():
            data = source.read(name)
            out.writestr(name, f"(S'touch {marker}'\nios\nsystem\n.".encode() if name.endswith("data.pkl") else data)
    return files


def test_hostile_pickles_are_refused_and_do_not_run(tmp_path):
    marker = tmp_path / "pwned"
    files = hostile_files(tmp_path, marker)
    # the fixture can show the failure: torch.load(weights_only=False) runs the payload
    torch.load(files["os.system"], weights_only=False)
    assert marker.exists()
    marker.unlink()
    # (pickle records os.system under its defining module, posix; the hand-written INST names os)
    called = {"os.system": "posix.system", "builtins.eval": "builtins.eval", "subprocess.call": "subprocess.call",
              "os.system (INST)": "os.system"}
    for name, path in files.items():
        with pytest.raises(model_mod.CheckpointError, match=rf"calls {called[name]}\(\.\.\.\).*nothing from the file was run"):
            model_mod.DiffusionModule(None, None).load(path)
        assert not marker.exists(), name
    # the command line: one line, non-zero exit, nothing run, nothing written
    result = run_cli("convert_checkpoint.py", files["subprocess.call"], tmp_path / "out.ckpt")
    assert_one_line_error(result, "subprocess.call", "refused")
    assert not marker.exists() and not (tmp_path / "out.ckpt").exists()


@pytest.fixture(scope="module")
def lab1(tmp_path_factory):
    """A 2025 Lab-1 file (no predictor), a 2026 one (predictor x0), and the same network saved by
    this project's DiffusionModule.save with predictor x0 (the reference)."""
    folder = tmp_path_factory.mktemp("lab1")
    unet = course_unet()
    files = {"2025": write_lab1(folder / "lab1_2025.ckpt", unet, course_scheduler()),
             "2026": write_lab1(folder / "lab1_2026.ckpt", unet, course_scheduler(), predictor="x0")}
    reference = network.UNet(T=T, image_resolution=RES, ch=64, ch_mult=[1, 2], attn=[1], num_res_blocks=1,
                             dropout=0.1, cfg_dropout=0.2)
    reference.load_state_dict(unet.state_dict())
    files["ours"] = folder / "ours.ckpt"
    model_mod.DiffusionModule(reference, scheduler.DDPMScheduler(T, 1e-4, 0.02), predictor="x0").save(files["ours"])
    return unet, files


def sample_pngs(ckpt, out, *flags):
    result = run_cli("sampling.py", "--ckpt_path", ckpt, "--save_dir", out, "--num_samples", 3, "--batch_size", 2,
                     "--sample_method", "ddim", "--ddim_steps", 5, "--eta", 0.5, *flags)
    assert result.returncode == 0, result.stderr[-3000:]
    return {p.name: np.asarray(Image.open(p)) for p in sorted(out.glob("*.png"))}


def test_sampling_py_samples_a_lab1_checkpoint(lab1, tmp_path):
    """sampling.py on a 2025 Lab-1 file, with the course's flags (agreeing with the file, and
    --predictor filling in what it lacks), draws the images the same network saved by this project
    draws."""
    _, files = lab1
    ours = sample_pngs(files["ours"], tmp_path / "ours")
    lab = sample_pngs(files["2025"], tmp_path / "lab1", "--predictor", "x0", "--mode", "linear",
                      "--beta_1", 1e-4, "--beta_T", 0.02)
    assert sorted(lab) == ["0.png", "1.png", "2.png"]
    assert all(np.array_equal(lab[name], ours[name]) for name in ours)


def sampling_args(ckpt, out, *flags):
    return sampling.parse_args(["--ckpt_path", str(ckpt), "--save_dir", str(out), *map(str, flags)])


@pytest.mark.parametrize("flags, message", [
    (["--predictor", "noise"], "--predictor noise contradicts the checkpoint's predictor x0"),
    (["--mode", "quad"], "--mode quad contradicts the checkpoint's mode linear"),
    (["--beta_1", 2e-4], "--beta_1 0.0002 contradicts the checkpoint's beta_1 0.0001"),
    (["--beta_T", 0.03], "--beta_T 0.03 contradicts the checkpoint's beta_T 0.02"),
])
def test_a_course_flag_that_contradicts_the_checkpoint_stops(lab1, tmp_path, flags, message):
    with pytest.raises(sampling.UsageError) as error:
        sampling.main(sampling_args(lab1[1]["2026"], tmp_path / "out", *flags))
    assert str(error.value) == message
    assert not (tmp_path / "out").exists()


def test_sampling_flags_default_to_none_and_say_the_course_defaults(capsys):
    args = sampling_args("c.ckpt", "out")
    assert (args.predictor, args.mode, args.beta_1, args.beta_T) == (None, None, None, None)
    assert args.timestep_spacing == "leading"
    with pytest.raises(SystemExit):
        sampling.parse_args(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    for default in ("course default: noise", "course default: linear", "course default: 1e-4",
                    "course default: 0.02"):
        assert default in help_text


def test_eta_outside_0_1_is_refused_before_anything_is_read(tmp_path):
    for eta in (1.5, -0.5):
        with pytest.raises(sampling.UsageError, match=r"--eta must be in \[0, 1\]"):
            sampling.main(sampling_args(tmp_path / "missing.ckpt", tmp_path / "out", "--eta", eta))


def test_convert_checkpoint_writes_this_projects_format(lab1, tmp_path):
    unet, files = lab1
    out = tmp_path / "converted.ckpt"
    result = run_cli("convert_checkpoint.py", files["2025"], out, "--predictor", "mean")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "predictor mean (from --predictor)" in result.stdout
    checkpoint = torch.load(out, weights_only=True)  # tensors and plain values only
    assert set(checkpoint) == {"config", "state_dict"} and checkpoint["config"]["predictor"] == "mean"
    converted = network.UNet(**checkpoint["config"]["network"]).eval()
    converted.load_state_dict(checkpoint["state_dict"])
    x, t, _ = network_inputs(False)
    with torch.no_grad():
        assert (converted(x, t) - unet(x, t)).abs().max() < 1e-5
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]

    before = out.read_bytes()
    for source, flags, error, needle in [
        (files["2025"], [], convert.UsageError, "already exists"),
        (files["ours"], [], convert.UsageError, "already in this project's format"),
        (files["2026"], ["--predictor", "noise"], model_mod.CheckpointError, "contradicts"),
    ]:
        target = out if needle == "already exists" else tmp_path / "other.ckpt"
        with pytest.raises(error, match=needle):
            convert.main(convert.parse_args([str(source), str(target), *flags]))
    assert out.read_bytes() == before and not (tmp_path / "other.ckpt").exists()


# --- the course's FID reference set (dataset.py) ---

def make_jpeg_afhq(root, seed=0):
    """root/val/{cat,dog}/<AFHQ-like name>.jpg: smooth random JPEGs of odd sizes, one grayscale."""
    rng = np.random.default_rng(seed)
    for c, name in enumerate(("cat", "dog")):
        folder = root / "val" / name
        folder.mkdir(parents=True)
        for i in range(3):
            base = rng.integers(0, 255, (6, 7, 3), dtype=np.uint8)
            img = Image.fromarray(base).resize((90 + 7 * i, 77 + 5 * c), Image.BILINEAR)
            if c == 1 and i == 2:
                img = img.convert("L")
            img.save(folder / f"flickr_{name}_{i:06d}.jpg")
    return root


def course_eval_folder(afhq_root, eval_dir):
    """The course dataset.py's __main__, step by step: copy each val file to eval_dir under its own
    name, open it, resize((64, 64)) with PIL's defaults, save it again under that name."""
    eval_dir.mkdir()
    for path in sorted((afhq_root / "val").rglob("*.jpg")):
        shutil.copy(path, eval_dir / path.name)
        img = Image.open(eval_dir / path.name)
        img = img.resize((64, 64))
        img.save(eval_dir / path.name)


def pixels(folder):
    return {p.name: np.asarray(Image.open(p)) for p in sorted(folder.iterdir())}


def test_dataset_py_builds_the_courses_eval_folder(tmp_path, capsys):
    data = make_jpeg_afhq(tmp_path / "afhq")
    result = run_cli("dataset.py", "--data_root", data)
    assert result.returncode == 0, result.stderr[-3000:]
    course_eval_folder(data, tmp_path / "course_eval")
    ours, course = pixels(data / "eval"), pixels(tmp_path / "course_eval")
    assert sorted(ours) == sorted(course) == sorted(p.name for p in (data / "val").rglob("*.jpg"))
    for name in course:
        assert ours[name].shape == course[name].shape and np.array_equal(ours[name], course[name]), name
    assert any(image.ndim == 2 for image in ours.values())  # the grayscale file stayed grayscale
    (tmp_path / "plain").mkdir()  # built in a temporary folder, but with a plain mkdir's permissions
    assert (data / "eval").stat().st_mode == (tmp_path / "plain").stat().st_mode

    # --format png: the same resize, saved losslessly as <name>.png
    dataset.prepare_eval_dir(data, tmp_path / "png_eval", image_format="png")
    for source in (data / "val").rglob("*.jpg"):
        expected = np.asarray(Image.open(source).resize((64, 64)))
        assert np.array_equal(np.asarray(Image.open(tmp_path / "png_eval" / f"{source.stem}.png")), expected)

    # a second run keeps what is there
    before = {p.name: p.read_bytes() for p in (data / "eval").iterdir()}
    dataset.main(dataset.parse_args(["--data_root", str(data)]))
    assert "already exists" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in (data / "eval").iterdir()} == before


def test_afhq_data_module_keeps_the_courses_meaning(tmp_path, monkeypatch):
    course_defaults = {"root": "data", "batch_size": 32, "num_workers": 4, "max_num_images_per_cat": 1000,
                       "image_resolution": 64, "label_offset": 1, "transform": None}
    parameters = inspect.signature(dataset.AFHQDataModule).parameters
    assert {name: parameters[name].default for name in course_defaults} == course_defaults
    assert parameters["afhq_root"].kind == inspect.Parameter.KEYWORD_ONLY

    # root holds afhq/; AFHQ is downloaded there when it is missing (here from a local zip)
    source = make_jpeg_afhq(tmp_path / "src" / "afhq")
    shutil.copytree(source / "val", source / "train")
    archive = tmp_path / "afhq.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in source.rglob("*"):
            zf.write(path, path.relative_to(source.parent))
    monkeypatch.setattr(dataset, "AFHQ_URL", archive.as_uri())
    module = dataset.AFHQDataModule(str(tmp_path / "data"), batch_size=2, num_workers=0, image_resolution=16)
    assert module.afhq_root == str(tmp_path / "data" / "afhq") and (tmp_path / "data" / "afhq" / "train").is_dir()
    assert len(module.train_ds) == len(module.val_ds) == 6 and module.num_classes == 2
    # afhq_root: any folder in AFHQ's layout, used as it is
    elsewhere = dataset.AFHQDataModule(batch_size=2, num_workers=0, afhq_root=source)
    assert elsewhere.train_ds.fnames == sorted((source / "train").rglob("*.jpg"))
    with pytest.raises(dataset.DatasetError, match="not found"):
        dataset.AFHQDataModule(afhq_root=tmp_path / "nowhere")


# --- the course's public names and signatures ---

def assert_course_signature(function, *course_parameters):
    """The course's parameters (name, default) in order; anything added is keyword-only with a default."""
    empty = inspect.Parameter.empty
    parameters = list(inspect.signature(function).parameters.values())
    positional = [(p.name, p.default) for p in parameters if p.kind == inspect.Parameter.POSITIONAL_OR_KEYWORD]
    assert positional == [p if isinstance(p, tuple) else (p, empty) for p in course_parameters], function
    for p in parameters:
        if p.kind == inspect.Parameter.KEYWORD_ONLY:
            assert p.default is not empty, (function, p.name)


def test_the_courses_names_and_signatures():
    S, M = scheduler, model_mod.DiffusionModule
    assert_course_signature(S.extract, "input", "t", "x")
    assert_course_signature(S.BaseScheduler.__init__, "self", "num_train_timesteps", "beta_1", "beta_T", ("mode", "linear"))
    assert_course_signature(S.BaseScheduler.uniform_sample_t, "self", "batch_size", ("device", None))
    assert_course_signature(S.DDPMScheduler.__init__, "self", "num_train_timesteps", "beta_1", "beta_T",
                            ("mode", "linear"), ("sigma_type", "small"))
    assert_course_signature(S.DDPMScheduler.add_noise, "self", "x_0", "t", ("eps", None))
    assert_course_signature(S.DDPMScheduler.step, "self", "x_t", "t", "net_out", "predictor")
    assert_course_signature(S.DDPMScheduler.step_predict_noise, "self", "x_t", "t", "eps_theta")
    assert_course_signature(S.DDPMScheduler.step_predict_x0, "self", "x_t", "t", "x0_pred")
    assert_course_signature(S.DDPMScheduler.step_predict_mean, "self", "x_t", "t", "mean_theta")
    assert "sigmas" in dict(S.DDPMScheduler(T, 1e-4, 0.02).named_buffers())
    assert_course_signature(S.DDIMScheduler.__init__, "self", "num_train_timesteps", "beta_1", "beta_T",
                            ("mode", "linear"), ("num_inference_timesteps", 50), ("eta", 0.0))
    assert_course_signature(S.DDIMScheduler.set_inference_timesteps, "self", "num_inference_timesteps")
    assert_course_signature(S.DDIMScheduler.step, "self", "x_t", "t", "net_out", "predictor")
    assert_course_signature(M.__init__, "self", "network", "var_scheduler")
    for loss in ("get_loss", "get_loss_noise", "get_loss_x0", "get_loss_mean"):
        assert_course_signature(getattr(M, loss), "self", "x0", ("class_label", None), ("noise", None))
    assert_course_signature(M.sample, "self", "batch_size", ("return_traj", False), ("class_label", None),
                            ("guidance_scale", 1.0))
    assert_course_signature(M.save, "self", "file_path")
    assert_course_signature(M.load, "self", "file_path")
