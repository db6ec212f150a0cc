"""vlmq's Python API: quantize a model, export it, load it back; `vlmq quantize` runs the same functions
(vlmq.pipeline).

    q = vlmq.quantize("demo")                          # "demo", a snapshot folder, or a loaded model
    q.export("out/w8a8", formats=["compressed_tensors"])   # atomic; an existing export needs force=True
    model, processor = vlmq.load("out/w8a8")

Every argument is config (conf/, vlmq.config): `config_for` returns the config a call runs, which is what
`vlmq quantize` runs with the overrides `as_overrides` makes, e.g.
`quantize(path, recipe={"alpha": 0.8}, calib="data/coco2017")` is
`vlmq quantize arch.snapshot=path quant.alpha=0.8 calib.root=data/coco2017` (+ `arch.family`, read from the
snapshot's config.json). Bad input raises the CLI's one-line errors (`ConfigError`, `SnapshotError`,
`CalibDataError`, `ExportError`, `CheckpointError`, all ValueError or RuntimeError); a wrong argument type
raises TypeError.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shlex
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from vlmq.config import CalibConfig, Config, ConfigError, QuantConfig, conf_dir, load_config
from vlmq.console import library_chatter_to_log
from vlmq.pipeline import Quantized, prepare, quantize_prepared, start

__all__ = ["DEMO", "Quantized", "as_overrides", "config_for", "load", "quantize"]

DEMO = "demo"   # model_or_path: the built-in tiny Qwen2.5-VL (`demo=on`), calibrated on the demo COCO set
ModelArg = str | Path | nn.Module
RecipeArg = str | Sequence[str] | Mapping[str, Any] | QuantConfig | None
CalibArg = str | Path | CalibConfig | None
Overrides = Mapping[str, Any] | Sequence[str]


def quantize(model_or_path: ModelArg, recipe: RecipeArg = None,
             calib: CalibArg | Sequence[str | Mapping[str, str]] = None, *, processor: Any = None,
             overrides: Overrides = ()) -> Quantized:
    """Quantize the language model's linears to W8A8 INT8 (SmoothQuant, ModelOpt calibration); the vision tower
    stays bf16. Returns a `Quantized`: `.export(out_dir, formats, force)`, `.state`, `.model` (ModelOpt's
    fake-quant W8A8).

    - model_or_path: "demo" (`demo=on`), a snapshot folder (`arch.snapshot`; `arch.family` from its config.json),
      or a loaded transformers model (quantized in place; `processor=` unless its name_or_path is a local folder).
    - recipe: None (conf/quant's default), a conf/quant file name (`quant=NAME`), a list of step names
      (`quant.steps`), a dict of quant keys (`quant.KEY=VALUE`) or a `QuantConfig` (every key).
    - calib: None (the demo set for the demo model, else conf/calib's root), a COCO 2017 root or a .jsonl file
      (`calib.root`; a file also sets `calib.source=jsonl`), a `CalibConfig`, or a list of texts / text records
      ({"prompt", "answer"} or {"text"}), which are written to a temporary .jsonl file.
    - overrides: any other config keys, as {"calib.num_samples": 64} or CLI strings ["calib.num_samples=64"].
    """
    workdir = tempfile.TemporaryDirectory(prefix="vlmq-")   # the demo snapshot, calib records: removed with `q`
    try:
        if isinstance(calib, (list, tuple)):
            calib = write_records(calib, Path(workdir.name) / "calib.jsonl")
        cfg = config_for(model_or_path, recipe, calib, overrides)
        module = model_or_path if isinstance(model_or_path, nn.Module) else None
        if module is not None:
            check_loaded_model(module, processor, cfg)
        ctx = start(cfg, Path(workdir.name))
        with ctx.stage("prepare"), library_chatter_to_log():
            inputs = prepare(ctx, module)
        q = quantize_prepared(ctx, inputs, module, processor)
    except BaseException:
        workdir.cleanup()
        raise
    command = "vlmq quantize " + shlex.join(cfg.overrides)
    return dataclasses.replace(q, tool="vlmq.quantize", command_line=command, log_dir=None, workdir=workdir)


def load(path: str | Path, device: str = "auto", backend: str = "auto") -> tuple[nn.Module, Any]:
    """(model, processor) of an export (a format folder, or an export root: its first format) on vlmq's INT8
    runtime, or of a bf16 snapshot. `generate_text(model, processor, prompt)` (vlmq.runtime.generate) or the
    model's own `generate` run it."""
    from vlmq.runtime.generate import load_any

    model, processor, _ = load_any(Path(path), device, backend)
    return model, processor


def config_for(model_or_path: ModelArg, recipe: RecipeArg = None, calib: CalibArg = None,
               overrides: Overrides = ()) -> Config:
    """The validated config that `quantize` runs for these arguments."""
    return load_config(as_overrides(model_or_path, recipe, calib, overrides))


def as_overrides(model_or_path: ModelArg, recipe: RecipeArg = None, calib: CalibArg = None,
                 overrides: Overrides = ()) -> list[str]:
    """The `vlmq quantize` overrides that say what the arguments say. A key set both by an argument and in
    `overrides` is an error; what is read from the inputs (`arch.family`, `calib.source`) yields to `overrides`."""
    given = dict(_split(o) for o in _override_strings(overrides))
    args = {**model_keys(model_or_path), **recipe_keys(recipe), **calib_keys(calib)}
    twice = sorted(set(args) & set(given))
    if twice:
        raise ConfigError(f"{twice[0]} is given twice: by an argument and in overrides")
    read = {k: v for k, v in read_keys(model_or_path, calib).items() if k not in given and k not in args}
    return [f"{k}={v}" for k, v in {**args, **read}.items()] + [f"{k}={v}" for k, v in given.items()]


def model_keys(model: ModelArg) -> dict[str, str]:
    if isinstance(model, nn.Module):
        return {"demo": "off"}
    if isinstance(model, str) and model == DEMO:
        return {"demo": "on"}
    if isinstance(model, (str, Path)):
        return {"arch.snapshot": hydra_value(str(model)), "demo": "off"}
    raise TypeError(f"model_or_path must be {DEMO!r}, a snapshot folder or a torch nn.Module, "
                    f"got {type(model).__name__}")


def recipe_keys(recipe: RecipeArg) -> dict[str, str]:
    if recipe is None:
        return {}
    if isinstance(recipe, str):
        known = sorted(p.stem for p in (conf_dir() / "quant").glob("*.yaml"))
        if recipe not in known:
            raise ConfigError(f"unknown recipe {recipe!r} (known: {', '.join(known)}; or a dict of quant keys)")
        return {"quant": recipe}
    if isinstance(recipe, QuantConfig):
        recipe = dataclasses.asdict(recipe)
    elif isinstance(recipe, Sequence):
        recipe = {"steps": list(recipe)}
    if not isinstance(recipe, Mapping):
        raise TypeError(f"recipe must be a recipe name, a list of steps, a dict of quant keys or a QuantConfig, "
                        f"got {type(recipe).__name__}")
    return leaf_keys("quant", recipe)


def calib_keys(calib: CalibArg) -> dict[str, str]:
    if calib is None:
        return {}
    if isinstance(calib, (str, Path)):
        return {"calib.root": hydra_value(str(calib))}
    if isinstance(calib, CalibConfig):
        return leaf_keys("calib", dataclasses.asdict(calib))
    raise TypeError(f"calib must be a calibration root or .jsonl file, a CalibConfig or (vlmq.quantize) a list of "
                    f"texts, got {type(calib).__name__}")


def leaf_keys(prefix: str, values: Mapping[str, Any]) -> dict[str, str]:
    """{"quant.rotate.seed": "0", ...}: one override per leaf, as on the command line (lists are leaves)."""
    out = {}
    for key, value in values.items():
        if isinstance(value, Mapping):
            out.update(leaf_keys(f"{prefix}.{key}", value))
        else:
            out[f"{prefix}.{key}"] = hydra_value(value)
    return out


def read_keys(model: ModelArg, calib: CalibArg) -> dict[str, str]:
    """What the inputs themselves say: a snapshot's or model's family, a calibration file's source."""
    out = {}
    model_type = model.config.model_type if isinstance(model, nn.Module) else None
    if isinstance(model, (str, Path)) and model != DEMO:
        try:
            model_type = json.loads((Path(model) / "config.json").read_text()).get("model_type")
        except (OSError, ValueError, AttributeError):
            pass   # the snapshot checks say what is wrong with it, in order
    if model_type is not None:
        from vlmq.models.families import FAMILIES

        if model_type in FAMILIES:
            out["arch.family"] = FAMILIES[model_type].name
    if isinstance(calib, (str, Path)) and Path(calib).is_file():
        out["calib.source"] = "jsonl"
    return out


def hydra_value(value: Any) -> str:
    """`value` in Hydra's override grammar (strings quoted, so no character is special)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (str, Path)):
        # Hydra unescapes backslashes only before a quote, an interpolation or the closing quote.
        text = re.sub(r"(\\+)(?='|\$\{|$)", lambda m: m.group(1) * 2, str(value))
        return "'" + text.replace("'", "\\'").replace("${", "\\${") + "'"
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, Mapping):
        return "{" + ",".join(f"{k}:{hydra_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(hydra_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} {value!r} as a config value")


def _override_strings(overrides: Overrides) -> list[str]:
    if isinstance(overrides, Mapping):
        return [f"{k}={hydra_value(v)}" for k, v in overrides.items()]
    if isinstance(overrides, str) or not all(isinstance(o, str) for o in overrides):
        raise TypeError("overrides must be a dict of config keys or a list of 'key=value' strings")
    return list(overrides)


def _split(override: str) -> tuple[str, str]:
    if "=" not in override:
        raise ConfigError(f"override '{override}' is not of the form key=value")
    key, value = override.split("=", 1)
    return key, value


def write_records(records: Sequence[str | Mapping[str, str]], path: Path) -> Path:
    """Texts and text records as a JSONL calibration file (`calib.source=jsonl`)."""
    lines = []
    for record in records:
        record = {"text": record} if isinstance(record, str) else record
        if not isinstance(record, Mapping):
            raise TypeError(f"calib records are texts or dicts, got {type(record).__name__}")
        if "image" in record:
            raise ConfigError("calib records with an image: write them to a .jsonl file beside the images and "
                              "pass its path (image paths are relative to the file's folder)")
        lines.append(json.dumps(dict(record), ensure_ascii=False))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def check_loaded_model(model: nn.Module, processor: Any, cfg: Config) -> None:
    name = getattr(model, "name_or_path", "")
    if processor is None and not (name and Path(name).is_dir()):
        raise TypeError("a loaded model needs processor=... (its name_or_path is not a local snapshot folder)")
    if cfg.quant.max_kl is not None:
        raise ConfigError("quant.max_kl re-quantizes a fresh copy from the snapshot: pass the snapshot's folder, "
                          "not a loaded model")
