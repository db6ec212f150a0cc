"""Which calibration samples a run uses: `calib.source` (COCO 2017 captions, JSONL, text-only JSONL)
or a mix of sources by ratio, and the held-out samples that KL is measured on."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from vlmq.calib.coco import load_coco_captions
from vlmq.calib.jsonl import load_jsonl, mix_sources
from vlmq.calib.samples import CalibStats, check_counts
from vlmq.config import Config, ConfigError

log = logging.getLogger(__name__)


def load_text_jsonl(path: Path, num_samples: int, seed: int, instruction: str,
                    min_samples: int) -> tuple[list, CalibStats]:
    """A text-only JSONL source: like `jsonl`, but records with an image are skipped (counted)."""
    # Walk every record (same seeded order as `jsonl`), then keep the first text-only ones.
    everything, stats = load_jsonl(path, None, 2**62, seed, instruction, 0)
    for sample in everything:
        if sample.image is not None:
            stats.skip(sample.source, "image_in_text_source")
    samples = [s for s in everything if s.image is None][:num_samples]
    stats.requested = num_samples
    stats.sources = [f"text_jsonl:{path}"]
    check_counts(samples, stats, min_samples, str(path))
    return samples, stats


def load_source(cfg: Config, source: str, root: Path, min_samples: int) -> tuple[list, CalibStats]:
    c = cfg.calib
    if source == "coco2017":
        return load_coco_captions(root, c.splits, c.num_samples, c.seed, c.instruction, min_samples)
    if source == "jsonl":
        return load_jsonl(root, None, c.num_samples, c.seed, c.instruction, min_samples)
    if source == "text_jsonl":
        return load_text_jsonl(root, c.num_samples, c.seed, c.instruction, min_samples)
    raise ConfigError(f"unknown calibration source {source!r}")


def load_calibration_samples(cfg: Config, calib_root: Path) -> tuple[list, CalibStats]:
    """`calib.source` at `calib_root`, or, with `calib.mix`, that source plus the mix parts by ratio.

    Every source goes through its own checks (hostile images, malformed lines); skips from all
    of them are counted, and the mix as a whole must reach `calib.min_samples`."""
    c = cfg.calib
    if not c.mix:
        return load_source(cfg, c.source, calib_root, c.min_samples)
    parts = [(c.source, calib_root, 1.0 - sum(p.ratio for p in c.mix))]
    parts += [(p.source, cfg.resolve_path(p.root), p.ratio) for p in c.mix]
    total = CalibStats(requested=c.num_samples)
    loaded = []
    for source, root, ratio in parts:
        samples, stats = load_source(cfg, source, root, 0)
        total.add_skips(stats)
        loaded.append((samples, ratio))
    mixed = mix_sources(loaded, c.num_samples, c.seed)
    picked = {id(s) for s in mixed}
    total.sources = [f"{source}:{root} (ratio {ratio:.2f}, {sum(id(s) in picked for s in samples)} samples)"
                     for (source, root, ratio), (samples, _) in zip(parts, loaded, strict=True)]
    check_counts(mixed, total, c.min_samples, "the calibration mix " + ", ".join(str(r) for _, r, _ in parts))
    return mixed, total


def calibration_and_held_out(cfg: Config, calib_root: Path) -> tuple[list, list, CalibStats]:
    """`calib.num_samples` samples to calibrate on (exactly the selection without a held-out set) plus up to
    `quant.kl_samples` held out for KL (quantize-time scoring, the sensitivity fallback, `vlmq sensitivity`):
    samples of a larger selection that are not in the calibration set (by image, else by record), so
    disjoint by construction, mixes included. When the data has nothing left over, KL is measured on the
    last samples calibrated on, with a warning."""
    n, k = cfg.calib.num_samples, cfg.quant.kl_samples
    samples, stats = load_calibration_samples(cfg, calib_root)
    more = dataclasses.replace(cfg, calib=dataclasses.replace(cfg.calib, num_samples=n + k))
    everything, _ = load_calibration_samples(more, calib_root)
    used = {s.image or s.source for s in samples}
    held = [s for s in everything if (s.image or s.source) not in used][:k]
    if held:
        return samples, held, stats
    log.warning("only %d calibration samples: KL is measured on %d of them (not held out)", len(samples),
                min(k, len(samples)))
    return samples, samples[-k:], stats
