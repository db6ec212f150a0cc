"""Calibration data: sources (COCO 2017 captions, JSONL, mixes) -> chat samples -> processor batches."""

from __future__ import annotations

from pathlib import Path

from vlmq.calib.coco import load_coco_captions
from vlmq.calib.images import DEFAULT_MAX_PIXELS, ImageRejected, load_rgb
from vlmq.calib.jsonl import load_jsonl, mix_sources
from vlmq.calib.samples import DEFAULT_INSTRUCTION, CalibDataError, CalibSample, CalibStats


def demo_coco_root() -> Path:
    """The demo calibration set shipped in the package (COCO 2017 layout, split `val2017`)."""
    return Path(__file__).resolve().parent.parent / "data" / "demo_coco"


__all__ = [
    "DEFAULT_INSTRUCTION",
    "DEFAULT_MAX_PIXELS",
    "CalibDataError",
    "CalibSample",
    "CalibStats",
    "ImageRejected",
    "demo_coco_root",
    "load_coco_captions",
    "load_jsonl",
    "load_rgb",
    "mix_sources",
]
