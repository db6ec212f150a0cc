"""The `vlmq check` report opened in headless Chromium: images decode, tables and plots are there, offline.

Needs Debian's `chromium` (CI's .ci/run installs it). Missing chromium fails the test, unless
VLMQ_SKIP_BROWSER=1 is set, which skips it with that reason.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import describe
from test_check import CheckRun, check_export, check_pass  # noqa: F401  (session fixtures shared with test_check)

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--virtual-time-budget=5000"]


def chromium() -> str:
    found = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").is_file() else None)
    if found:
        return found
    if os.environ.get("VLMQ_SKIP_BROWSER") == "1":
        pytest.skip("VLMQ_SKIP_BROWSER=1: chromium is not installed, report not opened in a browser")
    pytest.fail("chromium not found: install it (apt-get update && apt-get install -y chromium; CI's .ci/run does) "
                "or set VLMQ_SKIP_BROWSER=1 to skip this test")


def run_chromium(args: list[str], profile: Path) -> subprocess.CompletedProcess:
    return subprocess.run([chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
                          capture_output=True, text=True, timeout=120)


def test_report_renders_in_headless_chromium(check_pass: CheckRun, tmp_path: Path):  # noqa: F811
    assert check_pass.result.rc == 0, describe(check_pass.result)
    # A copy outside the run dir: the report must stand alone (no relative plot or image files).
    report = tmp_path / "report.html"
    shutil.copy(check_pass.run_dir / "report.html", report)
    source = report.read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//|file:)""", source), "report must not fetch anything"

    dom = run_chromium(["--dump-dom", report.as_uri()], tmp_path / "profile")
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout
    imgs = re.findall(r"<img\b[^>]*>", html)
    widths = [re.search(r'data-natural-width="(\d+)"', tag) for tag in imgs]
    assert imgs and all(widths), "the report's load script did not run (no data-natural-width on images)"
    broken = [t[:80] for t, w in zip(imgs, widths, strict=True) if int(w.group(1)) == 0]
    assert not broken, broken
    status = re.search(r'id="img-status"[^>]*data-decoded="(\d+)"[^>]*data-total="(\d+)"', html)
    assert status and status.group(1) == status.group(2) == str(len(imgs)), status and status.groups()

    results = check_pass.results
    plots = [t for t in imgs if 'class="plot"' in t]
    samples = [t for t in imgs if 'class="sample"' in t]
    assert len(plots) == 3
    assert len(samples) == sum(s["image"] is not None for s in results["samples"]) >= 5
    for table in ("run", "gates", "metrics", "samples", "layers", "versions"):
        assert f'<table id="{table}">' in html, table
    rows = re.search(r'<table id="samples">.*?</table>', html, re.S).group(0).count("<tr>") - 1
    assert rows == len(results["samples"])
    assert re.search(r'<table id="layers">.*?</table>', html, re.S).group(0).count("<tr>") - 1 == 14
    assert 'id="verdict">PASS<' in html and 'id="manifest"' in html

    shot = tmp_path / "report.png"
    done = run_chromium(["--window-size=1300,2600", f"--screenshot={shot}", report.as_uri()], tmp_path / "profile2")
    assert done.returncode == 0 and shot.is_file(), done.stderr[-2000:]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 50_000
    keep = os.environ.get("VLMQ_KEEP_SCREENSHOT")
    if keep:
        shutil.copy(shot, keep)
