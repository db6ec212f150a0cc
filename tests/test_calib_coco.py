"""COCO 2017 captions source: sampling, caption choice, splits, file-level errors, the demo set."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest

from calib_fixtures import coco_json, simple_entries, write_coco
from vlmq.calib import (
    CalibDataError,
    demo_coco_root,
    load_coco_captions,
    load_jsonl,
    mix_sources,
)


def _sources(samples):
    return [s.source for s in samples]


def test_same_seed_same_samples_different_seed_differs(tmp_path: Path) -> None:
    root = write_coco(tmp_path / "coco", simple_entries(30))
    a, _ = load_coco_captions(root, num_samples=8, seed=0)
    b, _ = load_coco_captions(root, num_samples=8, seed=0)
    c, _ = load_coco_captions(root, num_samples=8, seed=1)
    assert _sources(a) == _sources(b)
    assert len(a) == 8
    assert set(_sources(a)) != set(_sources(c))
    # A seeded shuffle, not the file order.
    assert _sources(a) != [f"coco/val2017/{i}" for i in range(1, 9)]


def test_sampling_ignores_json_order_and_is_prefix_stable(tmp_path: Path) -> None:
    root = write_coco(tmp_path / "a", simple_entries(20))
    rev = tmp_path / "b"
    write_coco(rev, simple_entries(20))
    data = coco_json(simple_entries(20))
    data["images"].reverse()
    data["annotations"].reverse()
    (rev / "annotations" / "captions_val2017.json").write_text(json.dumps(data))
    a, _ = load_coco_captions(root, num_samples=6, seed=3)
    b, _ = load_coco_captions(rev, num_samples=6, seed=3)
    assert _sources(a) == _sources(b)
    more, _ = load_coco_captions(root, num_samples=12, seed=3)
    assert _sources(more)[:6] == _sources(a)


def test_shortest_caption_whitespace_and_ties(tmp_path: Path) -> None:
    entries = [
        ("a.jpg", ["  A fairly long caption about a dog.  ", "A\n dog   runs.\n", "   ", "A dog sitting down."]),
        ("b.jpg", ["zz top.", "Long caption number two.", "aa top."]),  # tie on length -> text order
    ]
    root = write_coco(tmp_path / "coco", entries)
    samples, stats = load_coco_captions(root, num_samples=10, instruction="What is shown?")
    by_file = {s.image.name: s for s in samples}
    assert by_file["a.jpg"].answer == "A dog runs."
    assert by_file["b.jpg"].answer == "aa top."
    assert all(s.prompt == "What is shown?" for s in samples)
    assert stats.samples == stats.images == 2 and stats.skipped == {}


def test_train_and_val_mix(tmp_path: Path) -> None:
    root = tmp_path / "coco"
    write_coco(root, simple_entries(10, "t"), split="train2017", start_id=1)
    write_coco(root, simple_entries(10, "v"), split="val2017", start_id=1)  # same ids, other split
    samples, stats = load_coco_captions(root, splits=["train2017", "val2017"], num_samples=100)
    assert len(samples) == 20
    assert {s.source.split("/")[1] for s in samples} == {"train2017", "val2017"}
    assert all(s.image.parent.name == s.source.split("/")[1] for s in samples)
    assert "train2017" in stats.sources[0] and "val2017" in stats.sources[0]


def test_each_image_at_most_once(tmp_path: Path) -> None:
    entries = [*simple_entries(4), ("000000000001.jpg", ["listed twice under another id"])]
    root = write_coco(tmp_path / "coco", entries)
    samples, stats = load_coco_captions(root, num_samples=50)
    paths = [s.image for s in samples]
    assert len(paths) == len(set(paths)) == 4
    assert stats.skipped == {"duplicate": 1}


def test_num_samples_above_available_returns_all(tmp_path: Path) -> None:
    root = write_coco(tmp_path / "coco", simple_entries(5))
    samples, stats = load_coco_captions(root, num_samples=512)
    assert len(samples) == 5 and stats.requested == 512 and stats.samples == 5
    assert stats.to_dict()["samples"] == 5


def _one_line_with(err: pytest.ExceptionInfo, path: Path) -> None:
    msg = str(err.value)
    assert str(path) in msg and "\n" not in msg


def test_missing_root(tmp_path: Path) -> None:
    with pytest.raises(CalibDataError) as err:
        load_coco_captions(tmp_path / "nope")
    _one_line_with(err, tmp_path / "nope")


def test_missing_annotations(tmp_path: Path) -> None:
    (tmp_path / "val2017").mkdir()
    with pytest.raises(CalibDataError) as err:
        load_coco_captions(tmp_path)
    _one_line_with(err, tmp_path / "annotations" / "captions_val2017.json")


def test_missing_image_folder(tmp_path: Path) -> None:
    root = write_coco(tmp_path / "coco", simple_entries(2))
    for p in (root / "val2017").iterdir():
        p.unlink()
    (root / "val2017").rmdir()
    with pytest.raises(CalibDataError) as err:
        load_coco_captions(root)
    _one_line_with(err, root / "val2017")


@pytest.mark.parametrize(
    "content",
    ['{"images": [', "", "\xff\xfe not utf8", '["a list"]', '{"images": {}, "annotations": []}'],
    ids=["truncated", "empty-file", "binary", "not-a-dict", "wrong-types"],
)
def test_malformed_json(tmp_path: Path, content: str) -> None:
    root = write_coco(tmp_path / "coco", simple_entries(1))
    ann = root / "annotations" / "captions_val2017.json"
    ann.write_bytes(content.encode("latin-1"))
    with pytest.raises(CalibDataError) as err:
        load_coco_captions(root)
    _one_line_with(err, ann)


@pytest.mark.parametrize(
    "entries", [[], [("a.jpg", [])], [("a.jpg", ["   "])]], ids=["no-images", "no-captions", "blank"]
)
def test_empty_annotations(tmp_path: Path, entries) -> None:
    root = write_coco(tmp_path / "coco", entries)
    with pytest.raises(CalibDataError, match="no captioned images") as err:
        load_coco_captions(root)
    _one_line_with(err, root)


def test_bad_split_name_and_num_samples(tmp_path: Path) -> None:
    root = write_coco(tmp_path / "coco", simple_entries(1))
    with pytest.raises(CalibDataError, match="split"):
        load_coco_captions(root, splits=["../val2017"])
    with pytest.raises(CalibDataError, match="num_samples"):
        load_coco_captions(root, num_samples=0)


def test_demo_set_loads() -> None:
    root = demo_coco_root()
    samples, stats = load_coco_captions(root, num_samples=512)
    assert 12 <= len(samples) <= 32 and stats.skipped == {}
    data = json.loads((root / "annotations" / "captions_val2017.json").read_text())
    assert {"info", "licenses", "images", "annotations"} <= data.keys()
    assert {"id", "file_name", "width", "height"} <= data["images"][0].keys()
    assert len(data["annotations"]) >= 3 * len(data["images"])
    # Shortest caption is chosen among several of different length.
    caps = [a["caption"] for a in data["annotations"] if a["image_id"] == data["images"][0]["id"]]
    chosen = next(s.answer for s in samples if s.source.endswith(f"/{data['images'][0]['id']}"))
    assert len(chosen) == min(len(" ".join(c.split())) for c in caps) < max(len(c) for c in caps)
    size = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    assert size < 200_000


def test_demo_set_regenerates_identically(tmp_path: Path) -> None:
    script = Path(__file__).resolve().parent.parent / "scripts" / "make_demo_coco.py"
    argv = sys.argv
    try:
        sys.argv = [str(script), "--out", str(tmp_path)]
        runpy.run_path(str(script), run_name="__main__")
    finally:
        sys.argv = argv
    shipped = demo_coco_root()
    ann = "annotations/captions_val2017.json"
    assert (tmp_path / ann).read_text() == (shipped / ann).read_text()
    names = sorted(p.name for p in (tmp_path / "val2017").iterdir())
    assert names == sorted(p.name for p in (shipped / "val2017").iterdir())


def test_jsonl_text_and_image_sources_and_mix(tmp_path: Path) -> None:
    from calib_fixtures import write_image

    write_image(tmp_path / "imgs" / "x.jpg")
    write_image(tmp_path / "imgs" / "y.png", fmt="PNG")
    lines = [
        json.dumps({"text": "Plain text for the language model."}),
        json.dumps({"prompt": "What is 2+2?", "answer": "Four."}),
        json.dumps({"image": "imgs/x.jpg", "answer": "A red square."}),
        json.dumps({"image": "imgs/y.png", "prompt": "Colour?", "answer": "Red."}),
        json.dumps({"image": "../outside.jpg", "answer": "nope"}),
        "{not json",
        json.dumps({"image": "imgs/missing.jpg", "answer": "gone"}),
        "",
    ]
    path = tmp_path / "calib.jsonl"
    path.write_text("\n".join(lines))
    samples, stats = load_jsonl(path, num_samples=100)
    assert len(samples) == 4 and stats.images == 2
    assert stats.skipped == {"path_escape": 1, "malformed_line": 1, "missing_file": 1}
    text = {s.prompt: s for s in samples if s.image is None}
    assert text["Plain text for the language model."].answer == ""
    assert text["What is 2+2?"].answer == "Four."
    img = {s.image.name: s for s in samples if s.image is not None}
    assert img["x.jpg"].prompt == "Describe this image in one sentence."
    with pytest.raises(CalibDataError, match="calib.jsonl"):
        load_jsonl(path, min_samples=5)

    coco, _ = load_coco_captions(write_coco(tmp_path / "coco", simple_entries(10)), num_samples=10)
    mixed = mix_sources([(coco, 0.75), (samples, 0.25)], num_samples=8, seed=0)
    assert len(mixed) == 8
    assert sum(s.source.startswith("coco/") for s in mixed) == 6
    assert mix_sources([(coco, 0.75), (samples, 0.25)], num_samples=8, seed=0) == mixed
    # A short source is topped up from the others.
    mixed = mix_sources([(coco, 0.1), (samples, 0.9)], num_samples=12, seed=0)
    assert len(mixed) == 12 and sum(not s.source.startswith("coco/") for s in mixed) == 4
