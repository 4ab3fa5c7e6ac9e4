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
from medjax.data.tokenizer import EOS_TOKEN, IM_END
from medjax.models.config import ModelConfig

ROLES = ("system", "user", "assistant")


# The named special tokens transformers hands every chat template (its SPECIAL_TOKENS_ATTRIBUTES).
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
TEMPLATE_FILE = "chat_template.jinja"
TEMPLATE_DIR = "additional_chat_templates"


def find_templates(tokenizer_dir: str | Path) -> dict[str, str]:
    """The chat templates of a tokenizer folder by name, found as transformers 5 finds them:
    chat_template.jinja ("default") and additional_chat_templates/NAME.jinja when any exist, else
    tokenizer_config.json's chat_template (a string, or a list of {name, template})."""
    d = Path(tokenizer_dir)
    found = {}
    if (d / TEMPLATE_FILE).is_file():
        found["default"] = (d / TEMPLATE_FILE).read_text(encoding="utf-8")
    if (d / TEMPLATE_DIR).is_dir():
        for f in sorted((d / TEMPLATE_DIR).glob("*.jinja")):
            found[f.name.removesuffix(".jinja")] = f.read_text(encoding="utf-8")
    if found:
        return found
    config = _read_json(d / "tokenizer_config.json")
    value = config.get("chat_template")
    if isinstance(value, str) and value:
        return {"default": value}
    if isinstance(value, list):
        try:
            return {t["name"]: t["template"] for t in value}
        except (KeyError, TypeError):
            raise DataError(
                f"{d / 'tokenizer_config.json'}: chat_template is a list but not of {{name, template}} objects"
            ) from None
    return {}


def special_tokens(tokenizer_dir: str | Path) -> dict[str, str]:
    """The named special tokens a template may use ({{ bos_token }} ...): tokenizer_config.json's,
    with special_tokens_map.json's (legacy, read by transformers after it) taking precedence."""
    d = Path(tokenizer_dir)
    out = {}
    for source in (_read_json(d / "tokenizer_config.json"), _read_json(d / "special_tokens_map.json")):
        for key in SPECIAL_TOKEN_KEYS:
            value = _token_text(source.get(key))
            if value is not None:
                out[key] = str(value)
    return out


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise DataError(f"{path}: not valid JSON: {e}") from e
    return data if isinstance(data, dict) else {}


class ChatTemplate:
    """The tokenizer's chat template, rendered with Jinja2 exactly as transformers'
    apply_chat_template renders it (sandboxed, trim/lstrip blocks, loop controls, its tojson and
    strftime_now, the named special tokens as variables), so SFT data, RL prompts and eval prompts
    equal what transformers and vLLM build for the same model. ``name`` picks one of several named
    templates (default: "default"). With no tokenizer folder, ChatML (the bundled tokenizer's); a
    folder that names no template is an error, as in transformers."""

    def __init__(self, tokenizer_dir: str | Path | None, name: str | None = None):
        from medjax.data.tokenizer import CHATML_TEMPLATE

        source, special = CHATML_TEMPLATE, {}
        if tokenizer_dir is not None:
            templates = find_templates(tokenizer_dir)
            want = name or "default"
            if want not in templates:
                if not templates:
                    raise DataError(
                        f"{tokenizer_dir}: the tokenizer has no chat template (no {TEMPLATE_FILE} and "
                        "no chat_template in tokenizer_config.json); chat data cannot be rendered"
                    )
                raise DataError(f"{tokenizer_dir}: no chat template named {want!r} (have: {', '.join(templates)})")
            source, special = templates[want], special_tokens(tokenizer_dir)
        self.source = source
        self._template = _compile(source)
        self._special = special

    def render(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = False) -> str:
        return self._template.render(
            messages=list(messages),
            add_generation_prompt=add_generation_prompt,
            tools=None,
            documents=None,
            **self._special,
        )

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
                raise DataError(
                    "chat template does not render conversations prefix-stably; "
                    "assistant turns cannot be located for the loss mask"
                )
            spans.append((start, end))
        return text, spans


def _compile(source: str):
    import datetime

    import jinja2.ext
    import jinja2.nodes
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise DataError(f"chat template: {message}")

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Jinja's own tojson escapes HTML characters; transformers' does not
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    class Generation(jinja2.ext.Extension):
        """{% generation %}...{% endgeneration %} (transformers' assistant-mask marker) renders its
        body; medjax finds assistant spans by rendering prefixes instead."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[Generation, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env.from_string(source)


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


def tokenize_chat(
    tokenizer, template: ChatTemplate, messages: Sequence[dict[str, str]]
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


def stop_token_ids(tok, model_cfg: ModelConfig, tokenizer_dir: Path | None = None) -> tuple[int, ...]:
    """Where generation ends: the tokenizer's end-of-text and end-of-turn tokens, the eos token its
    tokenizer_config.json names and the model's eos."""
    named = special_tokens(tokenizer_dir).get("eos_token") if tokenizer_dir is not None else None
    stops = (
        tok.token_to_id(EOS_TOKEN),
        tok.token_to_id(IM_END),
        model_cfg.eos_token_id,
        tok.token_to_id(named) if named else None,
    )
    return tuple(sorted({t for t in stops if t is not None}))
