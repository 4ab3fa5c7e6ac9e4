"""The optional rerank stage: a Hugging Face sequence-classification directory scores each
(question, passage) pair of the fused top candidates, and the best-scored come first.

Two kinds of directory work, told apart by the tokenizer: a cross-encoder (BERT-style, no chat
template) reads the pair as its two segments; a reward model with a chat template (a medjax
reward-model stage trained on (question, passage) preference pairs, then `medjax export`ed) reads
the question as the user turn and the passage as the assistant's reply, as it was trained, and the
score is read at the last token (the template's end kept when a pair is truncated). A model with
several labels (the reward model's honesty / helpfulness / compliance) is read at the label
search.rerank_label names."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from medjax.rag.corpus import RagError


class Reranker:
    def __init__(self, path: str | os.PathLike, label: str = "", batch_size: int = 16, max_length: int = 512):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import torch
        import transformers
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.path = Path(path).expanduser()
        if not (self.path / "config.json").is_file():
            raise RagError(f"search.rerank={path}: not a Hugging Face model directory (no config.json)")
        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        self.model = AutoModelForSequenceClassification.from_pretrained(self.path, torch_dtype=torch.float32).eval()
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.chat = bool(getattr(self.tokenizer, "chat_template", None))
        if self.chat:
            self.tokenizer.padding_side = "right"
            self.tokenizer.truncation_side = "left"  # the score is read at the end
        n = int(self.model.config.num_labels)
        labels = [str(self.model.config.id2label.get(i, f"LABEL_{i}")) for i in range(n)]
        if label:
            if label not in labels:
                raise RagError(f"search.rerank_label={label!r} is not a label of {self.path} ({', '.join(labels)})")
            self.column = labels.index(label)
        elif n <= 2:
            self.column = n - 1  # one relevance score, or a binary classifier's positive class
        else:
            raise RagError(f"{self.path} scores {n} labels ({', '.join(labels)}): set search.rerank_label to one")
        self.batch_size, self.max_length, self._torch = batch_size, max_length, torch

    def _batch(self, question: str, passages: list[str]):
        tok = self.tokenizer
        if self.chat:
            texts = [
                tok.apply_chat_template(
                    [{"role": "user", "content": question}, {"role": "assistant", "content": p}], tokenize=False
                )
                for p in passages
            ]
            return tok(
                texts,
                padding=True,
                truncation=True,
                max_length=self.max_length,
                add_special_tokens=False,
                return_tensors="pt",
            )
        return tok(
            [question] * len(passages),
            passages,
            padding=True,
            truncation="only_second",
            max_length=self.max_length,
            return_tensors="pt",
        )

    def score(self, question: str, passages: list[str]) -> np.ndarray:
        out = np.zeros(len(passages), np.float32)
        with self._torch.inference_mode():
            for start in range(0, len(passages), self.batch_size):
                batch = self._batch(question, passages[start : start + self.batch_size])
                logits = self.model(**batch).logits[:, self.column]
                out[start : start + len(logits)] = logits.float().numpy()
        return out
