"""Load an exported W8A8 checkpoint (ModelOpt unified HF or compressed-tensors) into the stock
transformers model, with `W8A8Linear` in place of the language model's linears.

The format is read from `config.json`'s `quantization_config.quant_method`, never the path.
A checkpoint whose tensors disagree with its config is refused with a one-line error.

FP8 KV-cache scales (`quant.kv_cache=fp8`: compressed-tensors' `self_attn.{k,v}_scale`, ModelOpt's
`self_attn.{k,v}_proj.{k,v}_scale`) are checked against the config, then ignored: vlmq's runtime keeps its KV
cache in the model dtype (`CheckpointInfo.kv_cache` says what the checkpoint asks engines for).

Online input transforms (compressed-tensors `transform_config`): schemes of type `hadamard` applied at a
module's `input` (the rotate step's R4 on down_proj) are run as vLLM runs them, a block Hadamard of the input
(blocks of the scheme's head_dim). `weight_input` entries describe what was folded and are skipped, as vLLM
does; anything else is refused, since running the checkpoint without it would be silently wrong.
"""

from __future__ import annotations

import functools
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from vlmq.models.families import Family, UnsupportedModelError, family_for
from vlmq.numerics import block_hadamard
from vlmq.runtime.linear import W8A8Linear

log = logging.getLogger(__name__)
FORMATS = {"modelopt": "modelopt_hf", "compressed-tensors": "compressed_tensors"}
# KV-cache scales of an attention module, in either format's names
KV_SCALE = re.compile(r"\.self_attn\.(?:[kv]_proj\.)?[kv]_scale$")


class CheckpointError(ValueError):
    """The checkpoint is missing, unsupported or inconsistent (one line)."""


@dataclass
class CheckpointInfo:
    path: Path
    format: str  # modelopt_hf | compressed_tensors
    family: Family
    config: dict
    activations: str  # static | dynamic
    quantized: list[str]  # in-memory module names of the W8A8 linears
    smoothing_scales: bool  # True when linears carry pre_quant_scale (ModelOpt format)
    kv_cache: str = "none"  # fp8: the checkpoint carries FP8 KV-cache scales (for engines; the runtime ignores them)
    input_hadamards: dict[str, int] = field(default_factory=dict)  # module name -> block (transform_config)
    warnings: list[str] = field(default_factory=list)  # one line each: another format of the export is damaged


def checkpoint_float_dtype(config: dict) -> torch.dtype:
    """The float dtype a checkpoint's config declares, for running it: float16 as declared, anything else bf16
    (an fp32 declaration too: the runtime's int8 paths were built for 16-bit floats)."""
    from vlmq.models.load import declared_dtype

    return torch.float16 if declared_dtype(config) == "float16" else torch.bfloat16


