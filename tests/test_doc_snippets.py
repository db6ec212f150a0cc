"""The docs' code blocks run: a doc and the program cannot disagree unnoticed.

Convention (README.md and docs/*.md): the line before a fenced ```bash / ```python block says what it is:

    <!-- run: cpu -->                  run here, in the project's venv, on a fresh demo export
    <!-- run: vllm -->                 a python block run with the vLLM CPU venv's python (.venv-vllm)
    <!-- run: no, <why> -->            not runnable on a CPU machine (a GPU, the 3B download, a server, ...)
    <!-- run: cpu; expect: TEXT -->    ... and TEXT must appear in what it prints (stdout + stderr)

Every bash/python block must carry one (`test_every_code_block_says_whether_it_runs`). Runnable blocks run
in a tmp working directory laid out as a new user's checkout after `make demo`: `.venv` (a link to this
repository's), and `models/vlmq_demo/quantized/w8a8_int8_sq` made by `vlmq quantize --force` (what
`make demo` runs). Bash blocks run with `bash -eo pipefail`; python blocks as a script (`__main__`). A block
fails the test when it exits non-zero or its `expect` text is missing.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import REPO_ROOT, cli_env, describe, run_cli

DOCS = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
MARK = re.compile(r"^<!--\s*run:\s*(?P<mode>[a-z]+)\s*(?:[,;]\s*(?P<rest>.*?))?\s*-->\s*$")
FENCE = re.compile(r"^```(?P<lang>[\w-]*)\s*$")
CODE_LANGS = {"bash", "sh", "shell", "console", "python", "py"}
SNIPPET_TIMEOUT_S = 240


@dataclass
class Block:
    doc: Path
    line: int            # 1-based line of the opening fence
    lang: str
    mode: str | None     # cpu | vllm | no | None (unmarked)
    note: str            # the reason (no) or the options (cpu/vllm: "expect: TEXT")
    code: str

    @property
    def id(self) -> str:
        return f"{self.doc.relative_to(REPO_ROOT).as_posix()}:{self.line}"

    @property
    def expect(self) -> str | None:
        found = re.search(r"expect:\s*(.+)$", self.note)
        return found.group(1).strip() if found else None


def code_blocks(doc: Path) -> list[Block]:
    lines = doc.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        fence = FENCE.match(lines[i])
        if not fence:
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == "```"), None)
        assert end is not None, f"{doc}:{i + 1}: unclosed code block"
        prev = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        mark = MARK.match(prev.strip())
        blocks.append(Block(doc, i + 1, fence["lang"], mark["mode"] if mark else None,
                            (mark["rest"] or "") if mark else "", "\n".join(lines[i + 1:end]) + "\n"))
        i = end + 1
    return blocks


ALL_BLOCKS = [b for doc in DOCS for b in code_blocks(doc)]
RUNNABLE = [b for b in ALL_BLOCKS if b.mode in ("cpu", "vllm")]


def test_every_code_block_says_whether_it_runs():
    problems = []
    for b in ALL_BLOCKS:
        if b.lang not in CODE_LANGS:
            continue   # listings, trees, sample output
        if b.mode not in ("cpu", "vllm", "no"):
            problems.append(f"{b.id}: ```{b.lang} block without <!-- run: cpu|vllm|no, why --> on the line before")
        elif b.mode == "no" and not b.note:
            problems.append(f"{b.id}: `run: no` needs a reason")
        elif b.mode == "vllm" and b.lang not in ("python", "py"):
            problems.append(f"{b.id}: `run: vllm` blocks are python")
    assert not problems, "\n".join(problems)
    assert len(RUNNABLE) >= 4, [b.id for b in RUNNABLE]   # the parser found the marked blocks


@pytest.fixture(scope="module")
def user_checkout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A working directory as after `make demo`: .venv and the demo export at its default path."""
    work = tmp_path_factory.mktemp("doc_snippets")
    (work / ".venv").symlink_to(Path(sys.executable).parent.parent)
    result = run_cli(["quantize", "--force"], cwd=work)   # `make demo` = vlmq quantize --force $(ARGS)
    assert result.rc == 0, describe(result)
    assert (work / "models/vlmq_demo/quantized/w8a8_int8_sq/compressed_tensors/config.json").is_file()
    return work


def run_block(block: Block, work: Path, vllm_python: Path | None) -> subprocess.CompletedProcess:
    env = cli_env()
    env["PATH"] = f"{work / '.venv' / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    if block.lang in ("python", "py"):
        script = work / f"snippet_{block.doc.stem}_{block.line}.py"
        script.write_text(block.code)
        if block.mode == "vllm":
            env = {k: v for k, v in env.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
            command = [str(vllm_python), str(script)]
        else:
            command = [str(work / ".venv" / "bin" / "python"), str(script)]
    else:
        command = ["bash", "-eo", "pipefail", "-c", block.code]
    return subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, timeout=SNIPPET_TIMEOUT_S,
                          stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("block", RUNNABLE, ids=[b.id for b in RUNNABLE])
def test_doc_block_runs(block: Block, user_checkout: Path, request: pytest.FixtureRequest):
    vllm_python = request.getfixturevalue("vllm_python") if block.mode == "vllm" else None
    proc = run_block(block, user_checkout, vllm_python)
    output = proc.stdout + proc.stderr
    context = (f"{block.id} ({block.mode}) exited {proc.returncode}\n--- block\n{block.code}--- stdout\n"
               f"{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-6000:]}")
    assert proc.returncode == 0, context
    assert "Traceback" not in output, context
    if block.expect:
        assert block.expect in output, f"expected {block.expect!r} in the output\n{context}"
