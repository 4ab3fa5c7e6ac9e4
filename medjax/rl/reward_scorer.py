"""Scoring (prompt, response) pairs with a trained reward model: the call RL's reward-model reward
makes, and `medjax score-rm`.

A response is rendered and tokenized by ``data.preferences.response_ids``, the function the
reward-model stage trained on, so a score here is the score training optimised. Sequences are
right-padded to bucketed lengths and scored in fixed-size batches, so a stream of calls compiles
only a few shapes.
"""

from __future__ import annotations

import json
import os
from typing import Sequence

import jax
import numpy as np

from medjax.convert import ConversionError
from medjax.convert.loading import load_params_streaming, open_model
from medjax.data import DataError
from medjax.data.chat import ChatTemplate
from medjax.data.preferences import prompt_messages, response_ids
from medjax.data.sources import LOCATION_KEY, JsonlSource
from medjax.data.tokenizer import load_tokenizer
from medjax.models.decoder import ModelDef
from medjax.models.sampler import bucket
from medjax.parallel.inference import Placement, load_placed
from medjax.utils import atomic_open


class RewardScorer:
    """``score(prompts, responses)`` -> float32 [n, labels]; ``labels`` names the columns."""

    def __init__(
        self, model_path: str | os.PathLike, batch_size: int = 16, max_len: int | None = None, mesh: str | None = None
    ):
        """``mesh`` ("fsdp=4", parallel.inference) shards the model over the devices, of every
        process in a multi-process job (`medjax score-rm`); None keeps it on this process's first
        device, as RL's reward does where each process scores its own samples."""
        source = open_model(model_path)
        cfg, tokenizer_dir = source.model, source.tokenizer_dir
        if not cfg.score_labels:
            raise ConversionError(f"{model_path}: not a reward model (its config has no score_labels)")
        if tokenizer_dir is None:
            raise ConversionError(f"{model_path}: no tokenizer found beside the weights")
        self.labels = list(cfg.score_labels)
        self.max_len = max_len or cfg.max_position_embeddings
        self.tokenizer = load_tokenizer(tokenizer_dir)
        self.template = ChatTemplate(tokenizer_dir)
        model = ModelDef(cfg)
        # read tensor by tensor onto the device(s) (medjax.convert.loading)
        self.placement = (
            Placement(load_params_streaming(source)[0])
            if mesh is None
            else load_placed(model.abstract_state, source, mesh)
        )
        self.params = self.placement.params
        self.batch_size = self.placement.batch_size(batch_size)
        self._score = jax.jit(
            lambda p, tokens, lengths: model.bind(p).sequence_scores(tokens, lengths), **self.placement.jit_kwargs()
        )

    def encode(self, prompt, response: str, where: str = "<input>") -> np.ndarray:
        """Token ids of one pair, keeping the last ``max_len`` (where the score is read)."""
        return response_ids(self.tokenizer, self.template, prompt_messages(prompt, where), response)[-self.max_len :]

    def score_ids(self, sequences: Sequence[np.ndarray]) -> np.ndarray:
        out = np.zeros((len(sequences), len(self.labels)), np.float32)
        order = np.argsort([len(s) for s in sequences], kind="stable")  # similar lengths share a bucket
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            width = bucket(max(len(sequences[i]) for i in idx))
            tokens = np.zeros((self.batch_size, width), np.int32)
            lengths = np.ones(self.batch_size, np.int32)
            for row, i in enumerate(idx):
                tokens[row, : len(sequences[i])] = sequences[i]
                lengths[row] = len(sequences[i])
            scores = self._score(self.params, *self.placement.put(tokens, lengths))
            out[idx] = np.asarray(scores)[: len(idx)]
        return out

    def score(self, prompts: Sequence, responses: Sequence[str]) -> np.ndarray:
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        return self.score_ids([self.encode(p, r) for p, r in zip(prompts, responses)])


def score_file(
    model_path: str | os.PathLike,
    input_path: str | os.PathLike,
    out_path: str | os.PathLike | None,
    batch_size: int = 16,
    mesh: str = "",
) -> dict:
    """Scores a JSONL file of {prompt, response} records, or of preference pairs {prompt, chosen,
    rejected, dimension} (then also pairwise accuracy per dimension). Writes one JSON line per
    record (id, scores per label) atomically; returns the summary. ``mesh`` shards the model (and,
    in a multi-process job, spans every process; there process 0 alone writes)."""
    scorer = RewardScorer(model_path, batch_size=batch_size, mesh=mesh)
    source = JsonlSource([input_path], with_location=True)
    records = [source[i] for i in range(len(source))]
    pairs = bool(records) and "chosen" in records[0]
    fields = ("chosen", "rejected") if pairs else ("response",)
    sequences = []
    for r in records:
        where = r[LOCATION_KEY]
        for key in ("prompt", *fields):
            if key not in r:
                raise DataError(
                    f"{where}: missing key {key!r} (records are {{prompt, response}} or "
                    "{prompt, chosen, rejected, dimension})"
                )
            if key != "prompt" and not isinstance(r[key], str):
                raise DataError(f"{where}: {key!r} must be a string")
        if pairs and r.get("dimension") is not None and r["dimension"] not in scorer.labels:
            raise DataError(f"{where}: dimension {r['dimension']!r} is not one of {scorer.labels}")
        sequences += [scorer.encode(r["prompt"], r[k], where) for k in fields]
    scores = scorer.score_ids(sequences).reshape(len(records), len(fields), len(scorer.labels))
    rows, tally = [], {}
    for i, r in enumerate(records):
        row = {"id": r.get("id", i)}
        for j, key in enumerate(fields):
            row["scores" if not pairs else f"{key}_scores"] = dict(zip(scorer.labels, map(float, scores[i, j])))
        if pairs and r.get("dimension") is not None:
            d = scorer.labels.index(r["dimension"])
            row["dimension"] = r["dimension"]
            row["correct"] = bool(scores[i, 0, d] > scores[i, 1, d])
            hits, n = tally.get(r["dimension"], (0, 0))
            tally[r["dimension"]] = (hits + row["correct"], n + 1)
        rows.append(row)
    if out_path is not None and jax.process_index() == 0:
        with atomic_open(out_path) as fh:
            for row in rows:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    summary = {"records": len(records), "labels": scorer.labels}
    if tally:
        summary["accuracy"] = {d: hits / n for d, (hits, n) in sorted(tally.items())}
        summary["accuracy_overall"] = sum(h for h, _ in tally.values()) / sum(n for _, n in tally.values())
    return summary
