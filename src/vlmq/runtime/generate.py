"""Load any checkpoint (W8A8 export or bf16 snapshot) and generate from it: what `vlmq generate`,
`vlmq check` and `vlmq bench` share."""

from __future__ import annotations

import json
from pathlib import Path


def load_any(model_dir: Path, device: str = "auto", backend: str = "auto"):
    """(model, processor, label): W8A8 through vlmq.runtime, a bf16 snapshot through transformers."""
    from vlmq.models.load import inspect_snapshot, load_model, load_processor
    from vlmq.runtime.loader import CheckpointError, load_w8a8

    config_file = Path(model_dir) / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"not a checkpoint directory (no config.json): {model_dir}")
    if json.loads(config_file.read_text()).get("quantization_config"):
        model, processor, info = load_w8a8(model_dir, device, backend=backend)
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
