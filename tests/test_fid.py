"""fid/inception.py, fid/measure_fid.py (FID and KID) and experiments/train_classifier.py.

References: the course checkpoint's key/shape list (tests/fixtures, a copy of the spec), torchvision's
Inception-v3 (same layers, other names), the closed form of the Frechet distance where sqrtm is
exact, scipy's sqrtm (in the features' span when there are fewer images than dimensions); for KID
a pair-by-pair computation, leave-one-out recomputation, and Monte Carlo draws of known
distributions.
"""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import linalg

from conftest import TASK1_FID, TASK1_IMAGE, assert_one_line_error, load_module, run_in_process

SPEC = Path(__file__).resolve().parent / "fixtures" / "afhq_inception_v3_state_dict.json"


@pytest.fixture(scope="module")
def inception():
    return load_module(TASK1_FID, "inception")


@pytest.fixture(scope="module")
def measure_fid():
    return load_module(TASK1_FID, "measure_fid")


def random_inception(inception, seed=0, img_size=75):
    """A randomly initialised network whose batch-norm statistics are those of random inputs,
    so that its features are O(1) (default running statistics let activations grow ~1e5x)."""
    torch.manual_seed(seed)
    model = inception.InceptionV3()
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None  # cumulative average: running stats = this batch's stats
            module.reset_running_stats()
    model.train()
    with torch.no_grad():
        model(torch.rand(8, 3, img_size, img_size) * 2 - 1)
    return model.eval()


# ----------------------------------------------------------------------------- the network

def test_state_dict_matches_the_course_checkpoint_key_for_key(inception):
    spec = json.loads(SPEC.read_text())["state_dict"]
    ours = {key: list(value.shape) for key, value in inception.InceptionV3().state_dict().items()}
    assert len(ours) == 566
    assert list(ours) == list(spec)
    assert ours == spec


def test_a_plain_state_dict_loads_strictly_with_weights_only(inception, measure_fid, tmp_path):
    model = random_inception(inception)
    path = tmp_path / "afhq_inception_v3.ckpt"
    torch.save(model.state_dict(), path)  # the course's format: a plain state_dict
    loaded = measure_fid.load_inception(path, "cpu")
    assert not loaded.training and not loaded.for_train
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


TORCHVISION_TO_COURSE = {
    "Conv2d_1a_3x3": "block1.0", "Conv2d_2a_3x3": "block1.1", "Conv2d_2b_3x3": "block1.2",
    "Conv2d_3b_1x1": "block2.0", "Conv2d_4a_3x3": "block2.1",
    **{f"Mixed_{name}": f"block3.{i}" for i, name in enumerate(["5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e"])},
    **{f"Mixed_{name}": f"block4.{i}" for i, name in enumerate(["7a", "7b", "7c"])},
    "fc": "final_fc",
}


def test_forward_is_torchvision_inception_v3(inception):
    """The course built its network from torchvision's Inception-v3 modules: with the same
    weights, our features equal torchvision's pooled output and our logits its fc output."""
    from torchvision.models.inception import Inception3

    torch.manual_seed(1)
    reference = Inception3(num_classes=3, aux_logits=False, init_weights=True)
    with torch.no_grad():  # non-trivial batch-norm statistics
        reference.train()(torch.rand(8, 3, 80, 80) * 2 - 1)
    reference.eval()
    state_dict = {}
    for key, value in reference.state_dict().items():
        prefix, rest = key.split(".", 1)
        state_dict[f"{TORCHVISION_TO_COURSE[prefix]}.{rest}"] = value
    ours = inception.InceptionV3(for_train=True)
    ours.load_state_dict(state_dict, strict=True)
    ours.eval()

    pooled = {}
    reference.avgpool.register_forward_hook(lambda module, args, output: pooled.update(x=output))
    x = torch.rand(3, 3, 75, 75) * 2 - 1  # 75: the smallest size Inception-v3 takes
    with torch.no_grad():
        reference_logits = reference(x)
        logits, features = ours(x), ours.features(x)
    assert features.shape == (3, 2048)
    torch.testing.assert_close(features, pooled["x"].flatten(1), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logits, reference_logits, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------- the Frechet distance

def random_spd(rng, d):
    a = rng.standard_normal((d, 2 * d))
    return a @ a.T / (2 * d) + 0.1 * np.eye(d)


def test_frechet_distance_closed_form_diagonal(measure_fid):
    """Diagonal covariances: sqrtm(S1 S2) = diag(sqrt(s1 s2)), so
    d^2 = |mu1 - mu2|^2 + sum_i (sqrt(s1_i) - sqrt(s2_i))^2."""
    rng = np.random.default_rng(0)
    d = 64
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    s1, s2 = rng.uniform(0.1, 3, d), rng.uniform(0.1, 3, d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(s1) - np.sqrt(s2)) ** 2)
    got = measure_fid.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2))
    assert got == pytest.approx(expected, rel=1e-6)


