"""Published evaluation protocols as named presets (`medjax eval --protocol NAME`): the prompt,
sampling and answer format a report's authors used, so a number medjax prints means what the
report's number means. Any setting given on the command line wins over the preset's.

quarkmed: the CPQExam protocol of the QuarkMed report (arXiv 2508.11894; prompt as published in
Quark-Medical/QuarkMed evaluation/README.md): a Chinese instruction to think, then reply with only
JSON {"answer": "..."}; one sample at temperature 0.6 (``--greedy`` for temperature 0); the reply
read by the shared extractor (JSON, fenced JSON, a JSON list of letters, then prose); exact match of
the sorted letter set; accuracy by level, department and the authors' four question groups."""

from __future__ import annotations

import dataclasses

from medjax.config import ConfigError

# The scoring settings `medjax eval` chooses among, here (no jax) so that the parser can list them.
MODES = ("loglikelihood", "generate")
CHOICES = ("letters", "texts")
TEXT_NORMS = ("chars", "bytes", "none")  # lm-eval's acc_norm, acc_bytes, acc


@dataclasses.dataclass(frozen=True)
class Protocol:
    name: str
    template: str  # tasks.prompts.PromptConfig.template: {question}, {options}, a {passages} line
    temperature: float
    max_new_tokens: int
    chat: bool = True  # the prompt is one user turn of the model's chat template
    # Groups the authors report; the summary lists them first and the suite's table takes its columns from them.
    groups: tuple[str, ...] = ()


QUARKMED = Protocol(
    name="quarkmed",
    template=(
        "请思考后回答以下选择题目，以json格式返回结果，除此以外不要返回其它任何信息。如:\n"
        '{"answer": "A/B/C"}\n'
        "{passages}\n"
        "问题:\n{question}\n回答:\n{options}"
    ),
    temperature=0.6,
    # "Think first" costs tokens: the reasoning models of the report's tables write several hundred.
    max_new_tokens=2048,
    groups=("level", "option_type"),
)

PROTOCOLS = {p.name: p for p in (QUARKMED,)}


def get_protocol(name: str) -> Protocol:
    if name not in PROTOCOLS:
        raise ConfigError(f"unknown --protocol {name!r}; known: {', '.join(PROTOCOLS)}")
    return PROTOCOLS[name]
