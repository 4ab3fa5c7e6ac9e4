"""seqio Tasks and Mixtures as a pretraining source (data.source: seqio; the tf extra).

Why: T5X and MaxText users describe pretraining blends as seqio Mixtures. medjax registers Tasks
for its corpora (JSONL files, TFDS datasets such as the curated medjax_corpus) with a seqio
Vocabulary that wraps the project's Hugging Face tokenizer, and Mixtures with rates from the
config; a user's own registry module is imported first. seqio hands out tokenized examples; Grain
then packs and batches them as it does every other source.

Resume is a deterministic skip: with a fixed data.seed the mixture's order is fixed (seqio seeds
its shuffles and its sampling; tf.data runs deterministically), so an iterator's state is the
number of examples it has handed out, and a restore rebuilds the pipeline and skips that many.
The skip reads (and tokenizes) the skipped examples again: a resume costs time in proportion to the
position, in exchange for a checkpoint that is one integer per stream inside Grain's own state.

TensorFlow is imported only here, and only when a seqio source is used: importing TensorFlow
before vLLM in one process aborts it (../shared/NOTES-ENV.md).
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import gc
import importlib
import logging
import os
import sys
import tempfile
import weakref
from pathlib import Path
from typing import Any, Callable, Iterator

import grain
import numpy as np

from medjax.config import SeqioConfig, SeqioTaskConfig
from medjax.data import DataError
from medjax.data.sources import TF_EXTRA_HINT, TfdsSource, expand_paths

TASK_FEATURE = "medjax_task"  # each medjax-registered Task tags its examples, so mixing can be counted


def _seqio():
    if sys.modules.get("seqio") is None:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        with _start_up_lines_held():
            try:
                import seqio  # noqa: F401  (imports TensorFlow)
                import tensorflow as tf

                tf.config.list_physical_devices()  # where a CPU host's "failed call to cuInit" is printed
                # tf.data runs on the host; TensorFlow must not take the accelerator memory JAX trains in.
                tf.config.set_visible_devices([], "GPU")
                logging.getLogger("absl").addFilter(_UncachedSourceAdvice())
            except ImportError:
                raise DataError(f"data.source: seqio needs seqio and TensorFlow: {TF_EXTRA_HINT}") from None
    return sys.modules["seqio"]


class _UncachedSourceAdvice(logging.Filter):
    """seqio advises against uncached function sources because a restarted job would reshuffle;
    medjax resumes by position in the same seeded order, so a restart sees what it would have."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Using an uncached FunctionDataset")