def test_frechet_distance_closed_form_commuting(measure_fid):
    """Covariances with a common eigenbasis Q: S = Q diag(s) Q^T, same closed form."""
    rng = np.random.default_rng(1)
    d = 64
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    s1, s2 = rng.uniform(0.1, 3, d), rng.uniform(0.1, 3, d)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    sigma1, sigma2 = q @ np.diag(s1) @ q.T, q @ np.diag(s2) @ q.T
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(s1) - np.sqrt(s2)) ** 2)
    assert measure_fid.frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(expected, rel=1e-6)


def scipy_frechet_distance(mu1, sigma1, mu2, sigma2):
    """The reference: scipy's general matrix square root (Schur method), as TTUR and the course."""
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2)
                 - 2 * np.trace(covmean).real)


def test_frechet_distance_general_covariances(measure_fid):
    rng = np.random.default_rng(2)
    d = 64
    sigma1, sigma2 = random_spd(rng, d), random_spd(rng, d)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    expected = scipy_frechet_distance(mu1, sigma1, mu2, sigma2)
    assert measure_fid.frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(expected, rel=1e-9)


def frechet_distance_in_the_span(features_1, features_2):
    """FID of feature sets with fewer images than dimensions, by scipy's sqrtm in the span of the
    centred features (an orthonormal basis Q [D, k]): FID is invariant under rotations, and both
    covariances vanish outside that span, so the k x k problem has the same value."""
    centred_1 = features_1 - features_1.mean(0)
    centred_2 = features_2 - features_2.mean(0)
    basis, _ = np.linalg.qr(np.concatenate([centred_1, centred_2]).T)
    sigma1 = basis.T @ np.cov(features_1, rowvar=False) @ basis
    sigma2 = basis.T @ np.cov(features_2, rowvar=False) @ basis
    mean_gap = np.sum((features_1.mean(0) - features_2.mean(0)) ** 2)
    return mean_gap + scipy_frechet_distance(np.zeros(1), sigma1, np.zeros(1), sigma2)


@pytest.mark.parametrize("m, n", [(12, 9), (40, 30), (300, 200), (300, 250)])  # the last: m n >= D^2
def test_frechet_distance_of_features_with_fewer_images_than_dimensions(measure_fid, m, n):
    """Singular covariances (as 1000 images of 2048 features): the feature route (no D x D matrix
    while m n < D^2), the statistics route and scipy's sqrtm in the features' span agree."""
    rng = np.random.default_rng(m)
    d = 256
    scales = rng.uniform(0.5, 2, d)
    features_1 = rng.standard_normal((m, d)) * scales
    features_2 = rng.standard_normal((n, d)) * scales[::-1] + 0.2
    expected = frechet_distance_in_the_span(features_1, features_2)
    # rounding: ~1e-9 for the feature route, ~1e-8 when the near-zero eigenvalues of a singular
    # covariance pass through a square root
    assert measure_fid.frechet_distance_of_features(features_1, features_2) == pytest.approx(expected, rel=1e-7)
    statistics = measure_fid.feature_statistics(features_1), measure_fid.feature_statistics(features_2)
    assert measure_fid.frechet_distance(*statistics[0], *statistics[1]) == pytest.approx(expected, rel=1e-7)
    with pytest.raises(measure_fid.FIDInputError):
        measure_fid.frechet_distance_of_features(features_1[:1], features_2)


