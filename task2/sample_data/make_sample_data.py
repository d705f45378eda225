"""Draw the sample data sets of Task 2 from code (deterministic: same files on every run).

    cd task2/sample_data && python make_sample_data.py            # writes next to this script
    python make_sample_data.py --out DIR                          # writes DIR/artistic-custom, DIR/dreambooth-cat

artistic-custom/train/: four scenes in one recognisable style (flat "paper poster" shapes with
thick black outlines, a five-colour palette, a concentric-ring sun and halftone dots), plus
metadata.jsonl with one caption per image. dreambooth-cat/: one cartoon cat (orange, white chest
and paws, green eyes, blue collar with a yellow bell, striped tail) in four poses and places.
Shapes are drawn at twice the size and downsampled, for smooth edges.
"""
import argparse
import json
from pathlib import Path

from PIL import Image, ImageDraw

SIZE = 512
SCALE = 2  # drawn at SIZE * SCALE, then downsampled
HERE = Path(__file__).resolve().parent

# The style's palette.
PAPER, INK, CORAL, MUSTARD, TEAL, NAVY = "#f3e9d2", "#1d1d1d", "#e4572e", "#f3a712", "#29a19c", "#1b3a4b"
OUTLINE = 8 * SCALE


def canvas(color):
    return Image.new("RGB", (SIZE * SCALE, SIZE * SCALE), color)


def finish(image):
    return image.resize((SIZE, SIZE), Image.LANCZOS)


def s(*values):
    """Coordinates given on a 512 grid -> the drawing grid."""
    return [v * SCALE for v in values]


# ---------------------------------------------------------------------------------------------
# artistic-custom: one style, four subjects
# ---------------------------------------------------------------------------------------------


def poster_background(draw, sun_at):
    """What every picture of the style shares: paper, a ring sun, halftone dots."""
    x, y = sun_at
    for radius, color in ((110, MUSTARD), (85, PAPER), (65, CORAL), (40, PAPER), (22, MUSTARD)):
        draw.ellipse(s(x - radius, y - radius, x + radius, y + radius), fill=color)
    for row in range(6):
        for col in range(10):
            cx, cy = 40 + col * 22 + (row % 2) * 11, 40 + row * 20
            radius = 2 + (col + row) % 4
            draw.ellipse(s(cx - radius, cy - radius, cx + radius, cy + radius), fill=TEAL)


def framed(image):
    """The style's thick black frame, drawn over everything, then downsampled."""
    ImageDraw.Draw(image).rectangle(s(6, 6, SIZE - 6, SIZE - 6), outline=INK, width=OUTLINE)
    return finish(image)


def ground(draw, top, color, stripes):
    draw.rectangle(s(0, top, SIZE, SIZE), fill=color, outline=INK, width=OUTLINE)
    for i in range(stripes):
        y = top + 25 + i * 30
        draw.line(s(30 + 20 * (i % 2), y, SIZE - 30 - 20 * (i % 2), y), fill=INK, width=3 * SCALE)


def sailboat():
    image = canvas(PAPER)
    draw = ImageDraw.Draw(image)
    poster_background(draw, (400, 120))
    ground(draw, 360, TEAL, 5)
    draw.polygon(s(120, 340, 400, 340, 360, 400, 160, 400), fill=CORAL, outline=INK, width=OUTLINE)
    draw.line(s(255, 110, 255, 340), fill=INK, width=OUTLINE)
    draw.polygon(s(265, 120, 265, 325, 380, 325), fill=PAPER, outline=INK, width=OUTLINE)
    draw.polygon(s(245, 150, 245, 325, 150, 325), fill=MUSTARD, outline=INK, width=OUTLINE)
    return framed(image), "a sailboat"


def tree():
    image = canvas(PAPER)
    draw = ImageDraw.Draw(image)
    poster_background(draw, (110, 130))
    ground(draw, 390, MUSTARD, 3)
    draw.rectangle(s(235, 260, 285, 400), fill=NAVY, outline=INK, width=OUTLINE)
    for cx, cy, radius, color in ((260, 200, 110, TEAL), (200, 240, 60, TEAL), (320, 240, 60, TEAL)):
        draw.ellipse(s(cx - radius, cy - radius, cx + radius, cy + radius), fill=color, outline=INK, width=OUTLINE)
    for cx, cy in ((230, 170), (300, 190), (260, 250), (210, 230)):
        draw.ellipse(s(cx - 12, cy - 12, cx + 12, cy + 12), fill=CORAL, outline=INK, width=3 * SCALE)
    return framed(image), "a tree"


