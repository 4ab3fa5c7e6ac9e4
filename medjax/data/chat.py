"""Chat conversations: validation, rendering with the tokenizer's own chat template, and the
per-token mask of what the assistant said.

The mask comes from the rendered text, not from a hand-built token layout: each assistant turn's
character span is found by rendering the conversation up to that turn with and without it, and
tokens whose characters fall inside a span are trained on. This works for any template whose
rendering of a prefix of the messages is a prefix of the full rendering (ChatML, Llama 3, Qwen),
so SFT masks follow whatever template the model ships with.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from medjax.data import DataError

ROLES = ("system", "user", "assistant")


class ChatTemplate:
    """The chat template named in tokenizer_config.json, rendered with Jinja2 the way
    transformers' apply_chat_template does (sandboxed, trim/lstrip blocks); ChatML when the
    tokenizer names none."""

    def __init__(self, tokenizer_dir: str | Path | None):
        from medjax.data.tokenizer import CHATML_TEMPLATE

        source, special = CHATML_TEMPLATE, {}
        config = Path(tokenizer_dir) / "tokenizer_config.json" if tokenizer_dir else None
        if config is not None and config.is_file():
            data = json.loads(config.read_text())
            source = data.get("chat_template") or CHATML_TEMPLATE
            special = {k: _token_text(data.get(k)) for k in ("bos_token", "eos_token")}
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise DataError(f"chat template: {message}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        self._template = env.from_string(source)
        self._special = special

    def render(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = False) -> str:
        return self._template.render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                     **self._special)

    def assistant_spans(self, messages: Sequence[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
        """The full text and the [start, end) character span of each assistant turn (its content
        and the template's end-of-turn marker, so the model learns to stop)."""
        text = self.render(messages)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            start = len(self.render(messages[:i], add_generation_prompt=True))
            end = len(self.render(messages[: i + 1]))
            if not text.startswith(self.render(messages[: i + 1])) or end <= start:
                raise DataError("chat template does not render conversations prefix-stably; "
                                "assistant turns cannot be located for the loss mask")
            spans.append((start, end))
        return text, spans


def _token_text(value: Any) -> Any:
    """tokenizer_config.json may hold a special token as {"content": "<s>", ...}."""
    return value.get("content") if isinstance(value, dict) else value


def check_messages(messages: Any, where: str, require_assistant: bool = True) -> list[dict[str, str]]:
    """The conversation as a list of {role, content}; anything else is a DataError naming ``where``
    (file:line) and the turn at fault."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}} turns")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise DataError(f"{where}: messages[{i}] must be an object, got {type(m).__name__}")
        for key in ("role", "content"):
            if key not in m:
                raise DataError(f"{where}: messages[{i}] has no {key!r}")
        if m["role"] not in ROLES:
            raise DataError(f"{where}: messages[{i}] has unknown role {m['role']!r} (known: {', '.join(ROLES)})")
        if not isinstance(m["content"], str):
            raise DataError(f"{where}: messages[{i}].content must be a string")
        out.append({"role": m["role"], "content": m["content"]})
    if require_assistant and not any(m["role"] == "assistant" for m in out):
        raise DataError(f"{where}: conversation has no assistant turn (nothing to train on)")
    return out


def tokenize_chat(tokenizer, template: ChatTemplate, messages: Sequence[dict[str, str]]
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(token ids, assistant mask) of one rendered conversation; mask[i] is 1 where token i lies
    inside an assistant turn."""
    text, spans = template.assistant_spans(messages)
    enc = tokenizer.encode(text, add_special_tokens=False)
    ids = np.asarray(enc.ids, dtype=np.int32)
    mask = np.zeros(len(ids), dtype=np.float32)
    for t, (a, b) in enumerate(enc.offsets):
        if b > a and any(s <= a and b <= e for s, e in spans):
            mask[t] = 1.0
    return ids, mask
