"""`medjax eval`: score one benchmark file with one model, write per-item JSON lines, a summary JSON
and a per-subject chart beside them, and print accuracy with bootstrap intervals.

Modes:
- ``loglikelihood``: the option with the highest log p(continuation | prompt) wins. ``choices=letters``
  scores the option letter after the answer cue; ``choices=texts`` scores each option's text, cloze
  style (the prompt does not list the options, each is scored as the answer's text), divided by the
  text's length as ``text_norm`` says: ``chars`` is lm-evaluation-harness's acc_norm, ``bytes`` its
  acc_bytes (UTF-8), ``none`` its acc; like lm-eval, the length leaves out the separator before the
  text (a space in English, nothing in Chinese). One letter is chosen, so a
  multi-answer item can only be right in generative mode.
- ``generate``: the model writes freely and the shared extractor (medjax.tasks.answers) reads the
  letters it commits to; exact set match.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

from tqdm import tqdm

from medjax.config import ConfigError
from medjax.eval.backends import GenerationSettings, LoglikelihoodRequest, open_model
from medjax.eval.prompts import ChatFormatter
from medjax.eval.protocols import CHOICES, MODES, TEXT_NORMS
from medjax.eval.report import format_table, plot_groups, summarise
from medjax.tasks.answers import extract_for_item, score
from medjax.tasks.items import ExamItem
from medjax.tasks.prompts import PromptConfig, Retriever, answer_continuation, build_prompt, fit_passages, pick_shots
from medjax.tasks.readers import read_benchmark
from medjax.utils import atomic_open, atomic_write_text


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    mode: str = "loglikelihood"
    choices: str = "letters"
    text_norm: str = "chars"  # choices=texts: the option's length in characters, UTF-8 bytes, or none
    format: str | None = None
    shots: int = 0
    fewshot_file: str | None = None
    limit: int | None = None
    chat: bool = False
    batch_size: int = 8
    max_new_tokens: int = 256
    temperature: float = 0.0
    seed: int = 0
    skip_bad: bool = False
    mesh: str = ""  # "fsdp=4,tensor=2": shard a local model over the devices (backends.parse_mesh); "": one device
    passages_k: int = 3
    rag: str | None = None  # a `medjax rag index` directory: its top passages_k chunks go into each prompt
    protocol: str | None = None  # a published protocol's name (medjax.eval.protocols), recorded in the summary
    template: str = ""  # the protocol's prompt (tasks.prompts.PromptConfig.template)

    @classmethod
    def for_protocol(cls, name: str | None, greedy: bool = False, **explicit) -> "EvalConfig":
        """The preset of ``--protocol name`` (none: the defaults), under the settings given
        explicitly (None values are not given). ``greedy`` sets temperature 0."""
        fields = {}
        if name:
            from medjax.eval.protocols import get_protocol

            p = get_protocol(name)
            fields = dict(
                mode="generate",
                chat=p.chat,
                temperature=p.temperature,
                max_new_tokens=p.max_new_tokens,
                template=p.template,
                protocol=p.name,
            )
        if greedy:
            fields["temperature"] = 0.0
        fields.update({k: v for k, v in explicit.items() if v is not None})
        return cls(**fields)

    def validate(self) -> "EvalConfig":
        if self.mode not in MODES:
            raise ConfigError(f"--mode must be one of {MODES}, got {self.mode!r}")
        if self.choices not in CHOICES:
            raise ConfigError(f"--choices must be one of {CHOICES}, got {self.choices!r}")
        if self.text_norm not in TEXT_NORMS:
            raise ConfigError(f"--text-norm must be one of {TEXT_NORMS}, got {self.text_norm!r}")
        if self.shots < 0 or self.batch_size < 1 or self.max_new_tokens < 1:
            raise ConfigError("--shots must be >= 0, --batch-size and --max-new-tokens >= 1")
        if self.template and (self.mode != "generate" or self.shots):
            flags = [f"--mode {self.mode}"] * (self.mode != "generate") + ["--shots"] * bool(self.shots)
            raise ConfigError(
                f"--protocol {self.protocol or ''} is zero-shot and generative: drop {' and '.join(flags)}"
            )
        return self


def summary_path(out: Path) -> Path:
    return out.with_name(out.name.removesuffix(".jsonl") + ".summary.json")


def evaluate(
    model_path: str,
    benchmark: str | os.PathLike,
    out: str | os.PathLike,
    cfg: EvalConfig = EvalConfig(),
    retriever: Retriever | None = None,
    model=None,
    quiet: bool = False,
) -> dict:
    """Scores every item, writes ``out`` (JSONL) and its summary atomically, returns the summary.
    ``model`` may be passed in (an already-open backend) to score several files without reloading."""
    cfg = cfg.validate()
    out = Path(out)
    bench = read_benchmark(benchmark, cfg.format, cfg.limit, skip_bad=cfg.skip_bad)
    shots_pool = bench.items
    if cfg.fewshot_file:
        shots_pool = read_benchmark(cfg.fewshot_file, None, skip_bad=cfg.skip_bad).items
    if cfg.rag and retriever is None:
        from medjax.rag.search import RagIndex

        retriever = RagIndex(cfg.rag)
    model = model or open_model(model_path, batch_size=cfg.batch_size, mesh=cfg.mesh)
    # A served model is asked through its chat API, which applies the server's own template.
    chat_api = cfg.chat and cfg.mode == "generate" and hasattr(model, "generate_chat")
    chat = ChatFormatter(getattr(model, "tokenizer_dir", None)) if cfg.chat and not chat_api else None
    pcfg = prompt_config(cfg)

    def prompt_for(item: ExamItem) -> tuple[str, list[str]]:
        passages = (
            fit_passages(retriever.retrieve(item.question, cfg.passages_k), pcfg.passage_budget) if retriever else []
        )
        text = build_prompt(item, pick_shots(shots_pool, item, cfg.shots, cfg.seed), passages, pcfg)
        return (chat(text) if chat else text), passages

    # In a multi-process job every process scores every batch with its share of the devices;
    # process 0 alone reports and writes.
    writer = _process_index() == 0
    quiet = quiet or not writer
    t0 = time.perf_counter()
    rows = []
    progress = tqdm(total=len(bench.items), desc=f"eval {bench.name}", unit="item", disable=quiet)
    # Log-likelihood rows are sorted by length within a call to batch similar lengths together, so
    # it gets many items at once (the progress bar moves less often); generation a few batches.
    chunk = max(cfg.batch_size * 32, 512) if cfg.mode == "loglikelihood" else max(cfg.batch_size * 4, 32)
    for start in range(0, len(bench.items), chunk):
        items = bench.items[start : start + chunk]
        prompts, passages = zip(*(prompt_for(item) for item in items))
        if cfg.mode == "loglikelihood":
            scored = _score_loglikelihood(model, items, prompts, cfg)
        else:
            scored = _score_generate(model, items, prompts, cfg, chat_api)
        if retriever is not None:  # what the model was shown, as cited: [1] is passages[0]
            for row, shown in zip(scored, passages):
                row["passages"] = shown
        rows.extend(scored)
        progress.update(len(items))
    progress.close()
    seconds = time.perf_counter() - t0

    summary = {
        "benchmark": str(bench.path),
        "format": bench.format,
        "model": str(model_path),
        **({"protocol": cfg.protocol} if cfg.protocol else {}),
        "mode": cfg.mode,
        **({"choices": cfg.choices} if cfg.mode == "loglikelihood" else {}),
        **({"text_norm": cfg.text_norm} if cfg.mode == "loglikelihood" and cfg.choices == "texts" else {}),
        "shots": cfg.shots,
        "chat": cfg.chat,
        **({"rag": str(cfg.rag), "passages_k": cfg.passages_k} if cfg.rag else {}),
        **summarise(rows, extra_groups=_extra_groups(bench.items, cfg.protocol)),
        "items_in_file": bench.records,
        "skipped": bench.skipped,
        "repaired": bench.repaired,
        "seconds": seconds,
        "items_per_sec": len(rows) / seconds if seconds else None,
        "output": str(out),
    }
    if not writer:
        return summary
    title = f"{bench.name} ({bench.format}, {cfg.mode}) - {model_path}"
    chart = plot_groups(summary, out.with_name(out.name.removesuffix(".jsonl") + ".png"), title)
    if chart is not None:
        summary["chart"] = str(chart)
    with atomic_open(out) as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    atomic_write_text(summary_path(out), json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    if not quiet:
        print(format_table(summary, title))
        if bench.skipped:
            print(f"  skipped {len(bench.skipped)} malformed items, first: {bench.skipped[0]}")
        if bench.repaired:
            print(
                f"  repaired {len(bench.repaired)} malformed option lists (listed in the summary), first: "
                f"{bench.repaired[0]}"
            )
        print(f"  scored {len(rows)} of the file's {bench.records} items")
        print(f"  {len(rows)} items in {seconds:.1f}s ({summary['items_per_sec']:.2f} items/s); wrote {out}")
    return summary


def _process_index() -> int:
    """This process's index in a multi-process JAX job (0 when JAX is not in use or alone)."""
    import sys

    return sys.modules["jax"].process_index() if "jax" in sys.modules else 0