def car():
    image = canvas(PAPER)
    draw = ImageDraw.Draw(image)
    poster_background(draw, (390, 110))
    ground(draw, 400, NAVY, 2)
    draw.rounded_rectangle(s(170, 220, 350, 310), radius=40 * SCALE, fill=MUSTARD, outline=INK, width=OUTLINE)
    draw.rounded_rectangle(s(80, 280, 440, 370), radius=30 * SCALE, fill=CORAL, outline=INK, width=OUTLINE)
    draw.rectangle(s(195, 240, 255, 285), fill=TEAL, outline=INK, width=4 * SCALE)
    draw.rectangle(s(270, 240, 330, 285), fill=TEAL, outline=INK, width=4 * SCALE)
    for cx in (160, 360):
        draw.ellipse(s(cx - 45, 325, cx + 45, 415), fill=INK)
        draw.ellipse(s(cx - 18, 352, cx + 18, 388), fill=PAPER)
    return framed(image), "a car"


def bird():
    image = canvas(PAPER)
    draw = ImageDraw.Draw(image)
    poster_background(draw, (120, 380))
    draw.line(s(40, 330, 470, 330), fill=INK, width=OUTLINE)
    draw.polygon(s(170, 280, 90, 250, 110, 300), fill=NAVY, outline=INK, width=OUTLINE)
    draw.ellipse(s(150, 200, 340, 320), fill=TEAL, outline=INK, width=OUTLINE)
    draw.ellipse(s(290, 150, 380, 240), fill=TEAL, outline=INK, width=OUTLINE)
    draw.polygon(s(375, 185, 430, 200, 375, 215), fill=MUSTARD, outline=INK, width=5 * SCALE)
    draw.ellipse(s(335, 178, 355, 198), fill=INK)
    draw.chord(s(190, 215, 300, 300), start=0, end=180, fill=CORAL, outline=INK, width=OUTLINE)
    for x in (230, 270):
        draw.line(s(x, 318, x, 335), fill=INK, width=5 * SCALE)
    return framed(image), "a bird"


# ---------------------------------------------------------------------------------------------
# dreambooth-cat: the same cat, four poses and places
# ---------------------------------------------------------------------------------------------

FUR, FUR_DARK, WHITE, CAT_INK = "#e8893a", "#b85c1e", "#fbf6ee", "#3a2a20"
EYE, COLLAR, BELL, NOSE = "#3fa34d", "#2b59c3", "#f2c14e", "#e07a8a"


