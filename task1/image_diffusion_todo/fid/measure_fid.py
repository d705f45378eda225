"""Frechet Inception Distance (FID), and optionally KID, between two folders of images.

    python measure_fid.py GT_DIR GEN_DIR [--ckpt afhq_inception_v3.ckpt] [--img_size 256] [--kid]

prints ``FID: <value>`` (and ``KID: <mean> +- <standard error>``). As in the course, the features are the 2048-d pooled output of
``inception.InceptionV3`` with the weights of the course's AFHQ classifier
(``afhq_inception_v3.ckpt``, next to this file by default), and every image is

    RGB -> resized to img_size x img_size (bilinear, antialiased: torchvision's Resize on PIL
    images) -> [0, 1] (ToTensor) -> [-1, 1] (Normalize(0.5, 0.5))

which is also the preprocessing the classifier was trained with
(``experiments/train_classifier.py`` imports ``image_transform`` from here). The default size is the course's 256; Inception-v3
needs at least 75 pixels, so 64x64 samples are upsampled. Folders are searched recursively
for .png/.jpg/.jpeg files.

FID (Heusel et al., 2017) is the Frechet distance between Gaussians fitted to the two sets of
features,

    d^2 = ||mu_1 - mu_2||^2 + Tr(Sigma_1 + Sigma_2 - 2 (Sigma_1 Sigma_2)^{1/2}),

computed in float64 with scipy's sqrtm the way the reference implementations (TTUR's
fid.py, pytorch-fid) do. FID is biased upwards at small sample sizes: compare numbers only
at the same number of images. KID (``kernel_inception_distance``) is unbiased at any size
and comes with a standard error.

Run it as the course does (``python fid/measure_fid.py``, or from inside fid/), or import it
as ``fid.measure_fid`` from the folder above (as experiments/fid_grid.py does).
"""
import argparse
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from scipy import linalg
from torchvision import transforms
from tqdm import tqdm

if __package__:  # imported as fid.measure_fid
    from .inception import MIN_INPUT_SIZE, InceptionV3
else:  # run as a script, or imported from inside fid/ (the course's way)
    from inception import MIN_INPUT_SIZE, InceptionV3

DEFAULT_CKPT = Path(__file__).resolve().parent / "afhq_inception_v3.ckpt"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")


class FIDInputError(Exception):
    """A problem with the user's input (checkpoint, folder, image), reported as one line."""


def one_line(error):
    """The first line of an exception's message (some library messages span many lines)."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def list_images(folder):
    """All images under ``folder`` (recursively), sorted -> list[Path]."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FIDInputError(f"image folder not found: {folder}")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise FIDInputError(f"no .png/.jpg/.jpeg images in {folder}")
    return files


def image_transform(img_size):
    """PIL image -> tensor [3, img_size, img_size] in [-1, 1], the course's preprocessing."""
    return transforms.Compose([
        transforms.Resize((img_size, img_size)),
        transforms.ToTensor(),
        transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    ])


def verify_images(files):
    """Check that every file is an image PIL can read (header and, for PNG, checksums), so that
    a bad file is reported before any slow work starts."""
    for path in files:
        try:
            with Image.open(path) as image:
                image.verify()
        except Exception as error:  # PIL raises many types for damaged files
            raise FIDInputError(f"cannot read image {path}: {one_line(error)}") from None


def load_image(path, transform):
    """Read one image file as RGB and apply ``transform``; names the file when it fails."""
    try:
        with Image.open(path) as image:
            return transform(image.convert("RGB"))
    except (OSError, ValueError, SyntaxError) as error:
        raise FIDInputError(f"cannot read image {path}: {one_line(error)}") from None


def default_device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_inception(ckpt_path=DEFAULT_CKPT, device="cpu"):
    """The feature network with the weights of ``ckpt_path`` (a plain state_dict), in eval mode.

    The number of classes is read from the checkpoint's final_fc, so a classifier trained on
    any dataset in AFHQ's layout loads; every key and shape must match, as with the course's.
    """
    ckpt_path = Path(ckpt_path)
    if not ckpt_path.is_file():
        raise FIDInputError(
            f"FID checkpoint not found: {ckpt_path}. Put the course's afhq_inception_v3.ckpt "
            f"there (it ships with the course's starter code in fid/), pass --ckpt PATH, or "
            f"build one with experiments/train_classifier.py"
        )
    try:
        state_dict = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for a damaged or foreign file
        raise FIDInputError(f"cannot read FID checkpoint {ckpt_path}: {one_line(error)}") from None
    fc_weight = state_dict.get("final_fc.weight") if isinstance(state_dict, dict) else None
    if not isinstance(fc_weight, torch.Tensor) or fc_weight.ndim != 2:
        raise FIDInputError(
            f"{ckpt_path} is not an Inception-v3 state_dict of fid/inception.py (no final_fc.weight)"
        )
    model = InceptionV3(for_train=False, num_classes=fc_weight.shape[0])
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as error:
        raise FIDInputError(
            f"{ckpt_path} does not match fid/inception.py: {one_line(error)}"
        ) from None
    return model.eval().to(device)


