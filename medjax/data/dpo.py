"""DPO data: the reward model's preference JSONL {prompt, chosen, rejected} -> packed rows holding
both completions of each pair, the loss mask on the completion's tokens.

A completion is split from its prompt as TRL's DPO trainer splits it: the prompt rendered with the
generation prompt, prompt + reply rendered whole, and the completion starting where the two token
sequences part (the shorter of the two sides' common prefixes), so both trainers score exactly the
same tokens (tests/test_dpo.py). Both sides travel as one example and are never split over rows: in
a packed row pair k's chosen side is segment 2k-1, its rejected side segment 2k.
"""

from __future__ import annotations

import grain
import numpy as np

from medjax.data import DataError
from medjax.data.examples import DROPPED, OK, TRUNCATED, Converter
from medjax.data.preferences import CHOSEN, REJECTED, fit_pair, prompt_messages

EXAMPLE_KEYS = ("tokens", "targets", "loss_mask", "local_positions", "side")
DPO_BATCH_KEYS = ("tokens", "targets", "positions", "segment_ids", "loss_mask", "pair_ids", "side")


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    differ = np.nonzero(a[:n] != b[:n])[0]
    return int(differ[0]) if len(differ) else n


class DpoConverter(Converter):
    keys = EXAMPLE_KEYS
    dtypes = {"loss_mask": np.float32}

    def encode(self, text: str) -> np.ndarray:
        tokenizer, _ = self.tokenizer()
        return np.asarray(tokenizer.encode(text, add_special_tokens=False).ids, dtype=np.int32)

    def split(self, record: dict, where: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(prompt ids, prompt + chosen ids, prompt + rejected ids), the completions starting after
        the prompt ids."""
        _, template = self.tokenizer()
        for key in ("prompt", "chosen", "rejected"):
            if key not in record:
                raise DataError(f"{where}: missing key {key!r}")
        for key in ("chosen", "rejected"):
            if not isinstance(record[key], str) or not record[key].strip():
                raise DataError(f"{where}: {key!r} must be a non-empty string")
        prompt = prompt_messages(record["prompt"], where)
        prompt_ids = self.encode(template.render(prompt, add_generation_prompt=True))
        full = [
            self.encode(template.render([*prompt, {"role": "assistant", "content": record[key]}]))
            for key in ("chosen", "rejected")
        ]
        n = min(common_prefix(prompt_ids, f) for f in full)
        if any(len(f) <= n for f in full):
            raise DataError(f"{where}: a completion renders to no tokens after the prompt")
        return prompt_ids[:n], full[0], full[1]

    def build(self, record: dict, where: str):
        prompt, chosen, rejected = self.split(record, where)
        sides = []
        for ids in (chosen, rejected):
            mask = (np.arange(len(ids)) >= len(prompt)).astype(np.float32)
            sides.append((ids[:-1], ids[1:], mask[1:]))
        keep_c, keep_r = fit_pair(len(sides[0][0]), len(sides[1][0]), self.seq_len)
        status = OK
        if (keep_c, keep_r) != (len(sides[0][0]), len(sides[1][0])):
            if self.overlong == "drop":
                return None, DROPPED
            # keep each side's end: the completion is what DPO scores
            sides = [tuple(x[len(x) - keep :] for x in side) for side, keep in zip(sides, (keep_c, keep_r))]
            status = TRUNCATED
        return dpo_example(sides[0], sides[1]), status


def dpo_example(chosen: tuple, rejected: tuple) -> dict[str, np.ndarray]:
    """One pair's example from each side's (tokens, targets, loss_mask)."""
    parts = []
    for (tokens, targets, mask), which in ((chosen, CHOSEN), (rejected, REJECTED)):
        n = len(tokens)
        parts.append((tokens, targets, mask, np.arange(n, dtype=np.int32), np.full(n, which, np.int32)))
    return dict(zip(EXAMPLE_KEYS, (np.concatenate(x) for x in zip(*parts))))


class PackedDpoRow(grain.transforms.Map):
    """Packer output -> model row: the packer's segment k (pair k) splits into segments 2k-1 and 2k."""

    def map(self, row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        pair = row["tokens_segment_ids"].astype(np.int32)
        side = row["side"].astype(np.int32)
        return {
            "tokens": row["tokens"].astype(np.int32),
            "targets": row["targets"].astype(np.int32),
            "positions": row["local_positions"].astype(np.int32),
            "segment_ids": np.where(pair > 0, 2 * pair - (side == CHOSEN), 0).astype(np.int32),
            "loss_mask": row["loss_mask"].astype(np.float32),
            "pair_ids": pair,
            "side": side,
        }
