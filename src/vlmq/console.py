"""Terminal output: one rich console, progress bars, the closing summary, and the run's log file."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

# Width when stderr is not a terminal (a pipe, a log file) and COLUMNS is unset: wide enough that tables keep
# their natural width instead of rich's 80-column default, which cut names to `text…`.
PIPE_WIDTH = 10_000


def console_width() -> int | None:
    """None (rich measures the terminal, or reads COLUMNS) on a terminal or with COLUMNS set, else PIPE_WIDTH."""
    if os.environ.get("COLUMNS") or sys.stderr.isatty():
        return None
    return PIPE_WIDTH


# Bound to the terminal's stderr now, so progress bars still show while library_chatter_to_log
# sends the libraries' own stderr output (tqdm bars, notices) to the log file.
console = Console(file=sys.stderr, highlight=False, width=console_width())


@contextmanager
def progress_bar(label: str, total: int) -> Iterator[Callable[[int], None]]:
    columns = (TextColumn(f"{label:<12}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task(label, total=total)
        yield lambda n: progress.advance(task, n)


def make_run_dir(log_root: str, run_name: str | None) -> Path:
    name = run_name or datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir = Path(log_root).absolute() / name
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def setup_logging(run_dir: Path, filename: str) -> Path:
    """Everything at INFO+ goes to the run's log file; the console shows warnings only."""
    path = run_dir / filename
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    for handler in list(root.handlers):
        if getattr(handler, "_vlmq", False):
            root.removeHandler(handler)
    file_handler = logging.FileHandler(path)
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    file_handler._vlmq = True  # type: ignore[attr-defined]
    root.addHandler(file_handler)
    return path


def _gb(n: int) -> str:
    return f"{n / 1e9:.3f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


def quantize_summary(manifest: dict[str, Any]) -> Table:
    table = Table(title="vlmq quantize" + (" (DEMO model)" if manifest.get("demo") else ""))
    table.add_column("item")
    table.add_column("value", overflow="fold")
    modules = manifest["modules"]
    table.add_row("quantized linears (int8 W8A8)", str(len(modules["quantized"])))
    fallback = modules.get("fallback_bf16") or []
    table.add_row("kept bf16 (vision, merger, embed, lm_head)", str(len(modules["excluded"]) - len(fallback)))
    if fallback:
        table.add_row("LM linears kept bf16 (quant.max_kl)", str(len(fallback)))
    cal = manifest["calibration"]
    table.add_row("calibration", f"{cal['samples']} samples, {cal['images']} images, {cal['tokens']} tokens, "
                                 f"skipped {sum(cal['skipped'].values())}")
    table.add_row("size bf16 snapshot", _gb(manifest["sizes"]["bf16_safetensors_bytes"]))
    for fmt, info in manifest["exports"].items():
        table.add_row(f"size {fmt}", _gb(info["bytes"]))
    for fmt, info in manifest["exports"].items():
        if "fidelity" in info:
            table.add_row(f"fidelity {fmt}", fidelity_line(info["fidelity"]))
    for stage, seconds in manifest["timings_s"].items():
        table.add_row(f"time {stage}", f"{seconds:.2f} s")
    for key, value in manifest["peak_memory"].items():
        shown = ", ".join(f"{v:.2f}" for v in value) if isinstance(value, list) else f"{value:.2f}"
        table.add_row(key, shown)
    table.add_row("export", manifest["export_dir"])
    table.add_row("logs", manifest["run_dir"])
    return table


def fidelity_line(fid: dict[str, Any]) -> str:
    """e.g. 'KL 0.025, top-1 0.912, ppl +2.3 % (8 held-out samples, 2400 tokens)'."""
    ppl = f", ppl {fid['ppl_delta_pct']:+.1f} %" if fid.get("ppl_delta_pct") is not None else ""
    where = "held-out" if fid.get("held_out", True) else "calibration (too few samples to hold out)"
    return (f"KL {fid['kl_mean']:.3g}, top-1 {fid['top1']:.3f}{ppl} vs bf16 "
            f"({fid['samples']} {where} samples, {fid['tokens']} tokens)")


class _LogWriter:
    def __init__(self, logger: logging.Logger) -> None:
        self.logger = logger

    def write(self, text: str) -> int:
        if text.strip():
            self.logger.info(text.rstrip())
        return len(text)

    def flush(self) -> None:
        pass


@contextmanager
def library_chatter_to_log(name: str = "vlmq.lib") -> Iterator[None]:
    """Route libraries' prints and warnings (ModelOpt is chatty) to the log file, not the terminal."""
    import contextlib
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    logger = logging.getLogger(name)
    writer = _LogWriter(logger)
    with warnings.catch_warnings(), contextlib.redirect_stdout(writer), contextlib.redirect_stderr(writer):
        warnings.simplefilter("always")
        warnings.showwarning = lambda msg, cat, *_a, **_k: logger.warning("%s: %s", cat.__name__, msg)
        yield
