"""Assemble the real-text calibration and held-out sets for the real-weights tier (SmolLM2).

Sources, all real English prose that every CPython and Debian machine carries:
- the Python Language Reference topics shipped in `pydoc_data.topics` (PSF license);
- the licence texts in /usr/share/common-licenses (GPL, LGPL, MPL, Apache, Artistic, GFDL, CC0).

Each document is cut at paragraph boundaries into chunks of about `--chars` characters, one
`{"text": ...}` record per chunk. Documents, not chunks, are split between the two files, so no
held-out record shares a document with calibration: every 4th pydoc topic (sorted by name) is
held out; the licences are calibration only. The output is committed
(benchmarks/data/real_text/), so a different Python's pydoc_data cannot move the figures.

    python benchmarks/make_real_text.py [--out benchmarks/data/real_text]
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "benchmarks" / "data" / "real_text"
LICENSES = Path("/usr/share/common-licenses")
LICENSE_FILES = ("Apache-2.0", "Artistic", "GFDL-1.3", "GPL-2", "GPL-3", "LGPL-2.1", "LGPL-3", "MPL-2.0")
HELD_OUT_EVERY = 4


def chunks(text: str, size: int) -> list[str]:
    """Paragraph-aligned pieces of about `size` characters (a longer paragraph stands alone)."""
    paragraphs = [re.sub(r"[ \t]+", " ", p.strip()) for p in re.split(r"\n\s*\n", text)]
    out, current = [], ""
    for para in paragraphs:
        if not para or set(para) <= set("*=-~ "):
            continue
        if current and len(current) + len(para) > size:
            out.append(current)
            current = ""
        current = f"{current}\n\n{para}" if current else para
    if current:
        out.append(current)
    return [c for c in out if len(c) >= size // 4]


def documents() -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(calibration documents, held-out documents) as (name, text)."""
    from pydoc_data.topics import topics

    calib, held = [], []
    for i, name in enumerate(sorted(topics)):
        (held if i % HELD_OUT_EVERY == 0 else calib).append((f"pydoc:{name}", topics[name]))
    for name in LICENSE_FILES:
        path = LICENSES / name
        if path.is_file():
            calib.append((f"license:{name}", path.read_text(encoding="utf-8", errors="replace")))
    return calib, held


def write(records: list[tuple[str, str]], path: Path, size: int) -> int:
    lines = [json.dumps({"text": piece, "doc": name}, ensure_ascii=False)
             for name, text in records for piece in chunks(text, size)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return len(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--chars", type=int, default=1200, help="target characters per record")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    calib, held = documents()
    n_calib = write(calib, args.out / "calib.jsonl", args.chars)
    n_held = write(held, args.out / "heldout.jsonl", args.chars)
    print(f"{args.out}: calib.jsonl {n_calib} records from {len(calib)} documents, "
          f"heldout.jsonl {n_held} records from {len(held)} documents")


if __name__ == "__main__":
    main()