def cat_head(draw, cx, cy, r):
    """Round head of radius r centred at (cx, cy), facing the viewer."""
    w = 4 * SCALE
    for side in (-1, 1):
        ear = [cx + side * 0.95 * r, cy - 0.35 * r, cx + side * 0.75 * r, cy - 1.25 * r,
               cx + side * 0.2 * r, cy - 0.85 * r]
        draw.polygon(s(*ear), fill=FUR, outline=CAT_INK, width=w)
        inner = [cx + side * 0.8 * r, cy - 0.5 * r, cx + side * 0.7 * r, cy - 1.0 * r,
                 cx + side * 0.38 * r, cy - 0.8 * r]
        draw.polygon(s(*inner), fill=NOSE)
    draw.ellipse(s(cx - r, cy - 0.9 * r, cx + r, cy + 0.9 * r), fill=FUR, outline=CAT_INK, width=w)
    for dx in (-0.25, 0, 0.25):  # forehead stripes
        draw.line(s(cx + dx * r, cy - 0.85 * r, cx + dx * r, cy - 0.5 * r), fill=FUR_DARK, width=5 * SCALE)
    draw.ellipse(s(cx - 0.45 * r, cy + 0.05 * r, cx + 0.45 * r, cy + 0.75 * r), fill=WHITE)  # muzzle
    for side in (-1, 1):
        ex = cx + side * 0.42 * r
        draw.ellipse(s(ex - 0.2 * r, cy - 0.35 * r, ex + 0.2 * r, cy + 0.05 * r), fill=EYE, outline=CAT_INK, width=w)
        draw.ellipse(s(ex - 0.06 * r, cy - 0.3 * r, ex + 0.06 * r, cy), fill=CAT_INK)
        for dy in (-0.05, 0.1):  # whiskers
            draw.line(s(cx + side * 0.3 * r, cy + 0.3 * r, cx + side * 1.2 * r, cy + (0.3 + dy) * r - 0.1 * r),
                      fill=CAT_INK, width=2 * SCALE)
    draw.polygon(s(cx - 0.1 * r, cy + 0.12 * r, cx + 0.1 * r, cy + 0.12 * r, cx, cy + 0.25 * r), fill=NOSE)
    draw.arc(s(cx - 0.15 * r, cy + 0.2 * r, cx, cy + 0.4 * r), 0, 180, fill=CAT_INK, width=3 * SCALE)
    draw.arc(s(cx, cy + 0.2 * r, cx + 0.15 * r, cy + 0.4 * r), 0, 180, fill=CAT_INK, width=3 * SCALE)


def collar(draw, cx, cy, r):
    draw.rounded_rectangle(s(cx - 0.7 * r, cy + 0.8 * r, cx + 0.7 * r, cy + 0.98 * r), radius=6 * SCALE,
                           fill=COLLAR, outline=CAT_INK, width=3 * SCALE)
    draw.ellipse(s(cx - 0.12 * r, cy + 0.92 * r, cx + 0.12 * r, cy + 1.16 * r), fill=BELL, outline=CAT_INK,
                 width=3 * SCALE)


def striped_tail(draw, points, width):
    draw.line(s(*points), fill=FUR, width=width * SCALE, joint="curve")
    for i in range(0, len(points) - 2, 2):
        x, y = points[i], points[i + 1]
        draw.ellipse(s(x - width / 2, y - width / 2, x + width / 2, y + width / 2), fill=FUR_DARK if i % 4 else FUR)


def sitting_cat(draw, cx, ground_y, r, tail_side):
    """Sitting cat, head radius r, paws on ground_y."""
    body_top = ground_y - 3.0 * r
    tail = [cx + tail_side * 1.0 * r, ground_y - 0.2 * r, cx + tail_side * 1.7 * r, ground_y - 0.4 * r,
            cx + tail_side * 2.0 * r, ground_y - 1.0 * r, cx + tail_side * 1.9 * r, ground_y - 1.6 * r]
    striped_tail(draw, tail, int(0.32 * r))
    draw.ellipse(s(cx - 1.1 * r, body_top, cx + 1.1 * r, ground_y), fill=FUR, outline=CAT_INK, width=4 * SCALE)
    draw.ellipse(s(cx - 0.55 * r, body_top + 0.5 * r, cx + 0.55 * r, ground_y - 0.3 * r), fill=WHITE)  # chest
    for side in (-1, 1):
        px = cx + side * 0.45 * r
        draw.ellipse(s(px - 0.3 * r, ground_y - 0.3 * r, px + 0.3 * r, ground_y + 0.05 * r), fill=WHITE,
                     outline=CAT_INK, width=3 * SCALE)
    head_y = body_top - 0.3 * r
    cat_head(draw, cx, head_y, r)
    collar(draw, cx, head_y, r)


