"""lm-eval and lmms-eval through `vlmq check` (src/vlmq/evaluate/harness.py): the local tasks' data, the
commands, scores and recovery read back, the one-line refusals, and lmms-eval for real on the demo model and
its export (the harness venv is .venv-vllm, `make setup-harness`). The real-weights lm-eval run is in
tests/test_real_weights.py, the served one in tests/test_vllm_serve.py."""

from __future__ import annotations

import functools
import json
import os
import stat
import tempfile
from pathlib import Path

import pytest
import yaml

from conftest import cli_env, describe, run_cli
from test_check import run_inprocess
from vlmq.evaluate import harness
from vlmq.evaluate.check import apply_gates
from vlmq.evaluate.report import validate

LMMS_LIMIT = 3
SMALL_CHECK = ["infer.text_prompts=[]", "infer.image_prompts=[]", "infer.heldout_samples=1", "infer.max_new_tokens=2"]
# The default recipe rotates (an online Hadamard on down_proj's input) and vLLM's CPU build has no kernel for it
# (tests/vllm/vllm_probe.py supplies one in its own process only); these tests are about the harnesses, so the
# demo export is SmoothQuant alone, which vLLM's CPU build runs as it is.
SMOOTHQUANT_ONLY = "quant.steps=[calibrate,smooth,round]"


@functools.lru_cache(maxsize=1)
def demo_export() -> Path:
    """A SmoothQuant demo export in both formats, built once per process (test_vllm_serve shares it)."""
    from vlmq.cli import main

    work = Path(tempfile.mkdtemp(prefix="vlmq-harness-demo-"))
    rc = main(["quantize", f"log_root={work / 'logs'}", f"export.dir={work / 'export'}", "run_name=q",
               SMOOTHQUANT_ONLY, "export.formats=[compressed_tensors,modelopt_hf]"])
    assert rc == 0
    return work / "export"


class _Loader(yaml.SafeLoader):
    """The task YAMLs carry lmms-eval's `!function module.name` tags: read them as strings."""


_Loader.add_constructor("!function", lambda loader, node: f"!function {loader.construct_scalar(node)}")


def _task_yaml(path: Path) -> dict:
    return yaml.load(path.read_text(), Loader=_Loader)


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="session")
def harness_venv() -> Path:
    python = harness.harness_python()
    if python is not None:
        return python
    msg = f"no harness venv (.venv-vllm/bin/python or $VLMQ_HARNESS_PYTHON): run {harness.INSTALL}"
    if os.environ.get("VLMQ_SKIP_HARNESS") == "1":
        pytest.skip(f"VLMQ_SKIP_HARNESS=1 and {msg}")
    pytest.fail(msg + ", or set VLMQ_SKIP_HARNESS=1 to skip this test locally", pytrace=False)


# ---------------------------------------------------------------- local tasks, commands, scores

def test_local_tasks_are_harness_yaml_over_local_files():
    lm, lmms = harness.local_tasks(harness.HARNESSES["lm_eval"]), harness.local_tasks(harness.HARNESSES["lmms_eval"])
    assert set(lm) == {"vlmq_text_mc", "vlmq_text_ppl"} and set(lmms) == {"vlmq_demo_caption"}
    for name, path in {**lm, **lmms}.items():
        cfg = _task_yaml(path)
        assert cfg["task"] == name and cfg["dataset_path"] == "json", cfg
        data = path.parent / cfg["dataset_kwargs"]["data_files"][cfg["test_split"]]
        assert data.is_file() and len(_jsonl(data)) >= 16, data
    mc = _jsonl(lm["vlmq_text_mc"].parent / "text_mc.jsonl")
    assert all(len(r["choices"]) == 4 and 0 <= r["label"] < 4 and len(set(r["choices"])) == 4 for r in mc)
    assert len({r["label"] for r in mc}) == 4   # the right answer is not always in the same place
    captions = _jsonl(lmms["vlmq_demo_caption"].parent / "demo_caption.jsonl")
    for r in captions:
        assert (lmms["vlmq_demo_caption"].parent / r["image"]).resolve().is_file() and r["answers"], r


def test_caption_scoring_helpers():
    import importlib.util

    spec = importlib.util.spec_from_file_location("task_utils", harness.TASKS_ROOT / "lmms_eval" / "utils.py")
    utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(utils)
    doc = {"answers": ["Three houses in the snow.", "A drawing of houses."]}
    assert utils.process_results(doc, ["three houses in the snow"]) == {"caption_f1": 1.0, "exact_match": 1.0}
    half = utils.process_results(doc, ["Houses on a beach at night"])
    assert 0 < half["caption_f1"] < 1 and half["exact_match"] == 0.0
    assert utils.process_results(doc, [""]) == {"caption_f1": 0.0, "exact_match": 0.0}


