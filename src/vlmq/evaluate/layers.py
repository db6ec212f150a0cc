"""Per-layer view for `vlmq check`: output SQNR of each quantized linear on the baseline's own inputs,
and activation ranges before/after smoothing (the factors recovered from the checkpoint)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from vlmq.evaluate.metrics import column_factors, range_summary, row_factors
from vlmq.models.families import Family


def smoothing_transform(ref: nn.Module, test: nn.Module, names: list[str], fmt: str,
                        family: Family) -> tuple[dict, dict]:
    """(input factor c per linear, output row factor r per producer linear) so that
    test_linear(x * c) / r ~= ref_linear(x). ModelOpt keeps c inside the layer (pre_quant_scale): no transform.
    compressed-tensors folds c into the producers: recovered from the weights (metrics.column_factors). A
    linear producer (the family's linear_rows / attn_v groups, e.g. up_proj, v_proj) reads the same norm as a
    sibling (gate_proj, q_proj), whose factor is its input factor."""
    if fmt == "modelopt_hf":
        return {}, {}
    mods_r, mods_t = dict(ref.named_modules()), dict(test.named_modules())

    def deq(name: str) -> torch.Tensor:
        m = mods_t[name]
        return m.weight.float().cpu() * m.weight_scale.float().cpu()[:, None]

    cols = {n: column_factors(mods_r[n].weight.float().cpu(), deq(n)) for n in names}
    rows = {}
    for group in (g for g in family.smooth_groups if g.kind != "norm"):
        sibling = next((g for g in family.smooth_groups if g.kind == "norm" and group.producer in g.consumers), None)
        if sibling is None:
            continue
        other = next(c for c in sibling.consumers if c != group.producer)
        for n in names:
            if n.endswith("." + group.producer):
                prefix = n[: -len(group.producer)]
                cols[n] = cols[prefix + other]
                rows[n] = row_factors(mods_r[n].weight.float().cpu(), deq(n), cols[n])
    return cols, rows


class LayerProbe:
    """Hooks the baseline's linears: records per-channel input amax and runs the matching test module on
    the same input, accumulating the output SQNR (the test layer in isolation, no upstream error)."""

    def __init__(self, ref: nn.Module, test: nn.Module, names: list[str], cols: dict | None = None,
                 rows: dict | None = None) -> None:
        self.names, self.cols, self.rows = names, cols or {}, rows or {}
        self.ref_mods, test_mods = dict(ref.named_modules()), dict(test.named_modules())
        self.test_mods = {n: test_mods[n] for n in names}
        self.amax: dict[str, torch.Tensor] = {}
        self.power = {n: [0.0, 0.0] for n in names}   # [signal, noise]
        self.handles: list = []

    def _hook(self, name: str):
        def hook(_mod: nn.Module, args: tuple, out: torch.Tensor) -> None:
            x = args[0]
            a = x.detach().abs().flatten(0, -2).amax(0).float().cpu()
            self.amax[name] = torch.maximum(self.amax[name], a) if name in self.amax else a
            test = self.test_mods[name]
            dev = next(test.buffers(), next(test.parameters(), x)).device
            xin = x.to(dev)
            if name in self.cols:
                xin = (xin.float() * self.cols[name].to(dev)).to(x.dtype)
            with torch.no_grad():
                y = test(xin).float()
            if name in self.rows:
                y = y / self.rows[name].to(dev)
            ref_y = out.detach().float().to(dev)
            self.power[name][0] += float(ref_y.pow(2).sum())
            self.power[name][1] += float((ref_y - y).pow(2).sum())
        return hook

    def __enter__(self) -> LayerProbe:
        self.handles = [self.ref_mods[n].register_forward_hook(self._hook(n)) for n in self.names]
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self.handles:
            h.remove()

    def sqnr(self, name: str) -> float:
        signal, noise = self.power[name]
        return float("inf") if noise == 0 else 10 * torch.log10(torch.tensor(signal / noise)).item()



def layer_table(probe: LayerProbe, factors: dict[str, torch.Tensor], source: str) -> list[dict]:
    out = []
    for name in probe.names:
        amax = probe.amax.get(name)
        sq = probe.sqnr(name)
        row: dict[str, Any] = {"name": name, "sqnr_db": None if sq == float("inf") else sq, "factor_source": source}
        if amax is not None:
            s = factors.get(name)
            row["amax_before"] = range_summary(amax)
            row["amax_after"] = range_summary(amax * s.float().cpu()) if s is not None else None
        out.append(row)
    return out
