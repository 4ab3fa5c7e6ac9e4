"""Where a model's weights live and how to read them one tensor at a time.

Two layouts hold medjax weights:
- a model directory (written by `medjax import`): model.json, params/ (an Orbax checkpoint written
  by partial saves, the tree in params/state), tokenizer/;
- a training run: workdir/checkpoints/<step>/{state,meta}, params under state["params"], the
  model config in meta, the tokenizer named by workdir/config.yaml.
Either can be exported; a training checkpoint saved on a sharded mesh is gathered per tensor.

A run that trains part of a model it started from elsewhere (LoRA adapters, optimizer.trainable,
over init_from) keeps only what it trains: its meta names the frozen weights' source
("frozen_from"), and loading.checkpoint_reader reads the tensors the checkpoint lacks from there, so
every reader (export, eval, generate, init_from) sees the whole model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

import jax
import numpy as np
import orbax.checkpoint as ocp
import yaml
from orbax.checkpoint.experimental.v1 import partial as ocp_partial

from medjax.config import from_dict
from medjax.convert import ConversionError
from medjax.convert.weights import get_path, set_path
from medjax.data.chat import TEMPLATE_DIR
from medjax.integrity import host_checksum
from medjax.models.config import ModelConfig
from medjax.utils import committed_steps

MODEL_JSON = "model.json"
# The meta key naming where a trained-only checkpoint's frozen params are read from.
FROZEN_FROM = "frozen_from"
PARAMS_DIR = "params"
# Orbax's partial-save layout puts the tree under this sub-folder of params/.
PARAMS_TREE = "state"
# Tensors are flushed to disk in groups this large: small tensors (norms, biases) share one write,
# a large one goes alone.
GROUP_BYTES = 64 * 1024**2
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "added_tokens.json",
    "chat_template.jinja",
)


@dataclasses.dataclass
class CheckpointRef:
    params_dir: Path  # the Orbax item directory holding the params tree
    prefix: tuple[str, ...]  # where params sit inside that tree
    model: ModelConfig
    tokenizer_dir: Path | None
    step: int | None = None
    # Where the tensors a trained-only checkpoint lacks are read from (meta "frozen_from").
    base: str | None = None


def _model_from_json(data: dict, where: str) -> ModelConfig:
    return from_dict(ModelConfig, data, where=where, prefix="model").validate()


def _latest_step_dir(checkpoints: Path) -> Path:
    steps = committed_steps(checkpoints, holding="state")
    if not steps:
        raise ConversionError(f"{checkpoints}: no finished checkpoint (no <step>/state folder)")
    return checkpoints / str(steps[-1])


def resolve_checkpoint(path: str | os.PathLike) -> CheckpointRef:
    """Accepts a model directory, a training workdir, its checkpoints/ folder or one step folder.
    The paths returned are absolute: Orbax refuses (or silently misreads) relative ones."""
    p = Path(path).absolute()
    if not p.exists():
        raise ConversionError(f"checkpoint not found: {p}")
    if (p / MODEL_JSON).is_file():
        model = _model_from_json(json.loads((p / MODEL_JSON).read_text()), str(p / MODEL_JSON))
        tok = p / "tokenizer"
        params = p / PARAMS_DIR / PARAMS_TREE
        if not params.is_dir():  # model directories written before imports streamed: one Orbax save
            params = p / PARAMS_DIR
        return CheckpointRef(params, (), model, tok if tok.is_dir() else None)
    if (p / "checkpoints").is_dir():
        p = _latest_step_dir(p / "checkpoints")
    elif not (p / "state").is_dir() and any(c.name.isdigit() for c in p.iterdir()):
        p = _latest_step_dir(p)
    meta_file = p / "meta" / "metadata"
    if not (p / "state").is_dir() or not meta_file.is_file():
        raise ConversionError(f"{path}: not a medjax model directory or training checkpoint")
    meta = json.loads(meta_file.read_text())
    if "model" not in meta:
        raise ConversionError(f"{meta_file}: no model config recorded")
    model = _model_from_json(meta["model"], str(meta_file))
    tokenizer = None
    run_config = p.parent.parent / "config.yaml"
    if run_config.is_file():
        tok = (yaml.safe_load(run_config.read_text()).get("data") or {}).get("tokenizer")
        if tok and Path(tok).exists():
            tokenizer = Path(tok) if Path(tok).is_dir() else Path(tok).parent
    step = int(p.name) if p.name.isdigit() else None
    return CheckpointRef(p / "state", ("params",), model, tokenizer, step=step, base=meta.get(FROZEN_FROM))


class ParamReader:
    """Reads single parameters (gathered to host numpy) from an Orbax params tree.

    It talks to the PyTree handler directly: ``params_dir`` is one item of a step (or a model
    directory's params), and a Checkpointer would look for step metadata there and log
    "Metadata file does not exist" on every read."""

    def __init__(self, ref: CheckpointRef, base=None):
        self.ref = ref
        self._ckpt = ocp.PyTreeCheckpointHandler()
        tree = self._ckpt.metadata(ref.params_dir)
        for key in ref.prefix:
            tree = tree[key]
        self._meta = tree
        # A training step's checksums (train/integrity.py), checked on every tensor read, so an
        # export or an init_from never passes on a damaged checkpoint's bytes.
        meta_file = ref.params_dir.parent / "meta" / "metadata"
        self._checksums = {}
        if ref.step is not None and meta_file.is_file():
            self._checksums = json.loads(meta_file.read_text()).get("checksums") or {}
        self._stored = {tuple(map(str, p)) for p in self._stored_paths()}
        # A trained-only checkpoint's frozen tensors (loading.FrozenBase; None: the stored ones alone).
        self._base = base

    def _verified(self, path: tuple, array: np.ndarray) -> np.ndarray:
        name = "/".join(map(str, (*self.ref.prefix, *path)))
        want = self._checksums.get(name)
        if want is not None and (got := host_checksum(array)) != want:
            raise ConversionError(
                f"{self.ref.params_dir.parent}: {name}: checksum expected {want}, found {got}: the checkpoint is "
                "damaged (`medjax ckpt verify` checks every step; an earlier step may be good)"
            )
        return array

    def _restore(self, item: dict) -> dict:
        restore_args = jax.tree.map(lambda _: ocp.ArrayRestoreArgs(restore_type=np.ndarray), item)
        try:
            return self._ckpt.restore(
                self.ref.params_dir,
                args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True),
            )
        except Exception as e:  # tensorstore's DATA_LOSS and the like, under Orbax's plain Exception
            cause = e.__cause__ or e
            raise ConversionError(
                f"{self.ref.params_dir}: cannot be read ({type(cause).__name__}: {str(cause).splitlines()[0][:300]}); "
                "`medjax ckpt verify` checks a run's steps"
            ) from e

    def _stored_paths(self) -> list[tuple]:
        def walk(node, prefix):
            if hasattr(node, "shape"):
                return [prefix]
            return [p for k, v in node.items() for p in walk(v, (*prefix, k))]

        return walk(self._meta, ())

    def paths(self) -> list[tuple]:
        """Every tensor's key path (keys as Orbax stores them: strings), the frozen base's included."""
        stored = self._stored_paths()
        if self._base is None:
            return stored
        return stored + [p for p in self._base.abstract if p not in self._stored]

    def _from_base(self, path: tuple) -> bool:
        return self._base is not None and tuple(map(str, path)) not in self._stored

    def metadata(self, path: tuple) -> tuple[tuple[int, ...], np.dtype]:
        if self._from_base(path):
            return self._base.metadata(path)
        node = self._meta
        for key in path:
            node = node[str(key)] if isinstance(node, dict) and str(key) in node else node[key]
        return tuple(node.shape), np.dtype(node.dtype)

    def read(self, path: tuple) -> np.ndarray:
        return self.read_many([path])[0]

    def read_many(self, paths: list[tuple]) -> list[np.ndarray]:
        """Several parameters in one restore (each call costs tens of milliseconds however small
        its tensors), in the order of ``paths``."""
        item: dict = {}
        stored = [p for p in paths if not self._from_base(p)]
        for path in stored:
            set_path(item, (*self.ref.prefix, *path), jax.ShapeDtypeStruct(*self.metadata(path)))
        out = self._restore(item) if stored else {}
        return [
            self._base.read(path)
            if self._from_base(path)
            else self._verified(path, np.asarray(get_path(out, (*self.ref.prefix, *path))))
            for path in paths
        ]

    def read_all(self) -> dict:
        item = jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype), self._meta)
        for key in reversed(self.ref.prefix):
            item = {key: item}
        out = self._restore(item)
        for key in self.ref.prefix:
            out = out[key]
        for path, leaf in jax.tree_util.tree_flatten_with_path(out)[0]:
            self._verified(tuple(getattr(k, "key", getattr(k, "idx", k)) for k in path), np.asarray(leaf))
        for path in self.paths():
            if self._from_base(path):
                set_path(out, path, self._base.read(path))
        return _int_keys(out)


def load_params(ref: CheckpointRef) -> dict:
    """The whole params tree as host numpy arrays, in one restore (tests and tools; generation,
    evaluation and init_from load tensor by tensor onto their devices: medjax.convert.loading)."""
    if ref.base:
        raise ConversionError(
            f"{ref.params_dir.parent}: the checkpoint holds only the trained params; "
            "medjax.convert.loading.checkpoint_reader reads the rest from its base"
        )
    return ParamReader(ref).read_all()


def _int_keys(tree):
    """Orbax hands list-like levels back with string keys ('0', '1'); the model uses ints."""
    if isinstance(tree, dict):
        return {(int(k) if isinstance(k, str) and k.isdigit() else k): _int_keys(v) for k, v in tree.items()}
    return tree


def save_model_dir(
    out_dir: str | os.PathLike,
    model: ModelConfig,
    params: dict | Iterable[tuple[tuple, np.ndarray]],
    tokenizer_dir: Path | None,
    tokenizer_json: str | None = None,
) -> Path:
    """Writes a model directory beside ``out_dir`` and renames it into place when complete.

    ``params`` is a whole tree or a stream of (path, array). A stream goes to disk through Orbax
    partial saves in groups of about GROUP_BYTES, so an import never holds the model in memory.
    ``tokenizer_json`` replaces the copied tokenizer.json (an adopted transformers tokenizer)."""
    out = Path(out_dir)
    with staging_dir(out) as tmp:
        items = _leaves(params) if isinstance(params, dict) else params
        group: dict = {}
        group_bytes = 0
        for path, leaf in items:
            set_path(group, tuple(str(k) for k in path), leaf)
            group_bytes += leaf.nbytes
            if group_bytes >= GROUP_BYTES:
                ocp_partial.save(tmp / PARAMS_DIR, group)
                group, group_bytes = {}, 0
        if group:
            ocp_partial.save(tmp / PARAMS_DIR, group)
        ocp_partial.finalize(tmp / PARAMS_DIR)
        (tmp / MODEL_JSON).write_text(json.dumps(dataclasses.asdict(model), indent=2) + "\n")
        if tokenizer_dir is not None and not copy_tokenizer(tokenizer_dir, tmp / "tokenizer"):
            (tmp / "tokenizer").rmdir()  # none there: no empty folder that reads as a tokenizer
        if tokenizer_json is not None:
            (tmp / "tokenizer").mkdir(exist_ok=True)
            (tmp / "tokenizer" / "tokenizer.json").write_text(tokenizer_json, encoding="utf-8")
    return out


def _leaves(tree: dict, prefix: tuple = ()) -> Iterator[tuple[tuple, np.ndarray]]:
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _leaves(value, (*prefix, key))
        else:
            yield (*prefix, key), np.asarray(value)


@contextlib.contextmanager
def staging_dir(out: Path) -> Iterator[Path]:
    """A temporary folder beside ``out``; renamed to ``out`` on success, removed on failure.
    A non-empty ``out`` is refused up front: conversion never overwrites earlier output. The
    staging folder is absolute because Orbax writes only to absolute paths."""
    out = Path(out).absolute()
    if out.exists() and any(out.iterdir()):
        raise ConversionError(f"output {out} exists and is not empty")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            out.rmdir()  # only an empty folder reaches here
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def copy_tokenizer(src: Path, dst: Path) -> list[str]:
    dst.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    if (src / TEMPLATE_DIR).is_dir():  # named chat templates, as transformers saves them
        shutil.copytree(src / TEMPLATE_DIR, dst / TEMPLATE_DIR, dirs_exist_ok=True)
        copied.append(TEMPLATE_DIR)
    return copied
