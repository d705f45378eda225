"""Small helpers of the inference notebook (lora_inference.ipynb) and the validation images."""
import os
import random

import numpy as np
import torch
from PIL import Image


def seed_everything(seed=2024):
    """Seed Python, NumPy and PyTorch (CPU and CUDA), and make cuDNN deterministic."""
    os.environ["PYTHONHASHSEED"] = str(seed)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def image_grid(imgs, rows, cols):
    """Paste ``rows * cols`` PIL images of one size into a single image, row by row."""
    assert len(imgs) == rows * cols, f"{len(imgs)} images do not fill a {rows}x{cols} grid"
    w, h = imgs[0].size
    grid = Image.new("RGB", size=(cols * w, rows * h))
    for i, img in enumerate(imgs):
        grid.paste(img, box=(i % cols * w, i // cols * h))
    return grid
