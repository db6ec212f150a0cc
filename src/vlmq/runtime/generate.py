"""Load any checkpoint (W8A8 export or bf16 snapshot) and generate from it: what `vlmq generate`,
`vlmq check` and `vlmq bench` share."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def checkpoint_dir(model_dir: Path) -> tuple[Path, str | None]:
    """(the directory to load, a note or None). A directory with config.json is itself; an export root (a
    manifest.json, format folders below it) gives the folder of its manifest's `export.formats[0]`, with a
    one-line note saying so; anything else is a one-line error that names the format folders to pick from."""
    from vlmq.export.manifest import MANIFEST_NAME
    from vlmq.runtime.loader import CheckpointError

    model_dir = Path(model_dir)
    if (model_dir / "config.json").is_file():
        return model_dir, None
    folders = sorted(p.name for p in model_dir.iterdir() if (p / "config.json").is_file()) if model_dir.is_dir() else []
    manifest = model_dir / MANIFEST_NAME
    if folders and manifest.is_file():
        try:
            formats = list(json.loads(manifest.read_text())["config"]["export"]["formats"])
        except (json.JSONDecodeError, KeyError, TypeError):
            formats = []
        if formats and formats[0] in folders:
            return model_dir / formats[0], (f"{model_dir} is an export root: using {formats[0]}/ "
                                            f"(export.formats[0] in its {MANIFEST_NAME})")
    if folders:
        raise CheckpointError(f"{model_dir} holds no config.json; pick one of its checkpoints: "
                              + ", ".join(str(model_dir / f) for f in folders))
    raise CheckpointError(f"not a checkpoint directory (no config.json): {model_dir}")


def load_any(model_dir: Path, device: str = "auto", backend: str = "auto"):
    """(model, processor, label): W8A8 through vlmq.runtime, a bf16 snapshot through transformers. An export
    root loads its first format (`checkpoint_dir`); that choice and any damage to the export's other format are
    one line each on stderr."""
    from vlmq.models.load import inspect_snapshot, load_model, load_processor
    from vlmq.runtime.loader import load_w8a8

    model_dir, note = checkpoint_dir(model_dir)
    if note:
        print(f"vlmq: info: {note}", file=sys.stderr)
    config_file = model_dir / "config.json"
    if json.loads(config_file.read_text()).get("quantization_config"):
        model, processor, info = load_w8a8(model_dir, device, backend=backend)
        for warning in info.warnings:
            print(f"vlmq: warning: {warning}", file=sys.stderr)
        return model, processor, f"W8A8 ({info.format}, {info.activations} activations)"
    snapshot = inspect_snapshot(model_dir)
    return load_model(snapshot, device=device), load_processor(model_dir), "bf16"


def chat_inputs(processor, prompt: str, image=None) -> dict:
    from vlmq.models.chat import chat, is_text_only, render

    text = render(processor, chat(processor, prompt, image=image is not None), add_generation_prompt=True)
    if is_text_only(processor):   # a tokenizer takes no images argument
        return dict(processor(text=[text], return_tensors="pt"))
    return dict(processor(text=[text], images=[image] if image is not None else None, return_tensors="pt"))


def generate_text(model, processor, prompt: str, image=None, max_new_tokens: int = 32) -> tuple[str, list[int]]:
    import torch

    inputs = chat_inputs(processor, prompt, image)
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in inputs.items()}
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    new_tokens = out[0, inputs["input_ids"].shape[1]:].tolist()
    tokenizer = getattr(processor, "tokenizer", processor)   # text-only models: the processor is the tokenizer
    return tokenizer.decode(new_tokens, skip_special_tokens=True), new_tokens
