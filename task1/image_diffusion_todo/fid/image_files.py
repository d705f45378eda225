"""Which files are images, and how one is read as 8-bit RGB: one rule for every tool of
image_diffusion_todo (training data, the eval folder, FID)."""
from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
# PIL's modes for 16- and 32-bit grayscale: convert("RGB") clips them at 255 instead of scaling
WIDE_GRAY_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")


def list_images(folder) -> list:
    """The image files under folder (recursively), sorted: [Path]; [] when there are none."""
    return sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def to_rgb(image: Image.Image) -> Image.Image:
    """image as 8-bit RGB; 16-bit grayscale (0..65535) is scaled to 0..255, not clipped."""
    if image.mode in WIDE_GRAY_MODES:
        scaled = np.asarray(image, dtype=np.float64) / 257  # 65535 / 255 = 257
        image = Image.fromarray(np.clip(scaled.round(), 0, 255).astype(np.uint8))
    return image.convert("RGB")
