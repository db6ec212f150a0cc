"""Accuracy through the harnesses users trust: `vlmq check --lm-eval-tasks a,b` / `--lmms-tasks c,d`.

Each harness runs twice, as its own command line (`python -m lm_eval ...` / `python -m lmms_eval ...`) in the
harness venv (.venv-vllm, `make setup-harness`): once on the bf16 snapshot, once on the W8A8 export, both
through the harness's `vllm` model adapter (vLLM loads compressed-tensors W8A8 with its int8 kernels, the
engine users deploy). The tasks are the harness's own (hub tasks need network or a warm HF cache) or vlmq's
local tasks in src/vlmq/data/tasks/ (task YAML with local data_files; no hub). Scores are read back from
the harness's results JSON; recovery = W8A8 / bf16 for a higher-is-better metric, bf16 / W8A8 otherwise.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlmq.config import ConfigError

TASKS_ROOT = Path(__file__).resolve().parent.parent / "data" / "tasks"
INSTALL = "make setup-harness (bash .ci/setup_harness.sh: lm-eval 0.4.13 and lmms-eval 0.7.3 into .venv-vllm)"
RUN_TIMEOUT_S = 3 * 3600
MAX_MODEL_LEN = 4096


@dataclass(frozen=True)
class Harness:
    name: str                 # key in results.json
    label: str                # how users call it
    module: str               # python -m <module>
    flag: str                 # the vlmq check option
    model_key: str            # the vllm adapter's argument naming the checkpoint
    extra_model_args: tuple[str, ...] = ()

    @property
    def tasks_dir(self) -> Path:
        return TASKS_ROOT / self.name


HARNESSES = {
    "lm_eval": Harness("lm_eval", "lm-eval", "lm_eval", "--lm-eval-tasks", "pretrained"),
    # lmms-eval's vllm adapter generates max(task's max_new_tokens, this) tokens: keep its 4096 default off.
    "lmms_eval": Harness("lmms_eval", "lmms-eval", "lmms_eval", "--lmms-tasks", "model", ("max_new_tokens=32",)),
}


class HarnessError(ConfigError):
    """A harness run that cannot start (one line, exit code 2)."""


# ---------------------------------------------------------------- before any model is loaded

def harness_python() -> Path | None:
    """The harness venv's python: $VLMQ_HARNESS_PYTHON, else .venv-vllm in the working directory or the checkout."""
    env = os.environ.get("VLMQ_HARNESS_PYTHON")
    candidates = [Path(env)] if env else [Path.cwd() / ".venv-vllm" / "bin" / "python",
                                          Path(__file__).resolve().parents[3] / ".venv-vllm" / "bin" / "python"]
    return next((p for p in candidates if p.is_file() and os.access(p, os.X_OK)), None)


def harness_info(h: Harness, python: Path | None) -> dict[str, str]:
    """{"python", "version", "package_dir"} of the installed harness, or a one-line HarnessError."""
    if python is None:
        raise HarnessError(f"{h.flag} needs {h.label} in the harness venv, and there is none (.venv-vllm/bin/python "
                           f"or $VLMQ_HARNESS_PYTHON): run {INSTALL}")
    code = (f"import importlib.metadata as m, importlib.util as u; s = u.find_spec({h.module!r}); "
            f"print(m.version({h.module!r}) if s else ''); print(s.submodule_search_locations[0] if s else '')")
    proc = subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=120, env=clean_env())
    version, _, package_dir = proc.stdout.strip().partition("\n")
    if proc.returncode != 0 or not version:
        raise HarnessError(f"{h.flag} needs {h.label}, which {python} cannot import: run {INSTALL}")
    return {"python": str(python), "version": version, "package_dir": package_dir.strip()}


def local_tasks(h: Harness) -> dict[str, Path]:
    """vlmq's local tasks for this harness: task name -> its YAML."""
    out = {}
    for path in sorted(h.tasks_dir.glob("*.yaml")):
        match = re.search(r"^task:\s*['\"]?([\w.-]+)", path.read_text(encoding="utf-8"), re.M)
        if match:
            out[match.group(1)] = path
    return out


def harness_task_names(package_dir: Path) -> set[str]:
    """Every task, group and tag name that the harness's own task YAMLs declare."""
    names: set[str] = set()
    pattern = re.compile(r"^(?:task|group|tag|\s*-)\s*:?\s*['\"]?([\w.-]+)['\"]?\s*$", re.M)
    for path in (package_dir / "tasks").rglob("*.yaml"):
        try:
            names.update(pattern.findall(path.read_text(encoding="utf-8", errors="replace")))
        except OSError:
            continue
    return names


