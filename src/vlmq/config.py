"""Compose the Hydra config tree under conf/ and validate it into a typed schema.

Hydra does the composition and override parsing; OmegaConf's structured configs reject unknown
keys and wrong types; `check_values` rejects values the types allow but vlmq does not.
Every failure is raised as `ConfigError` with a one-line message.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

CONFIG_VERSION = 1
REPO_ROOT = Path(__file__).resolve().parents[2]
EXPORT_FORMATS = ("modelopt_hf", "compressed_tensors")
CALIB_SOURCES = ("coco2017", "jsonl", "text_jsonl")
DEFAULT_MODEL = "qwen2_5_vl_3b_instruct"  # the model whose files conf/config.yaml's defaults name
DICT_KEYS = ("arch.max_memory",)           # map-valued keys: overrides may add entries


class ConfigError(ValueError):
    """A user-facing configuration problem (one line)."""


# The float dtypes a model is computed in (arch.dtype) or a checkpoint written in (export.dtype).
DTYPES = ("bfloat16", "float16", "float32")

@dataclass
class ArchConfig:
    name: str = "qwen2_5_vl_3b_instruct"
    short_name: str = "qwen2_5_vl_3b"
    family: str = "qwen2_5_vl"
    snapshot: str = "models/qwen2_5_vl_3b_instruct/checkpoints/Qwen2.5-VL-3B-Instruct"
    hub_id: str = "Qwen/Qwen2.5-VL-3B-Instruct"
    modelscope_id: str = "Qwen/Qwen2.5-VL-3B-Instruct"
    dtype: str = "bfloat16"
    quantized: bool = False
    trust_remote_code: bool = False
    max_memory: dict[Any, str] = field(default_factory=dict)   # GPU index (or "cpu") -> cap


@dataclass
class InferConfig:
    max_new_tokens: int = 64  # `vlmq check` decodes greedily: W8A8 and bf16 answers compared token by token
    text_prompts: list[str] = field(default_factory=list)
    image_prompts: list[str] = field(default_factory=list)
    heldout_samples: int = 8


ROTATION_MATRICES = ("auto", "hadamard", "orthogonal")


@dataclass
class RotateConfig:
    """The `rotate` step (vlmq.quantize.rotate): orthogonal rotations that leave the bf16 model unchanged."""

    residual: bool = True      # R1: the residual stream, folded into the weights (unties a tied lm_head)
    values: bool = False       # R2: per-head rotation of the attention values, folded
    mlp_input_block: int = 128  # R4: online block Hadamard on down_proj's input (power of 2; 0 = off)
    # R1/R2's matrix: "hadamard" (randomized Hadamard wherever vlmq.numerics.hadamard reaches the size: powers
    # of two, also 576, 3584; Haar-random orthogonal elsewhere), "auto" (Hadamard for a power-of-two size only)
    # or "orthogonal" (Haar-random); docs/QUANTIZATION.md has what each measured
    matrix: str = "hadamard"
    seed: int = 0


@dataclass
class GptqConfig:
    """The `gptq` step (vlmq.quantize.gptq): int8 weights rounded against calibration Hessians."""

    damp: float = 0.01
    block: int = 128
    act_order: bool = True
    # Where the Hessians are summed: null = each linear's own device; "cpu" = host RAM (on a GPU each batch's
    # x^T x is still formed there). Qwen2.5-VL-3B's are 19.3 GB in fp32, more than a 24 GB GPU holds beside
    # the model; 7B's 44.5 GB.
    hessian_device: str | None = None


@dataclass
class QuantConfig:
    name: str = "w8a8_int8_sq"
    alpha: float = 0.5
    kv_cache: str = "none"
    # Per-layer SmoothQuant strength: each shared-input group (q/k/v, o, gate/up, down) takes the
    # alpha of alpha_grid with the least W8A8 output error on calibration inputs (`alpha` breaks ties).
    alpha_search: bool = False
    alpha_grid: list[float] = field(default_factory=lambda: [0.3, 0.4, 0.5, 0.6, 0.7, 0.8])
    alpha_search_tokens: int = 512  # calibration tokens kept per linear input for the search
    # Sensitivity fallback: keep the fewest most sensitive LM linears bf16 until the model's per-token
    # KL vs bf16 (on kl_samples held-out samples) is <= max_kl. null = off.
    max_kl: float | None = None
    kl_samples: int = 8
    steps: list[str] = field(default_factory=lambda: ["rotate", "calibrate", "smooth", "gptq", "round"])
    rotate: RotateConfig = field(default_factory=RotateConfig)
    gptq: GptqConfig = field(default_factory=GptqConfig)


@dataclass
class CalibMixPart:
    """One extra calibration source mixed in by ratio (the main `calib.source` gets the rest)."""

    source: str = "text_jsonl"  # coco2017, jsonl or text_jsonl
    root: str = ""  # COCO root, or the JSONL file
    ratio: float = 0.2  # share of calib.num_samples, in (0, 1)


@dataclass
class CalibConfig:
    source: str = "coco2017"
    root: str = "data/coco2017"
    splits: list[str] = field(default_factory=lambda: ["val2017"])
    num_samples: int = 512
    min_samples: int = 8
    seed: int = 0
    batch_size: str = "auto"
    max_length: int = 1024
    instruction: str = "Describe this image in one sentence."
    gpu_memory_fraction: float = 1.0
    mix: list[CalibMixPart] = field(default_factory=list)


@dataclass
class ExportConfig:
    dir: str = "models/qwen2_5_vl_3b_instruct/quantized/w8a8_int8_sq"
    formats: list[str] = field(default_factory=lambda: ["compressed_tensors"])  # as conf/export
    activations: str = "dynamic"
    smooth_o_proj: bool = True
    dtype: str = "auto"  # the checkpoint's float tensors: auto (fp16 where the peaks allow; quantize/peaks.py), ...
    score: bool = True   # load each written format with vlmq's runtime and score it against bf16 (quant.kl_samples)


@dataclass
class Config:
    arch: ArchConfig = field(default_factory=ArchConfig)
    infer: InferConfig = field(default_factory=InferConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    calib: CalibConfig = field(default_factory=CalibConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    model: str = "qwen2_5_vl_3b_instruct"
    demo: str = "auto"
    device: str = "auto"
    run_name: str | None = None
    log_root: str = "tmp/qwen2_5_vl_3b_w8a8"
    force: bool = False
    version: int = CONFIG_VERSION
    # Keys given on the command line (used to tell "the default snapshot is absent" from
    # "the snapshot you named is absent").
    overrides: list[str] = field(default_factory=list)

    def overridden(self, key: str) -> bool:
        return any(o.split("=", 1)[0].lstrip("+~") == key for o in self.overrides)

    def resolve_path(self, value: str) -> Path:
        """Relative paths in the config are relative to the working directory."""
        return Path(os.path.expanduser(value)).absolute()

    def to_dict(self) -> dict[str, Any]:
        return OmegaConf.to_container(OmegaConf.structured(self), resolve=True)  # type: ignore[return-value]


def conf_dir() -> Path:
    """The conf/ tree: $VLMQ_CONF_DIR, else the repository's conf/."""
    return Path(os.environ.get("VLMQ_CONF_DIR", REPO_ROOT / "conf"))


