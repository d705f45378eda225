"""Train inception.py's Inception-v3 from scratch as a classifier: how an FID checkpoint is made.

The course's ``afhq_inception_v3.ckpt`` is this network trained to tell AFHQ's three classes
apart (Adam, lr 1e-3, batch 32, 10 epochs, 256x256 inputs in [-1, 1]) and saved as a plain
state_dict. This script does the same for any dataset in AFHQ's layout,

    DATA_ROOT/train/{class}/*.png|jpg    DATA_ROOT/val/{class}/*.png|jpg

with the preprocessing ``fid/measure_fid.py`` measures with. It prints the validation accuracy
after every epoch and writes OUT (the state_dict, loadable by ``measure_fid.py --ckpt OUT``)
and OUT with the suffix .json (validation accuracy, settings, time), both atomically.
From image_diffusion_todo/:

    # rebuild the AFHQ checkpoint on a GPU (course settings are the defaults)
    python -m experiments.train_classifier --data_root data/afhq
    # the CPU stand-in (see standin_dataset.py): smaller inputs, fewer epochs
    python -m experiments.train_classifier --data_root ../../data/standin --img_size 75 \
        --epochs 2 --out standin_inception_v3.ckpt
"""
import json
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from atomic_write import atomic_write, atomic_write_text
from cli import ArgumentParser, UsageError, run
from fid.inception import MIN_INPUT_SIZE, InceptionV3
from fid.image_files import list_images
from fid.measure_fid import (
    DEFAULT_CKPT, FIDInputError, image_transform, load_image, parse_device, verify_images,
)


class LabelledImageFolder(Dataset):
    """SPLIT_DIR/{class}/* -> (image [3, S, S] in [-1, 1], class index), classes sorted by name."""

    def __init__(self, split_dir, classes, img_size, max_num_images_per_cat=-1):
        self.samples = []
        for label, class_name in enumerate(classes):
            files = list_images(split_dir / class_name)
            if not files:
                raise FIDInputError(f"no .png/.jpg/.jpeg images in {split_dir / class_name}")
            if max_num_images_per_cat > 0:
                files = files[:max_num_images_per_cat]
            self.samples += [(path, label) for path in files]
        verify_images([path for path, _ in self.samples])
        self.transform = image_transform(img_size)

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        path, label = self.samples[index]
        return load_image(path, self.transform), label


def find_classes(data_root):
    """Class names shared by DATA_ROOT/train and DATA_ROOT/val (their sub-folders), sorted."""
    per_split = []
    for split in ("train", "val"):
        split_dir = data_root / split
        if not split_dir.is_dir():
            raise FIDInputError(f"{split_dir} not found: --data_root must hold train/ and val/")
        per_split.append(sorted(p.name for p in split_dir.iterdir() if p.is_dir()))
    if per_split[0] != per_split[1]:
        raise FIDInputError(f"train/ has classes {per_split[0]} but val/ has {per_split[1]}")
    if len(per_split[0]) < 2:
        raise FIDInputError(f"{data_root / 'train'} needs at least 2 class folders")
    return per_split[0]


@torch.no_grad()
def accuracy(model, loader, device):
    model.eval()
    correct = total = 0
    for images, labels in tqdm(loader, desc="val", leave=False):
        predictions = model(images.to(device)).argmax(dim=-1).cpu()
        correct += (predictions == labels).sum().item()
        total += labels.numel()
    return correct / total


def check_args(args):
    for name, minimum in (("img_size", MIN_INPUT_SIZE), ("epochs", 1), ("batch_size", 1)):
        if getattr(args, name) < minimum:
            raise UsageError(f"--{name} must be at least {minimum}")
    if args.num_workers < 0 or args.lr <= 0:
        raise UsageError("--num_workers must be >= 0 and --lr > 0")
    if not Path(args.out).parent.is_dir():
        raise UsageError(f"folder of --out not found: {Path(args.out).parent}")


