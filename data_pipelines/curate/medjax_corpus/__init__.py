"""The curated corpus as a TFDS dataset: `medjax data tfds-build CURATED_DIR --data-dir DIR`.

Why: T5X and MaxText users keep corpora as TFDS datasets. Written in TFDS's ArrayRecord file
format, the dataset loads with ``tfds.builder("medjax_corpus", data_dir=DIR)`` or
``tfds.data_source(...)`` alone (TFDS reads its dataset_info.json; no medjax code is needed), and
medjax trains on it with ``data.source: tfds``. The examples are curation's clean/ output: the
text, its token ids exactly as curation's ArrayRecord shards hold them (same tokenizer, same EOS),
and where each document came from. Documents go to train or validation by the shards' own rule,
so the TFDS splits hold the same documents as shards/train-* and shards/eval-*. The dataset card
is README.md beside this file (TFDS's description).
"""

from __future__ import annotations

import contextlib
import fnmatch
import io
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import tensorflow_datasets as tfds
from absl import logging as absl_logging
from etils import epath
from tqdm import tqdm

from data_pipelines.curate.documents import doc_key
from data_pipelines.curate.shards import is_eval

NAME = "medjax_corpus"
SPLITS = ("train", "validation")


class MedjaxCorpus(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")
    pkg_dir_path = epath.Path(__file__).parent  # README.md (the card) lives here, not in the parent package
    RELEASE_NOTES = {"1.0.0": "Curated documents with text, token ids, source, authority grade and provenance."}

    def __init__(self, *, curated_dir: str | os.PathLike | None = None, report: dict | None = None, **kwargs):
        self._curated = None if curated_dir is None else Path(curated_dir).resolve()
        # report.json is read once per build: the metadata and every split's generator use it.
        self._curation = report if report is not None or self._curated is None else _report(self._curated)
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(
                {
                    "id": tfds.features.Text(),
                    "text": tfds.features.Text(),
                    "tokens": tfds.features.Tensor(shape=(None,), dtype=np.int32),
                    "source": tfds.features.Text(),
                    "authority": tfds.features.Text(),
                    "lang": tfds.features.Text(),
                    "provenance": tfds.features.Text(),
                }
            ),
            # Curation's order is kept: a TFDS shuffle would only be undone by the loader's own.
            disable_shuffling=True,
            homepage="https://github.com/medjax/medjax",
            metadata=tfds.core.MetadataDict(self._curation_summary()),
        )

    def _curation_summary(self) -> dict[str, Any]:
        if self._curated is None:
            return {}
        report = self._curation
        return {
            "curated_dir": str(self._curated),
            "kept": report.get("kept", {}),
            "authority": report.get("authority", {}),
            "lang": report.get("lang", {}),
            "tokenizer": report["config"]["shards"]["tokenizer"],
        }

    def _split_generators(self, dl_manager):
        if self._curated is None:
            raise ValueError(
                f"{NAME} is built from a curation output: medjax data tfds-build CURATED_DIR --data-dir DIR"
            )
        return {split: self._generate_examples(split) for split in SPLITS}

    def _generate_examples(self, split: str) -> Iterator[tuple[str, dict[str, Any]]]:
        from medjax.data.tokenizer import eos_id, load_tokenizer

        shards = self._curation["config"]["shards"]
        tok = load_tokenizer(shards["tokenizer"])
        eos = eos_id(tok)
        for path in sorted((self._curated / "clean").glob("*.jsonl")):
            with open(path, encoding="utf-8") as f:
                for lineno, line in enumerate(
                    tqdm(f, desc=f"{split}: {path.name}", unit=" docs", leave=False), start=1
                ):
                    if not line.strip():
                        continue
                    doc = json.loads(line)
                    if _split_of(doc, shards) != split:
                        continue
                    ids = tok.encode(doc["text"]).ids + ([eos] if shards.get("add_eos", True) else [])
                    where = f"{doc.get('file', '')}:{doc.get('line', '')}"
                    yield (
                        f"{path.name}:{lineno}",
                        {
                            "id": str(doc.get("id") or ""),
                            "text": doc["text"],
                            "tokens": np.asarray(ids, np.int32),
                            "source": doc.get("source") or "",
                            "authority": doc.get("authority") or "",
                            "lang": doc.get("lang") or "",
                            "provenance": doc.get("url") or where,
                        },
                    )


def _split_of(doc: dict, shards: dict) -> str:
    """The shards' rule (data_pipelines/curate/shards.py): held-out sources and a hashed fraction."""
    held_out = any(fnmatch.fnmatch(doc.get("source") or "", p) for p in shards.get("eval_sources", []))
    key = doc_key(doc.get("file", ""), int(doc.get("line") or 0))
    return "validation" if held_out or is_eval(key, shards.get("eval_fraction", 0.0)) else "train"


def _report(curated: Path) -> dict:
    path = curated / "report.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {curated} is not a `medjax curate` output")
    report = json.loads(path.read_text(encoding="utf-8"))
    if not report.get("config", {}).get("shards", {}).get("tokenizer"):
        raise ValueError(f"{path}: the curation ran without shards.tokenizer, so there are no token ids to store")
    return report


def build(curated_dir: str | os.PathLike, data_dir: str | os.PathLike, overwrite: bool = False) -> dict[str, Any]:
    """Writes DATA_DIR/medjax_corpus/1.0.0 (ArrayRecord files) from ``curated_dir``; returns the
    split counts, a line that says them, and the dataset's path. The build happens in a temporary folder beside it and is
    moved into place whole, so a failed build leaves an earlier dataset as it was."""
    curated, data_dir = Path(curated_dir).resolve(), Path(data_dir).resolve()
    if not (curated / "clean").is_dir():
        raise FileNotFoundError(f"{curated}/clean not found: {curated} is not a `medjax curate` output")
    report = _report(curated)
    final = data_dir / NAME / str(MedjaxCorpus.VERSION)
    if final.exists() and not overwrite:
        raise FileExistsError(f"{final} exists (pass --overwrite to rebuild it)")
    data_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{NAME}-", dir=data_dir))
    tfds.disable_progress_bar()  # ours (per split, in documents) says more than TFDS's nested bars
    absl_logging.set_verbosity(absl_logging.WARNING)  # "Downloading and preparing dataset Unknown size ..."
    try:
        builder = MedjaxCorpus(curated_dir=curated, report=report, data_dir=staging)
        with contextlib.redirect_stdout(io.StringIO()):  # TFDS prints "Downloading ... Unknown size" banners
            builder.download_and_prepare(file_format="array_record")
        counts = {name: split.num_examples for name, split in builder.info.splits.items()}
        final.parent.mkdir(parents=True, exist_ok=True)
        if final.exists():
            old = final.with_name(f".{final.name}.old")
            os.replace(final, old)
            os.replace(staging / NAME / final.name, final)
            shutil.rmtree(old)
        else:
            os.replace(staging / NAME / final.name, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {
        "path": str(final),
        "splits": counts,
        "counts": ", ".join(f"{name} {n:,}" for name, n in sorted(counts.items())),
    }
