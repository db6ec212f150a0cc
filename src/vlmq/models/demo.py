"""The embedded demo: a deterministic tiny Qwen2.5-VL with a real processor.

No weights can be downloaded here, so the demo is built from a config shipped in the package,
random weights from a fixed seed, and a small byte-level BPE tokenizer trained on a fixed corpus.
Every class is the real transformers one, so the demo exercises the same code paths as the 3B model.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

DEMO_SEED = 1234
DATA_DIR = Path(__file__).resolve().parent.parent / "data"
DEMO_CONFIG_PATH = DATA_DIR / "demo_model" / "config.json"

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# Qwen2-VL / Qwen2.5-VL chat template (same rendering as the official snapshot's template).
QWEN_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CORPUS = """
You are a helpful assistant. Describe this image in one sentence. What is in the picture?
A red circle on a blue background. A green square next to a yellow triangle.
Two small boats on a calm lake at sunset. A cat sleeping on a wooden table near a window.
A man riding a bicycle down a busy city street. A plate of food with vegetables and rice.
A group of people standing in a field with kites flying overhead. The quick brown fox jumps
over the lazy dog. Explain what quantization does to a neural network in simple words.
Integer arithmetic, eight bit weights, activations, smoothing, calibration, language model.
The sky is clear and the grass is green. Write a short poem about the sea. How many objects?
0 1 2 3 4 5 6 7 8 9 . , ! ? : ; ' " ( ) - + = / * % $ # @
"""

# Small images: 56..112 px sides keep the vision tower cheap on CPU.
IMAGE_MIN_PIXELS = 28 * 28 * 4
IMAGE_MAX_PIXELS = 112 * 112


def demo_config():
    """The tiny Qwen2.5-VL config shipped in the package (token ids filled from the tokenizer)."""
    from transformers import Qwen2_5_VLConfig

    return Qwen2_5_VLConfig(**json.loads(DEMO_CONFIG_PATH.read_text()))


def build_demo_tokenizer():
    """A byte-level BPE tokenizer with Qwen's special tokens, trained deterministically."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Tokenizer

    vocab_size = json.loads(DEMO_CONFIG_PATH.read_text())["text_config"]["vocab_size"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[1:],
    )
    fast.chat_template = QWEN_VL_CHAT_TEMPLATE
    del Qwen2Tokenizer  # imported to fail early if the Qwen tokenizer family is missing
    return fast


def build_demo_processor():
    """A real `Qwen2_5_VLProcessor` around the demo tokenizer, with small image sizes."""
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    tokenizer = build_demo_tokenizer()
    image_processor = Qwen2VLImageProcessor(min_pixels=IMAGE_MIN_PIXELS, max_pixels=IMAGE_MAX_PIXELS)
    video_processor = Qwen2VLVideoProcessor(min_pixels=IMAGE_MIN_PIXELS, max_pixels=IMAGE_MAX_PIXELS)
    return Qwen2_5_VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=QWEN_VL_CHAT_TEMPLATE,
    )


def random_model(model_cls, config, seed: int, dtype: torch.dtype = torch.bfloat16):
    """`model_cls(config)` with weights drawn from `seed` (same seed -> same bytes), global RNG untouched."""
    config.architectures = [model_cls.__name__]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config)
    return model.to(dtype).eval()


def save_snapshot(target: Path, model, processor) -> Path:
    target = Path(target)
    model.save_pretrained(target)
    processor.save_pretrained(target)
    return target


def build_demo_model(dtype: torch.dtype = torch.bfloat16, seed: int = DEMO_SEED):
    """The tiny Qwen2.5-VL with deterministic random weights (same seed -> same bytes)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    return random_model(Qwen2_5_VLForConditionalGeneration, demo_config(), seed, dtype)


def write_demo_snapshot(target: Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Save the demo model and processor as a snapshot directory, like a downloaded one."""
    from transformers import GenerationConfig

    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    model = build_demo_model(dtype)
    processor = build_demo_processor()
    model.generation_config = GenerationConfig(
        eos_token_id=[processor.tokenizer.convert_tokens_to_ids("<|im_end|>")],
        pad_token_id=processor.tokenizer.pad_token_id,
        do_sample=False,
    )
    model.save_pretrained(target)
    processor.save_pretrained(target)
    (target / "VLMQ_DEMO").write_text("deterministic tiny random Qwen2.5-VL built by vlmq\n")
    return target