def test_command_is_the_harness_own_cli(tmp_path: Path):
    (tmp_path / "config.json").write_text(json.dumps({"text_config": {"max_position_embeddings": 32768}}))
    h = harness.HARNESSES["lm_eval"]
    cmd = harness.build_command(h, "/py", ["vlmq_text_mc"], tmp_path, tmp_path / "out", "cpu", 8)
    assert cmd == ["/py", "-m", "lm_eval", "--model", "vllm", "--model_args",
                   f"pretrained={tmp_path},dtype={harness.harness_dtype('cpu')},max_model_len=4096,enforce_eager=True",
                   "--tasks", "vlmq_text_mc", "--include_path", str(h.tasks_dir), "--batch_size", "auto",
                   "--output_path", str(tmp_path / "out"), "--log_samples", "--limit", "8"]
    lmms = harness.build_command(harness.HARNESSES["lmms_eval"], "/py", ["a", "b"], tmp_path, tmp_path, "cuda")
    assert lmms[lmms.index("--model_args") + 1].startswith(f"model={tmp_path},") and "enforce_eager" not in str(lmms)
    assert "--limit" not in lmms and lmms[lmms.index("--tasks") + 1] == "a,b"
    assert ",dtype=auto," in lmms[lmms.index("--model_args") + 1]   # a GPU runs each checkpoint in its own dtype


def test_cpu_without_native_bf16_is_told_apart():
    from vlmq.cpu import slow_bf16

    assert slow_bf16(frozenset({"avx2", "fma"}), "x86_64")
    assert not slow_bf16(frozenset({"avx2", "avx512f", "avx512_bf16"}), "x86_64")
    assert not slow_bf16(frozenset({"amx_bf16"}), "x86_64")
    assert not slow_bf16(frozenset(), "aarch64")


def test_scores_recovery_and_its_gate():
    hib = {"mc": {"acc": True, "acc_norm": True}, "ppl": {"word_perplexity": False, "bits_per_byte": False}}
    raw = {"results": {"mc": {"alias": "mc", "sample_len": 16, "acc,none": 0.5, "acc_stderr,none": 0.1,
                              "acc_norm,none": 0.6},
                       "ppl": {"sample_len": 16, "word_perplexity,none": 20.0, "bits_per_byte,none": 1.0}},
           "higher_is_better": hib}
    base = harness.task_scores(raw)
    assert base == {"mc": {"acc": 0.5, "acc_norm": 0.6}, "ppl": {"word_perplexity": 20.0, "bits_per_byte": 1.0}}
    test = {"mc": {"acc": 0.45, "acc_norm": 0.6}, "ppl": {"word_perplexity": 25.0, "bits_per_byte": 1.1}}
    rec, primary = harness.recoveries({"bf16": base, "w8a8": test}, hib, ["mc", "ppl"])
    assert primary == {"mc": "acc", "ppl": "word_perplexity"}
    assert rec["mc"]["acc"] == pytest.approx(0.9) and rec["ppl"]["word_perplexity"] == pytest.approx(0.8)
    run = {"tasks": ["mc", "ppl"], "recovery": rec, "primary": primary}
    assert harness.recovery_min([run]) == pytest.approx(0.8)
    assert harness.recovery(0.0, 0.0, True) is None and harness.recovery(None, 1.0, False) is None
    assert harness.recovery_min([{**run, "recovery": {**rec, "mc": {"acc": None}}}]) is None
    gates, verdict = apply_gates({"recovery_min": 0.8}, {"min_recovery": 0.85})
    assert verdict == "fail" and gates[0]["metric"] == "recovery_min" and not gates[0]["passed"]
    assert apply_gates({"recovery_min": None}, {"min_recovery": 0.5})[1] == "fail"   # undefined never passes


# ---------------------------------------------------------------- refusals: one line, exit 2, before loading

def _one_line_error(rc: int, err: str, *needles: str) -> None:
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("vlmq: info:")]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("vlmq: error:"), err
    assert all(n in lines[0] for n in needles), err


