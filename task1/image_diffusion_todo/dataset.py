"""AFHQ (cat, dog, wild) for training, and the 64x64 evaluation folder for FID.

Any folder in AFHQ's layout works: ROOT/{train,val}/{class}/*.png|jpg, class names = subfolder
names. Labels are 1 + the class's index in sorted order; 0 is kept for the null class of
classifier-free guidance.

    python dataset.py                     # download AFHQ if missing, build data/afhq/eval
    python dataset.py --data_root DIR     # the same for another folder in AFHQ's layout

The eval folder is the course's FID reference set, built as the course's dataset.py builds it:
every val image resized to 64x64 by PIL's resize with its defaults and saved again under its own
file name with PIL's defaults (AFHQ's JPEGs are re-encoded as JPEG), so FIDs measured against it
compare with the course's and a classmate's.
"""
import os
import shutil
import tempfile
import urllib.request
import zipfile
from collections import Counter
from pathlib import Path
from typing import Optional

import torch
import torchvision.transforms as transforms
from atomic_write import DIR_MODE
from cli import ArgumentParser, run
from fid.image_files import list_images, to_rgb
from PIL import Image
from tqdm import tqdm

AFHQ_URL = "https://www.dropbox.com/s/t9l9o3vsx2jai3z/afhq.zip?dl=1"
# where the course's AFHQDataModule("data") keeps AFHQ: the default --data_root of train.py and dataset.py
DEFAULT_ROOT = os.path.join("data", "afhq")
EVAL_FORMATS = ("source", "png")


class DatasetError(ValueError):
    """A data folder that is missing, empty, unreadable, or could not be downloaded."""


def listdir(dname):
    """Image files under dname (recursively), sorted: [Path] (the course's name for list_images)."""
    return list_images(dname)


def tensor_to_pil_image(x: torch.Tensor, single_image=False):
    """[B, C, H, W] (or [C, H, W]) in [-1, 1] -> list of PIL images (or one image)."""
    if x.ndim == 3:
        x = x.unsqueeze(0)
        single_image = True
    x = (x * 0.5 + 0.5).clamp(0, 1).detach().cpu().permute(0, 2, 3, 1).numpy()
    images = [Image.fromarray(image) for image in (x * 255).round().astype("uint8")]
    return images[0] if single_image else images


def get_data_iterator(iterable):
    """Loop over a DataLoader forever: for step, batch in zip(range(N), get_data_iterator(dl))."""
    while True:
        yield from iterable


def open_rgb(path) -> Image.Image:
    """Load an image as RGB; DatasetError naming the file when it cannot be decoded."""
    try:
        with Image.open(path) as img:
            return to_rgb(img)
    except Exception as error:
        raise DatasetError(f"unreadable image {path}: {error}") from None


def check_readable(path) -> None:
    """Cheap check (header only) that path is an image PIL can open."""
    try:
        with Image.open(path):
            pass
    except Exception as error:
        raise DatasetError(f"unreadable image {path}: {error}") from None


class AFHQDataset(torch.utils.data.Dataset):
    """(image [3, R, R] in [-1, 1], label) pairs from root/split/{class}/*."""

    def __init__(self, root: str, split: str, transform=None, max_num_images_per_cat=-1, label_offset=1):
        super().__init__()
        self.root, self.split, self.transform = root, split, transform
        self.max_num_images_per_cat, self.label_offset = max_num_images_per_cat, label_offset
        split_dir = Path(root) / split
        if not split_dir.is_dir():
            raise DatasetError(f"no {split}/ folder in {root} (expected {root}/{split}/<class>/*.png|jpg)")
        categories = sorted(d.name for d in split_dir.iterdir() if d.is_dir())
        if not categories:
            raise DatasetError(f"no class folders in {split_dir} (expected {split_dir}/<class>/*.png|jpg)")
        self.categories = categories
        self.num_classes = len(categories)

        fnames, labels = [], []
        for idx, category in enumerate(categories):
            cat_fnames = listdir(split_dir / category)
            if max_num_images_per_cat > 0:
                cat_fnames = cat_fnames[:max_num_images_per_cat]
            fnames += cat_fnames
            labels += [idx + label_offset] * len(cat_fnames)
        if not fnames:
            raise DatasetError(f"no images (*.png, *.jpg) in the class folders of {split_dir}")
        for fname in fnames:
            check_readable(fname)
        self.fnames, self.labels = fnames, labels

    def __getitem__(self, idx):
        img = open_rgb(self.fnames[idx])
        if self.transform is not None:
            img = self.transform(img)
        return img, self.labels[idx]

    def __len__(self):
        return len(self.labels)


