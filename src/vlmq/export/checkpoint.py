"""What every checkpoint writer shares: tensors of the quantized state under the names transformers'
`save_pretrained` writes, streamed into safetensors shards one at a time; the model config in the
checkpoint's dtype; the processor files that make a checkpoint stand alone; the list of unquantized linears."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

from vlmq.models.families import Family
from vlmq.quantize.state import QuantizedModel

# (module name, its tensors as the state stores them) -> the tensors a format stores for it
ModuleLayout = Callable[[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]


def copy_processor_files(processor, generation_config, out_dir: Path) -> None:
    """Processor, tokenizer, chat template and generation config: a checkpoint that stands alone."""
    processor.save_pretrained(out_dir)
    if generation_config is not None:
        generation_config.save_pretrained(out_dir)


def ignore_list(model: nn.Module, family: Family, quantized: list[str]) -> list[str]:
    """Every Linear not quantized (vision tower, merger, lm_head), by name.

    Loaders match `ignore` against different names: transformers 5 against its in-memory modules
    (`model.visual.blocks.0.attn.qkv`), vLLM against the checkpoint's (`visual.blocks.0.attn.qkv`,
    mapped by its own prefix table). Each module is listed under both, so every loader finds it."""
    keep = set(quantized)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in keep]
    return list(dict.fromkeys([family.checkpoint_name(n) for n in names] + names))


# Shards of at most this many bytes: the writer holds one shard on the CPU at a time.
MAX_SHARD_BYTES = 2 * 2**30


def write_shards(tensors: Iterator[tuple[str, torch.Tensor]], out_dir: Path, max_bytes: int = MAX_SHARD_BYTES
                 ) -> list[str]:
    """Safetensors shards (transformers' names and index), one shard in CPU memory at a time."""
    from safetensors.torch import save_file

    files: list[tuple[str, list[str]]] = []
    shard: dict[str, torch.Tensor] = {}
    size = 0

    def flush() -> None:
        nonlocal shard, size
        name = f"shard-{len(files):05d}.tmp"
        save_file(shard, str(out_dir / name), metadata={"format": "pt"})
        files.append((name, list(shard)))
        shard, size = {}, 0

    for key, tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if shard and size + nbytes > max_bytes:
            flush()
        shard[key] = tensor.detach().to("cpu").contiguous()
        size += nbytes
    if shard or not files:
        flush()
    if len(files) == 1:
        (out_dir / files[0][0]).rename(out_dir / "model.safetensors")
        return ["model.safetensors"]
    names, weight_map, total = [], {}, 0
    for i, (tmp, keys) in enumerate(files):
        name = f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
        (out_dir / tmp).rename(out_dir / name)
        names.append(name)
        weight_map.update(dict.fromkeys(keys, name))
        total += (out_dir / name).stat().st_size
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return names


def checkpoint_tensors(state: QuantizedModel, layout: ModuleLayout | None = None
                       ) -> Iterator[tuple[str, torch.Tensor]]:
    """(checkpoint key, tensor) for the whole model, under the names `save_pretrained` writes; `layout` maps
    each module's tensors (as the state gives them) to a format's own (names relative to the module)."""
    for module_name, tensors in state.tensors():
        if layout is not None:
            tensors = layout(module_name, tensors)
        prefix = state.family.checkpoint_name(module_name)
        for leaf, tensor in tensors.items():
            yield f"{prefix}.{leaf}" if prefix else leaf, tensor


def save_config(state: QuantizedModel, out_dir: Path) -> None:
    """The model's config.json, its float dtype the checkpoint's (`state.dtype`), `architectures` always set."""
    config = copy.deepcopy(state.model.config)
    if state.dtype is not None:
        config.dtype = state.dtype
        for sub in ("text_config", "vision_config"):
            if getattr(config, sub, None) is not None:
                getattr(config, sub).dtype = state.dtype
    config.architectures = list(config.architectures or [type(state.model).__name__])
    config.save_pretrained(out_dir)
