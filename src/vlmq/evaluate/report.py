"""`vlmq check` outputs: results.json (validated against data/results.schema.json), PNG plots, and one
self-contained report.html (images and plots as base64 data URIs; no external requests)."""

from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path
from typing import Any

SCHEMA_PATH = Path(__file__).resolve().parent.parent / "data" / "results.schema.json"
THUMB_PX = 320

_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}


def load_schema() -> dict[str, Any]:
    return json.loads(SCHEMA_PATH.read_text())


def json_safe(value: Any) -> Any:
    """Non-finite floats -> None (strict JSON has no inf/nan), recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def _is_type(value: Any, name: str) -> bool:
    if name == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if name == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, _TYPES[name])


def _mini_validate(value: Any, schema: dict, root: dict, where: str) -> list[str]:
    """The JSON Schema subset results.schema.json uses ($ref, type, enum, required, properties,
    additionalProperties, items, minItems, minimum, maximum, minLength, oneOf), for when `jsonschema` is absent."""
    if "$ref" in schema:
        node: Any = root
        for part in schema["$ref"].lstrip("#/").split("/"):
            node = node[part]
        return _mini_validate(value, node, root, where)
    if "oneOf" in schema:
        ok = sum(not _mini_validate(value, s, root, where) for s in schema["oneOf"])
        return [] if ok == 1 else [f"{where}: matches {ok} of oneOf (needs exactly 1)"]
    types = schema.get("type")
    if types is not None:
        types = [types] if isinstance(types, str) else types
        if not any(_is_type(value, t) for t in types):
            return [f"{where}: {type(value).__name__} is not {'/'.join(types)}"]
    errors = []
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{where}: {value!r} not in {schema['enum']}")
    if _is_type(value, "number"):
        if "minimum" in schema and value < schema["minimum"]:
            errors.append(f"{where}: {value} < minimum {schema['minimum']}")
        if "maximum" in schema and value > schema["maximum"]:
            errors.append(f"{where}: {value} > maximum {schema['maximum']}")
    if isinstance(value, str) and len(value) < schema.get("minLength", 0):
        errors.append(f"{where}: shorter than {schema['minLength']}")
    if isinstance(value, dict):
        errors += [f"{where}: '{k}' is a required property" for k in schema.get("required", []) if k not in value]
        props, extra = schema.get("properties", {}), schema.get("additionalProperties")
        for k, v in value.items():
            sub = props.get(k, extra if isinstance(extra, dict) else None)
            if sub is not None:
                errors += _mini_validate(v, sub, root, f"{where}.{k}")
    if isinstance(value, list):
        if len(value) < schema.get("minItems", 0):
            errors.append(f"{where}: fewer than {schema['minItems']} items")
        if "items" in schema:
            for i, v in enumerate(value):
                errors += _mini_validate(v, schema["items"], root, f"{where}[{i}]")
    return errors


def validate(results: dict[str, Any], schema: dict[str, Any] | None = None) -> list[str]:
    """Schema violations of a results document (empty = valid); uses `jsonschema` when installed."""
    schema = schema or load_schema()
    try:
        import jsonschema
    except ImportError:
        return _mini_validate(results, schema, schema, "$")
    validator = jsonschema.Draft202012Validator(schema)
    return [f"${''.join(f'.{p}' for p in e.absolute_path)}: {e.message}" for e in validator.iter_errors(results)]


# ---------------------------------------------------------------- HTML

def _data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def image_uri(path: Path) -> str:
    """A held-out image as a PNG data URI, downscaled to a thumbnail."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        im.thumbnail((THUMB_PX, THUMB_PX))
        buf = io.BytesIO()
        im.save(buf, format="PNG")
    return _data_uri(buf.getvalue(), "image/png")


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return html.escape(str(value))