def _expand_shorthands(overrides: list[str], root: Path) -> list[str]:
    """`model=M`, `arch=A`, `infer=I` select files under conf/model/<M>/{arch,infer}/."""
    values = dict(o.split("=", 1) for o in overrides if "=" in o)
    model = values.get("model", DEFAULT_MODEL)
    if not (root / "model" / model).is_dir():
        known = sorted(p.name for p in (root / "model").iterdir() if p.is_dir())
        raise ConfigError(f"unknown model '{model}' (known: {', '.join(known)})")
    out = []
    for o in overrides:
        key = o.split("=", 1)[0]
        if key in DICT_KEYS:   # open-ended maps: Hydra's struct mode refuses new keys unless forced
            out.append("++" + o)
        elif o == "quant.alpha=auto":   # the per-layer search's short name
            out.append("quant.alpha_search=true")
        elif key not in ("arch", "infer", "model"):   # `model` is set after composing (see load_config)
            out.append(o)
    for group in ("arch", "infer"):
        choice = values.get(group, f"{model}.default")
        if not (root / "model" / model / group / f"{choice}.yaml").is_file():
            options = sorted(p.stem for p in (root / "model" / model / group).glob("*.yaml"))
            raise ConfigError(f"unknown {group} '{choice}' for model {model} (known: {', '.join(options)})")
        if model == DEFAULT_MODEL and group in values:
            out.append(f"model/{DEFAULT_MODEL}/{group}@{group}={choice}")
        elif model != DEFAULT_MODEL:
            out.append(f"~model/{DEFAULT_MODEL}/{group}@{group}")
            out.append(f"+model/{model}/{group}@{group}={choice}")
    return out