def is_demo_snapshot(path: Path) -> bool:
    return (Path(path) / "VLMQ_DEMO").is_file()


@torch.no_grad()
def inject_outliers(model, family_layers: str = "model.language_model.layers", channels: tuple[int, ...] = (3, 17, 42),
                    factor: float = 80.0):
    """Scale a few RMSNorm gain channels in every decoder layer, as real LLMs' massive activations do.

    Makes SmoothQuant matter on a random-weight model (plain per-tensor INT8 then loses the small
    channels to rounding)."""
    for layer in model.get_submodule(family_layers):
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            idx = torch.tensor([c % norm.weight.numel() for c in channels])
            norm.weight[idx] *= factor
    return model


def write_demo_qwen2_vl_snapshot(target: Path, seed: int = DEMO_SEED) -> Path:
    """A tiny random Qwen2-VL (the previous generation: different vision tower, same language model),
    for tests of the family registry."""
    from transformers import (
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    base = json.loads(DEMO_CONFIG_PATH.read_text())
    text = {k: v for k, v in base["text_config"].items() if k != "model_type"}
    vision = dict(depth=2, embed_dim=32, hidden_size=text["hidden_size"], num_heads=2, mlp_ratio=2,
                  patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
    ids = {k: base[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")}
    config = Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True, **ids)
    model = random_model(Qwen2VLForConditionalGeneration, config, seed)
    sizes = {"min_pixels": IMAGE_MIN_PIXELS, "max_pixels": IMAGE_MAX_PIXELS}
    processor = Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(**sizes), tokenizer=build_demo_tokenizer(),
                                 video_processor=Qwen2VLVideoProcessor(**sizes), chat_template=QWEN_VL_CHAT_TEMPLATE)
    return save_snapshot(target, model, processor)


def write_demo_text_snapshot(target: Path, family: str = "qwen2", seed: int = DEMO_SEED) -> Path:
    """A tiny random text-only causal LM (Qwen2, Qwen3 or Llama) with the demo tokenizer."""
    import transformers

    base = json.loads(DEMO_CONFIG_PATH.read_text())["text_config"]
    text = {k: v for k, v in base.items() if k not in ("model_type", "rope_parameters")}
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": 1000000.0}
    classes = {"qwen2": ("Qwen2Config", "Qwen2ForCausalLM"), "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
               "llama": ("LlamaConfig", "LlamaForCausalLM")}
    config_cls, model_cls = (getattr(transformers, name) for name in classes[family])
    return save_snapshot(target, random_model(model_cls, config_cls(**text), seed), build_demo_tokenizer())


def write_demo_qwen3_vl_snapshot(target: Path, seed: int = DEMO_SEED) -> Path:
    """A tiny random Qwen3-VL (16-px patches, DeepStack mergers, interleaved mrope), for family tests."""
    from transformers import (
        Qwen2VLImageProcessor,
        Qwen3VLConfig,
        Qwen3VLForConditionalGeneration,
        Qwen3VLProcessor,
        Qwen3VLVideoProcessor,
    )

    base = json.loads(DEMO_CONFIG_PATH.read_text())
    text = {k: v for k, v in base["text_config"].items() if k not in ("model_type", "rope_parameters")}
    text.update(head_dim=text["hidden_size"] // text["num_attention_heads"],
                rope_parameters={"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [4, 6, 6],
                                 "mrope_interleaved": True})
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=text["hidden_size"],
                  deepstack_visual_indexes=[0], patch_size=16, num_position_embeddings=64)
    ids = {k: base[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")}
    config = Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True, **ids)
    model = random_model(Qwen3VLForConditionalGeneration, config, seed)
    processor = Qwen3VLProcessor(
        image_processor=Qwen2VLImageProcessor(patch_size=16, merge_size=2, min_pixels=32 * 32 * 4,
                                              max_pixels=128 * 128),
        tokenizer=build_demo_tokenizer(), video_processor=Qwen3VLVideoProcessor(patch_size=16, merge_size=2),
        chat_template=QWEN_VL_CHAT_TEMPLATE)
    return save_snapshot(target, model, processor)
