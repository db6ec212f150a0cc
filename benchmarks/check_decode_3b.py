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


def compare(model, inputs, n: int) -> dict:
    out = model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False, output_logits=True,
                         return_dict_in_generate=True)
    ref_tok = out.sequences[:, inputs["input_ids"].shape[1]:]
    ref_logits = torch.stack(out.logits, 1).float()
    dec = LeanDecoder(model, inputs["input_ids"].shape[0], inputs["input_ids"].shape[1] + n + 64,
                      graph_prefill=True)
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path)
    ap.add_argument("--new-tokens", type=int, default=16)
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
                results[f"{label}_{kind}"] = r = compare(model, inputs, args.new_tokens)
            print(label, kind, {k: v for k, v in r.items() if k not in ("lean", "hf")}, flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