def test_frechet_distance_of_a_set_with_itself_is_zero(measure_fid):
    """Fewer samples than dimensions (as with 500 images and 2048 features): singular covariance."""
    rng = np.random.default_rng(3)
    features = rng.standard_normal((40, 256)) * rng.uniform(0.5, 2, 256)
    mu, sigma = measure_fid.feature_statistics(features)
    assert abs(measure_fid.frechet_distance(mu, sigma, mu, sigma)) < 1e-6 * np.trace(sigma)
    shifted = measure_fid.feature_statistics(features + 0.5)
    assert measure_fid.frechet_distance(mu, sigma, *shifted) == pytest.approx(0.25 * 256, rel=1e-6)


# ----------------------------------------------------------------------------------- KID

def brute_force_kid(x, y):
    """The unbiased MMD^2 with k(a, b) = (a.b / d + 1)^3, one pair at a time."""
    def k(a, b):
        return (float(np.dot(a, b)) / len(a) + 1) ** 3
    m, n = len(x), len(y)
    within_x = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    within_y = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    return within_x + within_y - 2 * sum(k(a, b) for a in x for b in y) / (m * n)


def test_kid_and_its_jackknife_error_match_a_brute_force_computation(measure_fid):
    rng = np.random.default_rng(4)
    x, y = rng.standard_normal((7, 5)), rng.standard_normal((9, 5)) * 1.5 + 0.3
    kid, se = measure_fid.kernel_inception_distance(x, y)
    assert kid == pytest.approx(brute_force_kid(x, y), rel=1e-10)
    # the jackknife, each leave-one-out estimate recomputed from scratch
    without_x = np.array([brute_force_kid(np.delete(x, i, axis=0), y) for i in range(len(x))])
    without_y = np.array([brute_force_kid(x, np.delete(y, j, axis=0)) for j in range(len(y))])
    variance = (6 / 7 * np.sum((without_x - without_x.mean()) ** 2)
                + 8 / 9 * np.sum((without_y - without_y.mean()) ** 2))
    assert se == pytest.approx(np.sqrt(variance), rel=1e-8)
    with pytest.raises(measure_fid.FIDInputError):
        measure_fid.kernel_inception_distance(x[:2], y)


def test_kid_is_unbiased_and_its_standard_error_is_one(measure_fid):
    """Monte Carlo over draws of Gaussian 'features' (d = 32): two samples of one distribution
    give KID 0 on average, where FID is biased upwards; between two distributions the reported
    standard error matches the spread of KID over draws, and it shrinks with N like 1/sqrt(N)."""
    rng = np.random.default_rng(5)
    d, n, draws = 32, 100, 200

    def draw(size, shift=0.0):
        return rng.standard_normal((size, d)) + shift

    same = [measure_fid.kernel_inception_distance(draw(n), draw(n))[0] for _ in range(draws)]
    assert abs(np.mean(same)) < 3 * np.std(same) / np.sqrt(draws)
    fids = [measure_fid.frechet_distance(*measure_fid.feature_statistics(draw(n)),
                                         *measure_fid.feature_statistics(draw(n))) for _ in range(20)]
    assert np.mean(fids) > 10 * np.std(fids) / np.sqrt(20)  # FID: positive bias at this N

    shifted = np.array([measure_fid.kernel_inception_distance(draw(n), draw(n, 0.3)) for _ in range(draws)])
    kids, errors = shifted[:, 0], shifted[:, 1]
    assert kids.mean() > 5 * kids.std() / np.sqrt(draws)
    assert 0.8 < np.sqrt(np.mean(errors ** 2)) / kids.std() < 1.25
    larger = [measure_fid.kernel_inception_distance(draw(4 * n), draw(4 * n, 0.3))[1] for _ in range(10)]
    assert 0.4 < np.mean(larger) / errors.mean() < 0.6


# ------------------------------------------------------------------------------ the CLI