def test_missing_harness_is_one_line_naming_the_install(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("VLMQ_HARNESS_PYTHON", str(tmp_path / "no-such-python"))
    ct = demo_export() / "compressed_tensors"
    rc, _, err = run_inprocess(["check", "--model-dir", str(ct), "--lmms-tasks", "vlmq_demo_caption",
                                f"log_root={tmp_path}", "run_name=m"], capsys)
    _one_line_error(rc, err, "lmms-eval", "make setup-harness")


def test_bad_harness_options_are_one_line(tmp_path, capsys):
    export = demo_export()
    for argv, needle in [
        (["--model-dir", str(export / "modelopt_hf"), "--lm-eval-tasks", "vlmq_text_mc"], "compressed-tensors"),
        (["--min-recovery", "0.9"], "--lm-eval-tasks"),
        (["--lm-eval-tasks", "vlmq_text_mc", "--lm-eval-limit", "0"], "--lm-eval-limit"),
        (["--lmms-tasks", "vlmq_demo_caption", "--min-recovery", "-1"], "--min-recovery"),
    ]:
        rc, _, err = run_inprocess(["check", *argv, f"log_root={tmp_path}", "run_name=b"], capsys)
        _one_line_error(rc, err, needle)


def test_unknown_task_is_one_line_naming_the_install(harness_venv, tmp_path, capsys):
    ct = demo_export() / "compressed_tensors"
    for flag, label in (("--lm-eval-tasks", "lm-eval"), ("--lmms-tasks", "lmms-eval")):
        rc, _, err = run_inprocess(["check", "--model-dir", str(ct), flag, "no_such_task_x",
                                    f"log_root={tmp_path}", "run_name=u"], capsys)
        _one_line_error(rc, err, f"unknown {label} task 'no_such_task_x'", "make setup-harness")


# ---------------------------------------------------------------- lmms-eval for real on the demo

@pytest.mark.slow
def test_lmms_eval_runs_on_demo_snapshot_and_export(harness_venv, tmp_path):
    """Both models through lmms-eval's vllm adapter on the local image task; scores land in results.json and the
    report. Random weights: the scores are ~0, so recovery is undefined (null) and the gate is left out."""
    ct = demo_export() / "compressed_tensors"
    result = run_cli(["check", "--model-dir", str(ct), "--lmms-tasks", "vlmq_demo_caption",
                      "--lmms-limit", str(LMMS_LIMIT), f"log_root={tmp_path}", "run_name=l", *SMALL_CHECK],
                     cwd=tmp_path, timeout=900)
    assert result.rc == 0, describe(result)
    r = json.loads((tmp_path / "l" / "results.json").read_text())
    assert not validate(r) and r["lm_eval"] is None
    run = r["lmms_eval"]
    assert run["harness"] == "lmms-eval" and run["version"] == "0.7.3" and run["errors"] == {}, run
    assert run["offline"] and run["tasks"] == ["vlmq_demo_caption"]
    for label, model in (("bf16", r["baseline"]["path"]), ("w8a8", str(ct))):
        assert f"model={model}," in " ".join(run["commands"][label])
        assert run["samples"][label] == {"vlmq_demo_caption": LMMS_LIMIT}
        scores = run["scores"][label]["vlmq_demo_caption"]
        assert set(scores) == {"caption_f1", "exact_match"} and all(0 <= v <= 1 for v in scores.values()), scores
        logged = list((tmp_path / "l" / "lmms_eval" / label).rglob("*samples*.jsonl"))
        assert len(logged) == 1 and len(_jsonl(logged[0])) == LMMS_LIMIT   # the harness's own per-sample log
    assert run["primary"] == {"vlmq_demo_caption": "caption_f1"}
    assert [g["name"] for g in r["gates"]] == ["harness_runs"] and r["gates"][0]["passed"]
    w8a8_log = (tmp_path / "l" / "lmms_eval" / "w8a8.log").read_text()
    assert "CompressedTensorsW8A8Int8" in w8a8_log   # vLLM ran the export's int8 kernels
    html = (tmp_path / "l" / "report.html").read_text()
    assert 'id="lmms_eval"' in html and "vlmq_demo_caption" in html and "-m lmms_eval --model vllm" in html


@pytest.mark.slow
def test_a_failing_harness_run_fails_the_check(harness_venv, tmp_path):
    """The harness is launched (its python answers the import probe) but the run exits non-zero: exit 1,
    one line per failed run naming its log, the report still written."""
    wrapper = tmp_path / "python"
    wrapper.write_text(f'#!/bin/sh\nif [ "$1" = "-m" ]; then echo "broken on purpose" >&2; exit 3; fi\n'
                       f'exec "{harness_venv}" "$@"\n')
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IEXEC)
    ct = demo_export() / "compressed_tensors"
    result = run_cli(["check", "--model-dir", str(ct), "--lmms-tasks", "vlmq_demo_caption", f"log_root={tmp_path}",
                      "run_name=f", *SMALL_CHECK], cwd=tmp_path, env=cli_env(VLMQ_HARNESS_PYTHON=str(wrapper)))
    assert result.rc == 1, describe(result)
    failed = [line for line in result.stderr_lines if "run on" in line and "failed" in line]
    assert len(failed) == 2 and all("exited with 3" in line for line in failed), describe(result)
    r = json.loads((tmp_path / "f" / "results.json").read_text())
    assert r["verdict"] == "fail" and r["metrics"]["harness_failed_runs"] == 2 and r["metrics"]["recovery_min"] is None
    assert result.stdout_lines[-1].startswith("FAIL ")
