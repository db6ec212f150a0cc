"""Hand both checkpoints to lmms-eval (`vlmq check --lmms-tasks mmmu_val,docvqa_val`).

Each model runs in its own subprocess, `python -m vlmq.evaluate.lmms`, which builds lmms-eval's
`qwen2_5_vl` model wrapper around the bf16 snapshot (processor, chat template, generation loop) and,
for the W8A8 run, swaps the wrapped model for the vlmq runtime model loaded from the export
(`vlmq.runtime.load_w8a8`: real int8 GEMMs; transformers alone cannot run the ModelOpt format).
Then `lmms_eval.evaluator.simple_evaluate(model=wrapper, tasks=...)`; scores land in <out>/<label>.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from vlmq.config import ConfigError

LMMS_MODEL = "qwen2_5_vl"
INSTALL_HINT = "pip install lmms-eval qwen-vl-utils (https://github.com/EvolvingLMMs-Lab/lmms-eval)"


class LmmsError(ConfigError):
    """lmms-eval cannot be used for this run (one line, exit code 2)."""


def lmms_available() -> bool:
    return importlib.util.find_spec("lmms_eval") is not None


def check_handoff(demo: bool, available: bool | None = None) -> None:
    """Refuse early (before any model is loaded) when the hand-off cannot produce meaningful scores."""
    if demo:
        raise LmmsError("--lmms-tasks needs a real snapshot: the demo model has random weights "
                        "(run `vlmq fetch-model` and `vlmq quantize` first)")
    if not (lmms_available() if available is None else available):
        raise LmmsError(f"--lmms-tasks needs lmms-eval, which is not installed: {INSTALL_HINT}")


def build_command(tasks: list[str], baseline: Path, out_json: Path, w8a8: Path | None = None,
                  device: str = "auto", limit: int | None = None, python: str = sys.executable) -> list[str]:
    """The argv of one hand-off run (bf16 when w8a8 is None)."""
    cmd = [python, "-m", "vlmq.evaluate.lmms", "--pretrained", str(baseline), "--tasks", ",".join(tasks),
           "--device", device, "--out", str(out_json)]
    if w8a8 is not None:
        cmd += ["--w8a8", str(w8a8)]
    if limit is not None:
        cmd += ["--limit", str(limit)]
    return cmd


def build_commands(tasks: list[str], baseline: Path, w8a8: Path, out_dir: Path, device: str = "auto",
                   limit: int | None = None) -> dict[str, list[str]]:
    return {"bf16": build_command(tasks, baseline, out_dir / "bf16.json", None, device, limit),
            "w8a8": build_command(tasks, baseline, out_dir / "w8a8.json", w8a8, device, limit)}


def task_scores(raw: dict[str, Any]) -> dict[str, dict[str, float]]:
    """simple_evaluate's `results` section -> task -> numeric metrics (stderr and aliases dropped)."""
    out = {}
    for task, metrics in (raw.get("results") or {}).items():
        out[task] = {k: v for k, v in metrics.items()
                     if isinstance(v, (int, float)) and not isinstance(v, bool) and "stderr" not in k}
    return out


def run_handoff(tasks: list[str], baseline: Path, w8a8: Path, out_dir: Path, device: str = "auto",
                limit: int | None = None) -> dict[str, Any]:
    """Run both hand-offs one after the other; a failing run records its error instead of scores."""
    out_dir.mkdir(parents=True, exist_ok=True)
    commands = build_commands(tasks, baseline, w8a8, out_dir, device, limit)
    scores: dict[str, Any] = {}
    for label, cmd in commands.items():
        log_file = out_dir / f"{label}.log"
        with log_file.open("w") as fh:
            rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT).returncode
        out_json = Path(cmd[cmd.index("--out") + 1])
        if rc == 0 and out_json.is_file():
            scores[label] = task_scores(json.loads(out_json.read_text()))
        else:
            scores[label] = {"error": f"lmms-eval exited with {rc}; see {log_file}"}
    return {"tasks": tasks, "commands": commands, "scores": scores}


def evaluate(pretrained: Path, tasks: list[str], device: str, w8a8: Path | None, limit: int | None) -> dict:
    """In the subprocess: lmms-eval's wrapper around the snapshot, optionally running the W8A8 model."""
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.models import get_model

    from vlmq.models.load import pick_device

    dev = pick_device(device)
    wrapper = get_model(LMMS_MODEL)(pretrained=str(pretrained), device=dev, device_map=dev)
    if w8a8 is not None:
        from vlmq.runtime.loader import load_w8a8

        model, _, _ = load_w8a8(w8a8, dev)
        wrapper._model = model  # the wrapper reads .model -> ._model for generate()
        wrapper._config = model.config
    return simple_evaluate(model=wrapper, tasks=tasks, batch_size=1, limit=limit, log_samples=False)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vlmq.evaluate.lmms", description=__doc__.splitlines()[0])
    p.add_argument("--pretrained", type=Path, required=True, help="the bf16 snapshot (processor + template)")
    p.add_argument("--w8a8", type=Path, help="run this W8A8 export through vlmq.runtime instead of the bf16 model")
    p.add_argument("--tasks", required=True)
    p.add_argument("--device", default="auto")
    p.add_argument("--limit", type=int)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    if not lmms_available():
        print(f"vlmq: error: lmms-eval is not installed: {INSTALL_HINT}", file=sys.stderr)
        return 2
    raw = evaluate(args.pretrained, args.tasks.split(","), args.device, args.w8a8, args.limit)
    args.out.write_text(json.dumps(raw, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
