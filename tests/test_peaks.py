"""The checkpoint dtype that export.dtype=auto chooses from the calibration's activation peaks
(vlmq.quantize.peaks), and the hooks that record those peaks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from vlmq.quantize.peaks import FP16_HEADROOM, FP16_MAX, PeakRecorder, choose_dtype, fp16_overflow_risk

BF16 = {"dtype": "bfloat16"}
FITS = {"model.layers.0": 100.0, "model.layers.1": 1352.0, "lm_head": 30.0}
LIMIT = FP16_MAX / FP16_HEADROOM


def test_a_bf16_text_model_that_fits_gets_float16_and_the_largest_peak_is_named():
    choice = choose_dtype("auto", BF16, FITS)
    assert choice.dtype == torch.float16 and choice.where == "model.layers.1" and choice.peak == 1352.0
    assert "1,352" in choice.reason and fp16_overflow_risk(choice) is None


@pytest.mark.parametrize("peak", [LIMIT * 1.01, 24929.0, 1e6])
def test_a_peak_without_the_headroom_keeps_bf16_and_says_where(peak):
    choice = choose_dtype("auto", BF16, {**FITS, "model.layers.7": peak})
    assert choice.dtype == torch.bfloat16
    assert "model.layers.7" in choice.reason and "headroom" in choice.reason


def test_the_headroom_boundary_is_inclusive():
    assert choose_dtype("auto", BF16, {"x": LIMIT}).dtype == torch.float16


@pytest.mark.parametrize("config,peaks,vision,want,says", [
    ({"text_config": {"dtype": "bfloat16"}}, FITS, True, torch.bfloat16, "vision tower"),
    ({"torch_dtype": "float32"}, FITS, False, torch.float32, "float32"),
    ({"dtype": "float16"}, FITS, False, torch.float16, "float16"),
    ({}, None, False, torch.bfloat16, "no activation peaks"),
])
def test_auto_keeps_the_snapshots_dtype_where_fp16_is_not_for_it(config, peaks, vision, want, says):
    choice = choose_dtype("auto", config, peaks, has_vision=vision)
    assert choice.dtype == want and says in choice.reason


def test_an_explicit_dtype_is_kept_and_an_unsafe_float16_is_warned_about():
    assert choose_dtype("bfloat16", BF16, FITS).dtype == torch.bfloat16
    unsafe = choose_dtype("float16", BF16, {"model.layers.3": 24929.0})
    assert unsafe.dtype == torch.float16
    warning = fp16_overflow_risk(unsafe)
    assert warning and "model.layers.3" in warning and "\n" not in warning


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(4, 8)
        self.pair = PairOut()
        self.down_quantizer = nn.Identity()   # ModelOpt's quantizer modules are not recorded

    def forward(self, x):
        return self.down_quantizer(self.pair(self.up(x))[0])


class PairOut(nn.Module):
    def forward(self, x):
        return x * 3, "not a tensor"


def test_the_recorder_keeps_each_modules_largest_finite_output_over_calls():
    model = Tiny()
    recorder = PeakRecorder(model)
    xs = [torch.randn(2, 4), 10 * torch.randn(3, 4)]
    for x in xs:
        model(x)
    model(torch.full((1, 4), float("inf")))   # inf/NaN outputs do not count as peaks
    peaks = recorder.peaks()
    recorder.remove()
    with torch.no_grad():
        want_up = max(float(model.up(x).abs().max()) for x in xs)
    assert set(peaks) == {"up", "pair"}
    assert peaks["up"] == pytest.approx(want_up) and peaks["pair"] == pytest.approx(3 * want_up)
    model(100 * torch.randn(2, 4))   # removed: nothing more is recorded
    assert recorder.peaks() == peaks


def test_fp32_copies_are_held_only_where_the_checkpoint_can_be_finer_than_bf16():
    from vlmq.models.demo import build_demo_model
    from vlmq.models.families import family_for
    from vlmq.quantize.peaks import may_be_finer_than_bf16

    vlm = build_demo_model()
    family = family_for(vlm.config.model_type)
    text = Tiny()   # no vision tower at the family's path
    assert not may_be_finer_than_bf16("auto", vlm, family) and may_be_finer_than_bf16("auto", text, family)
    assert may_be_finer_than_bf16("float16", vlm, family) and may_be_finer_than_bf16("float32", vlm, family)
    assert not may_be_finer_than_bf16("bfloat16", text, family)
