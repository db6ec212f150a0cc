"""Write a random-weight Qwen2.5-VL snapshot of a real model's shape (no weights exist here).

The processor is the demo one (small tokenizer, Qwen chat template) with Qwen2.5-VL's default
image sizes, so image+text prompts produce realistic numbers of vision tokens.

    python benchmarks/make_random_snapshot.py --shape 3b --out /tmp/qwen2_5_vl_3b_random
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

# DESIGN §7: Qwen2.5-VL-3B-Instruct's shape.
SHAPES = {
    "3b": {
        "text": dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                     num_attention_heads=16, num_key_value_heads=2, max_position_embeddings=128000,
                     rms_norm_eps=1e-6, tie_word_embeddings=True,
                     rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]}),
        "vision": dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048,
                       fullatt_block_indexes=[7, 15, 23, 31], window_size=112, patch_size=14,
                       spatial_merge_size=2, temporal_patch_size=2),
    },
    # a small stand-in with the same structure, for CPU smoke runs of the GPU scripts
    "small": {
        "text": dict(vocab_size=151936, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                     num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=32768,
                     rms_norm_eps=1e-6, tie_word_embeddings=True,
                     rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [4, 6, 6]}),
        "vision": dict(depth=2, hidden_size=128, intermediate_size=256, num_heads=4, out_hidden_size=256,
                       fullatt_block_indexes=[1], window_size=112, patch_size=14,
                       spatial_merge_size=2, temporal_patch_size=2),
    },
}


def build(shape: str, device: str = "cuda", seed: int = 0):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from vlmq.models.demo import build_demo_processor

    processor = build_demo_processor()
    tok = processor.tokenizer
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>",
                                                      "<|vision_end|>", "<|im_end|>", "<|endoftext|>")}
    spec = SHAPES[shape]
    config = Qwen2_5_VLConfig(
        text_config={**spec["text"], "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"],
                     "pad_token_id": ids["<|endoftext|>"]},
        vision_config=spec["vision"], image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )
    config.architectures = ["Qwen2_5_VLForConditionalGeneration"]
    torch.manual_seed(seed)
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration(config).to(torch.bfloat16).eval()
    # Qwen2.5-VL's default image sizes instead of the demo's tiny ones.
    processor.image_processor.min_pixels = 56 * 56
    processor.image_processor.max_pixels = 28 * 28 * 1280
    processor.image_processor.size = {"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 1280}
    return model, processor


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="3b", choices=sorted(SHAPES))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    start = time.perf_counter()
    model, processor = build(args.shape, args.device)
    model.save_pretrained(args.out)
    processor.save_pretrained(args.out)
    params = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.out}: {params / 1e9:.2f} B params in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