def write_images(folder, colours, size=24, seed=0):
    """One PNG per colour: a square of that colour with noise, on a grey background."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i, colour in enumerate(colours):
        image = np.full((size, size, 3), 128, dtype=np.float64)
        image[4:4 + size // 2, 4:4 + size // 2] = colour
        image += rng.normal(0, 20, image.shape)
        Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(folder / f"{i:03d}.png")


@pytest.fixture(scope="module")
def folders(tmp_path_factory, inception):
    root = tmp_path_factory.mktemp("fid_cli")
    rng = np.random.default_rng(0)
    write_images(root / "a", rng.integers(0, 256, (12, 3)), seed=1)
    write_images(root / "b" / "nested", rng.integers(0, 128, (12, 3)) * [2, 0, 0], seed=2)
    model = random_inception(inception)
    torch.save(model.state_dict(), root / "random.ckpt")
    return root


# One BLAS/OpenMP thread per child process: two processes' threads would wait on each other.
SINGLE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
                 "MKL_NUM_THREADS": "1"}


def run_cli(python_exe, *args):
    return subprocess.run([python_exe, "measure_fid.py", *map(str, args)], cwd=TASK1_FID,
                          capture_output=True, text=True, timeout=300, env=SINGLE_THREAD)


def parse_fid(stdout):
    match = re.search(r"^FID: (\S+)$", stdout, re.MULTILINE)
    assert match, stdout
    return float(match.group(1))


def reference_features(model, folder, size):
    """Features computed without measure_fid: PIL bilinear resize, [-1, 1], the network."""
    arrays = []
    for path in sorted(Path(folder).rglob("*.png")):
        image = Image.open(path).convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
        arrays.append(np.asarray(image, dtype=np.float32) / 127.5 - 1)
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    with torch.no_grad():
        return model(x).double().numpy()


@pytest.fixture(scope="module")
def cli_a_b(folders):
    """The CLI's output with --kid for folders a and b (b's images are in a sub-folder)."""
    result = run_cli(sys.executable, folders / "a", folders / "b", "--ckpt",
                     folders / "random.ckpt", "--img_size", 75, "--batch_size", 5, "--kid")
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.fixture(scope="module")
def fid_a_b(cli_a_b):
    return parse_fid(cli_a_b)


def test_cli_matches_an_independent_computation(cli_a_b, fid_a_b, folders, inception, measure_fid):
    fid = fid_a_b

    model = inception.InceptionV3()
    model.load_state_dict(torch.load(folders / "random.ckpt", weights_only=True))
    model.eval()
    f_a = reference_features(model, folders / "a", 75)
    f_b = reference_features(model, folders / "b", 75)
    expected = frechet_distance_in_the_span(f_a, f_b)
    assert fid > 0
    assert fid == pytest.approx(expected, rel=1e-3)
    kid, se = map(float, re.search(r"^KID: (\S+) \+- (\S+)$", cli_a_b, re.MULTILINE).groups())
    assert (kid, se) == pytest.approx(measure_fid.kernel_inception_distance(f_a, f_b), rel=1e-3)
    assert kid > 2 * se


def test_cli_fid_of_a_folder_with_itself_is_zero(python_exe, folders, fid_a_b):
    result = run_cli(python_exe, folders / "a", folders / "a", "--ckpt", folders / "random.ckpt",
                     "--img_size", 75)
    assert result.returncode == 0, result.stderr
    assert abs(parse_fid(result.stdout)) < 1e-6 * fid_a_b


def run_main(module, argv):
    """A CLI's entry point in this process (conftest.run_in_process): measure_fid's main(argv) from
    fid/, or run(main, parse_args(argv), ERRORS) for the scripts in experiments/ from the folder above."""
    argv = [str(arg) for arg in argv]
    if hasattr(module, "parse_args"):
        return run_in_process(lambda: module.run(module.main, module.parse_args(argv), module.ERRORS),
                              [module.__name__, *argv], TASK1_IMAGE)
    return run_in_process(lambda: module.main(argv), ["measure_fid.py", *argv], TASK1_FID)


def test_cli_unreadable_image_is_named_in_one_line(python_exe, folders, tmp_path):
    broken = tmp_path / "broken"
    write_images(broken, [(10, 20, 30), (40, 50, 60)])
    (broken / "002.png").write_bytes(b"\x89PNG garbage")
    result = run_cli(python_exe, folders / "a", broken, "--ckpt", folders / "random.ckpt",
                     "--img_size", 75)
    assert_one_line_error(result, "002.png")


def test_missing_checkpoint_says_where_to_put_it(measure_fid, folders):
    result = run_main(measure_fid, [folders / "a", folders / "b", "--ckpt", folders / "absent.ckpt"])
    assert_one_line_error(result, "absent.ckpt", "afhq_inception_v3.ckpt", "not found")
    # without --ckpt: the course's place, next to measure_fid.py
    if not measure_fid.DEFAULT_CKPT.exists():
        result = run_main(measure_fid, [folders / "a", folders / "b"])
        assert_one_line_error(result, str(TASK1_FID / "afhq_inception_v3.ckpt"))


@pytest.mark.parametrize("content", [b"not a checkpoint", "wrong keys", "wrong shapes"])
def test_corrupt_or_foreign_checkpoint(measure_fid, folders, tmp_path, content):
    path = tmp_path / "bad.ckpt"
    if content == "wrong keys":
        torch.save({"final_fc.weight": torch.zeros(3, 2048), "other": torch.zeros(1)}, path)
    elif content == "wrong shapes":
        state_dict = torch.load(folders / "random.ckpt", weights_only=True)
        state_dict["block1.0.conv.weight"] = torch.zeros(32, 3, 5, 5)
        torch.save(state_dict, path)
    else:
        path.write_bytes(content)
    result = run_main(measure_fid, [folders / "a", folders / "b", "--ckpt", path])
    assert_one_line_error(result, "bad.ckpt")


def test_bad_folders_and_sizes(measure_fid, folders, tmp_path):
    ckpt = folders / "random.ckpt"
    result = run_main(measure_fid, [tmp_path / "missing", folders / "a", "--ckpt", ckpt])
    assert_one_line_error(result, "missing")
    (tmp_path / "empty").mkdir()
    result = run_main(measure_fid, [folders / "a", tmp_path / "empty", "--ckpt", ckpt])
    assert_one_line_error(result, "empty")
    result = run_main(measure_fid, [folders / "a", folders / "b", "--ckpt", ckpt, "--img_size", 64])
    assert_one_line_error(result, "75")


def test_argument_errors_are_one_line(measure_fid, folders):
    """argparse's own errors too (it prints the usage block before the error otherwise)."""
    for argv in ([folders / "a"], [folders / "a", folders / "b", "--img_size", "big"]):
        result = run_main(measure_fid, argv)
        assert result.returncode == 2
        assert_one_line_error(result, "error:")


