"""Calibration samples -> chat text -> batches from the model's own processor.

Each batch is exactly what `processor(text=[...], images=[...], padding=True, return_tensors="pt")`
returns (input_ids, attention_mask, pixel_values, image_grid_thw, ...), so the forward loop can
call `model(**batch)` and the full VLM (vision tower -> merger -> LM) sees real image tokens.

Length limit: a sequence holding image tokens cannot be cut (its placeholder count must match the
pixel features), so an over-long sample has its last text field (caption, or the prompt of a plain
text sample) shortened token-wise; if even that cannot fit, the sample is skipped ("too_long").

Batching: samples are sorted by rendered length (stable) before chunking, so batches hold similar
lengths and little padding; padding is on the right, so every row's real tokens start at
position 0 exactly as unbatched (pad positions are masked but still run through the linears,
which is why keeping them few matters for calibration ranges). Image and text-only samples may
share a batch: the processor assigns the flat image list to the image placeholders in order.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from vlmq.calib.images import DEFAULT_MAX_PIXELS, ImageRejected, load_rgb
from vlmq.calib.samples import CalibSample, CalibStats
from vlmq.models.chat import chat, render
from vlmq.models.chat import tokenizer_of as _tokenizer

_SHORTEN_TRIES = 4


def to_messages(processor: Any, sample: CalibSample) -> list[dict[str, Any]]:
    """The chat for one sample; the assistant turn is left out when there is no answer."""
    return chat(processor, sample.prompt, sample.answer, image=sample.image is not None)


@dataclass
class _Prepared:
    index: int
    text: str
    image: Image.Image | None
    length: int  # tokens after the processor expands the image placeholder


def _image_tokens(processor: Any, image: Image.Image) -> int:
    ip = processor.image_processor
    return ip.get_number_of_image_patches(image.height, image.width, {}) // ip.merge_size**2


def _rendered_length(processor: Any, sample: CalibSample, image: Image.Image | None) -> tuple[str, int]:
    text = render(processor, to_messages(processor, sample))
    length = len(_tokenizer(processor)(text)["input_ids"])
    if image is not None:
        length += _image_tokens(processor, image) - 1  # one <|image_pad|> becomes N of them
    return text, length


def _fit(processor: Any, sample: CalibSample, image: Image.Image | None, max_length: int) -> tuple[str, int, bool]:
    """Render `sample`, shortening its last text field until it fits; raise ImageRejected("too_long")."""
    text, length = _rendered_length(processor, sample, image)
    shortened = False
    field = "answer" if sample.answer else "prompt"
    for _ in range(_SHORTEN_TRIES):
        if length <= max_length:
            return text, length, shortened
        ids = _tokenizer(processor)(getattr(sample, field), add_special_tokens=False)["input_ids"]
        keep = len(ids) - (length - max_length)
        if keep < 1:
            break
        cut = _tokenizer(processor).decode(ids[:keep], skip_special_tokens=True).strip()
        if not cut:
            break
        sample = replace(sample, **{field: cut})
        shortened = True
        text, length = _rendered_length(processor, sample, image)
    if length <= max_length:
        return text, length, shortened
    raise ImageRejected("too_long", f"{length} > {max_length} tokens")


def make_batches(
    processor: Any,
    samples: list[CalibSample],
    batch_size: int,
    max_length: int,
    stats: CalibStats | None = None,
    image_root: Path | None = None,
    max_image_pixels: int = DEFAULT_MAX_PIXELS,
) -> list[dict[str, torch.Tensor]]:
    """Batches of processor outputs for `samples`; skips and token counts are recorded in `stats`.

    `image_root`, when given, must contain every image (checked again here); otherwise images
    are trusted as validated by the loader that produced the samples.
    """
    if batch_size < 1 or max_length < 1:
        raise ValueError(f"batch_size and max_length must be >= 1, got {batch_size}, {max_length}")
    stats = stats if stats is not None else CalibStats(requested=len(samples))
    prepared: list[_Prepared] = []
    for i, sample in enumerate(samples):
        try:
            image = None
            if sample.image is not None:
                root = Path(image_root) if image_root is not None else Path(sample.image).parent
                image = load_rgb(Path(sample.image), root, max_image_pixels)
            text, length, shortened = _fit(processor, sample, image, max_length)
        except ImageRejected as err:
            stats.skip(sample.source, err.reason)
            continue
        stats.truncated += shortened
        prepared.append(_Prepared(i, text, image, length))
    prepared.sort(key=lambda p: (p.length, p.index))

    batches: list[dict[str, torch.Tensor]] = []
    for start in range(0, len(prepared), batch_size):
        chunk = prepared[start : start + batch_size]
        images = [p.image for p in chunk if p.image is not None]
        image_kwargs = {"images": images} if images else {}   # a text-only model's processor is a tokenizer
        out = processor(text=[p.text for p in chunk], padding=True, padding_side="right", return_tensors="pt",
                        **image_kwargs)
        batch = dict(out)
        _check_batch(processor, batch, chunk, len(images), max_length)
        stats.tokens += int(batch["attention_mask"].sum())
        batches.append(batch)
    stats.samples = len(prepared)
    stats.images = sum(p.image is not None for p in prepared)
    return batches


def _check_batch(
    processor: Any, batch: dict[str, torch.Tensor], chunk: list[_Prepared], n_images: int, max_length: int
) -> None:
    """Fail loudly if the processor's expansion disagrees with the length we budgeted."""
    lengths = batch["attention_mask"].sum(dim=1).tolist()
    if lengths != [p.length for p in chunk] or max(lengths) > max_length:
        expected = [p.length for p in chunk]
        raise RuntimeError(f"processor produced lengths {lengths}, expected {expected} (<= {max_length})")
    if n_images:
        grid = batch["image_grid_thw"]
        expected = int((grid.prod(dim=1) // processor.image_processor.merge_size**2).sum())
        found = int((batch["input_ids"] == processor.image_token_id).sum())
        if grid.shape[0] != n_images or found != expected:
            raise RuntimeError(f"image tokens {found} != {expected} from image_grid_thw for {n_images} images")
