"""SFT data: JSONL conversations ({"messages": [{role, content}, ...]}) -> packed rows whose loss
mask covers only what the assistant said.

Conversations are rendered with the tokenizer's chat template, tokenized once, and first-fit
packed whole into rows; ``segment_ids`` keep packed conversations from attending to each other
and ``positions`` restart at each, so a packed conversation trains exactly as it would alone.
"""

from __future__ import annotations

import grain
import numpy as np

from medjax.data import DataError
from medjax.data.chat import check_messages, tokenize_chat
from medjax.data.examples import DROPPED, OK, TRUNCATED, Converter, TolerantSource
from medjax.data.sources import JsonlSource, expand_paths

MESSAGES_KEY = "messages"
EXAMPLE_KEYS = ("tokens", "targets", "loss_mask")


class ChatConverter(Converter):
    """One conversation -> {tokens, targets, loss_mask} (next-token pairs, at most seq_len long)."""

    keys = EXAMPLE_KEYS
    dtypes = {"loss_mask": np.float32}

    def build(self, record: dict, where: str):
        tokenizer, template = self.tokenizer()
        if MESSAGES_KEY not in record:
            raise DataError(f"{where}: missing key {MESSAGES_KEY!r}")
        messages = check_messages(record[MESSAGES_KEY], where)
        ids, mask = tokenize_chat(tokenizer, template, messages)
        return chat_example(ids, mask, self.seq_len, self.overlong)


def chat_example(ids: np.ndarray, mask: np.ndarray, seq_len: int, overlong: str):
    """Next-token pairs of one tokenized conversation under the overlong rule: the loss at
    position t is on predicting token t+1, so it is set where token t+1 is the assistant's."""
    status = OK
    if len(ids) - 1 > seq_len:
        if overlong == "drop":
            return None, DROPPED
        ids, mask, status = ids[: seq_len + 1], mask[: seq_len + 1], TRUNCATED
    example = {"tokens": ids[:-1], "targets": ids[1:], "loss_mask": mask[1:].astype(np.float32)}
    if not example["loss_mask"].any():  # every assistant token was cut off
        return None, DROPPED
    return example, status


class PackedChatRow(grain.transforms.Map):
    def map(self, row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {
            "tokens": row["tokens"].astype(np.int32),
            "targets": row["targets"].astype(np.int32),
            "positions": row["tokens_positions"].astype(np.int32),
            "segment_ids": row["tokens_segment_ids"].astype(np.int32),
            "loss_mask": row["loss_mask"].astype(np.float32),
        }


def chat_source(files: list[str]) -> TolerantSource:
    return TolerantSource(JsonlSource(expand_paths(files, "data"), with_location=True))
