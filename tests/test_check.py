"""`vlmq check` on the tiny demo model: metrics on constructed cases (real logits, no mocks), held-out
selection, results.json against its schema, exit codes from the gates (the harness runs: tests/test_harness.py)."""

from __future__ import annotations

import copy
import functools
import json
import math
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from conftest import REPO_ROOT, SMOOTHQUANT_RECIPE, CliResult, describe, run_cli
from vlmq.calib import demo_coco_root, load_coco_captions
from vlmq.evaluate.check import Case, apply_gates, score_case, select_heldout
from vlmq.evaluate.layers import LayerProbe
from vlmq.evaluate.metrics import column_factors
from vlmq.evaluate.report import load_schema, validate
from vlmq.models.demo import build_demo_model, build_demo_processor
from vlmq.models.families import family_for, quantized_linear_names

CALIB_N = 12  # of the 16 demo COCO images: 4 stay held out
NEW_TOKENS = 6


@dataclass
class CheckRun:
    result: CliResult
    run_dir: Path
    export_dir: Path
    log_root: Path

    @property
    def results(self) -> dict:
        return json.loads((self.run_dir / "results.json").read_text())


@functools.lru_cache(maxsize=1)
def _check_export() -> Path:
    """A demo export whose calibration left 4 COCO images out (built once per process: shared with
    test_report_browser, which imports these fixtures)."""
    from vlmq.cli import main

    work = Path(tempfile.mkdtemp(prefix="vlmq-check-quantize-"))
    rc = main(["quantize", f"log_root={work / 'logs'}", f"export.dir={work / 'export'}", "run_name=q",
               "export.formats=[compressed_tensors,modelopt_hf]", SMOOTHQUANT_RECIPE,
               f"calib.num_samples={CALIB_N}"])  # in process: the subprocess CLI is exercised by check_pass
    assert rc == 0
    return work / "export"


