"""Chat wrapping of evaluation prompts (the prompt text itself is tasks.prompts, shared with RL)."""

from __future__ import annotations

from pathlib import Path

from medjax.data.chat import ChatTemplate


class ChatFormatter:
    """Wraps a prompt as one user turn with the model's own chat template (data.chat.ChatTemplate,
    the renderer SFT trains with, so evaluation prompts look like training conversations)."""

    def __init__(self, tokenizer_dir: str | Path | None):
        self.template = ChatTemplate(tokenizer_dir)

    def __call__(self, prompt: str) -> str:
        return self.template.render([{"role": "user", "content": prompt}], add_generation_prompt=True)
