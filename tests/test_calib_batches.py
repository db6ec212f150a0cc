"""Batching through the real Qwen2_5_VLProcessor of the demo model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from calib_fixtures import write_image
from vlmq.calib import CalibSample, CalibStats, demo_coco_root, load_coco_captions
from vlmq.calib.batches import make_batches, to_messages


@pytest.fixture(scope="module")
def processor():
    from vlmq.models.demo import build_demo_processor

    return build_demo_processor()


@pytest.fixture(scope="module")
def demo_samples() -> tuple[list[CalibSample], CalibStats]:
    return load_coco_captions(demo_coco_root(), num_samples=16)


def _text_samples() -> list[CalibSample]:
    return [
        CalibSample(None, "Explain quantization in simple words.", "", "t/0"),
        CalibSample(None, "What is 2+2?", "Four.", "t/1"),
        CalibSample(None, "Write a short poem about the sea.", "The sea is calm.", "t/2"),
    ]


def _check_image_tokens(processor, batch: dict[str, torch.Tensor]) -> None:
    merge = processor.image_processor.merge_size
    grid = batch["image_grid_thw"]
    per_row = (batch["input_ids"] == processor.image_token_id).sum(dim=1)
    per_image = (grid.prod(dim=1) // merge**2).tolist()
    # Rows with images carry exactly one image each, in order.
    assert [n for n in per_row.tolist() if n] == per_image
    assert batch["pixel_values"].shape[0] == int(grid.prod(dim=1).sum())


def test_to_messages(processor) -> None:
    img = CalibSample(Path("/x.jpg"), "Describe.", "A cat.", "s")
    assert to_messages(processor, img) == [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe."}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]},
    ]
    assert to_messages(processor, CalibSample(None, "Just text.", "", "t")) == [
        {"role": "user", "content": [{"type": "text", "text": "Just text."}]}
    ]


def test_demo_set_batches(processor, demo_samples) -> None:
    samples, stats = demo_samples
    stats = CalibStats(**stats.to_dict())
    batches = make_batches(processor, samples, batch_size=5, max_length=512, stats=stats)
    assert [b["input_ids"].shape[0] for b in batches] == [5, 5, 5, 1]
    n_images = 0
    for b in batches:
        assert b["input_ids"].shape == b["attention_mask"].shape and b["input_ids"].dtype == torch.long
        assert b["pixel_values"].ndim == 2 and b["pixel_values"].shape[0] > 0
        assert b["image_grid_thw"].shape == (b["input_ids"].shape[0], 3)
        _check_image_tokens(processor, b)
        # Right padding: real tokens form a prefix of every row.
        mask = b["attention_mask"]
        assert torch.equal(mask, mask.cummin(dim=1).values) and bool(mask[:, 0].all())
        n_images += b["image_grid_thw"].shape[0]
    assert n_images == len(samples) == stats.images == stats.samples
    assert stats.tokens == sum(int(b["attention_mask"].sum()) for b in batches) > 0
    assert stats.truncated == 0 and stats.skipped == {}
    # The caption is in the rendered chat.
    decoded = processor.tokenizer.decode(batches[0]["input_ids"][0])
    assert "<|vision_start|><|image_pad|>" in decoded and "<|im_start|>assistant" in decoded
    again = make_batches(processor, samples, batch_size=5, max_length=512)
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(batches, again, strict=True))


def test_text_only_and_mixed_batches(processor, demo_samples) -> None:
    stats = CalibStats(requested=3)
    batches = make_batches(processor, _text_samples(), batch_size=8, max_length=512, stats=stats)
    assert len(batches) == 1 and batches[0]["input_ids"].shape[0] == 3
    assert "pixel_values" not in batches[0] and stats.images == 0 and stats.tokens > 0
    assert not (batches[0]["input_ids"] == processor.image_token_id).any()

    mixed = make_batches(processor, demo_samples[0][:3] + _text_samples(), batch_size=6, max_length=512)
    assert len(mixed) == 1 and mixed[0]["input_ids"].shape[0] == 6
    assert mixed[0]["image_grid_thw"].shape[0] == 3
    _check_image_tokens(processor, mixed[0])


def test_too_long_is_shortened_or_skipped(processor, demo_samples) -> None:
    image_sample = demo_samples[0][0]
    long_caption = CalibSample(image_sample.image, image_sample.prompt, "A boat on the water. " * 40, "long/cap")
    long_text = CalibSample(None, "The quick brown fox jumps over the lazy dog. " * 40, "", "long/text")
    long_prompt = CalibSample(image_sample.image, "Describe this image in one sentence. " * 40, "Boat.", "long/prompt")
    stats = CalibStats(requested=4)
    batches = make_batches(processor, [long_caption, long_text, long_prompt, image_sample], 4, 96, stats)
    assert stats.truncated == 2 and stats.skipped == {"too_long": 1} and stats.samples == 3
    assert stats.skipped_examples == ["long/prompt: too_long"]
    (batch,) = batches
    assert batch["attention_mask"].sum(dim=1).max() == 96 == batch["input_ids"].shape[1]
    _check_image_tokens(processor, batch)
    texts = processor.tokenizer.batch_decode(batch["input_ids"])
    assert any("A boat on the water" in t and t.count("A boat") < 40 for t in texts)


def test_bad_images_at_batch_time_are_skipped(processor, tmp_path: Path) -> None:
    inside = write_image(tmp_path / "root" / "ok.jpg", size=(56, 56))
    outside = write_image(tmp_path / "elsewhere" / "x.jpg", size=(56, 56))
    gone = write_image(tmp_path / "root" / "gone.jpg")
    gone.unlink()
    samples = [CalibSample(p, "Describe.", "Red.", p.name) for p in (inside, outside, gone)]
    stats = CalibStats(requested=3)
    batches = make_batches(processor, samples, 4, 512, stats, image_root=tmp_path / "root")
    assert stats.skipped == {"path_escape": 1, "missing_file": 1}
    assert len(batches) == 1 and batches[0]["image_grid_thw"].tolist() == [[1, 4, 4]]
    with pytest.raises(ValueError, match="batch_size"):
        make_batches(processor, samples, 0, 512)


def test_forward_loop_counts_once_per_calibration_pass(processor, demo_samples) -> None:
    """ModelOpt may run the forward loop more than once (the sensitivity fallback re-quantizes with
    it): every pass recounts samples, tokens and the batcher's skips on top of the loader's skips."""
    from vlmq.models.demo import build_demo_model
    from vlmq.quantize.calibrate import ForwardLoop

    image_sample = demo_samples[0][0]
    long_prompt = CalibSample(image_sample.image, "Describe this image in one sentence. " * 40, "Boat.", "long/p")
    stats = CalibStats(requested=4, skipped={"missing_file": 2}, skipped_examples=["a.jpg: missing_file"])
    loop = ForwardLoop([long_prompt, *demo_samples[0][:3]], processor, 96, 2, stats)
    model = build_demo_model(torch.float32)
    counts = []
    for _ in range(2):
        loop(model)
        counts.append((stats.samples, stats.tokens, dict(stats.skipped), list(stats.skipped_examples)))
    assert counts[0] == counts[1]
    samples, tokens, skipped, examples = counts[0]
    assert samples == 3 and tokens > 0 and skipped == {"missing_file": 2, "too_long": 1}
    assert examples == ["a.jpg: missing_file", "long/p: too_long"]
    assert loop.last_log is not None and loop.last_log.batches == 2
