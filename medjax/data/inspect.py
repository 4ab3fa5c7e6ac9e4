"""`medjax data inspect CONFIG`: what a pretraining config's data source hands the packer.

Why: a mixture's rates are easy to get wrong and hard to see in a loss curve. This prints a few
decoded documents and, for a seqio Mixture, each task's share among the first N documents beside
its configured rate, before any compute is spent.
"""

from __future__ import annotations

from typing import Callable

from medjax.config import Config
from medjax.data import DataError


def _one_line(text: str, width: int = 160) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."


def inspect_data(cfg: Config, n: int = 1000, show: int = 3, say: Callable[[str], None] = print) -> dict:
    """Prints ``show`` decoded documents of the training split; for seqio, the realised task
    shares over ``n`` documents against the configured ones. Returns the figures."""
    data = cfg.data
    if n < 1 or show < 0:
        raise DataError(f"--n must be at least 1 and --show at least 0 (got {n}, {show})")
    if data.source == "seqio":
        from medjax.data import seqio_source

        provider = seqio_source.register(data.seqio, data.tokenizer, data.add_eos)
        realised, seen = seqio_source.realised_rates(provider, n, data.seed)
        configured = seqio_source.configured_rates(provider)
        vocab = seqio_source.vocabulary(data.tokenizer) if data.tokenizer else None
        say(f"seqio {type(provider).__name__.lower()} {provider.name}: {len(seen):,} documents read (seed {data.seed})")
        for example in seen[:show]:
            text = vocab.decode(example["targets"].tolist()) if vocab else str(example["targets"][:32].tolist())
            say(f"  [{example['task']}] {len(example['targets'])} tokens: {_one_line(text)}")
        say(f"{'task':<24} {'configured':>10} {'realised':>9} {'diff':>7}")
        for task in sorted(set(configured) | set(realised)):
            want, got = configured.get(task, 0.0), realised.get(task, 0.0)
            say(f"{task:<24} {want:10.3f} {got:9.3f} {got - want:+7.3f}")
        return {"name": provider.name, "n": len(seen), "configured": configured, "realised": realised}
    from medjax.data.pipeline import make_source
    from medjax.data.tokenizer import load_tokenizer

    source = make_source(data, data.train_files, train=True)
    tok = load_tokenizer(data.tokenizer) if data.tokenizer else None
    say(f"{data.source} source: {source!r}")
    for i in range(min(show, len(source))):
        record = source[i]
        if "ids" in record:
            text = tok.decode(record["ids"].tolist()) if tok else str(record["ids"][:32].tolist())
        else:
            text = record.get("text", record.get(data.text_key, ""))
        say(f"  [{i}] {_one_line(str(text))}")
    return {"records": len(source)}
