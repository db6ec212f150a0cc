"""A COCO 2017 captions tree of N drawn 640x480 scenes (real COCO cannot be downloaded here).

    python benchmarks/make_synthetic_coco.py --out /tmp/coco --num 512
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

COLORS = {"red": (200, 40, 40), "blue": (40, 70, 200), "green": (40, 150, 60), "yellow": (235, 200, 40),
          "white": (245, 245, 245), "black": (25, 25, 25)}
SHAPES = ("circle", "square", "triangle")


def scene(rng: random.Random, width: int = 640, height: int = 480) -> tuple[Image.Image, list[str]]:
    image = Image.new("RGB", (width, height), (rng.randint(90, 200), rng.randint(120, 220), rng.randint(150, 255)))
    draw = ImageDraw.Draw(image)
    things = []
    for _ in range(rng.randint(1, 5)):
        color = rng.choice(list(COLORS))
        shape = rng.choice(SHAPES)
        x, y, s = rng.randint(0, width - 80), rng.randint(0, height - 80), rng.randint(20, 160)
        box = (x, y, x + s, y + s)
        if shape == "circle":
            draw.ellipse(box, fill=COLORS[color])
        elif shape == "square":
            draw.rectangle(box, fill=COLORS[color])
        else:
            draw.polygon([(x, y + s), (x + s // 2, y), (x + s, y + s)], fill=COLORS[color])
        things.append(f"a {color} {shape}")
    captions = [f"A picture with {', '.join(things)}.", f"{things[0].capitalize()} on a plain background.",
                f"There are {len(things)} shapes in this image, including {things[-1]}."]
    return image, captions


def build(out: Path, num: int, split: str = "val2017", seed: int = 0) -> None:
    rng = random.Random(seed)
    (out / split).mkdir(parents=True, exist_ok=True)
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i in range(num):
        image, captions = scene(rng)
        name = f"{i + 1:012d}.jpg"
        image.save(out / split / name, quality=90)
        images.append({"id": i + 1, "file_name": name, "width": image.width, "height": image.height})
        for caption in captions:
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "caption": caption})
    data = {"info": {"description": "vlmq synthetic COCO-layout captions"}, "licenses": [], "images": images,
            "annotations": annotations}
    (out / "annotations" / f"captions_{split}.json").write_text(json.dumps(data))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--num", type=int, default=512)
    args = parser.parse_args()
    build(args.out, args.num)
    print(f"wrote {args.num} images to {args.out}")


if __name__ == "__main__":
    main()