def main(args):
    check_args(args)
    device = parse_device(args.device)
    data_root = Path(args.data_root)
    classes = find_classes(data_root)
    train_set = LabelledImageFolder(data_root / "train", classes, args.img_size,
                                    args.max_num_images_per_cat)
    val_set = LabelledImageFolder(data_root / "val", classes, args.img_size)

    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    train_loader = DataLoader(train_set, args.batch_size, shuffle=True, drop_last=True,
                              num_workers=args.num_workers, generator=generator)
    val_loader = DataLoader(val_set, args.batch_size, num_workers=args.num_workers)
    if len(train_loader) == 0:
        raise UsageError(f"fewer training images ({len(train_set)}) than --batch_size")

    model = InceptionV3(for_train=True, num_classes=len(classes))
    # Start from uniform class probabilities: with torchvision's initialisation (std 0.1 over
    # 2048 features) the first logits are large and random (a first loss of ~2.6 on the
    # stand-in instead of ln 3 = 1.1), and early steps go into undoing that.
    nn.init.zeros_(model.final_fc.weight)
    nn.init.zeros_(model.final_fc.bias)
    model = model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    print(f"classes {classes}; {len(train_set)} training and {len(val_set)} validation images "
          f"at {args.img_size}x{args.img_size} on {device}")
    start = time.time()
    for epoch in range(args.epochs):
        model.train()
        for images, labels in tqdm(train_loader, desc=f"epoch {epoch}", leave=False):
            loss = F.cross_entropy(model(images.to(device)), labels.to(device))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        val_accuracy = accuracy(model, val_loader, device)
        print(f"epoch {epoch}: last loss {loss.item():.4f}, val accuracy {val_accuracy:.4f}")
    seconds = time.time() - start

    out = Path(args.out)
    atomic_write(out, lambda f: torch.save(model.state_dict(), f))
    report = {
        "val_accuracy": val_accuracy, "classes": classes, "epochs": args.epochs,
        "img_size": args.img_size, "batch_size": args.batch_size, "lr": args.lr,
        "num_train_images": len(train_set), "num_val_images": len(val_set),
        "seed": args.seed, "seconds": seconds,
    }
    atomic_write_text(out.with_suffix(".json"), json.dumps(report, indent=2) + "\n")
    print(f"val accuracy {val_accuracy:.4f}; saved {out} ({seconds:.0f} s)")


def parse_args(argv=None):
    parser = ArgumentParser(prog="python -m experiments.train_classifier",
                            description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_root", type=str, required=True,
                        help="dataset in AFHQ's layout: DATA_ROOT/{train,val}/{class}/*.png|jpg")
    parser.add_argument("--out", type=str, default=str(DEFAULT_CKPT),
                        help="where to write the state_dict (a .json with the accuracy goes next "
                             "to it; default: the course's fid/afhq_inception_v3.ckpt)")
    parser.add_argument("--img_size", type=int, default=256,
                        help=f"input side (course: 256; at least {MIN_INPUT_SIZE}); measure FID "
                             f"with the same --img_size")
    parser.add_argument("--epochs", type=int, default=10, help="passes over the training split")
    parser.add_argument("--batch_size", type=int, default=32, help="images per step")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    parser.add_argument("--max_num_images_per_cat", type=int, default=-1,
                        help="use at most this many training images per class (-1: all)")
    parser.add_argument("--num_workers", type=int, default=4, help="data loading processes")
    parser.add_argument("--seed", type=int, default=0, help="seed for initialisation and shuffling")
    parser.add_argument("--device", type=str, default=None,
                        help="torch device, e.g. cpu, cuda:0 (default: cuda if available)")
    return parser.parse_args(argv)


# An image that verify_images passed but that cannot be decoded is met in a DataLoader worker;
# the FIDInputError it raises there comes back with the worker's traceback, which cli.run
# reduces to the original message.
ERRORS = (UsageError, FIDInputError, OSError)

if __name__ == "__main__":
    run(main, parse_args(), ERRORS)