@contextlib.contextmanager
def _start_up_lines_held():
    """TensorFlow's C++ start-up lines on a host without CUDA ("Could not find cuda drivers", "failed
    call to cuInit") go to file descriptor 2 before any log level applies. They are held while it
    starts and shown only if starting fails."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            held.seek(0)
            sys.stderr.write(held.read().decode("utf-8", "replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


@functools.lru_cache(maxsize=None)
def vocabulary(tokenizer_path: str):
    """The seqio Vocabulary over ``tokenizer_path`` (one instance per tokenizer: seqio compares
    the vocabularies of a Mixture's tasks)."""
    seqio = _seqio()
    import tensorflow as tf

    from medjax.data.tokenizer import eos_id, load_tokenizer, tokenizer_file

    class HfTokenizerVocabulary(seqio.Vocabulary):
        """medjax's BPE tokenizer (tokenizer.json) as a seqio Vocabulary: encode and decode are the
        tokenizer's own, in Python and inside tf.data (through tf.numpy_function)."""

        def __init__(self, path: str):
            self.path = str(tokenizer_file(path))
            self._tok = load_tokenizer(self.path)
            self._eos = eos_id(self._tok)
            super().__init__(extra_ids=0)

        @property
        def eos_id(self) -> int:
            return self._eos

        @property
        def unk_id(self):
            return None  # byte-level BPE: every string encodes

        @property
        def _base_vocab_size(self) -> int:
            return self._tok.get_vocab_size()

        def _encode(self, s: str) -> list[int]:
            return self._tok.encode(s).ids

        def _decode(self, ids) -> str:
            return self._tok.decode([int(i) for i in ids])

        def _encode_tf(self, s):
            def encode(b) -> np.ndarray:  # bytes, or a 0-d array of bytes outside tf.data
                return np.asarray(self._encode(np.asarray(b).item().decode("utf-8")), np.int32)

            ids = tf.numpy_function(encode, [s], tf.int32, stateful=False)
            ids.set_shape([None])
            return ids

        def _decode_tf(self, ids):
            text = tf.numpy_function(
                lambda a: self._decode(a.tolist()).encode("utf-8"), [ids], tf.string, stateful=False
            )
            text.set_shape([])
            return text

        def __eq__(self, other) -> bool:
            return isinstance(other, HfTokenizerVocabulary) and other.path == self.path

        def __hash__(self) -> int:
            return hash(self.path)

    return HfTokenizerVocabulary(tokenizer_path)


def _texts(task: SeqioTaskConfig, split: str) -> tuple[Callable[[int], str], np.ndarray]:
    """(record index -> text, the indices of the split's records the task keeps)."""
    where = f"data.seqio.tasks {task.name}"
    if task.tfds_name:
        source = TfdsSource(task.tfds_name, task.tfds_data_dir, split, task.text_key)
        if source.kind != "text":
            raise DataError(f"{where}: feature {task.text_key!r} of {task.tfds_name} is not text")
        text = lambda i: source[i]["text"]  # noqa: E731
        grades = TfdsSource(task.tfds_name, task.tfds_data_dir, split, "authority") if task.authorities else None
        grade = lambda i: grades[i]["text"]  # noqa: E731
        n = len(source)
    else:
        from medjax.data.sources import JsonlSource

        files = task.files if split == "train" else task.eval_files
        required = [task.text_key] + (["authority"] if task.authorities else [])
        jsonl = JsonlSource(expand_paths(files, where), required_keys=required)
        text = lambda i: jsonl[i][task.text_key]  # noqa: E731
        grade = lambda i: jsonl[i]["authority"]  # noqa: E731
        n = len(jsonl)
    keep = np.arange(n)
    if task.authorities:
        keep = np.asarray([i for i in range(n) if grade(i) in task.authorities], dtype=np.int64)
        if not len(keep):
            raise DataError(f"{where}: no {split} document has an authority grade in {task.authorities}")
    return text, keep


def _register_task(task: SeqioTaskConfig, vocab, add_eos: bool) -> None:
    seqio = _seqio()
    import tensorflow as tf

    if not task.name:
        raise DataError("data.seqio.tasks: every task needs a name")
    if bool(task.files) == bool(task.tfds_name):
        raise DataError(f"data.seqio.tasks {task.name}: give either files (JSONL) or tfds_name, not both or neither")
    if task.tfds_name:
        splits = ["train", "validation"]
    else:
        splits = ["train"] + (["validation"] if task.eval_files else [])

    indexed: dict[str, tuple[Callable[[int], str], np.ndarray]] = {}  # split -> (text, kept indices)

    def dataset_fn(split: str, shuffle_files: bool, seed: int | None = None) -> tf.data.Dataset:
        # Indexed once per split: every stream, resume and inspect rebuilds the pipeline through here.
        if split not in indexed:
            indexed[split] = _texts(task, split)
        text, keep = indexed[split]
        order = np.random.default_rng(seed if seed is not None else 0).permutation(keep) if shuffle_files else keep

        def records() -> Iterator[dict]:
            for i in order:
                yield {"text": text(int(i))}

        return tf.data.Dataset.from_generator(records, output_signature={"text": tf.TensorSpec([], tf.string)})

    def tag(ds):
        return ds.map(lambda ex: {**ex, TASK_FEATURE: tf.constant(task.name)})

    seqio.TaskRegistry.remove(task.name)
    seqio.TaskRegistry.add(
        task.name,
        source=seqio.FunctionDataSource(dataset_fn, splits=splits),
        preprocessors=[
            tag,
            functools.partial(seqio.preprocessors.rekey, key_map={"targets": "text", TASK_FEATURE: TASK_FEATURE}),
            seqio.preprocessors.tokenize,
            seqio.preprocessors.append_eos,
        ],
        output_features={"targets": seqio.Feature(vocab, add_eos=add_eos)},
    )


def register(cfg: SeqioConfig, tokenizer: str, add_eos: bool = True):
    """Imports ``cfg.modules``, registers the configured Tasks and Mixture (replacing same-named
    ones) and returns the Task or Mixture ``cfg.name``."""
    seqio = _seqio()
    if not cfg.name:
        raise DataError("data.seqio.name is not set (the seqio Task or Mixture to read)")
    for module in cfg.modules:
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise DataError(f"data.seqio.modules: cannot import {module!r}: {e}") from None
    if cfg.tasks:
        if not tokenizer:
            raise DataError("data.tokenizer is not set (the seqio Vocabulary wraps it)")
        vocab = vocabulary(str(Path(tokenizer).absolute()))
        for task in cfg.tasks:
            _register_task(task, vocab, add_eos)
    if cfg.mixture:
        known = set(seqio.TaskRegistry.names())
        for name, rate in cfg.mixture.items():
            if name not in known:
                raise DataError(
                    f"data.seqio.mixture: no seqio Task named {name!r} (tasks: {', '.join(sorted(known)) or 'none'})"
                )
            if not rate > 0:
                raise DataError(f"data.seqio.mixture: the rate of {name!r} is {rate}; rates must be positive")
        if cfg.name in known:
            raise DataError(f"data.seqio.name {cfg.name!r} is a Task's name; name the Mixture differently")
        seqio.MixtureRegistry.remove(cfg.name)
        seqio.MixtureRegistry.add(cfg.name, list(cfg.mixture.items()))
    try:
        return seqio.get_mixture_or_task(cfg.name)
    except ValueError:
        names = sorted(set(seqio.TaskRegistry.names()) | set(seqio.MixtureRegistry.names()))
        raise DataError(
            f"data.seqio.name {cfg.name!r} is not a registered seqio Task or Mixture "
            f"(registered: {', '.join(names) or 'none'})"
        ) from None


def examples(
    provider, split: str, *, shuffle: bool, seed: int, num_epochs: int | None, stream: int = 0, streams: int = 1
):
    """The tf.data dataset of tokenized examples ({"targets", and "medjax_task" where tagged}) one
    data stream reads: every ``streams``-th example of the whole, deterministic sequence."""
    seqio = _seqio()
    import tensorflow as tf

    check_split(provider, split)
    kwargs: dict[str, Any] = dict(
        sequence_length=None, split=split, use_cached=False, shuffle=shuffle, seed=seed, num_epochs=num_epochs
    )
    if isinstance(provider, seqio.Mixture):
        kwargs.update(passthrough_features=[TASK_FEATURE], log_mixing_proportions=False)
    ds = provider.get_dataset(**kwargs)
    options = tf.data.Options()
    options.deterministic = True
    ds = ds.with_options(options)
    return ds.shard(streams, stream) if streams > 1 else ds


def check_split(provider, split: str) -> None:
    if split not in provider.splits:
        raise DataError(
            f"data.seqio split {split!r} of {provider.name}: not one of its splits "
            f"({', '.join(sorted(provider.splits))})"
        )


class SeqioExamples(grain.IterDataset):
    """A seqio dataset as a Grain IterDataset of {"ids"} records, checkpointable by position."""

    def __init__(self, make: Callable[[], Any]):
        super().__init__()
        self._make = make

    def __iter__(self) -> "_SeqioIterator":
        return _SeqioIterator(self._make)


_LIVE: "weakref.WeakSet[_SeqioIterator]" = weakref.WeakSet()


@atexit.register
def _close_iterators() -> None:
    """tf.data iterators whose Python functions (the record reader, the tokenizer) are still alive
    when the interpreter finalises abort the process ("terminate called without an active
    exception"): release them while Python still runs."""
    for it in list(_LIVE):
        it.close_tf()
    gc.collect()


class _SeqioIterator(grain.DatasetIterator):
    def __init__(self, make: Callable[[], Any]):
        super().__init__()
        self._make, self._position, self._it = make, 0, None
        _LIVE.add(self)

    def close_tf(self) -> None:
        self._it = None

    def __next__(self) -> dict[str, np.ndarray]:
        if self._it is None:
            self._it = self._make().skip(self._position).as_numpy_iterator()
        example = next(self._it)
        self._position += 1
        return {"ids": np.asarray(example["targets"], dtype=np.int32)}

    def get_state(self) -> dict[str, int]:
        return {"position": self._position}

    def set_state(self, state: dict[str, int]) -> None:
        self._position, self._it = int(state["position"]), None


def realised_rates(provider, n: int, seed: int) -> tuple[dict[str, float], list[dict]]:
    """(share of each task among the first ``n`` training examples, those examples decoded)."""
    counts: dict[str, int] = {}
    seen = []
    for example in examples(provider, "train", shuffle=True, seed=seed, num_epochs=None).take(n).as_numpy_iterator():
        task = example.get(TASK_FEATURE, b"?")
        task = task.decode() if isinstance(task, bytes) else str(task)
        counts[task] = counts.get(task, 0) + 1
        seen.append({"task": task, "targets": example["targets"]})
    return {k: v / max(1, len(seen)) for k, v in sorted(counts.items())}, seen


def configured_rates(provider) -> dict[str, float]:
    """A Mixture's rates normalised to shares (a Task: itself, 1.0)."""
    seqio = _seqio()
    if not isinstance(provider, seqio.Mixture):
        return {provider.name: 1.0}
    rates = {task.name: float(provider.get_rate(task)) for task in provider.tasks}
    total = sum(rates.values())
    return {k: v / total for k, v in sorted(rates.items())}