@torch.no_grad()
def extract_features(files, model, img_size=256, batch_size=50, device="cpu", desc="features"):
    """Inception features of image files -> np.ndarray [N, 2048], float64."""
    transform = image_transform(img_size)
    features = []
    for start in tqdm(range(0, len(files), batch_size), desc=desc, leave=False):
        batch = torch.stack([load_image(p, transform) for p in files[start:start + batch_size]])
        features.append(model(batch.to(device)).double().cpu().numpy())
    return np.concatenate(features, axis=0)


def feature_statistics(features):
    """features [N, D] -> (mu [D], sigma [D, D]), the unbiased sample mean and covariance."""
    if features.shape[0] < 2:
        raise FIDInputError("FID needs at least 2 images per folder")
    return np.mean(features, axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """Squared Frechet distance between N(mu1, sigma1) and N(mu2, sigma2) (Dowson & Landau, 1982):

        ||mu1 - mu2||^2 + Tr(sigma1) + Tr(sigma2) - 2 Tr((sigma1 sigma2)^{1/2}).

    sigma1 sigma2 is not symmetric, and with fewer images than feature dimensions both
    covariances are singular, so scipy's sqrtm may return a complex matrix whose imaginary
    part is rounding noise, or non-finite values. As in the reference implementations: retry
    with eps added to both diagonals if non-finite, and drop an imaginary part that is small
    on the diagonal; a larger one means the result cannot be trusted. "Small" is the
    references' 1e-3, relative to the largest diagonal entry when that exceeds 1 (features of
    a network trained elsewhere can be much larger than ImageNet Inception's, and the rounding
    noise grows with them).
    """
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError("the two sets of statistics have different dimensions")

    diff = mu1 - mu2
    with warnings.catch_warnings():
        # "Matrix is singular": expected with fewer images than dimensions, handled below
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(sigma1 @ sigma2)
        if not np.isfinite(covmean).all():
            offset = np.eye(sigma1.shape[0]) * eps
            covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        diagonal = np.diagonal(covmean)
        largest_imaginary = np.max(np.abs(diagonal.imag))
        if largest_imaginary > 1e-3 * max(1.0, np.max(np.abs(diagonal.real))):
            raise ValueError(f"sqrtm has an imaginary component of {largest_imaginary:.3g}")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def polynomial_kernel(x, y):
    """k(x, y) = (x . y / d + 1)^3 for all pairs: x [M, D], y [N, D] -> [M, N] (KID's kernel)."""
    return (x @ y.T / x.shape[1] + 1) ** 3


def kernel_inception_distance(features_1, features_2):
    """KID (Binkowski et al. 2018) and its standard error: features [M, D], [N, D] -> (kid, se).

    KID is the unbiased estimate of the squared maximum mean discrepancy with polynomial_kernel
    (the U-statistic of Gretton et al. 2012, eq. 3):

        kid = sum_{i != i'} k(x_i, x_i') / (M (M-1)) + sum_{j != j'} k(y_j, y_j') / (N (N-1))
              - 2 sum_{i, j} k(x_i, y_j) / (M N).

    Unbiased at any N, unlike FID: numbers measured at different N can be compared, and two
    samples of one distribution give 0 on average (a single estimate can be negative).

    se is the jackknife's (Arvesen 1969, two-sample U-statistics): with kid_(i) the estimate
    without x_i and kid_[j] without y_j,

        se^2 = (M-1)/M sum_i (kid_(i) - mean_i kid_(i))^2 + (N-1)/N sum_j (kid_[j] - mean_j kid_[j])^2.

    It is computed from the kernel matrices' row sums, with no refitting. Measured on the CPU
    stand-in's features (150 vs. 150 images, 100 random draws), it matched the spread of KID
    between different distributions and overstated it by ~1.7x between two samples of one: a
    cautious error bar. (torch-fidelity's and clean-fid's spread over random subsets of 1000 is
    no standard error: below 1000 images every subset is the whole set. Disjoint subsets give
    one, but a KID up to 4x less precise than the whole sets'.)
    """
    x, y = np.asarray(features_1, np.float64), np.asarray(features_2, np.float64)
    m, n = len(x), len(y)
    if min(m, n) < 3:
        raise FIDInputError("KID's standard error needs at least 3 images per folder")
    k_xx, k_yy, k_xy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
    np.fill_diagonal(k_xx, 0)
    np.fill_diagonal(k_yy, 0)
    sum_xx, sum_yy, sum_xy = k_xx.sum(), k_yy.sum(), k_xy.sum()
    within_x, within_y = sum_xx / (m * (m - 1)), sum_yy / (n * (n - 1))
    kid = within_x + within_y - 2 * sum_xy / (m * n)
    # leaving out x_i removes row and column i of k_xx and row i of k_xy
    without_x = ((sum_xx - 2 * k_xx.sum(1)) / ((m - 1) * (m - 2)) + within_y
                 - 2 * (sum_xy - k_xy.sum(1)) / ((m - 1) * n))
    without_y = (within_x + (sum_yy - 2 * k_yy.sum(1)) / ((n - 1) * (n - 2))
                 - 2 * (sum_xy - k_xy.sum(0)) / (m * (n - 1)))
    variance = ((m - 1) / m * np.sum((without_x - without_x.mean()) ** 2)
                + (n - 1) / n * np.sum((without_y - without_y.mean()) ** 2))
    return float(kid), float(np.sqrt(variance))


def features_given_paths(paths, img_size=256, batch_size=50, ckpt=DEFAULT_CKPT, device=None):
    """Inception features [N_i, 2048] of the images of each folder in ``paths``."""
    device = default_device() if device is None else torch.device(device)
    if img_size < MIN_INPUT_SIZE:
        raise FIDInputError(f"--img_size must be at least {MIN_INPUT_SIZE} for Inception-v3")
    files = [list_images(path) for path in paths]
    for folder_files in files:  # report a bad image before the slow work starts
        verify_images(folder_files)
    model = load_inception(ckpt, device)
    return [extract_features(folder_files, model, img_size, batch_size, device, str(path))
            for path, folder_files in zip(paths, files)]


def calculate_fid_given_paths(paths, img_size=256, batch_size=50, ckpt=DEFAULT_CKPT, device=None):
    """FID between the images of the folders ``paths[0]`` and ``paths[1]``."""
    features = features_given_paths(paths, img_size, batch_size, ckpt, device)
    return frechet_distance(*feature_statistics(features[0]), *feature_statistics(features[1]))


def parse_device(name):
    """--device value -> torch.device, refusing CUDA devices this machine does not have."""
    if name is None:
        return default_device()
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise FIDInputError(f"invalid --device {name!r}: {one_line(error)}") from None
    if device.type == "cuda":
        index = device.index or 0
        if not torch.cuda.is_available() or index >= torch.cuda.device_count():
            raise FIDInputError(f"--device {name}: no such CUDA device on this machine")
    return device


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Print the FID (and with --kid the KID) between the images of two folders "
                    "(the course's protocol)."
    )
    parser.add_argument("gt_dir", help="folder of real images (searched recursively)")
    parser.add_argument("gen_dir", help="folder of generated images (searched recursively)")
    parser.add_argument("--ckpt", type=str, default=str(DEFAULT_CKPT),
                        help="Inception-v3 classifier weights (default: the course's "
                             "afhq_inception_v3.ckpt next to this file)")
    parser.add_argument("--img_size", type=int, default=256,
                        help=f"side images are resized to before Inception (course: 256; "
                             f"at least {MIN_INPUT_SIZE}; use the size the checkpoint was "
                             f"trained at)")
    parser.add_argument("--batch_size", type=int, default=50, help="images per forward pass")
    parser.add_argument("--device", type=str, default=None,
                        help="torch device, e.g. cpu, cuda, cuda:1 (default: cuda if available)")
    parser.add_argument("--kid", action="store_true",
                        help="also print the kernel inception distance and its standard error")
    args = parser.parse_args(argv)
    # This file runs from fid/, where the folder's cli.py is out of reach: it reports bad input
    # itself, in cli.run's format (one line on stderr, exit 1 or 2).
    if args.batch_size < 1:
        parser.exit(2, f"{parser.prog}: error: --batch_size must be at least 1\n")
    try:
        features = features_given_paths([args.gt_dir, args.gen_dir], args.img_size,
                                        args.batch_size, args.ckpt, parse_device(args.device))
        fid = frechet_distance(*feature_statistics(features[0]), *feature_statistics(features[1]))
        kid = kernel_inception_distance(*features) if args.kid else None
    except (FIDInputError, ValueError) as error:
        parser.exit(1, f"{parser.prog}: error: {one_line(error)}\n")
    print(f"FID: {fid}")
    if kid is not None:
        print(f"KID: {kid[0]} +- {kid[1]}")


if __name__ == "__main__":
    main()
