"""JSONL calibration sources (text-only, or image folder + JSONL) and mixing of sources.

One JSON object per line, any of:
    {"text": "..."}                                   plain text (rendered as a user turn)
    {"prompt": "...", "answer": "..."}                text-only chat
    {"image": "rel/path.jpg", "prompt": "...", "answer": "..."}   image chat; prompt optional
Image paths are relative to `image_root` (default: the JSONL file's folder) and must stay inside it.
Bad lines and bad images are skipped and counted, as for COCO.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

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


def _parse_line(line: str) -> dict[str, str]:
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as err:
        raise ImageRejected("malformed_line", str(err)) from None
    if not isinstance(rec, dict):
        raise ImageRejected("malformed_line", "not an object")
    out = {k: rec[k] for k in ("text", "prompt", "answer", "image") if k in rec}
    if any(not isinstance(v, str) for v in out.values()):
        raise ImageRejected("malformed_line", "fields must be strings")
    if not ({"text", "answer", "prompt"} & out.keys()):
        raise ImageRejected("malformed_line", "needs 'text', 'prompt' or 'answer'")
    return out


def load_jsonl(
    path: Path,
    image_root: Path | None = None,
    num_samples: int = 512,
    seed: int = 0,
    instruction: str = DEFAULT_INSTRUCTION,
    min_samples: int = 1,
    max_image_pixels: int = DEFAULT_MAX_PIXELS,
) -> tuple[list[CalibSample], CalibStats]:
    """Sample up to `num_samples` records from a JSONL file, deterministically in `seed`."""
    path = Path(path)
    if num_samples < 1:
        raise CalibDataError(f"num_samples must be >= 1, got {num_samples}")
    if not path.is_file():
        raise CalibDataError(f"JSONL calibration file not found: {path}")
    root = Path(image_root) if image_root is not None else path.parent
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise CalibDataError(f"cannot read {path}: {err}") from None
    numbered = [(i + 1, ln) for i, ln in enumerate(lines) if ln.strip()]
    if not numbered:
        raise CalibDataError(f"no records in {path}")
    stats = CalibStats(requested=num_samples, sources=[f"jsonl:{path}"])
    seen: set[Path] = set()

    def accept(item: tuple[int, str]) -> CalibSample:
        lineno, line = item
        rec = _parse_line(line)
        source = f"{path.name}:{lineno}"
        if "text" in rec and not ({"prompt", "answer", "image"} & rec.keys()):
            text = rec["text"].strip()
            if not text:
                raise ImageRejected("empty_text")
            return CalibSample(image=None, prompt=text, answer="", source=source)
        prompt = rec.get("prompt", instruction if "image" in rec else "").strip()
        answer = normalize_caption(rec.get("answer", rec.get("text", "")))
        if not prompt and not answer:
            raise ImageRejected("empty_text")
        if "image" not in rec:
            return CalibSample(image=None, prompt=prompt, answer=answer, source=source)
        if not root.is_dir():
            raise ImageRejected("missing_image_root", str(root))
        img = resolve_member(root, rec["image"])
        if img in seen:
            raise ImageRejected("duplicate")
        load_rgb(img, root, max_image_pixels)
        seen.add(img)
        return CalibSample(image=img, prompt=prompt, answer=answer, source=source)

    ordered = seeded_order(numbered, seed, key_str=lambda item: str(item[0]))
    samples = fill(ordered, num_samples, accept, stats, describe=lambda item: f"{path.name}:{item[0]}")
    check_counts(samples, stats, min_samples, str(path))
    return samples, stats


def mix_sources(parts: Sequence[tuple[list[CalibSample], float]], num_samples: int, seed: int = 0) -> list[CalibSample]:
    """Take about `ratio` of `num_samples` from each part (shortfalls are refilled from the others),
    then interleave deterministically. Each part is assumed already in its own seeded order."""
    if num_samples < 1:
        raise CalibDataError(f"num_samples must be >= 1, got {num_samples}")
    if not parts or any(r < 0 for _, r in parts) or sum(r for _, r in parts) <= 0:
        raise CalibDataError("calibration mix needs at least one source with a positive ratio")
    total = sum(r for _, r in parts)
    want = [num_samples * r / total for _, r in parts]
    quota = [int(w) for w in want]
    # Largest remainder first, ties to the earlier part.
    for i in sorted(range(len(parts)), key=lambda i: (quota[i] - want[i], i))[: num_samples - sum(quota)]:
        quota[i] += 1
    quota = [min(q, len(s)) for q, (s, _) in zip(quota, parts, strict=True)]
    spare = num_samples - sum(quota)
    for i, (s, r) in enumerate(parts):
        if spare <= 0:
            break
        extra = min(spare, len(s) - quota[i]) if r > 0 else 0
        quota[i] += extra
        spare -= extra
    picked = [(i, s) for i, ((samples, _), q) in enumerate(zip(parts, quota, strict=True)) for s in samples[:q]]
    ordered = seeded_order(picked, seed, key_str=lambda p: f"{p[0]}/{p[1].source}")
    return [s for _, s in ordered]
