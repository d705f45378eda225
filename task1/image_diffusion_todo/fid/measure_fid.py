"""Frechet Inception Distance (FID) and KID between two folders of images, the course's protocol.

    python measure_fid.py GT_DIR GEN_DIR [--ckpt afhq_inception_v3.ckpt] [--img_size 256] [--kid]

prints ``FID: <value>`` (and ``KID: <mean> +- <standard error>``). Features are the 2048-d pooled
output of ``inception.InceptionV3`` with the course's AFHQ classifier weights; every image is
RGB -> img_size x img_size (bilinear, antialiased) -> [-1, 1], the classifier's own
preprocessing. ``Scorer`` is the one API every caller uses (experiments/fid_grid.py too): a
different feature network changes ``Scorer`` and inception.py only.

Run it as the course does (``python fid/measure_fid.py``, or from inside fid/), or import it as
``fid.measure_fid`` from the folder above.
"""
import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision import transforms
from tqdm import tqdm

if __package__:  # imported as fid.measure_fid
    from .image_files import list_images as find_images, to_rgb
    from .inception import MIN_INPUT_SIZE, InceptionV3
else:  # run as a script, or imported from inside fid/ (the course's way)
    from image_files import list_images as find_images, to_rgb
    from inception import MIN_INPUT_SIZE, InceptionV3

DEFAULT_CKPT = Path(__file__).resolve().parent / "afhq_inception_v3.ckpt"


class FIDInputError(Exception):
    """A problem with the user's input (checkpoint, folder, image), reported as one line."""


def one_line(error):
    """The first line of an exception's message (some library messages span many lines)."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def list_images(folder):
    """All images under ``folder`` (recursively), sorted -> list[Path]; FIDInputError when none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FIDInputError(f"image folder not found: {folder}")
    files = find_images(folder)
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
    """Read one image file as 8-bit RGB and apply ``transform``; names the file when it fails."""
    try:
        with Image.open(path) as image:
            return transform(to_rgb(image))
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


def check_feature_count(features):
    if features.shape[0] < 2:
        raise FIDInputError("FID needs at least 2 images per folder")


def feature_statistics(features):
    """features [N, D] -> (mu [D], sigma [D, D]), the unbiased sample mean and covariance."""
    check_feature_count(features)
    return np.mean(features, axis=0), np.cov(features, rowvar=False)


def trace_sqrt_product(sigma1, sigma2):
    """Tr((sigma1 sigma2)^{1/2}) for symmetric PSD sigma1, sigma2 [D, D].

    sigma1 sigma2 is similar to the symmetric PSD matrix sigma1^{1/2} sigma2 sigma1^{1/2}, so the
    trace is the sum of the square roots of that matrix's eigenvalues: two symmetric
    eigendecompositions instead of a general matrix square root (scipy's sqrtm), with no complex
    parts or retries. Singular covariances (fewer images than dimensions) pass their null space's
    rounding noise through the square roots, as sqrtm does; frechet_distance_of_features does not.
    """
    eigenvalues, eigenvectors = np.linalg.eigh(sigma1)
    root = (eigenvectors * np.sqrt(np.clip(eigenvalues, 0, None))) @ eigenvectors.T
    return float(np.sqrt(np.clip(np.linalg.eigvalsh(root @ sigma2 @ root), 0, None)).sum())


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """Squared Frechet distance between N(mu1, sigma1) and N(mu2, sigma2) (Dowson & Landau 1982):

        ||mu1 - mu2||^2 + Tr(sigma1) + Tr(sigma2) - 2 Tr((sigma1 sigma2)^{1/2}).

    mu: [D], sigma: [D, D], in float64.
    """
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError("the two sets of statistics have different dimensions")
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2)
                 - 2 * trace_sqrt_product(sigma1, sigma2))


def frechet_distance_of_features(features_1, features_2):
    """frechet_distance of two feature sets' statistics: [M, D], [N, D] -> float.

    With centred features X1, X2 and sigma_i = X_i^T X_i / (n_i - 1), the non-zero eigenvalues
    of sigma1 sigma2 are the squared singular values of X1 X2^T [M, N] over (M - 1)(N - 1), so
    Tr((sigma1 sigma2)^{1/2}) = ||X1 X2^T||_* / sqrt((M - 1)(N - 1)) and Tr(sigma_i) =
    ||X_i||_F^2 / (n_i - 1): no D x D matrix when M N < D^2 (e.g. 1000 images, 2048 features).
    """
    x1, x2 = np.asarray(features_1, np.float64), np.asarray(features_2, np.float64)
    check_feature_count(x1)
    check_feature_count(x2)
    m, n = len(x1), len(x2)
    if m * n >= x1.shape[1] ** 2:
        return frechet_distance(*feature_statistics(x1), *feature_statistics(x2))
    mu1, mu2 = x1.mean(axis=0), x2.mean(axis=0)
    centred_1, centred_2 = x1 - mu1, x2 - mu2
    nuclear_norm = np.linalg.svd(centred_1 @ centred_2.T, compute_uv=False).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.sum(centred_1 ** 2) / (m - 1) + np.sum(centred_2 ** 2) / (n - 1)
                 - 2 * nuclear_norm / np.sqrt((m - 1) * (n - 1)))


