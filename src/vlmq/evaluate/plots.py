"""PNG plots of a `vlmq check` result (matplotlib, headless): per-layer SQNR, activation ranges, KL per sample."""

from __future__ import annotations

from pathlib import Path
from typing import Any

SQNR_CAP_DB = 100.0  # identical outputs (infinite SQNR) are drawn at this height and hatched


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _short(name: str) -> str:
    """model.language_model.layers.3.self_attn.q_proj -> L3.q_proj"""
    parts = name.split(".")
    if "layers" in parts:
        i = parts.index("layers")
        return f"L{parts[i + 1]}.{parts[-1]}"
    return parts[-1]


def _width(n: int) -> float:
    return min(24.0, max(6.0, 0.22 * n + 2))


def _xticks(ax, names: list[str]) -> None:
    """Every label up to 60 layers; beyond that every k-th (a 3B model has 252 linears)."""
    step = max(1, len(names) // 60)
    ticks = list(range(0, len(names), step))
    ax.set_xticks(ticks, [names[i] for i in ticks], rotation=90, fontsize=7)


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


def plot_sqnr(layers: list[dict[str, Any]], path: Path) -> Path:
    plt = _pyplot()
    names = [_short(x["name"]) for x in layers]
    values = [SQNR_CAP_DB if x["sqnr_db"] is None else x["sqnr_db"] for x in layers]
    fig, ax = plt.subplots(figsize=(_width(len(layers)), 3.6))
    bars = ax.bar(range(len(values)), values, color="#3b7dd8")
    for bar, x in zip(bars, layers, strict=True):
        if x["sqnr_db"] is None:
            bar.set_hatch("//")
            bar.set_color("#999999")
    _xticks(ax, names)
    ax.set_ylabel("output SQNR (dB)")
    ax.set_title("Per-layer output SQNR, W8A8 vs bf16 on the same input (higher is better)", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def plot_ranges(layers: list[dict[str, Any]], path: Path) -> Path:
    plt = _pyplot()
    rows = [x for x in layers if x.get("amax_before")]
    names = [_short(x["name"]) for x in rows]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(_width(len(rows)), 5.6), sharex=True)
    xs = range(len(rows))
    ax1.plot(xs, [x["amax_before"]["max"] for x in rows], "o-", label="before smoothing (bf16 input)")
    after = [x["amax_after"]["max"] if x.get("amax_after") else float("nan") for x in rows]
    ax1.plot(xs, after, "s-", label="after smoothing (input x s)")
    ax1.set_yscale("log")
    ax1.set_ylabel("max |x| over channels")
    ax1.set_title("Activation ranges per layer input")
    ax1.legend(fontsize=8)
    ax1.grid(alpha=0.3)
    ax2.plot(xs, [x["amax_before"]["ratio"] for x in rows], "o-", label="before")
    ax2.plot(xs, [x["amax_after"]["ratio"] if x.get("amax_after") else float("nan") for x in rows], "s-",
             label="after")
    ax2.set_yscale("log")
    ax2.set_ylabel("max / median channel amax")
    ax2.legend(fontsize=8)
    ax2.grid(alpha=0.3)
    _xticks(ax2, names)
    return _save(fig, path)


def plot_kl(samples: list[dict[str, Any]], path: Path) -> Path:
    plt = _pyplot()
    colors = {"text": "#3b7dd8", "image": "#e07b39", "caption": "#4aa564", "passage": "#8a5cc2"}
    fig, ax = plt.subplots(figsize=(min(24.0, max(6.0, 0.4 * len(samples) + 2)), 3.4))
    for i, s in enumerate(samples):
        ax.bar(i, s["metrics"]["kl_mean"], color=colors.get(s["kind"], "#777777"),
               label=s["kind"] if s["kind"] not in [x["kind"] for x in samples[:i]] else None)
        ax.plot([i], [s["metrics"]["kl_max"]], "k_", markersize=12)
    ax.set_xticks(range(len(samples)), [s["id"] for s in samples], rotation=60, fontsize=7)
    top = max((s["metrics"]["kl_max"] for s in samples), default=0.0)
    if top > 0:
        ax.set_ylim(0, top * 1.15)
    ax.set_ylabel("KL(bf16 || W8A8), nats/token")
    ax.set_title("KL per sample (bar: mean over tokens, tick: max)")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def write_plots(results: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    """All plots of a result into out_dir; name -> file."""
    out = {"kl_per_sample": plot_kl(results["samples"], out_dir / "kl_per_sample.png")}
    if results["layers"]:
        out["sqnr_per_layer"] = plot_sqnr(results["layers"], out_dir / "sqnr_per_layer.png")
        out["activation_ranges"] = plot_ranges(results["layers"], out_dir / "activation_ranges.png")
    return out
