"""Loading a model's weights into their final placement, one tensor at a time.

`medjax generate`, `medjax eval`, `medjax score-rm` and a stage's ``init_from`` all load weights
through ``load_params_streaming``: a source (a Hugging Face directory, a GGUF file, a medjax model
directory or training checkpoint; ``open_source``) is read tensor by tensor, each tensor is cast to
the model's param dtype and put on its devices (its sharding, or the default device), and its host
copy is let go before the next is read. Host memory therefore holds the placed weights (on a CPU
backend the devices' memory is host memory) plus about one tensor, never a whole numpy tree beside
the device arrays.

Layouts are converted on the way: a scanned model's stacked tensor is filled layer by layer on the
device (each layer is placed, then written into the stacked array in place), and a stacked source
tensor feeding an unrolled model is read once and placed layer by layer. Names, shapes and layer
counts are checked against the model before any tensor is read.
"""

from __future__ import annotations

import atexit
import ctypes
import dataclasses
import functools
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from medjax.convert import ConversionError
from medjax.convert.checkpoints import GROUP_BYTES, CheckpointRef, ParamReader, resolve_checkpoint
from medjax.convert.weights import set_path, stored_path
from medjax.models.config import ModelConfig
from medjax.models.layers import DTYPES, is_adapter

TensorPath = tuple
MALLOC_TRIM = True


class WeightSource:
    """A model's weights where they are stored. ``model`` is the source's own architecture and
    layout (scanned or not); ``shapes()`` names every stored tensor with its shape, in the order
    reading them is cheapest; ``read(paths)`` yields (path, host array in the source's param dtype)
    in the order asked, one at a time."""

    kind: str  # "hf", "gguf" or "medjax"
    path: Path
    model: ModelConfig
    tokenizer_dir: Path | None

    def shapes(self) -> dict[TensorPath, tuple[int, ...]]:
        raise NotImplementedError

    def read(self, paths: Iterable[TensorPath]) -> Iterator[tuple[TensorPath, np.ndarray]]:
        raise NotImplementedError


class TableSource(WeightSource):
    """Tensors under Hugging Face names (safetensors or pickle files, a GGUF file), re-laid out by
    medjax.convert.weights' table. The names, shapes and dtypes are checked on first use."""

    def __init__(self, kind: str, path: Path, model: ModelConfig, weights, tokenizer_dir: Path | None):
        self.kind, self.path, self.model, self.weights, self.tokenizer_dir = kind, path, model, weights, tokenizer_dir
        self._maps = None

    def _table(self) -> dict:
        if self._maps is None:
            from medjax.convert.hf_import import checked_table

            self._maps = {m.path: m for m in checked_table(self.model, self.weights, str(self.path))}
        return self._maps

    def shapes(self) -> dict[TensorPath, tuple[int, ...]]:
        return {p: m.shape for p, m in self._table().items()}

    def read(self, paths: Iterable[TensorPath]) -> Iterator[tuple[TensorPath, np.ndarray]]:
        from medjax.convert.hf_import import read_tensor

        maps, dtype = self._table(), np.dtype(DTYPES[self.model.param_dtype])
        for p in paths:
            yield p, read_tensor(maps[p], self.weights, dtype)


