"""Builders for small real COCO-2017-style trees and images on disk (used by the calib tests)."""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path
from typing import Any

from PIL import Image


def image_bytes(mode: str = "RGB", size: tuple[int, int] = (40, 30), fmt: str = "JPEG", color: Any = None) -> bytes:
    if color is None:
        color = {"RGB": (200, 30, 30), "L": 120, "RGBA": (0, 0, 255, 255), "CMYK": (0, 255, 255, 0)}.get(mode, 1)
    im = Image.new(mode, size, color)
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


def write_image(path: Path, mode: str = "RGB", size: tuple[int, int] = (40, 30), fmt: str = "JPEG") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(image_bytes(mode, size, fmt))
    return path


def png_claiming_size(width: int, height: int) -> bytes:
    """A tiny valid PNG whose header claims `width` x `height` (a decompression-bomb lookalike)."""
    data = bytearray(image_bytes("L", (1, 1), "PNG"))
    # IHDR payload starts at byte 16: width, height (big-endian u32), then its CRC after 13 bytes.
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def coco_json(entries: list[tuple[str, list[str]]], start_id: int = 1) -> dict[str, Any]:
    images, annotations = [], []
    for k, (file_name, captions) in enumerate(entries):
        image_id = start_id + k
        images.append({"license": 1, "file_name": file_name, "height": 30, "width": 40, "id": image_id})
        for cap in captions:
            annotations.append({"image_id": image_id, "id": 10_000 + len(annotations) + start_id, "caption": cap})
    return {"info": {}, "licenses": [], "images": images, "annotations": annotations}


def write_coco(
    root: Path,
    entries: list[tuple[str, list[str]]],
    split: str = "val2017",
    start_id: int = 1,
    with_images: bool = True,
) -> Path:
    """Write `root/annotations/captions_{split}.json` and (optionally) a small JPEG per entry."""
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / split).mkdir(parents=True, exist_ok=True)
    (root / "annotations" / f"captions_{split}.json").write_text(json.dumps(coco_json(entries, start_id)))
    if with_images:
        for file_name, _ in entries:
            write_image(root / split / file_name)
    return root


def simple_entries(n: int, prefix: str = "") -> list[tuple[str, list[str]]]:
    return [(f"{prefix}{i:012d}.jpg", [f"A long caption for picture {i}.", f"Picture {i}."]) for i in range(n)]
