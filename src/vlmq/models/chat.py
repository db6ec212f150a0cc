"""Chats rendered by the model's own template: one place for every caller (calibration, generate,
check, bench).

VLM processors take content as a list of parts (`{"type": "image"}`, `{"type": "text", ...}`);
many text-LLM templates concatenate `message['content']` as a string (SmolLM2's does), so a
text-only model (its "processor" is the tokenizer) gets plain-string content. A template that still
fails is a one-line error naming it, not an internal error.
"""

from __future__ import annotations

from typing import Any


class ChatTemplateError(ValueError):
    """The model's chat template cannot render a vlmq chat."""


def is_text_only(processor: Any) -> bool:
    """A text-only model's processor is its tokenizer: no image processor."""
    return getattr(processor, "image_processor", None) is None


def tokenizer_of(processor: Any) -> Any:
    """A VLM processor's tokenizer; a text-only model's "processor" is the tokenizer itself."""
    return getattr(processor, "tokenizer", processor)


def message(role: str, text: str, image: bool, text_only: bool) -> dict[str, Any]:
    """One chat message; `image` puts an image placeholder before the text."""
    if text_only:
        if image:
            raise ChatTemplateError("an image prompt needs a vision-language model; this model is text-only")
        return {"role": role, "content": text}
    parts: list[dict[str, Any]] = [{"type": "image"}] if image else []
    if text:
        parts.append({"type": "text", "text": text})
    return {"role": role, "content": parts}


def chat(processor: Any, prompt: str, answer: str = "", image: bool = False) -> list[dict[str, Any]]:
    """User turn (image placeholder + prompt), and the assistant's answer when there is one."""
    text_only = is_text_only(processor)
    messages = [message("user", prompt, image, text_only)]
    if answer:
        messages.append(message("assistant", answer, False, text_only))
    return messages


def render(processor: Any, messages: list[dict[str, Any]], add_generation_prompt: bool = False) -> str:
    """The chat as the model's template renders it (text, not tokens)."""
    try:
        return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as err:  # jinja2 errors, TypeError from str + list, ValueError (no template at all)
        name = getattr(tokenizer_of(processor), "name_or_path", "") or "the model"
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ChatTemplateError(f"the chat template of {name} cannot render a vlmq chat "
                                f"({type(err).__name__}: {first})") from None
