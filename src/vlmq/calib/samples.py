"""What every calibration source produces: `CalibSample`s (one chat each), the `CalibStats` that count
what was kept and why the rest was skipped, and the seeded, prefix-stable order the sources walk."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from vlmq.calib.images import ImageRejected

DEFAULT_INSTRUCTION = "Describe this image in one sentence."
MAX_EXAMPLES = 5

T = TypeVar("T")


class CalibDataError(ValueError):
    """The calibration data cannot be used; the message is one line, meant for the user."""


@dataclass(frozen=True)
class CalibSample:
    image: Path | None  # resolved path inside the dataset root; None for text-only samples
    prompt: str  # the user instruction
    answer: str  # the assistant turn (caption); may be "" for plain-text samples
    source: str  # e.g. "coco/val2017/397133"


@dataclass
class CalibStats:
    requested: int
    samples: int = 0
    images: int = 0
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count
    skipped_examples: list[str] = field(default_factory=list)  # first few "path: reason"
    truncated: int = 0  # samples whose text was shortened to fit max_length (batcher)
    tokens: int = 0  # non-pad tokens, filled by the batcher
    sources: list[str] = field(default_factory=list)  # e.g. "coco:/data/coco[val2017]"

    def skip(self, what: str, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        if len(self.skipped_examples) < MAX_EXAMPLES:
            self.skipped_examples.append(f"{what}: {reason}")

    def add_skips(self, other: CalibStats) -> None:
        """``other``'s skip counts (and examples, up to the cap) added to these."""
        for reason, count in other.skipped.items():
            self.skipped[reason] = self.skipped.get(reason, 0) + count
        self.skipped_examples.extend(other.skipped_examples[: max(0, MAX_EXAMPLES - len(self.skipped_examples))])

    def add_batch(self, other: CalibStats) -> None:
        """A batch's counts, as the batcher filled them, added to the run's."""
        self.samples += other.samples
        self.images += other.images
        self.tokens += other.tokens
        self.truncated += other.truncated
        self.add_skips(other)

    def skipped_summary(self) -> str:
        return ", ".join(f"{r}={n}" for r, n in sorted(self.skipped.items())) or "none"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def seeded_order(keys: Iterable[T], seed: int, key_str: Callable[[T], str] = str) -> list[T]:
    """Order `keys` by a seeded hash: independent of input order and of Python's hash/random.

    Growing `num_samples` keeps the earlier picks (the order is a prefix-stable ranking).
    """

    def rank(k: T) -> tuple[bytes, str]:
        s = key_str(k)
        return hashlib.blake2b(f"{seed}\x00{s}".encode(), digest_size=16).digest(), s

    return sorted(keys, key=rank)


def fill(
    candidates: Sequence[T],
    num_samples: int,
    accept: Callable[[T], CalibSample],
    stats: CalibStats,
    describe: Callable[[T], str] = str,
) -> list[CalibSample]:
    """Walk `candidates` in order, keeping those `accept` turns into samples, until `num_samples`."""
    out: list[CalibSample] = []
    for cand in candidates:
        if len(out) >= num_samples:
            break
        try:
            out.append(accept(cand))
        except ImageRejected as err:
            stats.skip(describe(cand), err.reason)
    return out


def check_counts(samples: list[CalibSample], stats: CalibStats, min_samples: int, where: str) -> None:
    stats.samples = len(samples)
    stats.images = sum(s.image is not None for s in samples)
    if len(samples) < min_samples:
        raise CalibDataError(
            f"only {len(samples)} usable calibration samples in {where} (need at least {min_samples}); "
            f"skipped: {stats.skipped_summary()}"
        )


def normalize_caption(text: str) -> str:
    return " ".join(text.split())
