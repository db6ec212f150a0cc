#!/usr/bin/env python
"""Regenerate the demo calibration set shipped in src/vlmq/data/demo_coco (COCO 2017 captions layout).

Sixteen small drawn scenes (sky, ground, sun/moon, houses, trees, balls, boats, ...) with several
captions each that describe what is actually drawn, in varying lengths. Deterministic: the same
Pillow/libjpeg gives byte-identical files.

    python scripts/make_demo_coco.py [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

SEED = 2017
NUM_IMAGES = 16
FIRST_ID = 900001  # far from real val2017 ids so demo files are never mistaken for COCO ones
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "src" / "vlmq" / "data" / "demo_coco"

COLORS = {
    "red": (200, 40, 40),
    "blue": (40, 70, 200),
    "green": (40, 150, 60),
    "yellow": (235, 200, 40),
    "orange": (240, 140, 30),
    "purple": (130, 60, 160),
    "white": (245, 245, 245),
    "black": (25, 25, 25),
}
SKIES = {"day": (135, 190, 235), "evening": (240, 160, 110), "night": (20, 25, 60)}
GROUNDS = {"grass": (70, 160, 70), "sand": (220, 200, 140), "water": (40, 100, 170), "snow": (235, 240, 245)}


def _scene(rng: random.Random, idx: int, gray: bool) -> tuple[Image.Image, list[str]]:
    w, h = rng.choice([(128, 96), (96, 128), (112, 112), (128, 128), (96, 72)])
    sky = rng.choice(sorted(SKIES))
    ground = rng.choice(sorted(GROUNDS))
    im = Image.new("RGB", (w, h), SKIES[sky])
    d = ImageDraw.Draw(im)
    horizon = int(h * rng.uniform(0.55, 0.7))
    d.rectangle([0, horizon, w, h], fill=GROUNDS[ground])
    celestial = "moon" if sky == "night" else "sun"
    r = rng.randint(6, 10)
    cx, cy = rng.randint(r, w - r), rng.randint(r, horizon // 2)
    d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=(240, 240, 210) if celestial == "moon" else (250, 220, 60))

    kind = "boat" if ground == "water" else ["house", "tree", "ball", "car", "flower"][idx % 5]
    color = rng.choice(sorted(COLORS))
    count = rng.randint(1, 3)
    numword = {1: "one", 2: "two", 3: "three"}[count]
    things = f"{numword} {kind}s" if count > 1 else f"a {kind}"
    for k in range(count):
        x = int((k + 0.5) * w / count) + rng.randint(-4, 4)
        _draw_object(d, kind, x, horizon, max(8, w // (3 * count)), COLORS[color])
    if gray:
        im, color = im.convert("L"), "gray"

    place = {"grass": "on green grass", "sand": "on a sandy beach", "water": "on the water", "snow": "in the snow"}
    when = {"day": "under a blue sky", "evening": "at sunset", "night": "at night under the moon"}
    captions = [
        f"{things.capitalize()} {place[ground]}.",
        f"A picture of {numword} {color} {kind}{'s' if count > 1 else ''} {place[ground]} {when[sky]}.",
        (
            f"There {'are' if count > 1 else 'is'} {numword} {color} {kind}{'s' if count > 1 else ''} "
            f"standing {place[ground]}, with the {celestial} visible in the "
            f"{'dark' if sky == 'night' else 'bright'} sky."
        ),
        f"A simple drawing showing {things} {when[sky]}.",
    ]
    if rng.random() < 0.5:
        # Messy whitespace, as real COCO captions have.
        captions.append(f"  {color.capitalize()} {kind}{'s' if count > 1 else ''}.\n")
    rng.shuffle(captions)
    return im, captions


def _draw_object(d: ImageDraw.ImageDraw, kind: str, x: int, base: int, s: int, color: tuple[int, int, int]) -> None:
    if kind == "house":
        d.rectangle([x - s, base - s, x + s, base], fill=color)
        d.polygon([(x - s - 2, base - s), (x + s + 2, base - s), (x, base - 2 * s)], fill=(120, 50, 30))
        d.rectangle([x - s // 4, base - s // 2, x + s // 4, base], fill=(60, 40, 20))
    elif kind == "tree":
        d.rectangle([x - s // 5, base - s, x + s // 5, base], fill=(100, 60, 30))
        d.ellipse([x - s, base - 2 * s - s // 2, x + s, base - s // 2], fill=color)
    elif kind == "ball":
        d.ellipse([x - s // 2, base - s, x + s // 2, base], fill=color, outline=(0, 0, 0))
    elif kind == "boat":
        top, bottom = base - s // 3, base + s // 4
        hull = [(x - s, top), (x + s, top), (x + s // 2, bottom), (x - s // 2, bottom)]
        d.polygon(hull, fill=color)
        d.line([(x, base - s // 3), (x, base - 2 * s)], fill=(60, 40, 20), width=2)
        d.polygon([(x + 1, base - 2 * s), (x + s, base - s // 2), (x + 1, base - s // 2)], fill=(250, 250, 250))
    elif kind == "car":
        d.rectangle([x - s, base - s // 2 - s // 3, x + s, base - s // 4], fill=color)
        d.rectangle([x - s // 2, base - s, x + s // 2, base - s // 2 - s // 3], fill=color)
        for wx in (x - s // 2, x + s // 2):
            d.ellipse([wx - s // 4, base - s // 2, wx + s // 4, base], fill=(20, 20, 20))
    else:  # flower
        d.line([(x, base), (x, base - s)], fill=(30, 120, 40), width=2)
        for dx, dy in ((-1, 0), (1, 0), (0, -1), (0, 1)):
            px, py = x + dx * s // 3, base - s + dy * s // 3
            d.ellipse([px - s // 4, py - s // 4, px + s // 4, py + s // 4], fill=color)
        d.ellipse([x - s // 6, base - s - s // 6, x + s // 6, base - s + s // 6], fill=(250, 220, 60))


def build(out: Path) -> None:
    rng = random.Random(SEED)
    (out / "val2017").mkdir(parents=True, exist_ok=True)
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for idx in range(NUM_IMAGES):
        image_id = FIRST_ID + idx
        # COCO has a few grayscale JPEGs; keep one to exercise the conversion to RGB.
        im, captions = _scene(rng, idx, gray=idx == 5)
        file_name = f"{image_id:012d}.jpg"
        im.save(out / "val2017" / file_name, format="JPEG", quality=80, optimize=True)
        images.append(
            {
                "license": 1,
                "file_name": file_name,
                "coco_url": "",
                "height": im.height,
                "width": im.width,
                "date_captured": f"2017-01-{idx + 1:02d} 12:00:00",
                "flickr_url": "",
                "id": image_id,
            }
        )
        for caption in captions:
            annotations.append({"image_id": image_id, "id": 1000 + len(annotations), "caption": caption})
    data = {
        "info": {
            "description": "vlmq demo calibration set (drawn scenes in COCO 2017 captions layout)",
            "url": "",
            "version": "1.0",
            "year": 2017,
            "contributor": "vlmq",
            "date_created": "2017/01/01",
        },
        "licenses": [{"url": "https://creativecommons.org/publicdomain/zero/1.0/", "id": 1, "name": "CC0 1.0"}],
        "images": images,
        "annotations": annotations,
    }
    (out / "annotations" / "captions_val2017.json").write_text(json.dumps(data, indent=1) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    build(parser.parse_args().out)


if __name__ == "__main__":
    main()
