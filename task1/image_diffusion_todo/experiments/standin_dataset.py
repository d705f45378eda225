"""A stand-in for AFHQ that the repository generates itself, deterministically.

AFHQ and the course's FID checkpoint cannot be downloaded everywhere, and training the course
UNet at 64x64 takes a GPU-day. This module writes a small dataset in AFHQ's layout

    ROOT/train/{circle,square,triangle}/00000.png ...
    ROOT/val/{circle,square,triangle}/00000.png ...

so that ``train.py --data_root ROOT``, ``experiments/train_classifier.py --data_root ROOT`` and
``fid/measure_fid.py ROOT/val GEN_DIR`` run exactly as they do on AFHQ. Each image is one filled
shape (the class) in a random saturated colour, size, position and rotation, on a random
dark background, drawn at 4x and box-filtered down so edges are anti-aliased.

Every image is a pure function of (seed, split, class, index): the same arguments give
byte-identical PNGs on any machine. ROOT/standin.json records the arguments; building again
with the same arguments is a no-op, and the folder appears atomically (built under a
temporary name, then renamed).

Usage (from image_diffusion_todo/):
    python -m experiments.standin_dataset --out ../../data/standin [--num_train_per_class 1000] ...
"""
import colorsys
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from cli import ArgumentParser, UsageError, run
from PIL import Image, ImageDraw

CLASSES = ("circle", "square", "triangle")
SPLITS = ("train", "val")
SUPERSAMPLE = 4
MANIFEST = "standin.json"


def render(class_name, rng, image_size=32):
    """One image of ``class_name`` drawn with the random numbers of ``rng`` -> RGB PIL image."""
    canvas = image_size * SUPERSAMPLE
    background = tuple(int(c) for c in rng.integers(0, 80, size=3))
    hue, saturation, value = rng.uniform(0, 1), rng.uniform(0.6, 1.0), rng.uniform(0.75, 1.0)
    colour = tuple(int(255 * c) for c in colorsys.hsv_to_rgb(hue, saturation, value))
    # Circumradius between a quarter and two fifths of the image, centre far enough from the
    # border that the whole shape is visible.
    radius = rng.uniform(0.25, 0.4) * canvas
    cx, cy = rng.uniform(radius, canvas - radius, size=2)
    angle = rng.uniform(0, 2 * math.pi)

    image = Image.new("RGB", (canvas, canvas), background)
    draw = ImageDraw.Draw(image)
    if class_name == "circle":
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=colour)
    else:
        corners = 4 if class_name == "square" else 3
        vertices = [
            (cx + radius * math.cos(angle + 2 * math.pi * k / corners),
             cy + radius * math.sin(angle + 2 * math.pi * k / corners))
            for k in range(corners)
        ]
        draw.polygon(vertices, fill=colour)
    return image.resize((image_size, image_size), Image.Resampling.BOX)


def build(root, num_train_per_class=1000, num_val_per_class=1000, image_size=32, seed=0):
    """Write the dataset to ``root`` (see the module docstring); returns the manifest dict.

    Raises FileExistsError when ``root`` exists but was built with other arguments.
    """
    root = Path(root)
    manifest = {
        "classes": list(CLASSES),
        "num_per_class": {"train": num_train_per_class, "val": num_val_per_class},
        "image_size": image_size,
        "seed": seed,
    }
    if root.exists():
        try:
            existing = json.loads((root / MANIFEST).read_text())
        except (OSError, ValueError):
            existing = None
        if existing == manifest:
            return manifest
        raise FileExistsError(
            f"{root} exists but is not a stand-in dataset built with these arguments; "
            "remove it or choose another --out"
        )

    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    try:
        for split_index, split in enumerate(SPLITS):
            for class_index, class_name in enumerate(CLASSES):
                folder = staging / split / class_name
                folder.mkdir(parents=True)
                for i in range(manifest["num_per_class"][split]):
                    rng = np.random.default_rng([seed, split_index, class_index, i])
                    render(class_name, rng, image_size).save(folder / f"{i:05d}.png")
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        os.replace(staging, root)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


def main(args):
    for name in ("num_train_per_class", "num_val_per_class", "image_size"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name} must be at least 1")
    build(args.out, args.num_train_per_class, args.num_val_per_class, args.image_size, args.seed)
    print(f"stand-in dataset ready in {args.out}")


def parse_args(argv=None):
    parser = ArgumentParser(prog="python -m experiments.standin_dataset",
                            description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=str, default="../../data/standin",
                        help="dataset root to create (gets train/ and val/)")
    parser.add_argument("--num_train_per_class", type=int, default=1000,
                        help="training images per class")
    parser.add_argument("--num_val_per_class", type=int, default=1000,
                        help="validation images per class")
    parser.add_argument("--image_size", type=int, default=32, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=0, help="seed every image is derived from")
    return parser.parse_args(argv)


if __name__ == "__main__":
    run(main, parse_args(), (UsageError, FileExistsError, OSError))
