"""Where a run's inputs and outputs live: demo vs real snapshot, calibration root, export dir, and the
stage timer. Shared by `vlmq quantize` (vlmq.pipeline), `vlmq check` and `vlmq sensitivity`."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from vlmq.config import Config

# The stage lines have always been logged as vlmq.pipeline's (quantize.log reads "vlmq.pipeline: stage ...").
log = logging.getLogger("vlmq.pipeline")

DEMO_EXPORT_DIR = "models/vlmq_demo/quantized/w8a8_int8_sq"
# The demo COCO set has 16 images: calibrate on 12 so `vlmq check` has 4 held-out captions.
DEMO_CALIB_SAMPLES = 12


@dataclass
class RunContext:
    cfg: Config
    run_dir: Path
    snapshot_dir: Path
    calib_root: Path
    export_dir: Path
    demo: bool
    timings: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        log.info("stage %s: start", name)
        try:
            yield
        finally:
            self.timings[name] = round(time.perf_counter() - start, 3)
            log.info("stage %s: %.2fs", name, self.timings[name])


def resolve_inputs(cfg: Config, run_dir: Path) -> RunContext:
    """Decide demo vs real snapshot and where data and outputs live; no heavy work."""
    snapshot_dir = cfg.resolve_path(cfg.arch.snapshot)
    named = cfg.overridden("arch.snapshot") or cfg.overridden("arch") or cfg.overridden("model")
    demo = cfg.demo == "on" or (cfg.demo == "auto" and not snapshot_dir.exists() and not named)
    calib_root = cfg.resolve_path(cfg.calib.root)
    export_dir = cfg.resolve_path(cfg.export.dir)
    if demo:
        from vlmq.calib import demo_coco_root

        snapshot_dir = run_dir / "demo_snapshot"
        if not cfg.overridden("calib.root"):
            calib_root = demo_coco_root()
        if not cfg.overridden("export.dir"):
            export_dir = cfg.resolve_path(DEMO_EXPORT_DIR)
        if not cfg.overridden("calib.num_samples") and not cfg.overridden("calib.root"):
            cfg.calib.num_samples = min(cfg.calib.num_samples, DEMO_CALIB_SAMPLES)
    return RunContext(cfg, run_dir, snapshot_dir, calib_root, export_dir, demo)
