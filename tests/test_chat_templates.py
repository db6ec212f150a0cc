"""Text-LLM chat templates that concatenate strings (SmolLM2's, Llama-2-style): calibration, generate and
check render plain-string content for text-only models, and a template that still fails is one line."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import describe, run_cli
from test_cli_errors import assert_one_line_error
from vlmq.models.demo import write_demo_text_snapshot

# SmolLM2-135M-Instruct's template, as its GGUF carries it: `message['content']` joined with `+`.
STRING_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
BROKEN_TEMPLATE = "{{ messages[0]['content'] + 1 }}"


def _text_snapshot(tmp_path: Path, template: str) -> tuple[Path, Path]:
    snapshot = write_demo_text_snapshot(tmp_path / "llama", "llama")
    (snapshot / "chat_template.jinja").write_text(template)
    data = tmp_path / "calib.jsonl"
    data.write_text("".join(json.dumps({"text": f"Paragraph {i} of a plain text about the sea and ships."}) + "\n"
                            for i in range(10)))
    return snapshot, data


def _quantize(tmp_path: Path, snapshot: Path, data: Path):
    return run_cli(["quantize", f"arch.snapshot={snapshot}", "arch.family=llama", "calib.source=text_jsonl",
                    f"calib.root={data}", f"export.dir={tmp_path / 'export'}", f"log_root={tmp_path / 'logs'}",
                    "export.formats=[compressed_tensors]", "quant.kl_samples=2"], cwd=tmp_path)


def test_string_concatenating_template_quantizes_generates_and_checks(tmp_path):
    snapshot, data = _text_snapshot(tmp_path, STRING_TEMPLATE)
    result = _quantize(tmp_path, snapshot, data)
    assert result.rc == 0, describe(result)
    export = tmp_path / "export" / "compressed_tensors"
    generate = run_cli(["generate", "--model-dir", str(export), "--max-new-tokens", "3", "Hello?"], cwd=tmp_path)
    assert generate.rc == 0 and generate.stdout.startswith("[W8A8"), describe(generate)
    check = run_cli(["check", "--model-dir", str(export), f"log_root={tmp_path / 'logs'}", "infer.max_new_tokens=3"],
                    cwd=tmp_path)
    assert check.rc == 0, describe(check)


def test_template_that_cannot_render_is_one_line_naming_it(tmp_path):
    snapshot, data = _text_snapshot(tmp_path, BROKEN_TEMPLATE)
    result = _quantize(tmp_path, snapshot, data)
    assert_one_line_error(result, "chat template of", str(snapshot))
    assert not (tmp_path / "export").exists()
