"""Reward-model data: JSONL preference pairs {prompt, chosen, rejected, dimension} -> packed rows
for a pairwise (Bradley-Terry) loss.

Each side is the conversation (prompt as a user turn, or a list of messages; the response as the
assistant's reply) rendered with the chat template, exactly as ``response_ids`` renders it when the
trained model scores a response. Both sides of a pair travel as one example, so a pair is never
split across rows; in a packed row pair k's chosen side is segment 2k-1 and its rejected side
segment 2k, and ``score_role`` marks each side's last token (1 chosen, 2 rejected), where the score
is read.
"""

from __future__ import annotations

import grain
import numpy as np

from medjax.data import DataError
from medjax.data.chat import ChatTemplate, check_messages
from medjax.data.examples import DROPPED, OK, TRUNCATED, Converter

EXAMPLE_KEYS = ("tokens", "local_positions", "side", "score_role", "dimension")
CHOSEN, REJECTED = 1, 2


def prompt_messages(prompt, where: str) -> list[dict[str, str]]:
    """A prompt is a string (one user turn) or a list of {role, content} turns before the reply."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    messages = check_messages(prompt, where, require_assistant=False)
    if messages[-1]["role"] == "assistant":
        raise DataError(f"{where}: the prompt's last turn is the assistant's; the response must follow a user turn")
    return messages


def response_ids(tokenizer, template: ChatTemplate, prompt: list[dict[str, str]], response: str) -> np.ndarray:
    """Token ids of prompt + response as the reward model reads them (training and scoring alike)."""
    text = template.render([*prompt, {"role": "assistant", "content": response}])
    return np.asarray(tokenizer.encode(text, add_special_tokens=False).ids, dtype=np.int32)


def fit_pair(n_chosen: int, n_rejected: int, seq_len: int) -> tuple[int, int]:
    """How many trailing tokens of each side to keep so the pair fits ``seq_len``: each side gets at
    least half unless the other needs less."""
    if n_chosen + n_rejected <= seq_len:
        return n_chosen, n_rejected
    keep_c = min(n_chosen, max(seq_len // 2, seq_len - n_rejected))
    return keep_c, min(n_rejected, seq_len - keep_c)


class PairConverter(Converter):
    keys = EXAMPLE_KEYS

    def __init__(
        self, tokenizer_path: str, seq_len: int, overlong: str = "truncate", skip_bad: bool = False, *, labels=()
    ):
        if not labels:
            raise DataError("the reward_model stage needs model.score_labels (e.g. [honesty, helpfulness, compliance])")
        super().__init__(tokenizer_path, seq_len, overlong, skip_bad)
        self.labels = list(labels)

    def build(self, record: dict, where: str):
        tokenizer, template = self.tokenizer()
        for key in ("prompt", "chosen", "rejected"):
            if key not in record:
                raise DataError(f"{where}: missing key {key!r}")
        for key in ("chosen", "rejected"):
            if not isinstance(record[key], str) or not record[key].strip():
                raise DataError(f"{where}: {key!r} must be a non-empty string")
        dim = record.get("dimension")
        if dim is None and len(self.labels) == 1:
            dim = self.labels[0]
        if dim not in self.labels:
            raise DataError(
                f"{where}: dimension {dim!r} is not one of the model's score labels {self.labels} (model.score_labels)"
            )
        prompt = prompt_messages(record["prompt"], where)
        chosen = response_ids(tokenizer, template, prompt, record["chosen"])
        rejected = response_ids(tokenizer, template, prompt, record["rejected"])
        keep_c, keep_r = fit_pair(len(chosen), len(rejected), self.seq_len)
        status = OK
        if (keep_c, keep_r) != (len(chosen), len(rejected)):
            if self.overlong == "drop":
                return None, DROPPED
            chosen, rejected, status = chosen[len(chosen) - keep_c :], rejected[len(rejected) - keep_r :], TRUNCATED
        return pair_example(chosen, rejected, self.labels.index(dim)), status


def pair_example(chosen: np.ndarray, rejected: np.ndarray, dimension: int) -> dict[str, np.ndarray]:
    def side(ids, which):
        role = np.zeros(len(ids), np.int32)
        role[-1] = which
        return ids, np.arange(len(ids), dtype=np.int32), np.full(len(ids), which, np.int32), role

    parts = [side(chosen, CHOSEN), side(rejected, REJECTED)]
    tokens, local, which, role = (np.concatenate(x) for x in zip(*parts))
    return {
        "tokens": tokens,
        "local_positions": local,
        "side": which,
        "score_role": role,
        "dimension": np.full(len(tokens), dimension, np.int32),
    }


PAIR_BATCH_KEYS = ("tokens", "positions", "segment_ids", "pair_ids", "score_role", "dimension")


class PackedPairRow(grain.transforms.Map):
    """Packer output -> model row: the packer's segment k (pair k) splits into segments 2k-1 and 2k."""

    def map(self, row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        pair = row["tokens_segment_ids"].astype(np.int32)
        segment = np.where(pair > 0, 2 * pair - (row["side"] == CHOSEN), 0).astype(np.int32)
        return {
            "tokens": row["tokens"].astype(np.int32),
            "positions": row["local_positions"].astype(np.int32),
            "segment_ids": segment,
            "pair_ids": pair,
            "score_role": row["score_role"].astype(np.int32),
            "dimension": row["dimension"].astype(np.int32),
        }
