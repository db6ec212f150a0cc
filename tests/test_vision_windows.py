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


def test_unrecognised_or_flash_towers_are_left_alone(visual) -> None:
    """A tower without Qwen2.5-VL's attention, or one configured for flash attention (already one
    varlen call per layer), is not patched; a recognised one is."""
    assert vision.attention_patchable(visual) and vision.LeanVision.supports(visual)
    assert not vision.attention_patchable(torch.nn.Module())
    attn_impl = visual.config._attn_implementation
    try:
        visual.config._attn_implementation = "flash_attention_2"
        assert not vision.attention_patchable(visual) and not vision.LeanVision.supports(visual)
        with vision.batched_window_attention(visual):
            assert "forward" not in vars(visual.blocks[0].attn)
    finally:
        visual.config._attn_implementation = attn_impl


def test_patch_restores_an_instance_forward_and_refuses_nesting(visual) -> None:
    attn = visual.blocks[0].attn
    hook = attn.forward  # a bound method set on the instance, as hooks/offloaders do
    attn.forward = hook
    try:
        with vision.batched_window_attention(visual):
            assert vars(attn)["forward"] is not hook
            with pytest.raises(RuntimeError, match="already active"):
                with vision.batched_window_attention(visual):
                    pass
        assert vars(attn)["forward"] is hook
    finally:
        del attn.forward
    with vision.batched_window_attention(visual):  # usable again after the refused nesting
        pass
    assert "forward" not in vars(attn)


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


@pytest.mark.parametrize("grids", [[[1, 12, 20]], [[1, 12, 20], [1, 8, 8]], [[2, 4, 6]], [[1, 16, 16]]],
                         ids=["uneven_windows", "two_images", "two_frames", "equal_windows"])
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


def test_decoder_falls_back_to_transformers_tower(monkeypatch) -> None:
    """LeanDecoder's image features: LeanVision where supported, transformers' tower with batched
    windows where not, transformers' own forward with lean_vision=False; all the same features."""
    from vlmq.runtime.decode import LeanDecoder

    model = build_demo_model(torch.float32)
    pixels, grid = tower_inputs([[1, 12, 20], [1, 8, 8]], seed=13)
    dec = LeanDecoder(model, 1, 64)
    lean = dec._image_features(pixels, grid)
    assert dec._vision is not None
    dec.lean_vision = False
    hf = dec._image_features(pixels, grid)
    dec.lean_vision = True
    calls = []
    real = vision.batched_window_attention

    def spy(visual):
        calls.append(visual)
        return real(visual)

    monkeypatch.setattr(vision.LeanVision, "supports", staticmethod(lambda visual: False))
    monkeypatch.setattr("vlmq.runtime.decode.batched_window_attention", spy)
    fallback = dec._image_features(pixels, grid)
    assert calls == [model.model.visual]
    for out in (lean, fallback):
        assert (out - hf).abs().max().item() < 1e-5 * hf.abs().max().item()


def test_fuse_linears_padding_is_part_of_the_cache_key() -> None:
    from vlmq.runtime.fusion import fuse_linears, pad_input_features

    a, b = torch.nn.Linear(8, 100), torch.nn.Linear(8, 100)
    x = torch.randn(3, 8)
    ref = torch.cat([a(x), b(x)], -1).detach()
    plain = fuse_linears([a, b])
    padded = fuse_linears([a, b], pad_to=64)
    assert plain.out_features == 200 and padded.out_features == 256
    y = padded(x).detach()
    assert torch.allclose(y[:, :100], ref[:, :100]) and torch.allclose(y[:, 128:228], ref[:, 100:])
    assert not y[:, 100:128].any() and not y[:, 228:].any()  # zero rows, zero bias
    down = torch.nn.Linear(64, 8)
    assert pad_input_features(down, 64) is down  # nothing to pad: no copy
