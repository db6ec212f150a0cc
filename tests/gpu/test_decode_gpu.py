"""GPU tests for the lean decode loop and its fused kernels (skipped without CUDA)."""

from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)
pytest.importorskip("triton")

from test_decode_loop import assert_greedy_equivalent, hf_run, lean_run, make_inputs, sharpened_model  # noqa: E402
from vlmq.bench import quantize_language_model  # noqa: E402
from vlmq.models.demo import build_demo_processor  # noqa: E402
from vlmq.runtime import attention as AT  # noqa: E402
from vlmq.runtime import fused as FU  # noqa: E402
from vlmq.runtime.decode import LeanDecoder, ReferenceOps, rms_norm  # noqa: E402
from vlmq.runtime.linear import quantize_per_token  # noqa: E402

DEV = "cuda"


def ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.view(torch.int16).int() - b.view(torch.int16).int()).abs()


@pytest.mark.parametrize("m", [1, 7, 300])
def test_add_rms_norm_and_quant(m):
    h, d = (torch.randn(m, 2048, device=DEV).bfloat16() for _ in range(2))
    w = (torch.rand(2048, device=DEV) + 0.5).bfloat16()
    hn, y = FU.add_rms_norm(h, d, w, 1e-6, quant=False)
    assert torch.equal(hn, h + d)
    ref = rms_norm(h + d, w, 1e-6)
    assert ulps(y, ref).max() <= 2 and (y == ref).float().mean() > 0.99  # torch's rsqrt vs 1/sqrt_rn
    _, (q, s) = FU.add_rms_norm(h, d, w, 1e-6, quant=True)
    qr, sr = quantize_per_token(y)  # quantization of the kernel's own bf16 output: exact
    assert torch.equal(q, qr) and torch.equal(s, sr)


@pytest.mark.parametrize("m", [1, 7, 300])
def test_silu_mul_and_quant(m):
    gu = torch.randn(m, 2 * 11008, device=DEV).bfloat16()
    g, u = gu.chunk(2, -1)
    ref = torch.nn.functional.silu(g) * u
    y = FU.silu_mul(gu, False)
    assert ulps(y, ref).max() <= 1 and (y == ref).float().mean() > 0.99
    q, s = FU.silu_mul(gu, True)
    qr, sr = quantize_per_token(y)
    assert torch.equal(q, qr) and torch.equal(s, sr)


@pytest.mark.parametrize("b,t", [(1, 1), (8, 1), (2, 37)])
def test_rope_cache(b, t):
    nh, nkv, d, s = 16, 2, 128, 64
    qkv = torch.randn(b, t, (nh + 2 * nkv) * d, device=DEV).bfloat16()
    pos = torch.randint(0, 5000, (b, t), device=DEV)
    freqs = pos[..., None].float() / (1e6 ** (torch.arange(0, d, 2, device=DEV).float() / d))
    emb = torch.cat((freqs, freqs), -1)
    cos, sin = emb.cos().bfloat16()[:, None], emb.sin().bfloat16()[:, None]
    slots = torch.randperm(s, device=DEV)[:t]
    kc1 = torch.full((3, b, nkv, s, d), float("nan"), device=DEV).bfloat16()
    vc1, kc2, vc2 = kc1.clone(), kc1.clone(), kc1.clone()
    q1 = FU.rope_cache(qkv, cos, sin, kc1[1], vc1[1], slots, nh, nkv, d)
    q2 = ReferenceOps().rope_cache(qkv, cos, sin, kc2[1], vc2[1], slots, nh, nkv, d)
    assert torch.equal(q1, q2)
    assert torch.equal(kc1.nan_to_num(7.0), kc2.nan_to_num(7.0)) and torch.equal(vc1.nan_to_num(7.0),
                                                                                 vc2.nan_to_num(7.0))


@pytest.mark.parametrize("b,s,cur", [(1, 640, 517), (8, 64, 63), (3, 1024, 5)])
def test_decode_attention(b, s, cur):
    nh, nkv, d = 16, 2, 128
    q = torch.randn(b, nh, 1, d, device=DEV).bfloat16()
    kc, vc = (torch.randn(b, nkv, s, d, device=DEV).bfloat16() for _ in range(2))
    kc[..., cur + 1:, :] = float("nan")  # slots past cur must never be read into the result
    valid = torch.rand(b, s, device=DEV) > 0.1
    valid[:, cur] = True
    c = torch.tensor([cur], device=DEV)
    out = AT.decode_attention(q, kc, vc, valid, c, d**-0.5)
    ref = AT.decode_attention_reference(q, kc.nan_to_num(0.0), vc, valid, c, d**-0.5)
    assert not out.isnan().any()
    assert ((out.float() - ref.float()).norm() / ref.float().norm()).item() < 1e-2