def test_16_bit_pngs_are_scaled_not_clipped(measure_fid, folders, tmp_path):
    """A 16-bit grayscale copy (v * 257) of 8-bit grayscale images has the same pixels and the same
    features (so FID 0); convert("RGB") alone clips every value above 255 to white."""
    rng = np.random.default_rng(3)
    for bits in (8, 16):
        (tmp_path / str(bits)).mkdir()
    for i in range(6):
        pixels = rng.integers(0, 256, (24, 24)).astype(np.uint16)
        Image.fromarray(pixels.astype(np.uint8)).save(tmp_path / "8" / f"{i}.png")
        Image.fromarray(pixels * 257).save(tmp_path / "16" / f"{i}.png")
    assert Image.open(tmp_path / "16" / "0.png").mode.startswith("I")
    transform = measure_fid.image_transform(24)
    for i in range(6):
        eight_bit = measure_fid.load_image(tmp_path / "8" / f"{i}.png", transform)
        assert torch.equal(measure_fid.load_image(tmp_path / "16" / f"{i}.png", transform), eight_bit)
    scorer = measure_fid.Scorer(folders / "random.ckpt", img_size=75, batch_size=6, device="cpu")
    eight = scorer.features(measure_fid.list_images(tmp_path / "8"))
    sixteen = measure_fid.list_images(tmp_path / "16")
    np.testing.assert_allclose(scorer.features(sixteen), eight, rtol=0, atol=1e-6)


# ------------------------------------------------------- experiments/train_classifier.py

@pytest.fixture(scope="module")
def standin(tmp_path_factory):
    standin_dataset = load_module(TASK1_IMAGE, "experiments.standin_dataset")
    root = tmp_path_factory.mktemp("standin") / "data"
    standin_dataset.build(root, num_train_per_class=8, num_val_per_class=4, image_size=16)
    return root


@pytest.fixture(scope="module")
def train_classifier():
    return load_module(TASK1_IMAGE, "experiments.train_classifier")


