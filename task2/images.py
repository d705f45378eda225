"""Training images: which files count as images, the checks run before training, and the transform
from a PIL image to the VAE's input."""
import contextlib
import json
import secrets
from pathlib import Path

import torch
from PIL import Image, ImageOps

from cli import UsageError

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
# torchvision's resampling filters, by the names --image_interpolation_mode takes.
INTERPOLATION_MODES = ["nearest", "nearest_exact", "bilinear", "bicubic", "box", "hamming", "lanczos"]
# What PIL raises for a damaged file: OSError (truncated), SyntaxError (a PNG chunk with a bad CRC),
# ValueError and DecompressionBombError (absurd sizes).
UNREADABLE = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def list_images(folder, recursive=False):
    """Image files inside ``folder`` (and its subfolders with ``recursive``), sorted by path."""
    paths = Path(folder).rglob("*") if recursive else Path(folder).iterdir()
    return sorted(p for p in paths if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def check_images_readable(folder):
    """Raise a UsageError naming the first image file under ``folder`` that PIL cannot read."""
    for path in list_images(folder, recursive=True):
        try:
            with Image.open(path) as image:
                image.verify()
        except UNREADABLE as error:
            raise UsageError(f"cannot read the image {path}: {error}; replace or remove it") from error


def check_captions(folder, caption_column):
    """Raise a UsageError naming the first row of a metadata.jsonl under ``folder`` (the datasets
    "imagefolder" layout) that is not JSON, names a missing image, or lacks a caption, i.e. a string
    or a list of strings under ``caption_column``. A column that no row has is left to the dataset's
    own check, which lists the columns there are."""
    for metadata in sorted(Path(folder).rglob("metadata.jsonl")):
        lines = [(number, line) for number, line in enumerate(metadata.read_text().splitlines(), 1) if line.strip()]
        rows = []
        for number, line in lines:
            try:
                rows.append((number, json.loads(line)))
            except json.JSONDecodeError as error:
                raise UsageError(f"{metadata} line {number} is not JSON ({error}); fix or remove the line") from error
        has_captions = any(isinstance(row, dict) and caption_column in row for _, row in rows)
        for number, row in rows:
            where = f"{metadata} line {number}"
            if not isinstance(row, dict) or not isinstance(row.get("file_name"), str):
                raise UsageError(f"{where} has no \"file_name\"; give each row the image it captions")
            if not (metadata.parent / row["file_name"]).is_file():
                raise UsageError(f"{where} names {row['file_name']}, which is not in {metadata.parent}; "
                                 f"add the image or remove the line")
            caption = row.get(caption_column)
            if has_captions and not (isinstance(caption, str) and caption.strip() or is_caption_list(caption)):
                raise UsageError(f"{where} has no caption under {caption_column!r} (got {caption!r}); "
                                 f"write one or remove the line")


def is_caption_list(value):
    """Whether ``value`` is a non-empty list of captions (one is drawn at random per use)."""
    return isinstance(value, list) and bool(value) and all(isinstance(v, str) and v.strip() for v in value)


def upright_rgb(image):
    """``image`` as RGB, turned the way its EXIF orientation tag says: a phone stores a portrait photo
    as landscape pixels plus "rotate 90 degrees", which viewers apply and PIL does not."""
    return ImageOps.exif_transpose(image).convert("RGB")


def load_image(path):
    """The image file at ``path``, upright and RGB; a UsageError naming it when it cannot be read."""
    try:
        with Image.open(path) as image:
            return upright_rgb(image)
    except UNREADABLE as error:
        raise UsageError(f"cannot read the image {path}: {error}; replace or remove it") from error


def image_transforms(args):
    """PIL image -> tensor [3, resolution, resolution] in [-1, 1], the VAE's input range."""
    from torchvision import transforms

    return transforms.Compose([
        transforms.Resize(args.resolution,
                          interpolation=transforms.InterpolationMode[args.image_interpolation_mode.upper()]),
        transforms.CenterCrop(args.resolution) if args.center_crop else transforms.RandomCrop(args.resolution),
        transforms.RandomHorizontalFlip() if args.random_flip else transforms.Lambda(lambda x: x),
        transforms.ToTensor(),
        transforms.Normalize([0.5], [0.5]),
    ])


class SampleRandomness:
    """The random draws of a data set's item (crop, flip, caption) seeded from (seed, epoch, index).

    They then depend only on which item of which epoch is loaded, not on when or where: accelerate
    loads one batch ahead of the one it trains on, workers have their own RNG, and a run resumed
    mid-epoch never loads the batches it skips. The global RNG, which draws the noise, is left as it was.
    """

    def __init__(self, seed=None):
        self.seed = secrets.randbits(32) if seed is None else seed
        self.epoch = 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    @contextlib.contextmanager
    def of_item(self, index):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(hash((self.seed, self.epoch, index)))
            yield