class CheckpointSource(WeightSource):
    """A medjax model directory or training checkpoint (Orbax): tensors are restored a group at a
    time (one restore per tensor would cost tens of milliseconds each, however small)."""

    kind = "medjax"

    def __init__(self, path: Path, ref):
        self.path, self.ref, self.model, self.tokenizer_dir = path, ref, ref.model, ref.tokenizer_dir
        self._reader = None

    @property
    def reader(self) -> ParamReader:
        if self._reader is None:
            self._reader = checkpoint_reader(self.ref)
            self._meta = {
                tuple(int(k) if isinstance(k, str) and k.isdigit() else k for k in p): self._reader.metadata(p)
                for p in self._reader.paths()
            }
        return self._reader

    def shapes(self) -> dict[TensorPath, tuple[int, ...]]:
        self.reader
        return {p: shape for p, (shape, _) in self._meta.items()}

    def read(self, paths: Iterable[TensorPath]) -> Iterator[tuple[TensorPath, np.ndarray]]:
        reader = self.reader
        paths = list(paths)
        nbytes_of = {p: int(np.prod(self._meta[p][0], dtype=np.int64)) * self._meta[p][1].itemsize for p in paths}
        # a group is at most a 16th of the weights (GROUP_BYTES for models over 1 GB), so it stays
        # small beside them whatever the model's size
        limit = min(GROUP_BYTES, sum(nbytes_of.values()) // 16)
        group: list[TensorPath] = []
        size = 0
        for p in [*paths, None]:
            if p is not None:
                nbytes = nbytes_of[p]
            if group and (p is None or size + nbytes > limit):
                arrays = reader.read_many(group)
                for q in group:
                    yield q, arrays.pop(0)
                group, size = [], 0
            if p is not None:
                group.append(p)
                size += nbytes


def open_source(path: str | Path, allow_pickle: bool = False) -> WeightSource:
    """The weights at ``path``: a GGUF file (or a `bundled:NAME` one), a Hugging Face directory (config.json, no model.json)
    or anything resolve_checkpoint accepts. Only headers and metadata are read. A GGUF file's
    tokenizer_dir is None (its tokenizer lives in its metadata: gguf_tokenizer_dir)."""
    from medjax.convert.gguf_import import GGUFFile, is_gguf, resolve_source

    p = resolve_source(path)
    if is_gguf(p):
        g = GGUFFile(p)
        return TableSource("gguf", p, g.model_config(), g, None)
    if (p / "config.json").is_file() and not (p / "model.json").is_file():
        from medjax.convert.hf_import import hf_model_and_weights

        model, weights = hf_model_and_weights(p, allow_pickle)
        return TableSource("hf", p, model, weights, p if (p / "tokenizer.json").is_file() else None)
    return CheckpointSource(p, resolve_checkpoint(p))


def checkpoint_reader(ref: CheckpointRef) -> ParamReader:
    """A checkpoint's reader that sees the whole model: a trained-only checkpoint's frozen tensors
    come from the source its meta names (FrozenBase)."""
    return ParamReader(ref, FrozenBase(ref) if ref.base else None)


class FrozenBase:
    """The tensors a trained-only checkpoint leaves to the source it started from, read from that
    source (a Hugging Face directory or another medjax checkpoint) in the checkpoint's layout and
    param dtype: exactly what the run held, as it never updated them."""

    def __init__(self, ref: CheckpointRef):
        from medjax.models.decoder import ModelDef

        try:
            self.source = open_source(ref.base)
        except (ConversionError, OSError) as e:
            raise ConversionError(
                f"{ref.params_dir.parent}: the checkpoint holds only the trained params; the rest are read "
                f"from {ref.base} (its init_from), which cannot be opened: {e}"
            ) from None
        self.model = ref.model
        self.abstract = _flat_str(ModelDef(ref.model).abstract_params())
        self._shapes = self.source.shapes()
        self._held: tuple = (None, None)

    def metadata(self, path: tuple) -> tuple[tuple[int, ...], np.dtype]:
        spec = self.abstract[tuple(map(str, path))]
        return tuple(spec.shape), np.dtype(spec.dtype)

    def read(self, path: tuple) -> np.ndarray:
        run_path = tuple(int(k) if isinstance(k, str) and k.isdigit() else k for k in path)
        stacked = self.model.scan_layers and run_path[0] == "layers" and not isinstance(run_path[1], int)
        if stacked:
            array = np.stack([self._canonical(("layers", i, *run_path[1:])) for i in range(self.model.num_layers)])
        else:
            array = self._canonical(run_path)
        return array.astype(self.metadata(path)[1], copy=False)

    def _canonical(self, path: tuple) -> np.ndarray:
        where, layer = stored_path(self.source.model, path)
        if self._held[0] != where:  # a scanned source's stacked tensor is read once for its layers
            if where not in self._shapes:
                raise ConversionError(
                    f"{self.source.path}: no tensor {'/'.join(map(str, path))}, which the trained-only "
                    "checkpoint reading it as its base needs"
                )
            self._held = (where, next(iter(self.source.read([where])))[1])
        return self._held[1] if layer is None else self._held[1][layer]


def _flat_str(tree: dict) -> dict[tuple, object]:
    from flax import traverse_util

    return {tuple(map(str, k)): v for k, v in traverse_util.flatten_dict(tree).items()}


def gguf_tokenizer_dir(source: TableSource) -> Path:
    """The tokenizer files of a GGUF source, rebuilt from its metadata into a folder that lives as
    long as this process."""
    from medjax.convert.gguf_tokenizer import write_tokenizer

    out = Path(tempfile.mkdtemp(prefix="medjax-gguf-tokenizer-"))
    atexit.register(shutil.rmtree, out, ignore_errors=True)
    return write_tokenizer(source.weights, out)


@dataclasses.dataclass
class LoadReport:
    loaded: int  # tensors of the model (in its layout) taken from the source
    fresh: list[str]  # optional tensors the source lacks, left as they were in ``into``
    unused: list[str]  # droppable source tensors the model has no place for

    def summary(self) -> str:
        adapters = [name for name in self.fresh if is_adapter(name)]
        fresh = [name for name in self.fresh if name not in adapters]
        if adapters:  # one per layer and target: counted, not listed
            fresh.append(f"{len(adapters)} LoRA adapter tensors")
        return (
            f"{self.loaded} tensors loaded"
            + (f", fresh: {', '.join(fresh)}" if fresh else "")
            + (f", not used: {', '.join(self.unused)}" if self.unused else "")
        )


def load_params_streaming(
    source: WeightSource,
    shardings: dict | None = None,
    *,
    model: ModelConfig | None = None,
    abstract: dict | None = None,
    into: dict | None = None,
    optional: Iterable[TensorPath] = (),
    droppable: Iterable[TensorPath] = (),
    where: str | None = None,
) -> tuple[dict, LoadReport]:
    """The params of ``model`` (default: the source's own) filled from ``source``, each tensor
    cast to the model's param dtype and placed in its sharding (``shardings``: a dict shaped like
    the params; None puts every tensor on the default device), tensor by tensor.

    ``abstract``: the params' shapes and dtypes (ModelDef(model).abstract_params(), which takes a
    while to build for a deep model) when the caller has them; else ``into``'s or built here.

    ``into``: a params tree of ``model`` (a fresh initialisation) whose leaves are replaced in
    place as the tensors load, each let go before its replacement is allocated; tensors the source
    lacks keep their value there if their path is in ``optional``. Source tensors at a path in
    ``droppable`` that the model has no place for are skipped (reported as unused); any other
    mismatch is a ConversionError naming the tensor, raised before anything is read. Values are
    copied bit for bit (the only arithmetic is the dtype cast)."""
    model = model or source.model
    where = where or str(source.path)
    if abstract is None and into is None:
        from medjax.models.decoder import ModelDef

        abstract = ModelDef(model).abstract_params()
    targets = {
        t: jax.ShapeDtypeStruct(tuple(x.shape), x.dtype) for t, x in _leaves(into if abstract is None else abstract)
    }
    plan, unused = _plan(source, model, targets, set(map(tuple, droppable)), where)
    optional = set(map(tuple, optional))
    missing = [t for t in targets if t not in plan["filled"]]
    absent = [t for t in missing if not (t in optional and into is not None)]
    if absent:
        names = ["/".join(map(str, t)) for t in absent]
        raise ConversionError(f"{where}: no tensor for {names[:8]}{' ...' if len(names) > 8 else ''}")

    total = sum(int(np.prod(targets[t].shape, dtype=np.int64)) * targets[t].dtype.itemsize for t in plan["filled"])
    trim_every, since_trim = max(1, min(GROUP_BYTES, total // 16)), 0  # malloc_trim costs ms a call
    params = into
    if params is None:
        params = {}
        for t in targets:
            set_path(params, t, None)
    stacked: dict[TensorPath, jax.Array] = {}
    reader = source.read(plan["order"])
    for src_path in plan["order"]:
        for target, _, _ in plan["deliveries"][src_path]:
            if target not in stacked:  # the tensor it replaces (``into``'s) is let go before the read
                set_path(params, target, None)
        _, array = next(reader)
        for target, t_layer, s_layer in plan["deliveries"][src_path]:
            spec = targets[target]
            sharding = _get(shardings, target)
            host = np.asarray(array if s_layer is None else array[s_layer]).astype(spec.dtype, copy=False)
            if t_layer is None:
                set_path(params, target, _put(host, sharding))
            else:
                if target not in stacked:
                    stacked[target] = _zeros(tuple(spec.shape), spec.dtype, sharding)
                stacked[target] = _set_layer(sharding)(
                    stacked[target], _put(host, _layer_sharding(sharding)), t_layer
                ).block_until_ready()
                set_path(params, target, stacked[target])
            del host
        since_trim += array.nbytes
        del array
        if since_trim >= trim_every:
            _return_freed_memory()
            since_trim = 0
    report = LoadReport(
        len(plan["filled"]),
        ["/".join(map(str, t)) for t in sorted(missing, key=str)],
        ["/".join(map(str, p)) for p in unused],
    )
    return params, report


def _plan(source: WeightSource, model: ModelConfig, targets: dict, droppable: set, where: str):
    """Which source tensors to read, in which order, and where each (or each of its layers) goes:
    {"order": [source path], "deliveries": {source path: [(target path, target layer or None,
    source layer or None)]}, "filled": {target path}}, and the droppable source paths left out."""
    deliveries: dict[TensorPath, list] = {}
    layers_of: dict[TensorPath, set] = {}
    unused = []
    sizes = source.shapes()
    for src_path, shape in sizes.items():
        for canonical, s_layer, piece in _canonical(source.model, src_path, shape):
            name = "/".join(map(str, canonical))
            is_layer = canonical[:1] == ("layers",) and len(canonical) > 1 and isinstance(canonical[1], int)
            if is_layer and canonical[1] >= model.num_layers:
                raise ConversionError(f"{where}: tensor {name}: the model has {model.num_layers} layers")
            target, t_layer = stored_path(model, canonical)
            if target not in targets:
                if target in droppable:
                    if target not in unused:
                        unused.append(target)
                    continue
                raise ConversionError(f"{where}: tensor {name} has no place in the model")
            want = tuple(targets[target].shape) if t_layer is None else tuple(targets[target].shape[1:])
            if tuple(piece) != want:
                raise ConversionError(f"{where}: tensor {name} has shape {tuple(piece)}, the model expects {want}")
            deliveries.setdefault(src_path, []).append((target, t_layer, s_layer))
            if t_layer is not None:
                layers_of.setdefault(target, set()).add(t_layer)
    for target, layers in layers_of.items():
        missing = sorted(set(range(model.num_layers)) - layers)
        if missing:
            raise ConversionError(f"{where}: tensor {'/'.join(map(str, target))}: no tensor for layers {missing[:8]}")
    for src_path, ds in deliveries.items():
        # a stacked source tensor that is the model's stacked tensor, layer for layer: placed whole
        if (
            len(ds) == model.num_layers
            and len({t for t, _, _ in ds}) == 1
            and all(t_layer == s_layer == i for i, (_, t_layer, s_layer) in enumerate(ds))
        ):
            deliveries[src_path] = [(ds[0][0], None, None)]
    filled = {t for ds in deliveries.values() for t, _, _ in ds}
    # Largest first: the peak is the weights placed so far plus the tensor in hand (twice over
    # while a transposed one is re-laid out), so the big embedding and LM head are read while
    # little else is placed and the end of the load costs only a small tensor.
    order = sorted(deliveries, key=lambda p: -int(np.prod(sizes[p], dtype=np.int64)))
    return {"order": order, "deliveries": deliveries, "filled": filled}, unused


def _canonical(cfg: ModelConfig, path: TensorPath, shape: tuple[int, ...]):
    """(canonical path, layer index into the stored tensor or None, canonical shape) for each
    tensor a stored one holds: a scanned model's stacked tensor holds one per layer."""
    if cfg.scan_layers and path[:1] == ("layers",) and len(path) > 1 and not isinstance(path[1], int):
        return [(("layers", i, *path[1:]), i, tuple(shape[1:])) for i in range(shape[0])]
    return [(path, None, tuple(shape))]


def _put(host: np.ndarray, sharding) -> jax.Array:
    """``host`` on its devices, the copy finished (so the host array can go, and the transfers
    queued never hold more than this one)."""
    if sharding is None:
        return jax.device_put(host).block_until_ready()
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx]).block_until_ready()


def _zeros(shape: tuple[int, ...], dtype, sharding) -> jax.Array:
    if sharding is None:
        return jnp.zeros(shape, dtype).block_until_ready()
    return _zeros_program(shape, np.dtype(dtype), sharding)().block_until_ready()


@functools.lru_cache(maxsize=None)
def _zeros_program(shape, dtype, sharding):
    return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)


