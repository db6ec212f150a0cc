"""COCO 2017 captions as calibration chats: user = [image, instruction], assistant = shortest caption.

Layout (the genuine one): `root/annotations/captions_{split}.json` and `root/{split}/<file_name>`.
Everything is validated here, before any model is loaded: file-level problems raise
`CalibDataError`; per-image problems are skipped, counted in `CalibStats`, and replaced by the next
image in the seeded order until `num_samples` are found.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vlmq.calib.images import (
    DEFAULT_MAX_PIXELS,
    ImageRejected,
    load_rgb,
    resolve_member,
)
from vlmq.calib.samples import (
    DEFAULT_INSTRUCTION,
    CalibDataError,
    CalibSample,
    CalibStats,
    check_counts,
    fill,
    normalize_caption,
    seeded_order,
)

_SPLIT_RE = re.compile(r"^[A-Za-z0-9_]+$")


def read_json(path: Path) -> Any:
    if not path.is_file():
        raise CalibDataError(f"annotations file not found: {path}")
    try:
        with path.open("rb") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CalibDataError(f"malformed JSON in {path}: {err}") from None
    except OSError as err:
        raise CalibDataError(f"cannot read {path}: {err.strerror or err}") from None


def _split_captions(ann_path: Path, data: Any, split: str, stats: CalibStats) -> dict[int, tuple[str, str]]:
    """image id -> (file_name, shortest caption) for one split's captions JSON."""
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise CalibDataError(f"not a COCO captions file (no 'images' list): {ann_path}")
    if not isinstance(data.get("annotations"), list):
        raise CalibDataError(f"not a COCO captions file (no 'annotations' list): {ann_path}")
    files: dict[int, str] = {}
    for img in data["images"]:
        if not isinstance(img, dict) or not isinstance(img.get("id"), int) or not isinstance(img.get("file_name"), str):
            stats.skip(f"{ann_path.name}: image entry {str(img)[:60]}", "malformed_entry")
            continue
        files[img["id"]] = img["file_name"]
    best: dict[int, tuple[int, str, int]] = {}  # image id -> (len, caption, annotation id)
    for ann in data["annotations"]:
        if not isinstance(ann, dict) or not isinstance(ann.get("caption"), str) or ann.get("image_id") not in files:
            stats.skip(f"{ann_path.name}: annotation {str(ann)[:60]}", "malformed_entry")
            continue
        caption = normalize_caption(ann["caption"])
        if not caption:
            continue
        aid = ann["id"] if isinstance(ann.get("id"), int) else 0
        cand = (len(caption), caption, aid)
        # Ties on length break on the caption text, then the annotation id: order-independent.
        if ann["image_id"] not in best or cand < best[ann["image_id"]]:
            best[ann["image_id"]] = cand
    for image_id in files.keys() - best.keys():
        stats.skip(f"{split}/{files[image_id]}", "no_caption")
    return {i: (files[i], best[i][1]) for i in best}


def load_coco_captions(
    root: Path,
    splits: Sequence[str] = ("val2017",),
    num_samples: int = 512,
    seed: int = 0,
    instruction: str = DEFAULT_INSTRUCTION,
    min_samples: int = 1,
    max_image_pixels: int = DEFAULT_MAX_PIXELS,
) -> tuple[list[CalibSample], CalibStats]:
    """Sample `num_samples` captioned images (fewer if fewer are usable) from COCO-2017-style splits.

    Deterministic in `seed`; each image at most once (even if listed twice or in two splits);
    every returned image has been fully decoded once, so batching will not fail on it.
    """
    root = Path(root)
    if num_samples < 1:
        raise CalibDataError(f"num_samples must be >= 1, got {num_samples}")
    if isinstance(splits, str):
        splits = (splits,)
    if not splits:
        raise CalibDataError("no COCO splits given (expected e.g. ['val2017'])")
    if not root.is_dir():
        raise CalibDataError(f"COCO root not found or not a directory: {root}")
    stats = CalibStats(requested=num_samples)
    candidates: list[tuple[str, int, str, str]] = []  # (split, image id, file_name, caption)
    for split in dict.fromkeys(splits):
        if not _SPLIT_RE.match(split):
            raise CalibDataError(f"invalid COCO split name {split!r} (expected e.g. 'val2017')")
        ann_path = root / "annotations" / f"captions_{split}.json"
        data = read_json(ann_path)
        if not (root / split).is_dir():
            raise CalibDataError(f"COCO image folder not found: {root / split}")
        per_image = _split_captions(ann_path, data, split, stats)
        candidates += [(split, i, fname, cap) for i, (fname, cap) in per_image.items()]
    where = f"{root} [{', '.join(splits)}]"
    if not candidates:
        raise CalibDataError(f"no captioned images in {where}")
    stats.sources.append(f"coco:{where}")

    seen: set[Path] = set()

    def accept(cand: tuple[str, int, str, str]) -> CalibSample:
        split, image_id, fname, caption = cand
        split_dir = root / split
        path = resolve_member(split_dir, fname)
        if path in seen:
            raise ImageRejected("duplicate")
        load_rgb(path, split_dir, max_image_pixels)
        seen.add(path)
        return CalibSample(image=path, prompt=instruction, answer=caption, source=f"coco/{split}/{image_id}")

    ordered = seeded_order(candidates, seed, key_str=lambda c: f"{c[0]}/{c[1]}")
    samples = fill(ordered, num_samples, accept, stats, describe=lambda c: f"{c[0]}/{c[2]}")
    check_counts(samples, stats, min_samples, where)
    return samples, stats