def resolve_tasks(h: Harness, spec: str, info: dict[str, str]) -> list[str]:
    """The comma-separated task list, each one a vlmq local task or one the harness declares."""
    tasks = list(dict.fromkeys(t.strip() for t in spec.split(",") if t.strip()))
    if not tasks:
        raise HarnessError(f"{h.flag} needs at least one task name")
    local = local_tasks(h)
    unknown = [t for t in tasks if t not in local]
    if unknown:
        declared = harness_task_names(Path(info["package_dir"]))
        missing = [t for t in unknown if t not in declared]
        if missing:
            raise HarnessError(f"unknown {h.label} task '{missing[0]}': not a vlmq local task ({', '.join(local)}) nor "
                               f"declared by {h.label} {info['version']} in {info['python']} (to update it: {INSTALL})")
    return tasks


def check_loadable(model_dir: Path, flag: str) -> None:
    """vLLM loads compressed-tensors; ModelOpt's format is refused before anything runs."""
    config = json.loads((model_dir / "config.json").read_text())
    method = (config.get("quantization_config") or {}).get("quant_method")
    if method != "compressed-tensors":
        raise HarnessError(f"{flag} runs the export in vLLM, which loads compressed-tensors checkpoints; {model_dir} "
                           f"is {method}: pass --model-dir <export>/compressed_tensors")


# ---------------------------------------------------------------- the runs

def max_model_len(model_dir: Path) -> int:
    config = json.loads((model_dir / "config.json").read_text())
    text = config.get("text_config") or config
    return min(int(text.get("max_position_embeddings") or config.get("max_position_embeddings") or MAX_MODEL_LEN),
               MAX_MODEL_LEN)


def harness_dtype(device: str) -> str:
    """auto runs each checkpoint in its own dtype (fp16 where vlmq's export.dtype=auto chose it); on an x86 CPU
    without native bf16 both models run in float32 instead, where vLLM's bf16 GEMMs are several times slower."""
    from vlmq.cpu import slow_bf16

    return "float32" if device == "cpu" and slow_bf16() else "auto"


def build_command(h: Harness, python: str, tasks: list[str], model_dir: Path, out_dir: Path, device: str = "cpu",
                  limit: int | None = None) -> list[str]:
    """The harness's own command line for one model (what a user would type), in `harness_dtype(device)`."""
    args = [f"{h.model_key}={model_dir}", f"dtype={harness_dtype(device)}", f"max_model_len={max_model_len(model_dir)}",
            *h.extra_model_args, *(["enforce_eager=True"] if device == "cpu" else [])]
    cmd = [python, "-m", h.module, "--model", "vllm", "--model_args", ",".join(args), "--tasks", ",".join(tasks),
           "--include_path", str(h.tasks_dir), "--batch_size", "auto" if h.name == "lm_eval" else "1",
           "--output_path", str(out_dir), "--log_samples"]
    return cmd + (["--limit", str(limit)] if limit is not None else [])


def clean_env() -> dict[str, str]:
    """This process's environment without the project venv's Python variables."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}


def run_env(device: str, offline: bool) -> dict[str, str]:
    env = clean_env()
    if offline:   # vlmq's local tasks only: nothing may reach the hub
        env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    if device == "cpu":   # vLLM's CPU backend: a small KV cache, the engine in this process (starts in seconds)
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        env.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    return env


def read_results(out_dir: Path) -> dict[str, Any] | None:
    """The newest results JSON the harness wrote under out_dir (it adds a per-model folder and a timestamp)."""
    found = sorted(out_dir.rglob("*results*.json"), key=lambda p: p.stat().st_mtime)
    return json.loads(found[-1].read_text()) if found else None


def task_scores(raw: dict[str, Any]) -> dict[str, dict[str, float]]:
    """results -> task -> numeric metrics: those the task declares in `higher_is_better` when it does (lm-eval
    also reports e.g. sample_len), stderr dropped, the default filter's ',none' suffix dropped."""
    out = {}
    declared = raw.get("higher_is_better") or {}
    for task, metrics in (raw.get("results") or {}).items():
        names = declared.get(task)
        out[task] = {k.removesuffix(",none"): float(v) for k, v in metrics.items()
                     if isinstance(v, (int, float)) and not isinstance(v, bool) and "stderr" not in k
                     and (not names or k.split(",")[0] in names)}
    return out


def recovery(bf16: float | None, w8a8: float | None, higher_is_better: bool) -> float | None:
    """W8A8 / bf16 when higher is better, bf16 / W8A8 when lower is (perplexity); None when undefined."""
    if bf16 is None or w8a8 is None or not (math.isfinite(bf16) and math.isfinite(w8a8)):
        return None
    num, den = (w8a8, bf16) if higher_is_better else (bf16, w8a8)
    return num / den if den > 0 else None


def recoveries(scores: dict[str, dict], hib: dict[str, dict], tasks: list[str]) -> tuple[dict, dict]:
    """({task: {metric: recovery}}, {task: primary metric}) for every task both runs scored; the primary
    metric is the first one the task lists (acc, word_perplexity, anls, ...)."""
    base, test = scores.get("bf16") or {}, scores.get("w8a8") or {}
    rec, primary = {}, {}
    for task in base:
        if task not in test:
            continue
        signs = hib.get(task, {})
        rec[task] = {m: recovery(v, test[task].get(m), bool(signs.get(m.split(",")[0], True)))
                     for m, v in base[task].items()}
        if task in tasks and rec[task]:
            primary[task] = next(iter(rec[task]))
    return rec, primary