@functools.lru_cache(maxsize=None)
def _set_layer(sharding):
    """(stacked, layer, i) -> stacked with [i] = layer, written in place (the stacked array is donated)."""
    kwargs = {} if sharding is None else {"out_shardings": sharding}
    return jax.jit(
        lambda stacked, layer, i: jax.lax.dynamic_update_index_in_dim(stacked, layer, i, 0), donate_argnums=0, **kwargs
    )


def _layer_sharding(sharding):
    """The sharding of one layer of a stacked tensor: the stacked one without its leading axis."""
    if isinstance(sharding, NamedSharding):
        return NamedSharding(sharding.mesh, P(*tuple(sharding.spec)[1:]))
    return sharding


@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


def _return_freed_memory() -> None:
    """Hands the heap's free pages back to the OS (glibc's malloc_trim). Readers allocate a
    tensor's host copy from per-thread arenas, which glibc trims only rarely: without this the
    process keeps each freed host copy's pages, and its resident memory grows by a good part of
    the weights beyond the placed arrays."""
    trim = _malloc_trim()
    if trim is not None and MALLOC_TRIM:
        trim(0)


def _leaves(tree: dict, prefix: TensorPath = ()) -> Iterator[tuple[TensorPath, object]]:
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _leaves(value, (*prefix, key))
        else:
            yield (*prefix, key), value