def schema_keys(cls: type = Config, prefix: str = "") -> dict[str, Any]:
    """Every key of the schema, dotted (`quant.alpha`; sections too: `quant`), with its type."""
    out: dict[str, Any] = {}
    for name, hint in typing.get_type_hints(cls).items():
        out[prefix + name] = hint
        if dataclasses.is_dataclass(hint):
            out.update(schema_keys(hint, f"{prefix}{name}."))
    return out


def _check_override_keys(overrides: list[str]) -> None:
    """Before Hydra sees them: an unknown key names the closest known one; a list key given a bare value says
    how to write a list."""
    keys = schema_keys()
    for override in overrides:
        raw, value = override.split("=", 1)
        key = raw.lstrip("+~")
        if key.startswith("hydra.") or any(key.startswith(f"{d}.") for d in DICT_KEYS):
            continue
        if key not in keys:
            section, _, leaf = key.rpartition(".")
            siblings = {k.rpartition(".")[2]: k for k in keys if k.rpartition(".")[0] == section}
            close = [siblings[m] for m in difflib.get_close_matches(leaf, list(siblings), n=1, cutoff=0.6)] or \
                difflib.get_close_matches(key, [k for k in keys if k != "overrides"], n=1, cutoff=0.8)
            if close:
                hint = f"; did you mean {close[0]}?"
            elif section in keys:
                hint = f" (known {section} keys: {', '.join(k for k in keys if k.startswith(section + '.'))})"
            else:
                hint = f" (top-level keys: {', '.join(k for k in keys if '.' not in k and k != 'overrides')})"
            raise ConfigError(f"unknown config key '{key}'{hint}")
        if typing.get_origin(keys[key]) is list and raw == key and not value.strip().startswith("["):
            raise ConfigError(f"{key} takes a list: {key}=[{value}]")


