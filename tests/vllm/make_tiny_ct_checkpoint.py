"""Write a tiny random Qwen2.5-VL as a compressed-tensors W8A8 INT8 checkpoint.

Dev/test helper for tests/test_vllm_cpu.py, independent of the project's exporter
(``vlmq.export.compressed_tensors``, tested separately through ``vlmq quantize``). The
default model (``tiny``) is built here with larger random weights (init std 0.1) than
the demo's, so next-token distributions are peaked (log-prob std ~1.3 rather than ~0.55)
and a logprob comparison means something; ``--model demo`` takes ``vlmq.models.demo``.
The checkpoint is written with the compressed-tensors library's own API: LM linears
get int8 symmetric per-output-channel weights and dynamic per-token int8
activations; the vision tower (``visual``) and ``lm_head`` stay bf16.

    python tests/vllm/make_tiny_ct_checkpoint.py --out /tmp/tiny_ct [--model tiny|demo] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from compressed_tensors.compressors import ModelCompressor
from compressed_tensors.quantization import (
    QuantizationConfig,
    QuantizationStatus,
    apply_quantization_config,
    preset_name_to_scheme,
)
from compressed_tensors.quantization.utils import calculate_qparams
from tokenizers.pre_tokenizers import ByteLevel
from transformers import (
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2Tokenizer,
    Qwen2VLImageProcessor,
    Qwen2VLVideoProcessor,
)

# Qwen's special tokens and the Qwen2.5-VL chat template, as the project's demo model has them.
from vlmq.models.demo import QWEN_VL_CHAT_TEMPLATE as CHAT_TEMPLATE
from vlmq.models.demo import SPECIAL_TOKENS

# Small images: 28x28-pixel units (patch 14 x merge 2); 4..16 units -> 4..16 LM tokens.
MIN_PIXELS = 28 * 28 * 4
MAX_PIXELS = 28 * 28 * 16
# The W8A8 recipe: everything Linear except the vision tower and the LM head.
IGNORE = ["lm_head", "re:.*visual.*"]
# vllm/v1/attention/backends/cpu_attn.py (vllm-cpu 0.32.0): CPUAttentionBackend's head sizes.
VLLM_CPU_HEAD_DIMS = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


def build_tokenizer() -> Qwen2Tokenizer:
    """Byte-level BPE over the 256 byte symbols (no merges) plus Qwen's special tokens."""
    vocab = {ch: i for i, ch in enumerate(ByteLevel.alphabet())}
    vocab = {ch: i for i, ch in enumerate(sorted(vocab))}
    tok = Qwen2Tokenizer(vocab=vocab, merges=[], errors="replace")
    tok.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[1:]})
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build_fallback(seed: int) -> tuple[Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor]:
    """A tiny random Qwen2.5-VL plus a real processor, deterministic in ``seed``."""
    tok = build_tokenizer()
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    # vLLM's CPU attention needs head_dim in VLLM_CPU_HEAD_DIMS (16 fails), so the text
    # model is hidden 128 / 4 heads rather than hidden 64.
    head_dim = 128 // 4
    text = dict(
        vocab_size=320,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        rms_norm_eps=1e-6,
        initializer_range=0.1,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]},
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
        tie_word_embeddings=False,
    )
    assert sum(text["rope_parameters"]["mrope_section"]) == head_dim // 2
    vision = dict(
        depth=2,
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        out_hidden_size=128,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        window_size=56,
        fullatt_block_indexes=[1],
        initializer_range=0.1,
    )
    config = Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).to(torch.bfloat16).eval()
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    size = {"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS}
    processor = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(size=size),
        tokenizer=tok,
        video_processor=Qwen2VLVideoProcessor(size=size),
        chat_template=CHAT_TEMPLATE,
    )
    return model, processor


def vllm_cpu_incompatibility(config: Qwen2_5_VLConfig) -> str | None:
    """Why vLLM's CPU backend cannot run this config, or None."""
    text = config.text_config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    if head_dim not in VLLM_CPU_HEAD_DIMS:
        return (
            f"text head_dim {head_dim} (hidden {text.hidden_size} / "
            f"{text.num_attention_heads} heads) not in vLLM CPU attention's {VLLM_CPU_HEAD_DIMS}"
        )
    return None


def build_model(model: str, seed: int) -> tuple[Any, Any]:
    """``tiny``: this helper's model; ``demo``: the project's demo (``vlmq.models.demo``)."""
    if model == "tiny":
        return build_fallback(seed)
    from vlmq.models.demo import build_demo_model, build_demo_processor

    demo = build_demo_model().to(torch.bfloat16).eval()
    reason = vllm_cpu_incompatibility(demo.config)
    if reason is not None:
        raise ValueError(f"vLLM's CPU backend cannot run the demo model: {reason}")
    return demo, build_demo_processor()


def quantize_w8a8(model: torch.nn.Module) -> ModelCompressor:
    """Attach the W8A8 scheme, set per-channel weight scales, compress weights to int8."""
    qconfig = QuantizationConfig(
        config_groups={"group_0": preset_name_to_scheme("W8A8", ["Linear"])},
        ignore=IGNORE,
        quantization_status=QuantizationStatus.FROZEN,
    )
    apply_quantization_config(model, qconfig)
    for module in model.modules():
        scheme = getattr(module, "quantization_scheme", None)
        if scheme is None:
            continue
        w = module.weight.detach().float()
        scale, _ = calculate_qparams(w.amin(dim=1, keepdim=True), w.amax(dim=1, keepdim=True), scheme.weights)
        module.weight_scale.data.copy_(scale.to(module.weight_scale.dtype))
        module.quantization_status = QuantizationStatus.FROZEN
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format="int-quantized")
    compressor.compress_model(model)
    # from_pretrained_model expands `ignore` to in-memory module names
    # ("model.visual.blocks.0..."), which differ from the saved ones ("visual.blocks.0...").
    # Keep the recipe's patterns instead: they match either naming.
    assert compressor.quantization_config is not None
    compressor.quantization_config.ignore = list(IGNORE)
    return compressor


def write_checkpoint(out: Path, model_name: str = "tiny", seed: int = 0) -> dict[str, Any]:
    """Build, quantize and save; returns a summary (also written as ``vlmq_tiny.json``)."""
    out.mkdir(parents=True, exist_ok=True)
    model, processor = build_model(model_name, seed)
    compressor = quantize_w8a8(model)
    model.save_pretrained(out)
    compressor.update_config(str(out))
    processor.save_pretrained(out)
    quantized = sorted(n for n, m in model.named_modules() if hasattr(m, "quantization_scheme"))
    summary = {"model": model_name, "seed": seed, "quantized_modules": quantized, "ignore": IGNORE}
    (out / "vlmq_tiny.json").write_text(json.dumps(summary, indent=2))
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", choices=["tiny", "demo"], default="tiny")
    parser.add_argument("--seed", type=int, default=0, help="tiny model only")
    args = parser.parse_args()
    summary = write_checkpoint(args.out, args.model, args.seed)
    print(f"wrote {args.out} ({summary['model']}): {len(summary['quantized_modules'])} W8A8 linears")


if __name__ == "__main__":
    main()
