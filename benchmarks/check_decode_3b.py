"""On the GPU: the lean loop (CUDA graphs + fused kernels) vs transformers generate on the random
3B shape, bf16 and W8A8, text and image prompts. Prints/writes per case: first step where the
greedy tokens differ (None = all equal), HF's top-2 logit margin there, logits rel. error up to it.

    PYTHONPATH=src python benchmarks/check_decode_3b.py --out $OUT/check_3b.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_random_snapshot import build  # noqa: E402

from vlmq.bench import make_inputs, quantize_language_model  # noqa: E402
from vlmq.runtime.decode import LeanDecoder  # noqa: E402


def hf(model, inputs, n: int):
    out = model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False, output_logits=True,
                         return_dict_in_generate=True)
    return out.sequences[:, inputs["input_ids"].shape[1]:], torch.stack(out.logits, 1).float()


def compare(model, inputs, n: int, ref, **kw) -> dict:
    ref_tok, ref_logits = ref
    dec = LeanDecoder(model, inputs["input_ids"].shape[0], inputs["input_ids"].shape[1] + n + 64, **kw)
    dec.prefill(**inputs)
    logits = [dec.logits.clone()]
    for _ in range(n - 1):
        dec.step()
        logits.append(dec.logits.clone())
    tok, lg = dec.tokens[:, :n], torch.stack(logits, 1)
    diff = (tok[0] != ref_tok[0]).nonzero()
    stop = int(diff[0]) if len(diff) else n - 1
    margin = (ref_logits[0, stop, ref_tok[0, stop]] - ref_logits[0, stop, tok[0, stop]]).item() if len(diff) else None
    err = ((lg[0, : stop + 1] - ref_logits[0, : stop + 1]).norm() / ref_logits[0, : stop + 1].norm()).item()
    return {"first_diff": int(diff[0]) if len(diff) else None, "hf_margin_at_diff": margin,
            "logit_scale": ref_logits[0, 0].abs().max().item(), "rel_err_prefix": err,
            "rel_err_prefill": ((lg[0, 0] - ref_logits[0, 0]).norm() / ref_logits[0, 0].norm()).item(),
            "lean": tok[0].tolist(), "hf": ref_tok[0].tolist()}


def profile_step(model, processor, label: str) -> None:
    """Kernel time of one decode step (eager launch, fused ops) at batch 1: where the step goes."""
    from torch.profiler import ProfilerActivity, profile

    inputs = {k: v.cuda() for k, v in make_inputs(processor, "text", 1, 512, (448, 336)).items()}
    dec = LeanDecoder(model, 1, 640, graphs=False)
    with torch.no_grad():
        dec.prefill(**inputs)
        for _ in range(3):
            dec.step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            dec.step()
            torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
    total = sum(e.self_device_time_total for e in events)
    print(f"== {label} decode step kernels: {total / 1e3:.3f} ms GPU time (b=1, S=640)")
    for e in sorted(events, key=lambda e: -e.self_device_time_total)[:14]:
        print(f"  {e.self_device_time_total / 1e3:8.3f} ms {e.count:5d}x  {e.key[:90]}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    model, processor = build("3b", "cuda")
    results = {}
    for label in ("bf16", "w8a8"):
        if label == "w8a8":
            quantize_language_model(model, backend="triton")
        for kind in ("text", "image"):
            inputs = {k: v.cuda() for k, v in make_inputs(processor, kind, 1, 128, (448, 336)).items()}
            with torch.no_grad():
                ref = hf(model, inputs, args.new_tokens)
                for name, kw in (("graph_fused", {"graph_prefill": True}),
                                 ("eager_reference_ops", {"graphs": False, "fused_ops": False})):
                    results[f"{label}_{kind}_{name}"] = r = compare(model, inputs, args.new_tokens, ref, **kw)
                    print(label, kind, name, {k: (round(v, 5) if isinstance(v, float) else v) for k, v in r.items()
                                              if k not in ("lean", "hf")}, flush=True)
        if args.profile:
            profile_step(model, processor, label)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