def _extra_groups(items: list[ExamItem], protocol: str | None = None) -> list[str]:
    """Item fields worth a breakdown (2 to 50 values), and always the groups a protocol reports."""
    keys = {k for item in items for k, v in item.meta.items() if isinstance(v, str) and v}
    groups = {k for k in keys if 1 < len({item.meta.get(k) for item in items}) <= 50}
    if protocol:
        from medjax.eval.protocols import get_protocol

        groups |= set(get_protocol(protocol).groups) & keys
    return sorted(groups)


def _row(item: ExamItem, prediction: str, correct: bool, **extra) -> dict:
    row = {"id": item.id, "prediction": prediction, "gold": item.gold, "correct": correct}
    if item.subject:
        row["subject"] = item.subject
    row.update({k: v for k, v in item.meta.items() if isinstance(v, str) and v})
    row.update(extra)
    return row


def prompt_config(cfg: EvalConfig) -> PromptConfig:
    """How ``cfg`` renders an item's prompt: option texts are scored after a prompt that does not
    list them (a cloze), option letters after one that does."""
    return PromptConfig(
        generative=cfg.mode == "generate",
        list_options=not (cfg.mode == "loglikelihood" and cfg.choices == "texts"),
        template=cfg.template,
    )


def loglikelihood_requests(items, prompts, cfg: EvalConfig) -> list[LoglikelihoodRequest]:
    """What log-likelihood mode scores for each item after its rendered prompt: every option's letter
    or text as a continuation. tools/bench_eval.py hands lm-eval these same pairs."""
    requests = []
    for item, prompt in zip(items, prompts):
        if cfg.choices == "letters":
            conts = [answer_continuation(item, k, chat=cfg.chat) for k in item.letters]
        else:
            conts = [answer_continuation(item, text=v, chat=cfg.chat) for v in item.options.values()]
        requests.append(LoglikelihoodRequest(prompt, conts, templated=cfg.chat))
    return requests