def lying_cat(draw, cx, ground_y, r):
    """Cat lying on its belly, seen from the front-left, head radius r."""
    striped_tail(draw, [cx + 1.9 * r, ground_y - 0.3 * r, cx + 2.6 * r, ground_y - 0.2 * r,
                        cx + 3.0 * r, ground_y - 0.6 * r], int(0.3 * r))
    draw.ellipse(s(cx - 0.8 * r, ground_y - 1.4 * r, cx + 2.2 * r, ground_y), fill=FUR, outline=CAT_INK,
                 width=4 * SCALE)
    for dx in (0.6, 1.0, 1.4):  # back stripes
        draw.line(s(cx + dx * r, ground_y - 1.35 * r, cx + dx * r - 0.1 * r, ground_y - 0.9 * r), fill=FUR_DARK,
                  width=6 * SCALE)
    for px in (cx - 0.6 * r, cx + 0.1 * r):
        draw.ellipse(s(px - 0.35 * r, ground_y - 0.3 * r, px + 0.35 * r, ground_y + 0.05 * r), fill=WHITE,
                     outline=CAT_INK, width=3 * SCALE)
    cat_head(draw, cx - 0.3 * r, ground_y - 1.5 * r, r)
    collar(draw, cx - 0.3 * r, ground_y - 1.5 * r, r)


def cat_on_rug():
    image = canvas("#d9c7a7")
    draw = ImageDraw.Draw(image)
    draw.rectangle(s(0, 330, SIZE, SIZE), fill="#8c5a3c")
    for i in range(0, SIZE, 64):  # wallpaper
        draw.line(s(i + 32, 0, i + 32, 330), fill="#cdb893", width=10 * SCALE)
    draw.ellipse(s(60, 400, 452, 500), fill="#b23a48", outline="#6d1f2a", width=6 * SCALE)
    sitting_cat(draw, 256, 455, 62, tail_side=1)
    return finish(image)


def cat_on_grass():
    image = canvas("#9fd3f0")
    draw = ImageDraw.Draw(image)
    draw.ellipse(s(380, 40, 460, 120), fill="#fff3b0")
    draw.rectangle(s(0, 320, SIZE, SIZE), fill="#6ab04c")
    for x in range(10, SIZE, 24):
        draw.polygon(s(x, 330, x + 6, 305, x + 12, 330), fill="#4e8a34")
    lying_cat(draw, 190, 440, 58)
    return finish(image)


def cat_by_window():
    image = canvas("#f2e2c4")
    draw = ImageDraw.Draw(image)
    draw.rectangle(s(60, 50, 300, 280), fill="#8ecae6", outline="#ffffff", width=14 * SCALE)
    draw.line(s(180, 50, 180, 280), fill="#ffffff", width=10 * SCALE)
    draw.line(s(60, 165, 300, 165), fill="#ffffff", width=10 * SCALE)
    draw.rectangle(s(0, 380, SIZE, SIZE), fill="#6b705c")
    sitting_cat(draw, 340, 470, 55, tail_side=-1)
    return finish(image)


def cat_portrait():
    image = canvas("#a8dadc")
    draw = ImageDraw.Draw(image)
    for i in range(-SIZE, SIZE, 48):  # diagonal stripes
        draw.line(s(i, SIZE, i + SIZE, 0), fill="#94c9cc", width=18 * SCALE)
    draw.ellipse(s(126, 330, 386, 600), fill=FUR, outline=CAT_INK, width=4 * SCALE)
    draw.ellipse(s(196, 380, 316, 560), fill=WHITE)
    cat_head(draw, 256, 250, 130)
    collar(draw, 256, 250, 130)
    return finish(image)


def main():
    parser = argparse.ArgumentParser(description="Draw Task 2's sample data sets.")
    parser.add_argument("--out", type=Path, default=HERE, help="Folder to write into (default: this script's).")
    out = parser.parse_args().out
    style_dir = out / "artistic-custom" / "train"
    style_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, draw_scene in enumerate((sailboat, tree, car, bird)):
        image, caption = draw_scene()
        image.save(style_dir / f"{i:04d}.png", optimize=True)
        lines.append(json.dumps({"file_name": f"{i:04d}.png", "text": caption}))
    (style_dir / "metadata.jsonl").write_text("\n".join(lines) + "\n")

    cat_dir = out / "dreambooth-cat"
    cat_dir.mkdir(parents=True, exist_ok=True)
    for i, draw_scene in enumerate((cat_on_rug, cat_on_grass, cat_by_window, cat_portrait)):
        draw_scene().save(cat_dir / f"cat_{i}.png", optimize=True)
    print(f"Wrote {style_dir} and {cat_dir}")


if __name__ == "__main__":
    main()