class AFHQDataModule(object):
    """Train/val datasets and loaders of AFHQ, with the course's arguments and defaults.

    root is the folder that holds afhq/ (the course's meaning); AFHQ is downloaded into root/afhq
    when that is missing, as the course's does. afhq_root (keyword only, this project's addition)
    is any folder in AFHQ's layout instead, used as it is (train.py --data_root). val/ is
    optional for training.
    """

    def __init__(self, root: str = "data", batch_size: int = 32, num_workers: int = 4,
                 max_num_images_per_cat: int = 1000, image_resolution: int = 64, label_offset=1, transform=None,
                 *, afhq_root: Optional[str] = None):
        self.root = root
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.afhq_root = os.path.join(root, "afhq") if afhq_root is None else str(afhq_root)
        self.max_num_images_per_cat = max_num_images_per_cat
        self.image_resolution = image_resolution
        self.label_offset = label_offset
        if afhq_root is None and not os.path.exists(self.afhq_root):
            print(f"{self.afhq_root} does not exist: downloading AFHQ")
            download_afhq(self.afhq_root)
        if not os.path.isdir(self.afhq_root):
            raise DatasetError(f"data folder not found: {self.afhq_root}")
        self.transform = transform if transform is not None else transforms.Compose([
            transforms.Resize((image_resolution, image_resolution)),
            transforms.ToTensor(),
            transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
        ])
        self.train_ds = AFHQDataset(self.afhq_root, "train", self.transform, max_num_images_per_cat, label_offset)
        has_val = (Path(self.afhq_root) / "val").is_dir()
        self.val_ds = (AFHQDataset(self.afhq_root, "val", self.transform, max_num_images_per_cat, label_offset)
                       if has_val else None)
        self.num_classes = self.train_ds.num_classes

    def train_dataloader(self):
        return torch.utils.data.DataLoader(self.train_ds, batch_size=self.batch_size, num_workers=self.num_workers,
                                           shuffle=True, drop_last=len(self.train_ds) >= self.batch_size)

    def val_dataloader(self):
        return torch.utils.data.DataLoader(self.val_ds, batch_size=self.batch_size, num_workers=self.num_workers,
                                           shuffle=False, drop_last=False)


def download_afhq(dest, url: Optional[str] = None, timeout: float = 30.0) -> None:
    """Download (from url, default AFHQ_URL) and unzip AFHQ so that dest/{train,val}/{cat,dog,wild} exist.

    Everything goes to temporary names next to dest first: an interrupted download leaves dest
    untouched. DatasetError (one line) when the download fails, e.g. offline.
    """
    dest, url = Path(dest), url or AFHQ_URL
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".afhq-download-") as tmp:
        zip_path = Path(tmp) / "afhq.zip"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response, open(zip_path, "wb") as f:
                total = int(response.headers.get("Content-Length") or 0) or None
                with tqdm(total=total, unit="B", unit_scale=True, desc="downloading AFHQ") as bar:
                    while chunk := response.read(1 << 20):
                        f.write(chunk)
                        bar.update(len(chunk))
        except Exception as error:
            raise DatasetError(
                f"could not download AFHQ from {url} ({error}); if offline, get afhq.zip elsewhere, "
                f"unzip it and pass its folder as --data_root") from None
        try:
            with zipfile.ZipFile(zip_path) as archive:
                archive.extractall(tmp)
        except zipfile.BadZipFile:
            raise DatasetError(f"the file downloaded from {url} is not a zip archive") from None
        # the archive holds afhq/{train,val}/...; accept the folders at its top level too
        candidates = [Path(tmp) / "afhq", Path(tmp)]
        extracted = next((c for c in candidates if (c / "train").is_dir()), None)
        if extracted is None:
            raise DatasetError(f"the archive from {url} has no train/ folder")
        dest.mkdir(exist_ok=True)
        for split_dir in extracted.iterdir():
            if split_dir.is_dir() and split_dir.name in ("train", "val"):
                os.replace(split_dir, dest / split_dir.name)