def run_inprocess(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    """`vlmq <argv>` in this process (saves the ~10 s of imports a subprocess pays); (rc, stdout, stderr)."""
    from vlmq.cli import main

    capsys.readouterr()
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def _overrides(log_root: Path, run: str) -> list[str]:
    return [f"log_root={log_root}", f"run_name={run}", f"infer.max_new_tokens={NEW_TOKENS}", "infer.heldout_samples=3"]


@functools.lru_cache(maxsize=1)
def _check_pass() -> CheckRun:
    export = _check_export()
    work = Path(tempfile.mkdtemp(prefix="vlmq-check-pass-"))
    result = run_cli(["check", "--model-dir", str(export / "compressed_tensors"), "--label", "w8a8",
                      "--max-kl", "1", "--min-top1", "0.5", "--max-nll-delta", "1", "--min-sqnr", "10",
                      *_overrides(work / "logs", "pass")], cwd=work)
    return CheckRun(result, work / "logs" / "pass", export, work / "logs")


@pytest.fixture(scope="session")
def check_export() -> Path:
    return _check_export()


@pytest.fixture(scope="session")
def check_pass() -> CheckRun:
    """`vlmq check` (subprocess) of the compressed-tensors export with lenient gates; the browser test
    reads its report."""
    return _check_pass()


# ---------------------------------------------------------------- metrics on constructed cases

@pytest.fixture(scope="module")
def demo_pair():
    processor = build_demo_processor()
    model = build_demo_model(torch.bfloat16)
    family = family_for("qwen2_5_vl")
    names = quantized_linear_names(family, len(model.get_submodule(family.layers)))
    image = sorted((demo_coco_root() / "val2017").glob("*.jpg"))[0]
    cases = [Case("text-0", "text", "Write a haiku about the sea."),
             Case("caption-0", "caption", "Describe this image in one sentence.", image, "A red circle.", True)]
    return processor, model, names, cases


def _score(ref, test, processor, names, cases):
    probe = LayerProbe(ref, test, names)
    scored = [score_case(ref, test, processor, c, NEW_TOKENS, probe) for c in cases]
    return scored, probe


def test_identical_models_give_zero_kl_full_agreement_and_infinite_sqnr(demo_pair):
    processor, model, names, cases = demo_pair
    scored, probe = _score(model, copy.deepcopy(model), processor, names, cases)
    for s in scored:
        m = s["metrics"]
        assert m["kl_mean"] == 0.0 and m["kl_max"] == 0.0, s["id"]
        assert m["top1"] == 1.0 and m["exact_match"] and m["token_overlap"] == 1.0
    cap = scored[1]["metrics"]
    assert cap["nll_baseline"] == cap["nll_w8a8"] > 0 and cap["nll_tokens"] >= 2
    assert all(probe.sqnr(n) == math.inf for n in names)
    assert all(probe.amax[n].min() >= 0 and probe.amax[n].max() > 0 for n in names)


def test_perturbed_linear_gives_positive_kl_and_finite_sqnr_on_that_layer_only(demo_pair):
    processor, model, names, cases = demo_pair
    noisy = copy.deepcopy(model)
    target = names[5]  # layer 0 mlp.up_proj
    weight = noisy.get_submodule(target).weight
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        weight.add_(torch.randn_like(weight) * weight.float().std().to(weight.dtype) * 0.5)
    scored, probe = _score(model, noisy, processor, names, cases)
    assert all(s["metrics"]["kl_mean"] > 1e-6 for s in scored), [s["metrics"] for s in scored]
    assert scored[1]["metrics"]["nll_w8a8"] != scored[1]["metrics"]["nll_baseline"]
    sq = probe.sqnr(target)
    assert math.isfinite(sq) and 0 < sq < 20, sq
    assert all(probe.sqnr(n) == math.inf for n in names if n != target)


def test_gates_compare_in_the_right_direction_and_fail_on_missing_metrics():
    metrics = {"kl_mean": 0.01, "top1": 0.9, "nll_delta": None, "sqnr_db_min": 30.0}
    gates, verdict = apply_gates(metrics, {"max_kl": 0.02, "min_top1": 0.8, "max_nll_delta": None, "min_sqnr": None})
    assert verdict == "pass" and [g["passed"] for g in gates] == [True, True]
    assert apply_gates(metrics, {"max_kl": 0.0})[1] == "fail"
    assert apply_gates(metrics, {"min_top1": 0.95})[1] == "fail"
    assert apply_gates(metrics, {"max_nll_delta": 10.0})[1] == "fail"  # not computable -> fails its gate
    assert apply_gates(metrics, {"max_kl": None})[1] == "ungated"


# ---------------------------------------------------------------- held-out selection

def test_calibration_selection_is_prefix_stable_and_heldout_disjoint():
    root = demo_coco_root()
    for n in (4, 8, 12):
        small, _ = load_coco_captions(root, ["val2017"], n, 0)
        large, _ = load_coco_captions(root, ["val2017"], n + 4, 0)
        assert [s.image for s in large[:n]] == [s.image for s in small]
    sel = {"source": "coco2017", "root": str(root), "splits": ["val2017"], "num_samples": CALIB_N, "seed": 0,
           "instruction": "Describe this image in one sentence."}
    held, calib, info = select_heldout(sel, 3)
    assert len(held) == 3 and len(calib) == CALIB_N and info["prefix_stable"]
    assert not {s.image for s in held} & {s.image for s in calib}
    held, _, info = select_heldout({**sel, "num_samples": 16}, 3)
    assert held == [] and "only 0 of 3" in info["note"]


# ---------------------------------------------------------------- the command

def test_check_passes_lenient_gates_and_results_validate(check_pass: CheckRun):
    assert check_pass.result.rc == 0, describe(check_pass.result)
    assert check_pass.result.stdout_lines[-1] == f"PASS {check_pass.run_dir / 'report.html'}"
    r = check_pass.results
    assert validate(r) == [], validate(r)[:3]
    assert r["verdict"] == "pass" and r["label"] == "w8a8" and r["model"]["format"] == "compressed_tensors"
    kinds = [s["kind"] for s in r["samples"]]
    assert kinds.count("text") == 2 and kinds.count("image") == 2 and kinds.count("caption") == 3
    calib, _ = load_coco_captions(demo_coco_root(), ["val2017"], CALIB_N, 0)
    used = {str(s.image) for s in calib}
    assert all(s["held_out"] and s["image"] not in used for s in r["samples"] if s["kind"] in ("image", "caption"))
    m = r["metrics"]
    assert 0 < m["kl_mean"] < 1 and m["caption_samples"] == 3 and m["nll_delta"] is not None
    assert len(r["layers"]) == 14 and all(x["sqnr_db"] is not None and x["sqnr_db"] > 10 for x in r["layers"])
    assert all(x["amax_after"]["max"] > 0 for x in r["layers"])
    for name in ("sqnr_per_layer", "activation_ranges", "kl_per_sample"):
        assert (check_pass.run_dir / r["plots"][name]).stat().st_size > 5000


def test_schema_validator_rejects_broken_results(check_pass: CheckRun):
    good = check_pass.results
    for mutate, expect in [(lambda r: r.pop("metrics"), "metrics"),
                           (lambda r: r["metrics"].update(top1=1.5), "maximum"),
                           (lambda r: r.update(verdict="maybe"), "maybe"),
                           (lambda r: r["samples"][0]["baseline"].update(tokens=["x"]), "tokens")]:
        broken = copy.deepcopy(good)
        mutate(broken)
        errors = validate(broken)
        assert errors and any(expect in e for e in errors), errors
    assert load_schema()["properties"]["verdict"]["enum"] == ["pass", "fail", "ungated"]


def test_smoothing_factors_are_recoverable_from_weights():
    """The recovery `check` uses where the factors are folded away agrees with the explicit pre_quant_scale
    of ModelOpt's own exporter (tests/quant_fixtures.py; vlmq's modelopt_hf folds them too), to within int8
    weight rounding."""
    from quant_fixtures import demo_quant
    from vlmq.runtime.loader import load_w8a8

    demo = demo_quant()
    test, _, info = load_w8a8(demo.exports["modelopt_hf"], "cpu")
    mods_r, mods_t = dict(demo.model.named_modules()), dict(test.named_modules())
    assert info.format == "modelopt_hf" and info.quantized
    for name in info.quantized:
        t = mods_t[name]
        est = column_factors(mods_r[name].weight, t.weight.float() * t.weight_scale[:, None])
        rel = (est / t.pre_quant_scale - 1).abs()
        assert rel.median() < 0.01 and rel.max() < 0.1, (name, rel.median(), rel.max())


def test_gate_failure_exits_1_through_the_sanity_script(check_export: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("sanity", REPO_ROOT / "scripts/qwen/run_qwen2_5_vl_3b_sanity.py")
    sanity = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sanity)
    monkeypatch.chdir(tmp_path)  # the script moves to the repo root; undone after the test
    capsys.readouterr()
    rc = sanity.main(["--model-dir", str(check_export / "modelopt_hf"), "--label", "strict", "--max-kl", "0",
                      *_overrides(tmp_path, "strict")])
    out, err = capsys.readouterr()
    assert rc == 1, err
    assert "gate max_kl failed" in err and out.strip().startswith("FAIL ")
    r = json.loads((tmp_path / "strict" / "results.json").read_text())
    assert r["verdict"] == "fail" and r["label"] == "strict" and r["model"]["format"] == "modelopt_hf"
    assert r["layers"][0]["factor_source"] == "pre_quant_scale" and validate(r) == []


def test_tampered_checkpoint_is_rejected_before_scoring(check_export: Path, tmp_path: Path, capsys):
    bad = tmp_path / "export"
    shutil.copytree(check_export, bad)
    weights = bad / "modelopt_hf" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    rc, _, err = run_inprocess(["check", "--model-dir", str(bad / "modelopt_hf"), *_overrides(tmp_path, "bad")],
                               capsys)
    assert rc == 1, err
    assert len(err.strip().splitlines()) == 1 and "REJECTED" in err and "vlmq verify" in err
    assert not (tmp_path / "bad" / "results.json").exists()


def test_missing_export_is_one_line_user_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys):
    monkeypatch.chdir(tmp_path)
    rc, _, err = run_inprocess(["check", f"export.dir={tmp_path / 'none'}", f"log_root={tmp_path}"], capsys)
    assert rc == 2, err
    assert err.strip().splitlines() == [f"vlmq: error: no W8A8 checkpoint in {tmp_path / 'none'}: run `vlmq quantize` "
                                        "first (or pass --model-dir)"]


def test_range_summary_of_a_parameter_warns_nothing():
    """pre_quant_scale is an nn.Parameter: summarising it must not leak autograd's UserWarning to the console."""
    import warnings

    from vlmq.evaluate.metrics import range_summary

    amax = torch.nn.Parameter(torch.tensor([1.0, 2.0, 8.0]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert range_summary(amax * torch.nn.Parameter(torch.ones(3)))["max"] == 8.0