@pytest.mark.parametrize("b,t", [(1, 2048), (8, 436), (2, 1)])
def test_heads_to_rows_on_sdpa_output(b, t):
    """Prefill o_proj input from SDPA's own output on GQA-grouped queries (the loop's call, its
    memory layout as the backend returns it) -> token rows, and int8 rows == quantize_per_token."""
    nkv, g, d = 2, 8, 128
    q = (torch.randn(b, nkv, g * t, d, device=DEV) * 3).bfloat16()
    k, v = ((torch.randn(b, nkv, t, d, device=DEV) * 3).bfloat16() for _ in range(2))
    mask = torch.zeros(b, 1, g * t, t, device=DEV, dtype=torch.bfloat16)
    attn = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    attn[-1, 1, -1, 7] = 300.0  # outlier (last token, head 15)
    rows = attn.reshape(b, nkv * g, t, d).transpose(1, 2).reshape(b * t, nkv * g * d)
    q8, s8 = AT.heads_to_rows(attn, quant=True, groups=g)
    q_ref, s_ref = quantize_per_token(rows)
    assert torch.equal(q8, q_ref) and torch.equal(s8, s_ref.reshape(-1))
    assert torch.equal(AT.heads_to_rows(attn, quant=False, groups=g), rows)


@pytest.fixture(scope="module")
def processor():
    proc = build_demo_processor()
    proc.tokenizer.padding_side = "left"
    return proc


@pytest.mark.parametrize("w8a8", [False, True], ids=["bf16", "w8a8"])
@pytest.mark.parametrize("rows", [["text"], ["image", "text"]], ids=["text", "image_text_b2"])
def test_graph_loop_matches_hf(processor, w8a8, rows):
    model = sharpened_model(torch.bfloat16).to(DEV)
    if w8a8:
        quantize_language_model(model, backend="triton")
    inputs = {k: v.to(DEV) for k, v in make_inputs(processor, rows).items()}
    ref_tokens, ref_logits = hf_run(model, inputs)
    eager_tokens, eager_logits = lean_run(model, inputs, graphs=False, fused_ops=True)
    graph_tokens, graph_logits = lean_run(model, inputs, graphs=True, fused_ops=True, graph_prefill=True)
    # graph replay runs the very same kernels as the eager fused loop
    assert torch.equal(graph_tokens, eager_tokens)
    assert torch.allclose(graph_logits, eager_logits, rtol=0, atol=1e-6)
    assert_greedy_equivalent(graph_tokens, ref_tokens, graph_logits, ref_logits, 2e-2, exact=False)
    plain_tokens, plain_logits = lean_run(model, inputs, graphs=True, fused_ops=False)
    assert_greedy_equivalent(plain_tokens, ref_tokens, plain_logits, ref_logits, 2e-2, exact=False)


def test_replay_lm_prefill_repeats_the_prefill(processor):
    """`vlmq bench` times the language model's prefill by replaying its graph: same logits again."""
    model = sharpened_model(torch.bfloat16).to(DEV)
    inputs = {k: v.to(DEV) for k, v in make_inputs(processor, ["image", "text"]).items()}
    dec = LeanDecoder(model, 2, 128, graphs=True, graph_prefill=True)
    with pytest.raises(RuntimeError, match="no graphed prefill"):
        dec.replay_lm_prefill()
    dec.prefill(**inputs)
    first = dec.logits.clone()
    dec.logits.zero_()
    dec.replay_lm_prefill()
    assert torch.equal(dec.logits, first)


def test_lean_vision_graph_matches_eager_and_transformers():
    """LeanVision on CUDA: the graph per grid replays the eager kernels exactly (fresh pixels each
    replay, two grids, two images in one), and matches transformers' tower within bf16 rounding."""
    from test_vision_windows import tower_inputs
    from vlmq.models.demo import build_demo_model
    from vlmq.runtime.vision import LeanVision

    model = build_demo_model(torch.bfloat16).to(DEV)
    visual = model.model.visual
    graphed = LeanVision(visual, graphs=True)
    eager = LeanVision(visual, graphs=False, fused=graphed.fused)  # the same kernels, launched one by one
    assert graphed.fused and not LeanVision(visual, graphs=False).fused  # Triton norm/SiLU only in graphs
    for grids in ([[1, 12, 20]], [[1, 12, 20], [1, 8, 8]]):
        for seed in (0, 1):
            pixels, grid = tower_inputs(grids, seed)
            pixels, grid = pixels.to(DEV, torch.bfloat16), grid.to(DEV)
            out = graphed(pixels, grid).clone()
            assert torch.equal(out, eager(pixels, grid))
            with torch.no_grad():
                ref = torch.cat(list(model.model.get_image_features(pixels, grid).pooler_output))
            assert ((out.float() - ref.float()).norm() / ref.float().norm()).item() < 2e-2
    assert len(graphed._graphs) == 2
