"""Helpers of the vlmq local image task (loaded by lmms-eval from this folder; only PIL and the stdlib).

Scores: `caption_f1`, the best bag-of-words F1 of the answer against any reference (lower-cased, punctuation
and the articles a/an/the dropped, as SQuAD-style F1); `exact_match`, 1 when the normalized answer equals a
normalized reference.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from pathlib import Path

from PIL import Image

HERE = Path(__file__).resolve().parent
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def doc_to_visual(doc: dict) -> list:
    path = Path(doc["image"])
    path = path if path.is_absolute() else HERE / path
    with Image.open(path) as im:
        return [im.convert("RGB")]


def doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    kw = lmms_eval_specific_kwargs or {}
    return f"{kw.get('pre_prompt', '')}{doc['question']}{kw.get('post_prompt', '')}"


def doc_to_target(doc: dict) -> str:
    return doc["answers"][0]


def normalize(text: str) -> list[str]:
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    return _ARTICLES.sub(" ", text).split()


def token_f1(prediction: str, reference: str) -> float:
    pred, ref = normalize(prediction), normalize(reference)
    common = sum((Counter(pred) & Counter(ref)).values())
    if not pred or not ref or common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def process_results(doc: dict, results: list) -> dict:
    answer = results[0] if results else ""
    answer = answer.strip().splitlines()[0] if answer.strip() else ""
    refs = doc["answers"]
    return {"caption_f1": max(token_f1(answer, r) for r in refs),
            "exact_match": float(any(normalize(answer) == normalize(r) for r in refs))}