def _get(tree: dict | None, path: TensorPath):
    if tree is None:
        return None
    for key in path:
        tree = tree[key]
    return tree


def open_model(path: str | os.PathLike) -> WeightSource:
    """The weights (nothing read yet) and tokenizer folder of a model to run: a medjax checkpoint
    or model directory, a Hugging Face directory or a GGUF file (its tokenizer rebuilt from the
    file's metadata into a folder that lives as long as this process)."""
    source = open_source(path)
    if source.kind == "gguf":
        source.tokenizer_dir = gguf_tokenizer_dir(source)
    elif source.kind == "hf" and source.tokenizer_dir is not None:
        from medjax.data.tokenizer_agreement import warn_if_disagreeing

        warn_if_disagreeing(
            source.path,
            hint="medjax reads tokenizer.json; a vLLM server for this directory would tokenize with transformers",
        )
    return source


def load_model(path: str | os.PathLike, shardings: dict | None = None) -> tuple[ModelConfig, dict, Path | None]:
    """(model config, params, tokenizer folder) of open_model's ``path``; the params are read
    tensor by tensor straight onto the default device (or into ``shardings``), so loading holds
    the weights about once (medjax.convert.loading)."""
    source = open_model(path)
    params, _ = load_params_streaming(source, shardings)
    return source.model, params, source.tokenizer_dir