def _score_loglikelihood(model, items, prompts, cfg: EvalConfig) -> list[dict]:
    requests = loglikelihood_requests(items, prompts, cfg)
    scores = model.loglikelihood(requests)
    rows = []
    for item, req, lps in zip(items, requests, scores):
        ranked = lps
        if cfg.choices == "texts" and cfg.text_norm != "none":
            size = len if cfg.text_norm == "chars" else (lambda text: len(text.encode("utf-8")))
            ranked = [lp / max(size(text), 1) for lp, text in zip(lps, item.options.values())]
        best = item.letters[max(range(len(ranked)), key=ranked.__getitem__)]
        rows.append(_row(item, best, best == item.gold, logprobs=dict(zip(item.letters, lps))))
    return rows


def _score_generate(model, items, prompts, cfg: EvalConfig, chat_api: bool = False) -> list[dict]:
    settings = GenerationSettings(
        max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, seed=cfg.seed, templated=cfg.chat
    )
    texts = model.generate_chat(prompts, settings) if chat_api else model.generate(prompts, settings)
    rows = []
    for item, text in zip(items, texts):
        found = extract_for_item(text, item)
        rows.append(
            _row(
                item,
                found.prediction,
                score(found, item) == 1.0,
                refused=found.refused,
                off_options=found.off_options,
                completion=text,
            )
        )
    return rows