def core_binds(device: str, env: dict[str, str]) -> list[str] | None:
    """On a CPU with 2+ cores (and no bind set by the user), the two runs go side by side, each vLLM engine
    bound to its half of the cores (vLLM's own 'auto' would put both on core 0); else None: one after the other."""
    n = os.cpu_count() or 1
    if device != "cpu" or n < 2 or "VLLM_CPU_OMP_THREADS_BIND" in env:
        return None
    half = n // 2
    return [f"0-{half - 1}" if half > 1 else "0", f"{half}-{n - 1}" if n - half > 1 else str(half)]


def run_models(jobs: list[tuple[list[str], Path, dict[str, str], Path]], parallel: bool) -> list[int]:
    """Each (command, cwd, env, log file) as a subprocess; side by side when `parallel`; exit codes (124: timeout)."""
    def start(cmd, cwd, env, log_file):
        with log_file.open("w") as fh:
            return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL)

    def finish(proc: subprocess.Popen) -> int:
        try:
            return proc.wait(timeout=RUN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            return 124

    if parallel:
        procs = [start(*job) for job in jobs]
        return [finish(p) for p in procs]
    return [finish(start(*job)) for job in jobs]


def run_harness(h: Harness, tasks: list[str], info: dict[str, str], baseline: Path, w8a8: Path, out_dir: Path,
                device: str, limit: int | None = None) -> dict[str, Any]:
    """Both models through the harness (side by side on a CPU, see core_binds); a failing run records its error."""
    device = "cpu" if device in ("auto", "cpu") and not _cuda() else "cuda"
    offline = all(t in local_tasks(h) for t in tasks)
    env = run_env(device, offline)
    binds = core_binds(device, env)
    models = {"bf16": baseline, "w8a8": w8a8}
    commands = {k: build_command(h, info["python"], tasks, m, out_dir / k, device, limit) for k, m in models.items()}
    jobs = []
    for i, label in enumerate(models):
        (out_dir / label).mkdir(parents=True, exist_ok=True)
        job_env = {**env, "VLLM_CPU_OMP_THREADS_BIND": binds[i]} if binds else env
        jobs.append((commands[label], h.tasks_dir, job_env, out_dir / f"{label}.log"))
    codes = dict(zip(models, run_models(jobs, parallel=binds is not None), strict=True))
    scores, samples, hib, errors = {}, {}, {}, {}
    for label, rc in codes.items():
        raw = read_results(out_dir / label) if rc == 0 else None
        if raw is None:
            errors[label] = f"{h.label} exited with {rc}; see {out_dir / f'{label}.log'}"
            continue
        scores[label] = task_scores(raw)
        samples[label] = {t: (raw.get("n-samples") or {}).get(t, {}).get("effective") for t in tasks}
        hib.update(raw.get("higher_is_better") or {})
    rec, primary = recoveries(scores, hib, tasks)
    return {"harness": h.label, "version": info["version"], "adapter": "vllm", "tasks": tasks, "limit": limit,
            "offline": offline, "side_by_side": binds is not None, "cwd": str(h.tasks_dir), "commands": commands,
            "scores": scores, "samples": samples, "higher_is_better": hib, "recovery": rec, "primary": primary,
            "errors": errors}


def prepare(specs: dict[str, str | None], model_dir: Path) -> list[tuple[Harness, list[str], dict[str, str]]]:
    """The requested harness runs, checked before any model is loaded: harness importable, tasks known,
    export loadable by vLLM. `specs` maps a harness name to its comma-separated tasks (None: not requested)."""
    wanted = [(HARNESSES[name], spec) for name, spec in specs.items() if spec is not None]
    if not wanted:
        return []
    check_loadable(model_dir, wanted[0][0].flag)
    python = harness_python()
    out = []
    for h, spec in wanted:
        info = harness_info(h, python)
        out.append((h, resolve_tasks(h, spec, info), info))
    return out


def run_all(prepared: list, baseline: Path, w8a8: Path, run_dir: Path, device: str,
            limits: dict[str, int | None]) -> dict[str, dict[str, Any] | None]:
    """Every prepared harness on both models: {harness name: its result} (None for those not requested)."""
    results: dict[str, dict[str, Any] | None] = {name: None for name in HARNESSES}
    for h, tasks, info in prepared:
        results[h.name] = run_harness(h, tasks, info, baseline, w8a8, run_dir / h.name, device, limits.get(h.name))
    return results


def recovery_min(runs: list[dict[str, Any]]) -> float | None:
    """The worst primary-metric recovery over every requested task; None if any is missing or undefined."""
    values = [r["recovery"].get(t, {}).get(r["primary"].get(t, "")) for r in runs for t in r["tasks"]]
    return None if not values or any(v is None for v in values) else min(values)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()