def polynomial_kernel(x, y):
    """k(x, y) = (x . y / d + 1)^3 for all pairs: x [M, D], y [N, D] -> [M, N] (KID's kernel)."""
    return (x @ y.T / x.shape[1] + 1) ** 3


def kernel_inception_distance(features_1, features_2):
    """KID (Binkowski et al. 2018) and its jackknife standard error: [M, D], [N, D] -> (kid, se).

    kid is the unbiased MMD^2 U-statistic with polynomial_kernel (Gretton et al. 2012, eq. 3), so
    it is comparable across N; se^2 = (M-1)/M sum_i (kid_(i) - mean)^2 + (N-1)/N sum_j (kid_[j] -
    mean)^2 over the estimates leaving out x_i or y_j (Arvesen 1969), from the kernels' row sums.
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


class Scorer:
    """FID and KID of image files, with one feature network.

        scorer = Scorer(ckpt, img_size, batch_size, device)
        reference = scorer.features(real_files)            # [N, 2048], computed once
        scorer.score(generated_files, reference)           # {"fid", "kid", "kid_se"}
    """

    def __init__(self, ckpt=DEFAULT_CKPT, img_size=256, batch_size=50, device=None):
        if img_size < MIN_INPUT_SIZE:
            raise FIDInputError(f"--img_size must be at least {MIN_INPUT_SIZE} for Inception-v3")
        if batch_size < 1:
            raise FIDInputError("--batch_size must be at least 1")
        self.img_size, self.batch_size = img_size, batch_size
        self.device = parse_device(device)
        self.model = load_inception(ckpt, self.device)

    def features(self, files, desc="features") -> np.ndarray:
        """Inception features of image files: [N, 2048] float64."""
        return extract_features(files, self.model, self.img_size, self.batch_size, self.device, desc)

    def score(self, files, reference: np.ndarray, desc="features", kid=True) -> dict:
        """{"fid", "kid", "kid_se"} of files against reference features [N, 2048] (KID when kid)."""
        features = self.features(files, desc)
        scores = {"fid": frechet_distance_of_features(features, reference)}
        if kid:
            scores["kid"], scores["kid_se"] = kernel_inception_distance(features, reference)
        return scores


def calculate_fid_given_paths(paths, img_size=256, batch_size=50, ckpt=DEFAULT_CKPT, device=None):
    """FID between the images of the folders paths[0] and paths[1] (the course's function)."""
    files = [list_images(path) for path in paths]
    verify_images(files[0] + files[1])  # a bad image is reported before the slow work starts
    scorer = Scorer(ckpt, img_size, batch_size, device)
    return scorer.score(files[1], scorer.features(files[0], str(paths[0])), str(paths[1]), kid=False)["fid"]


def parse_device(name):
    """A device name (or None: cuda if available, or a torch.device) -> torch.device, refusing
    CUDA devices this machine does not have."""
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


def build_parser():
    parser = argparse.ArgumentParser(description="Print the FID (with --kid also the KID) between the images "
                                                 "of two folders, searched recursively.")
    # one line for bad arguments (argparse prints usage too), as every script of this folder does
    parser.error = lambda message: parser.exit(2, f"{parser.prog}: error: {message}\n")
    parser.add_argument("gt_dir", help="folder of real images")
    parser.add_argument("gen_dir", help="folder of generated images")
    parser.add_argument("--ckpt", default=str(DEFAULT_CKPT),
                        help="Inception-v3 weights (default: the course's afhq_inception_v3.ckpt beside this file)")
    parser.add_argument("--img_size", type=int, default=256,
                        help=f"input size for Inception (course: 256; at least {MIN_INPUT_SIZE})")
    parser.add_argument("--batch_size", type=int, default=50, help="images per forward pass")
    parser.add_argument("--device", default=None, help="e.g. cpu, cuda:1 (default: cuda if available)")
    parser.add_argument("--kid", action="store_true", help="also print KID and its standard error")
    return parser


def main(argv=None):
    """The script: errors of the code below become one line on stderr (exit 1), as cli.run does
    for the folder above (whose cli.py is out of reach when this runs from fid/)."""
    args = build_parser().parse_args(argv)
    try:
        files = [list_images(args.gt_dir), list_images(args.gen_dir)]
        verify_images(files[0] + files[1])  # a bad image is reported before the slow work starts
        scorer = Scorer(args.ckpt, args.img_size, args.batch_size, args.device)
        scores = scorer.score(files[1], scorer.features(files[0], args.gt_dir), args.gen_dir, kid=args.kid)
    except (FIDInputError, ValueError) as error:
        sys.exit(f"{sys.argv[0]}: error: {one_line(error)}")
    print(f"FID: {scores['fid']}")
    if args.kid:
        print(f"KID: {scores['kid']} +- {scores['kid_se']}")


if __name__ == "__main__":
    main()
