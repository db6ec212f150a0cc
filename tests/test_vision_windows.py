"""The batched window attention (runtime/vision.py) against transformers' own vision tower, on
the demo Qwen2.5-VL with grids whose windows differ in length (padded batch + key mask)."""

from __future__ import annotations

import pytest
import torch

from vlmq.models.demo import build_demo_model
from vlmq.runtime import vision


@pytest.fixture(scope="module")
def visual():
    model = build_demo_model(torch.float32)
    return model.model.visual


def tower_inputs(grids: list[list[int]], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    grid = torch.tensor(grids)
    cfg_dim = 3 * 2 * 14 * 14  # channels x temporal patch x patch x patch
    g = torch.Generator().manual_seed(seed)
    return torch.randn(int(grid.prod(-1).sum()), cfg_dim, generator=g), grid


def merged(out) -> torch.Tensor:
    return out.pooler_output if hasattr(out, "pooler_output") else out


@pytest.mark.parametrize("grids", [[[1, 12, 20]], [[1, 12, 20], [1, 8, 8]], [[1, 8, 8]], [[2, 4, 6]]],
                         ids=["uneven_windows", "two_images", "one_window", "two_frames"])
def test_batched_windows_match_transformers(visual, grids) -> None:
    pixels, grid = tower_inputs(grids, seed=len(grids))
    with torch.no_grad():
        ref = merged(visual(pixels, grid_thw=grid))
        with vision.batched_window_attention(visual):
            out = merged(visual(pixels, grid_thw=grid))
        again = merged(visual(pixels, grid_thw=grid))  # the patch is gone after the with
    assert out.shape == ref.shape
    assert (out - ref).abs().max().item() < 1e-5 * ref.abs().max().item()
    assert torch.equal(again, ref)
    assert "forward" not in vars(visual.blocks[0].attn)


def test_plan_windows_pads_uneven_windows() -> None:
    layout = vision.plan_windows(torch.tensor([0, 3, 3, 8, 10]))  # an empty window is dropped
    assert (layout.windows, layout.longest) == (3, 5)
    assert layout.slots.tolist() == [0, 1, 2, 5, 6, 7, 8, 9, 10, 11]
    assert layout.key_mask[:, 0, 0].tolist() == [[True] * 3 + [False] * 2, [True] * 5, [True] * 2 + [False] * 3]
    assert vision.plan_windows(torch.tensor([0, 4, 8])).key_mask is None


def test_windowed_attention_is_per_window() -> None:
    """Each window attends only to itself: moving a token of one window changes no other window."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(10, 2, 4, generator=g) for _ in range(3))
    layout = vision.plan_windows(torch.tensor([0, 3, 8, 10]))
    out = vision.windowed_attention(q, k, v, layout, 0.5)
    for s, e in ((0, 3), (3, 8), (8, 10)):
        ref = torch.nn.functional.scaled_dot_product_attention(
            q[s:e].transpose(0, 1), k[s:e].transpose(0, 1), v[s:e].transpose(0, 1), scale=0.5).transpose(0, 1)
        assert torch.allclose(out[s:e], ref, atol=1e-6)
    v2 = v.clone()
    v2[9] += 5.0
    out2 = vision.windowed_attention(q, k, v2, layout, 0.5)
    assert torch.equal(out2[:8], out[:8]) and not torch.equal(out2[8:], out[8:])


def test_unrecognised_tower_runs_unchanged() -> None:
    tower = torch.nn.Module()
    with vision.batched_window_attention(tower):
        pass
    assert not vision.supports(tower)


def test_negative_control_one_window_per_layer_differs(visual, monkeypatch) -> None:
    """If the layout ignored the windows (all tokens in one), the tower's output would change:
    the comparison above can fail."""
    pixels, grid = tower_inputs([[1, 12, 20]], seed=5)
    whole = vision.plan_windows
    monkeypatch.setattr(vision, "plan_windows", lambda cu: whole(cu[[0, -1]]))
    with torch.no_grad():
        ref = merged(visual(pixels, grid_thw=grid))
        with vision.batched_window_attention(visual):
            assert "forward" in vars(visual.blocks[0].attn)
            out = merged(visual(pixels, grid_thw=grid))
    assert (out - ref).abs().max().item() > 1e-3 * ref.abs().max().item()


@pytest.mark.parametrize("grids", [[[1, 12, 20]], [[1, 12, 20], [1, 8, 8]], [[2, 4, 6]]],
                         ids=["uneven_windows", "two_images", "two_frames"])
def test_lean_vision_matches_transformers(visual, grids) -> None:
    """LeanVision (index work planned once per grid, the HF blocks' own modules) == the tower's
    forward; a second call with the same grid reuses the plan and gives the same result."""
    assert vision.LeanVision.supports(visual)
    pixels, grid = tower_inputs(grids, seed=7)
    lean = vision.LeanVision(visual, graphs=False)
    with torch.no_grad():
        ref = merged(visual(pixels, grid_thw=grid))
        out = lean(pixels, grid)
        pixels2 = pixels.flip(0)
        out2, ref2 = lean(pixels2, grid), merged(visual(pixels2, grid_thw=grid))
    assert len(lean._plans) == 1
    for o, r in ((out, ref), (out2, ref2)):
        assert o.shape == r.shape
        assert (o - r).abs().max().item() < 1e-5 * r.abs().max().item()


def test_padded_mlp_on_an_odd_width_matches_transformers() -> None:
    """A tower whose MLP width (50) is not a multiple of MLP_PAD: LeanVision's padded, fused MLP
    gives transformers' output, and the HF modules keep their shapes as views of the padded weights."""
    from vlmq.models.demo import demo_config, random_model

    cfg = demo_config()
    cfg.vision_config.intermediate_size = 50
    from transformers import Qwen2_5_VLForConditionalGeneration

    visual = random_model(Qwen2_5_VLForConditionalGeneration, cfg, seed=3, dtype=torch.float32).model.visual
    pixels, grid = tower_inputs([[1, 12, 20]], seed=9)
    with torch.no_grad():
        ref = merged(visual(pixels, grid_thw=grid))
        lean = vision.LeanVision(visual, graphs=False)
        mlp = lean.mlps[0]
        assert isinstance(mlp, vision.PaddedMLP) and mlp.gate_up.out_features == 2 * vision.MLP_PAD
        assert mlp.down.in_features == vision.MLP_PAD
        out = lean(pixels, grid)
        after = merged(visual(pixels, grid_thw=grid))  # the HF forward on the rebound views
    hf_mlp = visual.blocks[0].mlp
    assert hf_mlp.gate_proj.weight.shape == (50, 32) and hf_mlp.down_proj.weight.shape == (32, 50)
    assert hf_mlp.gate_proj.weight.data_ptr() == mlp.gate_up.weight.data_ptr()
    assert hf_mlp.down_proj.weight.data_ptr() == mlp.down.weight.data_ptr()
    assert vision.LeanVision(visual, graphs=False).mlps[0].down is mlp.down  # no second padded copy
    assert torch.allclose(after, ref, rtol=0, atol=1e-6 * ref.abs().max().item())
    assert (out - ref).abs().max().item() < 1e-5 * ref.abs().max().item()


FUSED_SCRIPT = r"""
import torch
from vlmq.models.demo import build_demo_model
from vlmq.runtime import vision
from test_vision_windows import merged, tower_inputs

visual = build_demo_model(torch.float32).model.visual
pixels, grid = tower_inputs([[1, 12, 20], [1, 8, 8]], seed=11)
with torch.no_grad():
    ref = merged(visual(pixels, grid_thw=grid))
    lean = vision.LeanVision(visual, graphs=False, fused=True)
    assert lean.fused and lean.mlps[0].silu_mul is not None
    out = lean(pixels, grid)
err = ((out - ref).abs().max() / ref.abs().max()).item()
assert err < 1e-5, err
print("FUSED-OK", err)
"""


def test_lean_vision_with_the_fused_kernels_in_triton_interpreter() -> None:
    """The CUDA path's Triton add+RMSNorm and SiLU*up kernels in the tower, run by Triton's
    interpreter on CPU (fp32), against transformers' forward."""
    import os
    import subprocess
    import sys

    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([os.path.dirname(__file__),
                                                                          os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", FUSED_SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert "FUSED-OK" in proc.stdout, proc.stdout[-300:] + proc.stderr[-3000:]