def _table(table_id: str, header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table id="{table_id}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


METRIC_ROWS = [
    ("kl_mean", "mean per-token KL(bf16 || W8A8), nats"), ("kl_max", "max per-token KL, nats"),
    ("top1", "top-1 agreement"), ("generation_exact", "greedy generations identical (fraction)"),
    ("generation_overlap", "greedy token overlap"), ("caption_samples", "held-out captions scored"),
    ("nll_baseline", "caption NLL bf16"), ("nll_w8a8", "caption NLL W8A8"), ("nll_delta", "caption NLL delta"),
    ("ppl_baseline", "caption perplexity bf16"), ("ppl_w8a8", "caption perplexity W8A8"),
    ("ppl_delta", "perplexity delta"), ("sqnr_db_mean", "layer SQNR mean, dB"), ("sqnr_db_min", "layer SQNR min, dB"),
    ("tokens", "scored tokens"), ("samples", "samples"),
    ("recovery_min", "harness recovery, worst task (W8A8/bf16)"),
]

CSS = """body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1300px}
table{border-collapse:collapse;margin:8px 0 20px}td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:top;
font-size:13px}th{background:#f0f3f7;text-align:left}.verdict{display:inline-block;padding:4px 12px;border-radius:4px;
color:#fff;font-weight:bold}.pass{background:#2e8b57}.fail{background:#c0392b}.ungated{background:#7f8c8d}
.answer{font-family:ui-monospace,monospace;white-space:pre-wrap;max-width:330px;max-height:14em;overflow:auto}
.nl{color:#aaa}img.sample{max-width:220px}
img.plot{max-width:100%;display:block;margin:8px 0}
.note{background:#fff6d6;padding:6px 10px;border-left:4px solid #e0b400}
pre{background:#f6f6f6;padding:8px;overflow:auto;max-height:420px;font-size:12px}"""

SCRIPT = """<script>
function vlmqMark(){var imgs=document.images,ok=0;for(var i=0;i<imgs.length;i++){var im=imgs[i];
im.setAttribute('data-natural-width',im.naturalWidth);if(im.complete&&im.naturalWidth>0)ok++;}
var s=document.getElementById('img-status');s.setAttribute('data-decoded',ok);s.setAttribute('data-total',imgs.length);
s.textContent=ok+' of '+imgs.length+' pictures decoded ('+s.getAttribute('data-what')+')';}
window.addEventListener('load',vlmqMark);
</script>"""


def _answer(text: str) -> str:
    """Answer text with visible line breaks (a random demo model answers in newlines)."""
    return html.escape(text).replace("\n", '<span class="nl">\u21b5</span>\n') or "<i>(empty)</i>"


def _samples_table(samples: list[dict[str, Any]]) -> str:
    rows = []
    for s in samples:
        m = s["metrics"]
        img = ""
        if s["image"]:
            tag = "held-out" if s["held_out"] else "calibration image (not held out)"
            name = html.escape(Path(s["image"]).name)
            img = (f'<img class="sample" alt="{name}" src="{image_uri(Path(s["image"]))}">'
                   f"<br><small>{name} ({tag})</small>")
        prompt = html.escape(s["prompt"]) + (f"<br><small>reference: {html.escape(s['reference'])}</small>"
                                             if s["reference"] else "")
        nll = (f"<br>NLL {_fmt(m['nll_baseline'])} / {_fmt(m['nll_w8a8'])}" if "nll_baseline" in m else "")
        stats = (f"KL {_fmt(m['kl_mean'])} (max {_fmt(m['kl_max'])})<br>top-1 {_fmt(m['top1'])}<br>"
                 f"exact {_fmt(m['exact_match'])}, overlap {_fmt(m['token_overlap'])}{nll}")
        answers = [f'<div class="answer">{_answer(s[k]["text"])}</div><small>{len(s[k]["tokens"])} tokens</small>'
                   for k in ("baseline", "w8a8")]
        rows.append([html.escape(s["id"]), img, prompt, *answers, stats])
    return _table("samples", ["id", "image", "prompt", "bf16 answer", "W8A8 answer", "metrics"], rows)


def _layers_table(layers: list[dict[str, Any]]) -> str:
    rows = []
    for x in layers:
        b, a = x.get("amax_before") or {}, x.get("amax_after") or {}
        rows.append([html.escape(x["name"]), "identical (inf)" if x["sqnr_db"] is None else _fmt(x["sqnr_db"]),
                     _fmt(b.get("max")), _fmt(b.get("ratio")), _fmt(a.get("max")), _fmt(a.get("ratio"))])
    return _table("layers", ["linear", "SQNR dB", "amax before", "max/median before", "amax after",
                             "max/median after"], rows)


def _harness_section(run: dict[str, Any] | None, flag: str) -> str:
    """Scores of both models, recovery per metric (the gated first metric in bold), the exact commands."""
    if not run:
        return f"<p>not requested (<code>{flag}</code>)</p>"
    rows = []
    for task in sorted(set(run["scores"].get("bf16", {})) | set(run["scores"].get("w8a8", {}))):
        base, test = run["scores"].get("bf16", {}).get(task, {}), run["scores"].get("w8a8", {}).get(task, {})
        for metric in dict.fromkeys([*base, *test]):
            rec = _fmt(run["recovery"].get(task, {}).get(metric))
            gated = run["primary"].get(task) == metric
            rows.append([html.escape(task), html.escape(metric), _fmt(base.get(metric)), _fmt(test.get(metric)),
                         f"<b>{rec}</b>" if gated else rec])
    errors = "".join(f'<p class="note">{html.escape(label)}: {html.escape(err)}</p>'
                     for label, err in run["errors"].items())
    head = (f"<p>{html.escape(run['harness'])} {html.escape(run['version'])}, model adapter "
            f"<code>{html.escape(run['adapter'])}</code>, limit {_fmt(run['limit'])}; run in "
            f"<code>{html.escape(run['cwd'])}</code>. Recovery = W8A8 / bf16 (bf16 / W8A8 where lower is better); "
            "bold: the task's first metric, the one <code>--min-recovery</code> gates.</p>")
    cmds = "".join(f"<pre>{html.escape(' '.join(c))}</pre>" for c in run["commands"].values())
    table = _table(run["harness"].replace("-", "_"), ["task", "metric", "bf16", "W8A8", "recovery"], rows)
    return head + errors + table + cmds


def render_html(results: dict[str, Any], plots: dict[str, Path]) -> str:
    r, m = results, results["metrics"]
    title = f"vlmq check: {r['label']}"
    demo = ('<p class="note">DEMO model: tiny random weights, so the answers are gibberish; only the '
            "differences between bf16 and W8A8 mean anything.</p>" if r["demo"] else "")
    held = r["heldout"]
    inputs = any(s.get("image") for s in r["samples"])
    what = "plots and input images" if inputs else "plots; text-only run, no input images"
    held_note = f'<p class="note">{html.escape(held["note"])}</p>' if held.get("note") else ""
    gates = _table("gates", ["gate", "metric", "threshold", "value", "result"],
                   [[g["name"], g["metric"], f"{g['op']} {_fmt(g['threshold'])}", _fmt(g["value"]),
                     "pass" if g["passed"] else "<b>FAIL</b>"] for g in r["gates"]]) if r["gates"] else "<p>none</p>"
    metrics = _table("metrics", ["metric", "value"], [[html.escape(d), _fmt(m.get(k))] for k, d in METRIC_ROWS])
    plot_html = "".join(f'<h3>{html.escape(name.replace("_", " "))}</h3><img class="plot" alt="{name}" '
                        f'src="{_data_uri(path.read_bytes(), "image/png")}">' for name, path in plots.items())
    info = _table("run", ["item", "value"], [
        ["baseline (bf16)", html.escape(r["baseline"]["path"])],
        ["W8A8 checkpoint", html.escape(f"{r['model']['path']} ({r['model']['format']}, "
                                        f"{r['model']['activations']} activations)")],
        ["verify", html.escape(r["model"]["verify"])], ["device", html.escape(r["device"])],
        ["held-out samples", html.escape(f"{held['held_out']} of {held['requested']} from {held['source']} "
                                         f"{held['root']}" + (f" {held['splits']}" if held["source"] == "coco2017"
                                                              else "") +
                                         f"; calibration used {held['calibration_samples']} "
                                         f"(num_samples={held['num_samples']}, seed={held['seed']})")],
        ["created", html.escape(r["created"])], ["command", html.escape(r.get("command_line", ""))]])
    versions = _table("versions", ["package", "version"], [[html.escape(k), html.escape(v)]
                                                           for k, v in r["versions"].items()])
    manifest = html.escape(json.dumps(r["manifest"], indent=2, default=str))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; img-src data:; style-src 'unsafe-inline'; \
script-src 'unsafe-inline'">
<style>{CSS}</style></head><body>
<h1>{html.escape(title)} <span class="verdict {r['verdict']}" id="verdict">{r['verdict'].upper()}</span></h1>
{demo}<p id="img-status" data-decoded="0" data-total="0" data-what="{what}">pictures not checked yet</p>
{info}
<h2>Gates</h2>{gates}
<h2>Metrics (W8A8 vs bf16)</h2>{metrics}
<h2>Generations and scores</h2>{held_note}{_samples_table(r["samples"])}
<h2>Plots</h2><div id="plots">{plot_html}</div>
<h2>Layers: output SQNR and activation ranges before/after smoothing</h2>
<p>Smoothing factors: {html.escape(r["layers"][0]["factor_source"]) if r["layers"] else "n/a"}.</p>
{_layers_table(r["layers"])}
<h2>lm-eval (text tasks)</h2>{_harness_section(r.get("lm_eval"), "--lm-eval-tasks")}
<h2>lmms-eval (image tasks)</h2>{_harness_section(r["lmms_eval"], "--lmms-tasks")}
<h2>Versions</h2>{versions}
<h2>Export manifest</h2><details><summary>manifest.json</summary><pre id="manifest">{manifest}</pre></details>
{SCRIPT}
</body></html>
"""


def write_outputs(results: dict[str, Any], run_dir: Path) -> dict[str, Path]:
    """plots/*.png, results.json (schema-checked: a violation is a bug) and report.html under run_dir."""
    from vlmq.evaluate.plots import write_plots

    plots = write_plots(results, run_dir / "plots")
    results["plots"] = {k: str(p.relative_to(run_dir)) for k, p in plots.items()}
    clean = json_safe(results)
    problems = validate(clean)
    if problems:
        raise RuntimeError(f"results.json does not match its schema: {problems[0]}")
    (run_dir / "results.json").write_text(json.dumps(clean, indent=2) + "\n")
    (run_dir / "report.html").write_text(render_html(clean, plots), encoding="utf-8")
    return {"results": run_dir / "results.json", "report": run_dir / "report.html", **plots}


def check_summary(results: dict[str, Any]):
    from rich.table import Table

    m = results["metrics"]
    table = Table(title=f"vlmq check {results['label']}" + (" (DEMO model)" if results["demo"] else ""))
    table.add_column("metric")
    table.add_column("value", overflow="fold")
    for key, desc in METRIC_ROWS[:10] + METRIC_ROWS[12:14]:
        table.add_row(desc, _fmt(m.get(key)))
    for run in (r for r in (results.get("lm_eval"), results["lmms_eval"]) if r):
        for task, metric in run["primary"].items():
            scores = [run["scores"].get(k, {}).get(task, {}).get(metric) for k in ("bf16", "w8a8")]
            table.add_row(f"{run['harness']} {task} {metric} bf16 / W8A8",
                          f"{_fmt(scores[0])} / {_fmt(scores[1])}, recovery {_fmt(run['recovery'][task][metric])}")
    for g in results["gates"]:
        table.add_row(f"gate {g['name']} {g['op']} {g['threshold']}", "pass" if g["passed"] else "FAIL")
    table.add_row("verdict", results["verdict"])
    table.add_row("report", results["run_dir"] + "/report.html")
    return table