def prepare_eval_dir(data_root, eval_dir, resolution: int = 64, split: str = "val", image_format: str = "source") -> int:
    """Write every image of data_root/split resized to resolution x resolution into eval_dir.

    image_format "source" (the course's): PIL's resize((resolution, resolution)) with its defaults
    (bicubic for RGB), saved under the file's own name with PIL's defaults (a JPEG is re-encoded
    at quality 75), as the course's dataset.py does. "png": the same pixels before re-encoding,
    saved losslessly as <name>.png. Built in a temporary folder and renamed at the end, so
    eval_dir is either complete or absent. Returns the number of images.
    """
    eval_dir = Path(eval_dir)
    sources = AFHQDataset(str(data_root), split).fnames
    names = [source.name if image_format == "source" else f"{source.stem}.png" for source in sources]
    repeated = [name for name, count in Counter(names).items() if count > 1]
    if repeated:
        raise DatasetError(f"two {split} images would both be {eval_dir / repeated[0]} (the eval folder is flat)")
    eval_dir.parent.mkdir(parents=True, exist_ok=True)
    # a killed earlier build leaves its temporary folder (an error or Ctrl-C removes it below)
    for stale in eval_dir.parent.glob(f".{eval_dir.name}-tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(dir=eval_dir.parent, prefix=f".{eval_dir.name}-tmp-"))
    try:
        os.chmod(tmp, DIR_MODE)
        for source, name in tqdm(zip(sources, names), total=len(sources), desc="eval images"):
            try:
                with Image.open(source) as img:
                    img.resize((resolution, resolution)).save(tmp / name)
            except Exception as error:
                raise DatasetError(f"cannot resize and save {source}: {error}") from None
        os.replace(tmp, eval_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return len(sources)


def main(args):
    data_root = Path(args.data_root)
    eval_dir = Path(args.eval_dir) if args.eval_dir else data_root / "eval"
    if eval_dir.exists() and not eval_dir.is_dir():
        raise DatasetError(f"--eval_dir {eval_dir} is a file, not a folder: choose another --eval_dir")
    if eval_dir.exists() and any(eval_dir.iterdir()):
        print(f"{eval_dir} already exists ({sum(1 for _ in eval_dir.iterdir())} files); delete it to rebuild")
        return
    if not data_root.exists():
        print(f"{data_root} does not exist: downloading AFHQ")
        download_afhq(data_root, args.url)
    num_images = prepare_eval_dir(data_root, eval_dir, args.resolution, image_format=args.format)
    print(f"Constructed eval dir at {eval_dir} ({num_images} images, {args.resolution}x{args.resolution})")


def parse_args(argv=None):
    parser = ArgumentParser(description="Download AFHQ (if missing) and build the FID evaluation folder "
                                        "as the course does.")
    parser.add_argument("--data_root", default=DEFAULT_ROOT,
                        help="folder in AFHQ's layout: {train,val}/<class>/*.png|jpg (downloaded here if missing)")
    parser.add_argument("--eval_dir", default=None, help="where to write the eval images (default: DATA_ROOT/eval)")
    parser.add_argument("--resolution", type=int, default=64, help="eval image size in pixels")
    parser.add_argument("--format", choices=EVAL_FORMATS, default="source",
                        help="source (the course's): each image under its own name and format, re-encoded "
                             "with PIL's defaults; png: lossless <name>.png (FIDs then differ from the course's)")
    parser.add_argument("--url", default=AFHQ_URL, help="where to download afhq.zip from")
    return parser.parse_args(argv)


if __name__ == "__main__":
    run(main, parse_args(), DatasetError)