def test_train_classifier_writes_a_checkpoint_measure_fid_loads(train_classifier, standin, tmp_path,
                                                                 inception, measure_fid, one_thread):
    out = tmp_path / "classifier.ckpt"
    train_classifier.main(train_classifier.parse_args([
        "--data_root", str(standin), "--out", str(out), "--img_size", "75", "--epochs", "1",
        "--batch_size", "8", "--num_workers", "0", "--device", "cpu"]))
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["classes"] == ["circle", "square", "triangle"]
    assert report["num_train_images"] == 24 and report["num_val_images"] == 12

    measure_fid.load_inception(out, "cpu")  # strict load of the plain state_dict
    # the reported accuracy is the saved network's accuracy on the validation split
    classifier = inception.InceptionV3(for_train=True)
    classifier.load_state_dict(torch.load(out, weights_only=True))
    classifier.eval()
    transform = measure_fid.image_transform(75)
    correct = 0
    for label, name in enumerate(report["classes"]):
        files = sorted((standin / "val" / name).glob("*.png"))
        x = torch.stack([transform(Image.open(f).convert("RGB")) for f in files])
        with torch.no_grad():
            correct += (classifier(x).argmax(-1) == label).sum().item()
    assert report["val_accuracy"] == pytest.approx(correct / 12)


def png_that_verifies_but_cannot_be_decoded(path):
    """A PNG whose chunk checksums are right (PIL's verify() passes) but whose pixel data is
    not zlib data, so decoding it fails."""
    import io
    import struct
    import zlib

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(buffer, format="PNG")
    data, out, position = buffer.getvalue(), bytearray(buffer.getvalue()[:8]), 8
    while position < len(data):
        length, kind = struct.unpack(">I4s", data[position:position + 8])
        payload = data[position + 8:position + 8 + length]
        if kind == b"IDAT":
            payload = b"certainly not zlib data"
        out += struct.pack(">I4s", len(payload), kind) + payload
        out += struct.pack(">I", zlib.crc32(kind + payload))
        position += 12 + length
    path.write_bytes(bytes(out))


def test_train_classifier_bad_input(python_exe, train_classifier, tmp_path):
    common = ["--out", tmp_path / "c.ckpt", "--img_size", "75", "--epochs", "1",
              "--batch_size", "4", "--device", "cpu", "--num_workers", "0"]
    result = run_main(train_classifier, ["--data_root", tmp_path / "nowhere", *common])
    assert_one_line_error(result, "nowhere")

    broken = tmp_path / "broken"
    for split in ("train", "val"):
        for name in ("a", "b"):
            write_images(broken / split / name, [(10, 20, 30)] * 4)
    (broken / "train" / "b" / "001.png").write_bytes(b"garbage")
    result = run_main(train_classifier, ["--data_root", broken, *common])
    assert_one_line_error(result, "001.png")

    # A file that only fails when decoded, in a DataLoader worker: training has started (its
    # progress bars are on stderr), and the run ends with one line naming the file.
    write_images(broken / "train" / "b", [(10, 20, 30)] * 4)
    png_that_verifies_but_cannot_be_decoded(broken / "train" / "b" / "002.png")
    result = subprocess.run(
        [python_exe, "-m", "experiments.train_classifier", "--data_root", broken,
         *map(str, common[:-1]), "2"],
        cwd=TASK1_IMAGE, capture_output=True, text=True, timeout=300, env=SINGLE_THREAD)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "002.png" in result.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "c.ckpt").exists()


# ---------------------------------------------------------------------- the stand-in data

def test_standin_dataset_is_deterministic_and_in_afhq_layout(tmp_path):
    standin_dataset = load_module(TASK1_IMAGE, "experiments.standin_dataset")
    first, second = tmp_path / "one", tmp_path / "two"
    standin_dataset.build(first, 5, 3, image_size=16, seed=7)
    standin_dataset.build(second, 5, 3, image_size=16, seed=7)
    files = sorted(p.relative_to(first) for p in first.rglob("*.png"))
    assert len(files) == 3 * (5 + 3)
    assert {p.parts[:2] for p in files} == {(s, c) for s in ("train", "val")
                                            for c in ("circle", "square", "triangle")}
    for relative in files:
        assert (first / relative).read_bytes() == (second / relative).read_bytes()
        assert Image.open(first / relative).size == (16, 16)
    # another seed gives other images; building again with the same arguments is a no-op
    standin_dataset.build(first, 5, 3, image_size=16, seed=7)
    with pytest.raises(FileExistsError):
        standin_dataset.build(first, 5, 3, image_size=16, seed=8)
    standin_dataset.build(tmp_path / "three", 5, 3, image_size=16, seed=8)
    assert (tmp_path / "three" / files[0]).read_bytes() != (first / files[0]).read_bytes()
