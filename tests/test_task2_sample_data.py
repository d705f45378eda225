"""Task 2 sample data: the committed images are what sample_data/make_sample_data.py draws, in the
layouts the training scripts read (an imagefolder with captions; a folder of photos of one cat)."""
import json
import subprocess
import sys

import numpy as np
from PIL import Image

from conftest import TASK2

SAMPLE_DATA = TASK2 / "sample_data"


def test_sample_data_is_what_the_script_draws(tmp_path):
    subprocess.run([sys.executable, str(SAMPLE_DATA / "make_sample_data.py"), "--out", str(tmp_path)],
                   check=True, capture_output=True)
    committed = sorted(p.relative_to(SAMPLE_DATA) for p in SAMPLE_DATA.rglob("*") if p.suffix in {".png", ".jsonl"})
    drawn = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert committed == drawn
    for path in committed:
        if path.suffix == ".png":
            assert np.array_equal(np.asarray(Image.open(SAMPLE_DATA / path)), np.asarray(Image.open(tmp_path / path)))
        else:
            assert (SAMPLE_DATA / path).read_text() == (tmp_path / path).read_text()


def test_sample_data_layouts():
    style = SAMPLE_DATA / "artistic-custom" / "train"
    rows = [json.loads(line) for line in (style / "metadata.jsonl").read_text().splitlines()]
    assert [row["file_name"] for row in rows] == [f"{i:04d}.png" for i in range(4)]
    assert len({row["text"] for row in rows}) == 4  # four different captions
    cats = sorted((SAMPLE_DATA / "dreambooth-cat").glob("*.png"))
    assert len(cats) == 4
    for path in [style / row["file_name"] for row in rows] + cats:
        image = Image.open(path)
        assert image.size == (512, 512) and image.mode == "RGB"
        assert path.stat().st_size < 100_000