def read_state_dict(path: Path, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint, read straight onto `device` (a GPU load never holds the model in host RAM)."""
    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no *.safetensors in {path}")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(str(file), framework="pt", device=str(device)) as fh:
            for key in fh.keys():
                tensors[key] = fh.get_tensor(key)
    return tensors


def inspect_checkpoint(path: Path, tensors: dict[str, torch.Tensor] | None = None) -> CheckpointInfo:
    """Check format, family and that tensors agree with the config; no model is built."""
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"not a checkpoint directory (no config.json): {path}")
    config = json.loads(config_file.read_text())
    qcfg = config.get("quantization_config") or {}
    fmt = FORMATS.get(qcfg.get("quant_method"))
    if fmt is None:
        raise CheckpointError(
            f"{path}: quantization_config.quant_method is {qcfg.get('quant_method')!r}; "
            "expected modelopt or compressed-tensors"
        )
    try:
        family = family_for(config.get("model_type"))
    except UnsupportedModelError as err:
        raise CheckpointError(f"{path}: {err}") from None
    tensors = tensors if tensors is not None else read_state_dict(path)
    int8 = sorted(k[: -len(".weight")] for k, v in tensors.items() if k.endswith(".weight") and v.dtype == torch.int8)
    if not int8:
        raise CheckpointError(f"{path}: no int8 weights, but config says it is quantized")
    vision_int8 = [k for k in int8 if family.ckpt_vision and k.startswith(family.ckpt_vision + ".")]
    if vision_int8:
        raise CheckpointError(f"{path}: vision tensor {vision_int8[0]}.weight is int8; the vision tower must stay bf16")
    if fmt == "modelopt_hf":
        algo = qcfg.get("quant_algo")
        if algo != "W8A8_SQ_PER_CHANNEL":
            raise CheckpointError(f"{path}: ModelOpt quant_algo {algo!r} is not W8A8_SQ_PER_CHANNEL")
        activations, needs = "static", ("weight_scale", "input_scale", "pre_quant_scale")
    else:
        groups = list((qcfg.get("config_groups") or {}).values())
        if len(groups) != 1 or (groups[0].get("weights") or {}).get("num_bits") != 8:
            raise CheckpointError(f"{path}: expected one int8 W8A8 config group in quantization_config")
        acts = groups[0].get("input_activations") or {}
        if acts.get("num_bits") != 8 or acts.get("type") != "int":
            raise CheckpointError(f"{path}: input activations are not int8 in quantization_config")
        activations = "dynamic" if acts.get("dynamic") else "static"
        needs = ("weight_scale", "input_scale") if activations == "static" else ("weight_scale",)
        if activations == "dynamic":
            extra = [k for k in int8 if f"{k}.input_scale" in tensors]
            if extra:
                raise CheckpointError(f"{path}: {extra[0]}.input_scale present but config says dynamic activations")
    for name in int8:
        for suffix in needs:
            if f"{name}.{suffix}" not in tensors:
                raise CheckpointError(f"{path}: {name}.{suffix} missing for int8 weight {name}.weight")
    kv_cache = _kv_cache(path, fmt, qcfg, config, tensors)
    input_hadamards = _input_hadamards(path, qcfg, family, tensors)
    return CheckpointInfo(
        path=path,
        format=fmt,
        family=family,
        config=config,
        activations=activations,
        quantized=[family.module_name(n) for n in int8],
        smoothing_scales=fmt == "modelopt_hf",
        kv_cache=kv_cache,
        input_hadamards=input_hadamards,
    )


def _input_hadamards(path: Path, qcfg: dict, family: Family, tensors: dict[str, torch.Tensor]) -> dict[str, int]:
    """{in-memory module name: block size} of the online Hadamards in `transform_config`."""
    groups = ((qcfg.get("transform_config") or {}).get("config_groups") or {})
    linears = sorted({k.rsplit(".", 1)[0] for k in tensors if k.endswith(".weight") and tensors[k].dim() == 2})
    out: dict[str, int] = {}
    for scheme_name, scheme in groups.items():
        for apply in scheme.get("apply") or []:
            if apply.get("location") == "weight_input":
                continue
            if scheme.get("type") != "hadamard" or apply.get("location") != "input":
                raise CheckpointError(f"{path}: transform {scheme_name!r} ({scheme.get('type')} at "
                                      f"{apply.get('location')}) is not an input Hadamard, which is all vlmq runs")
            block = scheme.get("head_dim")
            matched = [n for n in linears if _matches(apply.get("targets") or [], n, family.module_name(n))]
            if not matched:
                raise CheckpointError(f"{path}: transform {scheme_name!r} targets {apply.get('targets')} "
                                      "match no linear")
            for name in matched:
                size = tensors[f"{name}.weight"].shape[1]
                width = block or size
                if width & (width - 1) or size % width:
                    raise CheckpointError(f"{path}: transform {scheme_name!r}: block {width} does not tile {name}'s "
                                          f"{size} inputs in powers of two")
                out[family.module_name(name)] = width
    return out


def _matches(targets: list[str], *names: str) -> bool:
    for target in targets:
        pattern = target[3:] if target.startswith("re:") else None
        for name in names:
            if (re.match(pattern, name) if pattern is not None else name == target or name.endswith("." + target)):
                return True
    return False


def _kv_cache(path: Path, fmt: str, qcfg: dict, config: dict, tensors: dict[str, torch.Tensor]) -> str:
    """"fp8" when the config asks for an FP8 KV cache (and every decoder layer has its k/v scales), else "none";
    KV-cache scales without that config are refused."""
    scales = [k for k in tensors if KV_SCALE.search(k)]
    scheme = qcfg.get("kv_cache_scheme")   # both formats write it (ModelOpt: {num_bits: 8, type: float})
    wanted = (isinstance(scheme, dict) and scheme.get("type") == "float" and scheme.get("num_bits") == 8) or (
        fmt == "modelopt_hf" and str(qcfg.get("kv_cache_quant_algo") or "").upper() == "FP8")
    if not wanted:
        if scales:
            raise CheckpointError(f"{path}: KV-cache scale {scales[0]} present but config has no FP8 KV cache")
        return "none"
    layers = int(config.get("text_config", config).get("num_hidden_layers", 0))
    if len(scales) != 2 * layers:
        raise CheckpointError(f"{path}: config asks for an FP8 KV cache but {len(scales)} k/v scales are stored "
                              f"for {layers} decoder layers (expected {2 * layers})")
    return "fp8"


def build_w8a8_model(
    info: CheckpointInfo,
    tensors: dict[str, torch.Tensor],
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    backend: str = "auto",
) -> nn.Module:
    """The stock transformers model with W8A8Linear modules, weights loaded from `tensors`."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(info.path)
    config.quantization_config = None
    with init_empty_weights():
        model = info.family.model_class().from_config(config, dtype=dtype)
    state: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        if KV_SCALE.search(key):   # FP8 KV-cache scales: for engines; this runtime's KV cache is the model dtype
            continue
        module_key = info.family.module_name(key)
        state[module_key] = value
    for name in info.quantized:
        bias = state.pop(f"{name}.bias", None)
        layer = W8A8Linear.from_quantized(
            weight=state.pop(f"{name}.weight"),
            weight_scale=state.pop(f"{name}.weight_scale").float(),
            bias=bias.to(dtype) if bias is not None else None,
            input_scale=state.pop(f"{name}.input_scale").float() if info.activations == "static" else None,
            pre_quant_scale=state.pop(f"{name}.pre_quant_scale").float() if info.smoothing_scales else None,
            backend=backend,
        )
        for stale in ("weight_zero_point", "input_zero_point"):
            state.pop(f"{name}.{stale}", None)
        layer.input_hadamard = info.input_hadamards.get(name, 0)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer)
    state = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if getattr(config, "tie_word_embeddings", False) or getattr(config.get_text_config(), "tie_word_embeddings", False):
        model.tie_weights()
        missing = [k for k in missing if k != "lm_head.weight"]
    filled = tuple(f"{name}." for name in info.quantized)  # W8A8Linear buffers, set above
    missing = [k for k in missing if not k.endswith("inv_freq") and not k.startswith(filled)]
    if missing or unexpected:
        what = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
        raise CheckpointError(f"{info.path}: tensors do not match the model ({what})")
    _materialize_buffers(model, config)
    # the float (bf16 fallback) linears that read one; a W8A8Linear applies its own
    add_input_hadamards(model, {n: b for n, b in info.input_hadamards.items()
                                if not isinstance(model.get_submodule(n), W8A8Linear)})
    return model.to(device).eval()