def check_values(cfg: Config) -> None:
    """Values the types allow but vlmq does not: the first is a one-line `ConfigError`."""
    checks = [
        (0.0 <= cfg.quant.alpha <= 1.0, f"quant.alpha must be in [0, 1], got {cfg.quant.alpha}"),
        (bool(cfg.quant.alpha_grid) and all(0.0 <= a <= 1.0 for a in cfg.quant.alpha_grid),
         f"quant.alpha_grid must be a non-empty list of values in [0, 1], got {list(cfg.quant.alpha_grid)}"),
        (cfg.quant.alpha_search_tokens >= 16,
         f"quant.alpha_search_tokens must be >= 16, got {cfg.quant.alpha_search_tokens}"),
        (cfg.quant.max_kl is None or cfg.quant.max_kl > 0,
         f"quant.max_kl must be > 0 (or null for off), got {cfg.quant.max_kl}"),
        (cfg.quant.kl_samples >= 1, f"quant.kl_samples must be >= 1, got {cfg.quant.kl_samples}"),
        (cfg.quant.kv_cache in ("none", "fp8"), f"quant.kv_cache must be none or fp8, got {cfg.quant.kv_cache!r}"),
        (cfg.calib.num_samples >= 1, f"calib.num_samples must be >= 1, got {cfg.calib.num_samples}"),
        (cfg.calib.min_samples >= 1, f"calib.min_samples must be >= 1, got {cfg.calib.min_samples}"),
        (0.01 <= cfg.calib.gpu_memory_fraction <= 1.0,
         f"calib.gpu_memory_fraction must be in [0.01, 1], got {cfg.calib.gpu_memory_fraction}"),
        (cfg.calib.max_length >= 16, f"calib.max_length must be >= 16, got {cfg.calib.max_length}"),
        (cfg.calib.batch_size == "auto" or (cfg.calib.batch_size.isdigit() and int(cfg.calib.batch_size) >= 1),
         f"calib.batch_size must be a positive integer or auto, got {cfg.calib.batch_size!r}"),
        (cfg.calib.source in CALIB_SOURCES,
         f"calib.source must be coco2017, jsonl or text_jsonl, got {cfg.calib.source!r}"),
        *[(p.source in CALIB_SOURCES, f"calib.mix source must be coco2017, jsonl or text_jsonl, got {p.source!r}")
          for p in cfg.calib.mix],
        *[(bool(p.root), f"calib.mix entry for {p.source} needs a root") for p in cfg.calib.mix],
        *[(0.0 < p.ratio < 1.0, f"calib.mix ratio must be in (0, 1), got {p.ratio}") for p in cfg.calib.mix],
        (sum(p.ratio for p in cfg.calib.mix) < 1.0,
         f"calib.mix ratios must sum below 1 (calib.source gets the rest), got "
         f"{sum(p.ratio for p in cfg.calib.mix):g}"),
        (all(s in ("train2017", "val2017") for s in cfg.calib.splits) and cfg.calib.splits,
         f"calib.splits must be a non-empty subset of [train2017, val2017], got {list(cfg.calib.splits)}"),
        (bool(cfg.export.formats) and all(f in EXPORT_FORMATS for f in cfg.export.formats),
         f"export.formats must be a non-empty subset of {list(EXPORT_FORMATS)}, got {list(cfg.export.formats)}"),
        (cfg.export.activations in ("static", "dynamic"),
         f"export.activations must be static or dynamic, got {cfg.export.activations!r}"),
        (cfg.demo in ("auto", "on", "off"), f"demo must be auto, on or off, got {cfg.demo!r}"),
        (cfg.device in ("auto", "cpu", "cuda"), f"device must be auto, cpu or cuda, got {cfg.device!r}"),
        (cfg.quant.rotate.mlp_input_block >= 0 and not cfg.quant.rotate.mlp_input_block & (
            cfg.quant.rotate.mlp_input_block - 1), "quant.rotate.mlp_input_block must be 0 (off) or a power of two, "
         f"got {cfg.quant.rotate.mlp_input_block}"),
        (cfg.quant.rotate.matrix in ROTATION_MATRICES,
         f"quant.rotate.matrix must be one of {list(ROTATION_MATRICES)}, got {cfg.quant.rotate.matrix!r}"),
        (not ("modelopt_hf" in cfg.export.formats and "rotate" in cfg.quant.steps
              and cfg.quant.rotate.mlp_input_block),
         "export.formats: ModelOpt's layout (modelopt_hf) has no online Hadamard for down_proj's input (R4): "
         "with it, set quant.rotate.mlp_input_block=0"),
        (0.0 <= cfg.quant.gptq.damp < 1.0, f"quant.gptq.damp must be in [0, 1), got {cfg.quant.gptq.damp}"),
        (cfg.quant.gptq.block >= 1, f"quant.gptq.block must be >= 1, got {cfg.quant.gptq.block}"),
        (cfg.quant.gptq.hessian_device in (None, "cpu"),
         "quant.gptq.hessian_device must be null (each linear's device) or cpu, "
         f"got {cfg.quant.gptq.hessian_device!r}"),
        (cfg.arch.dtype in DTYPES,
         f"arch.dtype must be bfloat16, float16 or float32, got {cfg.arch.dtype!r}"),
        (cfg.export.dtype in ("auto", *DTYPES),
         f"export.dtype must be auto, bfloat16, float16 or float32, got {cfg.export.dtype!r}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


def load_config(overrides: list[str] | None = None) -> Config:
    """Compose conf/config.yaml with Hydra-style overrides and return the validated typed config."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    overrides = list(overrides or [])
    root = conf_dir()
    if not (root / "config.yaml").is_file():
        raise ConfigError(f"config tree not found: {root}/config.yaml (set VLMQ_CONF_DIR)")
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ConfigError(f"override '{bad[0]}' is not of the form key=value")
    _check_override_keys(overrides)
    hydra_overrides = _expand_shorthands(overrides, root)
    try:
        with initialize_config_dir(config_dir=str(root), version_base=None):
            composed: DictConfig = compose(config_name="config", overrides=hydra_overrides)
        # conf/model/ is a folder of groups, so Hydra reads `model=` as a group choice; it is a plain key.
        composed.model = next((o.split("=", 1)[1] for o in overrides if o.split("=", 1)[0] == "model"),
                              composed.model)
        schema = OmegaConf.structured(Config)
        merged = OmegaConf.merge(schema, composed)
        cfg: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(_one_line(err)) from None
    cfg.overrides = overrides
    check_values(cfg)
    return cfg


def _one_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    first = text[0] if text else type(err).__name__
    for line in text[1:]:
        if line.strip().startswith("full_key:"):
            first += f" ({line.strip()})"
            break
    return f"bad config: {first}"
