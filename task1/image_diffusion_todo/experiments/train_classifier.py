"""Train inception.py's Inception-v3 from scratch as a classifier: how an FID checkpoint is made.

The course's ``afhq_inception_v3.ckpt`` is this network trained to tell AFHQ's three classes
apart (Adam, lr 1e-3, batch 32, 10 epochs, 256x256 inputs in [-1, 1]) and saved as a plain
state_dict. This script does the same for any dataset in AFHQ's layout,

    DATA_ROOT/train/{class}/*.png|jpg    DATA_ROOT/val/{class}/*.png|jpg

with the preprocessing ``measure_fid.py`` measures with. It prints the validation accuracy
after every epoch and writes OUT (the state_dict, loadable by ``measure_fid.py --ckpt OUT``)
and OUT with the suffix .json (validation accuracy, settings, time), both atomically.

    # rebuild the AFHQ checkpoint on a GPU (course settings are the defaults)
    python train_classifier.py --data_root ../data/afhq --out afhq_inception_v3.ckpt
    # the CPU stand-in (see ../standin_dataset.py): smaller inputs, fewer epochs
    python train_classifier.py --data_root ../../../data/standin --img_size 80 --epochs 2 \
        --out standin_inception_v3.ckpt
"""
import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from inception import MIN_INPUT_SIZE, InceptionV3
from measure_fid import (
    IMAGE_EXTENSIONS, FIDInputError, image_transform, load_image, one_line, parse_device,
    verify_images,
)


class LabelledImageFolder(Dataset):
    """SPLIT_DIR/{class}/* -> (image [3, S, S] in [-1, 1], class index), classes sorted by name."""

    def __init__(self, split_dir, classes, img_size, max_num_images_per_cat=-1):
        self.samples = []
        for label, class_name in enumerate(classes):
            files = sorted(p for p in (split_dir / class_name).iterdir()
                           if p.suffix.lower() in IMAGE_EXTENSIONS)
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


def iterate(loader, desc):
    """Batches of ``loader``; an image that passed verify_images but cannot be decoded, met in a
    worker process, is still reported as one line."""
    try:
        yield from tqdm(loader, desc=desc, leave=False)
    except FIDInputError as error:
        message = str(error).strip()
        if message.startswith("Caught "):
            # Re-raised from a DataLoader worker with the worker's traceback in the message;
            # its last line is the original "...FIDInputError: <message>".
            message = message.splitlines()[-1].split(": ", 1)[-1]
        raise FIDInputError(message) from None


@torch.no_grad()
def accuracy(model, loader, device):
    model.eval()
    correct = total = 0
    for images, labels in iterate(loader, "val"):
        predictions = model(images.to(device)).argmax(dim=-1).cpu()
        correct += (predictions == labels).sum().item()
        total += labels.numel()
    return correct / total


def atomic_write(path, write):
    """Call write(temporary_path), then rename it to ``path``: readers never see half a file."""
    temporary = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_root", type=str, required=True,
                        help="dataset in AFHQ's layout: DATA_ROOT/{train,val}/{class}/*.png|jpg")
    parser.add_argument("--out", type=str,
                        default=str(Path(__file__).resolve().parent / "afhq_inception_v3.ckpt"),
                        help="where to write the state_dict (a .json with the accuracy goes next to it)")
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
    args = parser.parse_args(argv)

    for name, minimum in (("img_size", MIN_INPUT_SIZE), ("epochs", 1), ("batch_size", 1)):
        if getattr(args, name) < minimum:
            parser.exit(2, f"error: --{name} must be at least {minimum}\n")
    if args.num_workers < 0 or args.lr <= 0:
        parser.exit(2, "error: --num_workers must be >= 0 and --lr > 0\n")
    out = Path(args.out)
    if not out.parent.is_dir():
        parser.exit(1, f"error: folder of --out not found: {out.parent}\n")

    try:
        device = parse_device(args.device)
        data_root = Path(args.data_root)
        classes = find_classes(data_root)
        train_set = LabelledImageFolder(data_root / "train", classes, args.img_size,
                                        args.max_num_images_per_cat)
        val_set = LabelledImageFolder(data_root / "val", classes, args.img_size)
    except (FIDInputError, OSError) as error:
        parser.exit(1, f"error: {one_line(error)}\n")

    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    train_loader = DataLoader(train_set, args.batch_size, shuffle=True, drop_last=True,
                              num_workers=args.num_workers, generator=generator)
    val_loader = DataLoader(val_set, args.batch_size, num_workers=args.num_workers)
    if len(train_loader) == 0:
        parser.exit(1, f"error: fewer training images ({len(train_set)}) than --batch_size\n")

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
    try:
        for epoch in range(args.epochs):
            model.train()
            for images, labels in iterate(train_loader, f"epoch {epoch}"):
                loss = F.cross_entropy(model(images.to(device)), labels.to(device))
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            val_accuracy = accuracy(model, val_loader, device)
            print(f"epoch {epoch}: last loss {loss.item():.4f}, val accuracy {val_accuracy:.4f}")
    except FIDInputError as error:
        parser.exit(1, f"error: {error}\n")
    seconds = time.time() - start

    atomic_write(out, lambda path: torch.save(model.state_dict(), path))
    report = {
        "val_accuracy": val_accuracy, "classes": classes, "epochs": args.epochs,
        "img_size": args.img_size, "batch_size": args.batch_size, "lr": args.lr,
        "num_train_images": len(train_set), "num_val_images": len(val_set),
        "seed": args.seed, "seconds": seconds,
    }
    atomic_write(out.with_suffix(".json"),
                 lambda path: path.write_text(json.dumps(report, indent=2) + "\n"))
    print(f"val accuracy {val_accuracy:.4f}; saved {out} ({seconds:.0f} s)")


if __name__ == "__main__":
    sys.exit(main())