def add_input_hadamards(model: nn.Module, blocks: dict[str, int]) -> None:
    """A forward pre-hook x -> block_hadamard(x, block) on each named module (a checkpoint's declared online
    transform, `CheckpointInfo.input_hadamards`, for modules that do not apply it themselves)."""
    for name, block in blocks.items():
        model.get_submodule(name).register_forward_pre_hook(functools.partial(_hadamard_input, block))


def _hadamard_input(block: int, module: nn.Module, args: tuple) -> tuple:
    return (block_hadamard(args[0], block), *args[1:])


def _materialize_buffers(model: nn.Module, config) -> None:
    """Non-persistent buffers (rotary inv_freq) stay on meta under init_empty_weights: rebuild them."""
    for module in model.modules():
        if hasattr(module, "inv_freq") and module.inv_freq.is_meta:
            fresh = type(module)(module.config) if hasattr(module, "config") else None
            if fresh is None:
                fresh = type(module)(module.dim, module.theta) if hasattr(module, "theta") else None
            if fresh is None:
                raise CheckpointError(f"cannot rebuild rotary buffers of {type(module).__name__}")
            for name, buf in fresh.named_buffers(recurse=False):
                setattr(module, name, buf)


def load_w8a8(path: Path, device: str = "auto", dtype: torch.dtype | None = None, backend: str = "auto",
              verify: bool = True):
    """(model, processor, info) for an exported checkpoint directory, its float arithmetic in `dtype`
    (None: the checkpoint's own, e.g. float16 where `export.dtype=auto` chose it; as vLLM's dtype="auto").

    With `verify` (the default), a checkpoint that has a manifest.json beside or above it is first
    checked against it (sha256 of every file) and refused on any difference; damage to the export's other
    format is logged and listed in `info.warnings` (one line), not refused."""
    from transformers import AutoProcessor

    from vlmq.models.load import pick_device

    device = torch.device(pick_device(device))  # a device that isn't there fails before any file is read
    warnings: list[str] = []
    if verify:
        from vlmq.export.manifest import manifest_problems, sibling_warning

        problems = manifest_problems(Path(path))
        if problems:
            more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
            raise CheckpointError(f"{path}: does not match its manifest.json: {problems[0]}{more} "
                                  "(re-export it, or load with verify=False)")
        warnings = [w for w in [sibling_warning(Path(path))] if w]
        for warning in warnings:
            log.warning("%s", warning)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)  # Triton launches, streams and graph captures use the current device
    tensors = read_state_dict(Path(path), device)
    info = inspect_checkpoint(Path(path), tensors)
    info.warnings = warnings
    model = build_w8a8_model(info, tensors, dtype or checkpoint_float_dtype(info.config), device, backend)
    processor = AutoProcessor.from_pretrained(path)
    return model, processor, info
