"""Hostile and unusual images: skipped with a counted reason, or converted to RGB and used."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from calib_fixtures import (
    image_bytes,
    png_claiming_size,
    simple_entries,
    write_coco,
    write_image,
)
from vlmq.calib import CalibDataError, ImageRejected, load_coco_captions, load_rgb


def _reject_reason(path: Path, root: Path, max_pixels: int = 10**8) -> str:
    with pytest.raises(ImageRejected) as err:
        load_rgb(path, root, max_pixels)
    return err.value.reason


def test_hostile_files_rejected_with_reasons(tmp_path: Path) -> None:
    root = tmp_path
    (root / "zero.jpg").write_bytes(b"")
    good = image_bytes("RGB", (64, 64))
    (root / "trunc.jpg").write_bytes(good[: len(good) // 2])
    (root / "text.jpg").write_text("this is not an image\n")
    (root / "dir.jpg").mkdir()
    write_image(root / "big.jpg", size=(100, 100))
    (root / "bomb.png").write_bytes(png_claiming_size(100_000, 100_000))
    outside = write_image(tmp_path.parent / f"{tmp_path.name}_outside.jpg")
    os.symlink(outside, root / "link.jpg")

    assert _reject_reason(Path("zero.jpg"), root) == "zero_byte"
    assert _reject_reason(Path("trunc.jpg"), root) == "corrupt"
    assert _reject_reason(Path("text.jpg"), root) == "not_an_image"
    assert _reject_reason(Path("dir.jpg"), root) == "not_a_file"
    assert _reject_reason(Path("missing.jpg"), root) == "missing_file"
    assert _reject_reason(Path("big.jpg"), root, max_pixels=99 * 100) == "too_large"
    assert load_rgb(Path("big.jpg"), root, max_pixels=100 * 100).size == (100, 100)
    # 10^10 pixels: refused from the header, never decoded (and PIL's own bomb guard also maps here).
    assert _reject_reason(Path("bomb.png"), root) == "too_large"
    assert _reject_reason(Path("bomb.png"), root, max_pixels=10**11) == "too_large"
    assert _reject_reason(Path("../../etc/passwd"), root) == "path_escape"
    assert _reject_reason(Path("/etc/passwd"), root) == "path_escape"
    assert _reject_reason(Path("link.jpg"), root) == "path_escape"


@pytest.mark.parametrize(
    ("mode", "fmt", "color", "expected"),
    [
        ("CMYK", "JPEG", (0, 255, 255, 0), (255, 0, 0)),  # pure red in CMYK
        ("L", "JPEG", 120, (120, 120, 120)),
        ("RGBA", "PNG", (0, 0, 255, 0), (255, 255, 255)),  # fully transparent -> white background
        ("RGBA", "PNG", (0, 0, 255, 255), (0, 0, 255)),
        ("LA", "PNG", (10, 255), (10, 10, 10)),
        ("P", "PNG", 3, None),
        ("P", "GIF", 3, None),
        ("I;16", "PNG", 65535, (255, 255, 255)),  # 16-bit white stays white, not clipped garbage
        ("I;16", "PNG", 25700, (100, 100, 100)),
        ("I", "TIFF", 51400, (200, 200, 200)),
        ("1", "PNG", 1, (255, 255, 255)),
        ("F", "TIFF", 0.5, (128, 128, 128)),
    ],
)
def test_modes_converted_to_rgb(tmp_path: Path, mode: str, fmt: str, color, expected) -> None:
    im = Image.new(mode, (20, 10), color)
    if mode == "P":
        im.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 10, 20, 30] + [0] * (256 * 3 - 12))
        expected = (10, 20, 30)
    path = tmp_path / f"img.{fmt.lower()}"
    im.save(path, format=fmt)
    out = load_rgb(path, tmp_path, 10**6)
    assert out.mode == "RGB" and out.size == (20, 10)
    got = np.asarray(out)[5, 10].tolist()
    tol = 12 if fmt == "JPEG" else 1
    assert all(abs(g - e) <= tol for g, e in zip(got, expected, strict=True)), (mode, got, expected)


def test_coco_skips_hostile_entries_and_fills_from_the_rest(tmp_path: Path) -> None:
    hostile = {
        "zero.jpg": "zero_byte",
        "trunc.jpg": "corrupt",
        "text.jpg": "not_an_image",
        "missing.jpg": "missing_file",
        "../../etc/passwd": "path_escape",
        "/etc/passwd": "absolute_path",
        "C:\\windows\\x.jpg": "absolute_path",
        "big.jpg": "too_large",
    }
    odd_modes = {
        "cmyk.jpg": ("CMYK", "JPEG"),
        "gray.jpg": ("L", "JPEG"),
        "rgba.png": ("RGBA", "PNG"),
        "pal.png": ("P", "PNG"),
        "deep.png": ("I;16", "PNG"),
    }
    entries = [(name, [f"caption {name}"]) for name in [*hostile, *odd_modes]] + simple_entries(4)
    root = write_coco(tmp_path / "coco", entries, with_images=False)
    split = root / "val2017"
    for name, _ in simple_entries(4):
        write_image(split / name)
    for name, (mode, fmt) in odd_modes.items():
        write_image(split / name, mode=mode, fmt=fmt)
    (split / "zero.jpg").write_bytes(b"")
    good = image_bytes("RGB", (64, 64))
    (split / "trunc.jpg").write_bytes(good[: len(good) // 2])
    (split / "text.jpg").write_text("hello")
    write_image(split / "big.jpg", size=(200, 200))

    samples, stats = load_coco_captions(root, num_samples=100, max_image_pixels=150 * 150)
    assert stats.skipped == {r: list(hostile.values()).count(r) for r in set(hostile.values())}
    assert {s.image.name for s in samples} == set(odd_modes) | {n for n, _ in simple_entries(4)}
    assert stats.images == stats.samples == 9
    assert len(stats.skipped_examples) == 5 and all(": " in e for e in stats.skipped_examples)

    # Fewer requested than usable: skipped ones are replaced, the request is still met.
    samples, _ = load_coco_captions(root, num_samples=9, max_image_pixels=150 * 150, seed=7)
    assert len(samples) == 9

    with pytest.raises(CalibDataError, match="only 9 usable") as err:
        load_coco_captions(root, num_samples=100, min_samples=10, max_image_pixels=150 * 150)
    assert "zero_byte=1" in str(err.value) and str(root) in str(err.value)
