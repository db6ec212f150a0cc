"""Build the data of the local harness tasks (src/vlmq/data/tasks/), which need no hub.

- lm_eval/text_passages.jsonl: held-out real-text passages (benchmarks/data/real_text/heldout.jsonl, which
  calibration never saw) for the perplexity task `vlmq_text_ppl` (loglikelihood_rolling).
- lm_eval/text_mc.jsonl: a multiple-choice cloze over the same passages for `vlmq_text_mc`: the context is
  the start of a passage cut at a sentence end, the right choice is the passage's next sentence, the three
  others are sentences of about the same length from other held-out documents (seeded, deterministic).
- lmms_eval/demo_caption.jsonl: the demo COCO set's images (src/vlmq/data/demo_coco) with all their
  reference captions, for the image task `vlmq_demo_caption`; image paths are relative to the task folder.

The task YAMLs beside the data are written by hand; this script writes only the data, and its output is
committed, so the figures measured on it cannot move with a different input.

    python benchmarks/make_local_tasks.py [--out src/vlmq/data/tasks]
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
HELDOUT = REPO_ROOT / "benchmarks" / "data" / "real_text" / "heldout.jsonl"
DEMO_COCO = REPO_ROOT / "src" / "vlmq" / "data" / "demo_coco"
DEFAULT_OUT = REPO_ROOT / "src" / "vlmq" / "data" / "tasks"
SEED = 0
PASSAGES = 24
MC_ITEMS = 64
CAPTION_PROMPT = "Describe this image in one short sentence."


def sentences(text: str) -> list[str]:
    """Whitespace-normalized sentences (split after . ! ? followed by a space and a capital or quote)."""
    flat = re.sub(r"\s+", " ", text).strip()
    return [s.strip() for s in re.split(r"(?<=[.!?])\s+(?=[A-Z\"'(])", flat) if s.strip()]


def load_heldout(path: Path = HELDOUT) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def passages(records: list[dict], n: int = PASSAGES) -> list[dict]:
    """n records spread evenly over the held-out file (every k-th), as {"text", "doc"}."""
    step = max(1, len(records) // n)
    return [{"text": r["text"], "doc": r["doc"]} for r in records[::step][:n]]


def mc_item(record: dict, others: list[str], rng: random.Random) -> dict | None:
    """One cloze item from a record, or None when it has too few usable sentences."""
    sents = sentences(record["text"])
    usable = [i for i in range(2, len(sents)) if 40 <= len(sents[i]) <= 240]
    if not usable:
        return None
    cut = rng.choice(usable)
    context = " ".join(sents[max(0, cut - 4):cut])
    gold = sents[cut]
    near = [s for s in others if 0.6 * len(gold) <= len(s) <= 1.6 * len(gold) and s != gold]
    if len(near) < 3:
        return None
    choices = rng.sample(near, 3) + [gold]
    rng.shuffle(choices)
    return {"context": context, "choices": choices, "label": choices.index(gold), "doc": record["doc"]}


def mc_items(records: list[dict], n: int = MC_ITEMS, seed: int = SEED) -> list[dict]:
    rng = random.Random(seed)
    order = list(range(len(records)))
    rng.shuffle(order)
    items = []
    for i in order:
        record = records[i]
        others = [s for r in records if r["doc"] != record["doc"] for s in sentences(r["text"])]
        item = mc_item(record, others, rng)
        if item is not None:
            items.append(item)
        if len(items) == n:
            break
    return items


def caption_items(coco_root: Path = DEMO_COCO, task_dir: Path = DEFAULT_OUT / "lmms_eval") -> list[dict]:
    """One record per demo image: relative image path, the prompt, and every reference caption."""
    ann = json.loads((coco_root / "annotations" / "captions_val2017.json").read_text())
    refs: dict[int, list[str]] = {}
    for a in ann["annotations"]:
        refs.setdefault(a["image_id"], []).append(a["caption"].strip())
    rel = Path("..", "..", coco_root.name, "val2017") if coco_root.parent == task_dir.parent.parent else None
    items = []
    for im in sorted(ann["images"], key=lambda x: x["id"]):
        image = (rel / im["file_name"]).as_posix() if rel else str(coco_root / "val2017" / im["file_name"])
        items.append({"id": im["id"], "image": image, "question": CAPTION_PROMPT, "answers": refs[im["id"]]})
    return items


def write_jsonl(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    records = load_heldout()
    files = {args.out / "lm_eval" / "text_passages.jsonl": passages(records),
             args.out / "lm_eval" / "text_mc.jsonl": mc_items(records),
             args.out / "lmms_eval" / "demo_caption.jsonl": caption_items(DEMO_COCO, args.out / "lmms_eval")}
    for path, rows in files.items():
        write_jsonl(rows, path)
        print(f"{path}: {len(rows)} records")


if __name__ == "__main__":
    main()
