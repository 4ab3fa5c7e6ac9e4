"""Typed run configuration: YAML files plus dotted ``key=value`` overrides.

Every field is declared on a dataclass, so a typo in a YAML file or on the command line is an
error that names the key (and suggests the nearest real one) instead of a silently ignored
setting on a pod slice. Model shapes live in ``configs/models/*.yaml`` and are referenced by name.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.resources
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from medjax.models.config import ModelConfig

REPO_ROOT = Path(__file__).resolve().parent.parent
# Presets and default configs ship inside the package (a wheel install has them); a checkout's
# top-level configs/ is a link to this folder, so `configs/demo/sft.yaml` names the same file.
CONFIG_DIR = Path(str(importlib.resources.files("medjax"))) / "configs"
MODEL_PRESET_DIR = CONFIG_DIR / "models"


def packaged_config(path: str | os.PathLike) -> Path:
    """``path`` if it exists; else, for `configs/...` (as README writes them), the file of that
    name shipped in the package, so the documented commands work from any directory."""
    p = Path(path)
    if p.exists() or p.is_absolute():
        return p
    parts = p.parts[1:] if p.parts[:1] == ("configs",) else p.parts
    shipped = CONFIG_DIR.joinpath(*parts) if parts else CONFIG_DIR
    return shipped if shipped.is_file() else p


class ConfigError(ValueError):
    """A configuration problem; the message names the file and/or key at fault."""


@dataclass
class MeshConfig:
    """Device mesh shape. ``-1`` on one axis means "all remaining devices"."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    # Slices the data axis spans over DCN (multi-slice: the other axes stay within a slice, on ICI).
    # Devices without a slice index (CPU, GPU hosts) count each process as a slice.
    dcn_data: int = 1
    # Call jax.distributed.initialize() before building the mesh: JAX finds the job's processes
    # itself on TPU VMs and under SLURM or Open MPI (multi-host pod slices, GPU clusters).
    distributed: bool = False
    # Or join a job explicitly (all three; `medjax train --coordinator --num-processes --process-id`):
    # HOST:PORT of process 0's coordinator, the job's process count, and this process's index.
    coordinator: str = ""
    num_processes: int = 0
    process_id: int = -1
    # Seconds to wait for every process to join before failing (never hang on a missing host), and
    # without a heartbeat from a process before the others stop with an error naming it.
    join_timeout_s: int = 300
    heartbeat_timeout_s: int = 100


@dataclass
class TfdsConfig:
    """A TFDS dataset as a pretraining source (data.source: tfds; needs the tf extra)."""

    name: str = ""  # e.g. medjax_corpus (built by `medjax data tfds-build`), or name/config:version
    data_dir: str = ""  # the folder holding NAME/VERSION/
    split: str = "train"  # TFDS split syntax works too: "train[:90%]"
    eval_split: str = ""  # empty: no evaluation batches
    # The feature read: token ids (int sequence) are used as they are, text is tokenized by data.tokenizer.
    feature: str = "tokens"


@dataclass
class SeqioTaskConfig:
    """A seqio Task medjax registers (data.seqio.tasks): text from JSONL files or a TFDS dataset,
    tokenized by the seqio Vocabulary that wraps data.tokenizer."""

    name: str = ""
    # JSONL files of documents (globs) for the train split, and optionally for "validation".
    files: list[str] = field(default_factory=list)
    eval_files: list[str] = field(default_factory=list)
    # Or a TFDS dataset in ArrayRecord format (e.g. medjax_corpus from `medjax data tfds-build`).
    tfds_name: str = ""
    tfds_data_dir: str = ""
    text_key: str = "text"
    # Keep only documents whose `authority` grade (curation's A-E) is one of these; empty keeps all.
    # Tasks over one corpus split by grade make a mixture weighted by authority.
    authorities: list[str] = field(default_factory=list)


@dataclass
class SeqioConfig:
    """A seqio Task or Mixture as the pretraining source (data.source: seqio; needs the tf extra)."""

    name: str = ""  # the Task or Mixture read: one defined below, or registered by `modules`
    modules: list[str] = field(default_factory=list)  # imported first, to register your own Tasks/Mixtures
    tasks: list[SeqioTaskConfig] = field(default_factory=list)
    # Task name -> mixing rate (positive); registers Mixture `name` over those tasks.
    mixture: dict[str, float] = field(default_factory=dict)
    split: str = "train"
    eval_split: str = ""  # empty: no evaluation batches


@dataclass
class DataConfig:
    train_files: list[str] = field(default_factory=list)
    eval_files: list[str] = field(default_factory=list)
    # Where pretraining records come from: files (train_files/eval_files in data.format), a TFDS
    # dataset (data.tfds) or a seqio Task/Mixture (data.seqio). SFT and reward-model stages read files.
    source: Literal["files", "tfds", "seqio"] = "files"
    tfds: TfdsConfig = field(default_factory=TfdsConfig)
    seqio: SeqioConfig = field(default_factory=SeqioConfig)
    # pretrain: jsonl text documents tokenized on the fly, or arrayrecord int32 token-id records.
    # sft reads JSONL {"messages": [...]}; reward_model reads JSONL {prompt, chosen, rejected, dimension}.
    format: Literal["jsonl", "arrayrecord"] = "jsonl"
    text_key: str = "text"
    tokenizer: str = ""
    seq_len: int = 512
    shuffle: bool = True
    seed: int = 0
    # None repeats forever (the step budget bounds the run).
    num_epochs: Optional[int] = None
    add_eos: bool = True
    # Readers the records are split over (data/streams.py); 0 = one per process at the run's start.
    # The rows of every step depend on this alone, not on the process count.
    streams: int = 0
    # Grain worker processes; 0 reads in the training process (deterministic, easy to debug).
    worker_count: int = 0
    # sft / reward_model: an example longer than seq_len is truncated (SFT keeps its start; a
    # preference pair keeps the end of each side, where the score is read) or dropped. Counted.
    overlong: Literal["truncate", "drop"] = "truncate"
    # A malformed record stops the run naming file:line; true skips it instead (named and counted).
    skip_bad: bool = False
    # sft / reward_model: examples are first-fit packed into this many rows at a time.
    packing_bins: int = 16

    def has_eval(self) -> bool:
        """Whether evaluation batches are configured (eval_files, or a TFDS eval_split)."""
        if self.source == "tfds":
            return bool(self.tfds.eval_split)
        if self.source == "seqio":
            return bool(self.seqio.eval_split)
        return bool(self.eval_files)


@dataclass
class OptimizerConfig:
    learning_rate: float = 3e-4
    warmup_steps: int = 100
    # Cosine decay ends at learning_rate * min_lr_ratio at train.max_steps.
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    max_grad_norm: float = 1.0
    # Adam's two moments are stored in this dtype (computed in float32 each step). bfloat16 halves
    # their memory (8 -> 4 bytes a trained parameter); refused where 1 - b1 or 1 - b2 is below
    # what bfloat16 can resolve, as a moment would then stop decaying (see make_optimizer).
    moments_dtype: Literal["float32", "bfloat16"] = "float32"
    # Regular expressions searched in each parameter's path ("layers/3/attn/wq", "embed"); only
    # matching parameters are trained, the rest frozen (no optimizer state, no update). Empty:
    # every parameter trains.
    trainable: list[str] = field(default_factory=list)


@dataclass
class TrainConfig:
    max_steps: int = 1000
    global_batch_size: int = 8
    # The global batch is split into this many micro-batches whose gradients are summed.
    grad_accum_steps: int = 1
    log_every: int = 10
    # 0 disables periodic evaluation.
    eval_every: int = 0
    eval_batches: int = 8
    # Evaluate the starting weights too (step 0), so a fine-tuning run shows its before and after.
    eval_at_start: bool = False
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    async_checkpointing: bool = True
    seed: int = 0
    # Non-finite loss/gradients: the update is skipped and counted; this many in a row stops the run.
    max_consecutive_nonfinite: int = 10
    progress_bar: bool = True
    # Peak FLOP/s of one device for MFU; 0 looks the device kind up in a built-in table.
    peak_flops_per_device: float = 0.0


@dataclass
class RewardSpec:
    """One reward component: a built-in name (exam, format, length, reward_model) or an import path
    "package.module:function" to a user function (see medjax/rl/rewards.py for the signature)."""

    name: str = "exam"
    weight: float = 1.0
    # Component options, e.g. {partial_credit: true} for exam, {target_tokens: 48} for length,
    # {model: PATH, dimension: honesty} for reward_model.
    options: Any = field(default_factory=dict)
    # How raw values are scaled before weighting, so no component wins by its units alone: none;
    # sigmoid (value / temperature squashed into 0..1); zscore (standardised over the rollout
    # batch). Empty: sigmoid for reward_model (raw scores are unbounded logits), none otherwise.
    normalize: Literal["", "none", "sigmoid", "zscore"] = ""
    temperature: float = 1.0


@dataclass
class RLConfig:
    """Policy-gradient RL (stage: rl). A loop step is one optimizer update on train.global_batch_size
    sequences; each rollout batch (prompts_per_rollout x group_size completions) feeds
    epochs x rollout/global_batch_size steps."""

    prompts_per_rollout: int = 8
    group_size: int = 4
    epochs: int = 1
    max_new_tokens: int = 64
    # Update rows hold up to this many prompt + completion sequences, packed longest first into
    # data.seq_len tokens, each its own attention segment: the update computes tokens instead of
    # padding (rl/packing.py). Each logits window is max_new_tokens wide, so sequences_per_row x
    # max_new_tokens may not pass data.seq_len. 1: one sequence a row, unpacked.
    sequences_per_row: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    # grpo: (r - mean) / (std + eps) per group; drgrpo: r - mean (no std scaling).
    advantage: Literal["grpo", "drgrpo"] = "grpo"
    # token: mean over every completion token of the batch (DAPO); sequence: mean over sequences of
    # each one's token mean (GRPO); constant: token sum / (sequences x max_new_tokens) (Dr.GRPO).
    aggregation: Literal["token", "sequence", "constant"] = "token"
    clip_low: float = 0.2
    clip_high: float = 0.28
    # KL to the frozen starting policy, added to the loss (0 disables it and the reference model;
    # the logged kl is then measured against the behaviour policy that sampled the batch).
    kl_coef: float = 0.0
    kl_estimator: Literal["k1", "k3"] = "k3"
    # Drop groups whose rewards are all equal (no signal) and sample more prompts to refill.
    dynamic_sampling: bool = True
    max_refills: int = 4
    # QuarkMed's stage-1 pruning: a prompt whose whole group earned the maximum (1.0) of the
    # mastered_reward component leaves the prompt pool for later passes over the prompt set.
    drop_mastered: bool = False
    mastered_reward: str = "exam"
    # Completions that hit max_new_tokens: none; penalty (DAPO soft penalty over the last
    # overlong_buffer tokens, up to -overlong_penalty); filter (excluded from the loss).
    overlong: Literal["none", "penalty", "filter"] = "none"
    overlong_buffer: int = 16
    overlong_penalty: float = 1.0
    rewards: list[RewardSpec] = field(default_factory=lambda: [RewardSpec()])
    # Wrap prompts in the tokenizer's chat template (a model after SFT expects it).
    chat: bool = True
    # "rag:DIR" (a `medjax rag index` directory) or "package.module:factory" (gets the Config,
    # returns a Retriever). Empty: none.
    retriever: str = ""
    passages_k: int = 3  # passages per retrieved prompt (eval's --passages-k; the prompt budget is eval's too)
    # The share of drawn prompts shown the retriever's passages (each draw decided by its position
    # in the prompt order, so a resumed run draws the same), the rest asked bare: a policy trained
    # on both answers both ways.
    retrieval_fraction: float = 1.0


@dataclass
class DpoConfig:
    """Direct preference optimisation (stage: dpo) on the reward model's preference JSONL. The
    reference is the starting weights: with LoRA adapters the same model with them disabled (no
    second copy), else a frozen copy kept in the train state (and its checkpoints)."""

    beta: float = 0.1
    # sigmoid: DPO (Rafailov et al., 2023), with label_smoothing the conservative cDPO form;
    # ipo: (per-token mean log-ratio margin - 1/(2 beta))^2 (Azar et al., 2023) as TRL computes it;
    # robust: rDPO (Chowdhury et al., 2024), label_smoothing the assumed rate of flipped labels.
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0


@dataclass
class Config:
    # Named strings the rest of the config refers to as ${vars.NAME} (the demo configs keep the
    # demo's root there, so `workdir=...` on the command line moves the run but not its data).
    vars: dict[str, str] = field(default_factory=dict)
    stage: str = "pretrain"  # an entry of medjax.train.stages.STAGES (checked where the run starts)
    # Relative paths here and in data/init_from are taken against the current directory when the
    # config is loaded, and stored absolute, so a run's config.yaml means the same from anywhere.
    workdir: str = ""
    # Weights a fresh run starts from: a training run (workdir or checkpoint step), a model
    # directory from `medjax import`, or a Hugging Face directory. The model architecture comes
    # from there; only run-time model fields (dtype, remat, score_labels) are read from `model`.
    # Ignored once the run has its own checkpoint (resume wins).
    init_from: str = ""
    model: ModelConfig = field(default_factory=ModelConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    dpo: DpoConfig = field(default_factory=DpoConfig)


def import_object(spec: str, key: str) -> Any:
    """The callable a config names as "package.module:attribute" (a user reward, a retriever
    factory); any failure is a ConfigError naming ``key``."""
    import importlib

    if ":" not in spec:
        raise ConfigError(f"{key}: {spec!r} is not an import path package.module:attribute")
    module, attr = spec.split(":", 1)
    try:
        obj = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"{key}: cannot import {spec!r}: {e}") from None
    if not callable(obj):
        raise ConfigError(f"{key}: {spec!r} is not callable")
    return obj


# ----------------------------------------------------------------------------------------------
# Loading


def load_config(path: str | os.PathLike | None, overrides: typing.Sequence[str] = ()) -> Config:
    """Reads ``path`` (YAML), applies ``key=value`` overrides and returns a checked Config."""
    raw: dict[str, Any] = {}
    where = "<defaults>"
    if path is not None:
        path = packaged_config(path)
        where = str(path)
        raw = _read_yaml(path)
    for item in overrides:
        _apply_override(raw, item)
    raw = _expand_model_preset(raw, where)
    cfg = from_dict(Config, raw, where=where)
    if not cfg.workdir:
        raise ConfigError(f"{where}: key 'workdir' is required (where checkpoints and metrics go)")
    _substitute_variables(cfg, where)
    _absolute_paths(cfg)
    return cfg


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def _apply_override(raw: dict[str, Any], item: str) -> None:
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key=value")
    key, text = item.split("=", 1)
    try:
        value = yaml.safe_load(text) if text else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {key}: cannot parse value {text!r}: {e}") from e
    node = raw
    parts = key.strip().split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if isinstance(child, str) and part == "model":  # model: <preset name> then model.x=...
            child = {"preset": child}
        if not isinstance(child, dict):
            child = {}
        node[part] = child
        node = child
    node[parts[-1]] = value


def model_preset_path(name: str) -> Path:
    candidate = Path(name)
    if candidate.suffix in (".yaml", ".yml") and candidate.is_file():
        return candidate
    preset = MODEL_PRESET_DIR / f"{name}.yaml"
    if preset.is_file():
        return preset
    known = sorted(p.stem for p in MODEL_PRESET_DIR.glob("*.yaml"))
    hint = difflib.get_close_matches(name, known, n=3)
    raise ConfigError(
        f"unknown model preset {name!r}"
        + (f"; did you mean {', '.join(hint)}?" if hint else "")
        + f" (known: {', '.join(known)})"
    )


def load_model_preset(name: str) -> ModelConfig:
    path = model_preset_path(name)
    return from_dict(ModelConfig, _read_yaml(path), where=str(path), prefix="model")


def _expand_model_preset(raw: dict[str, Any], where: str) -> dict[str, Any]:
    model = raw.get("model")
    if isinstance(model, str):
        model = {"preset": model}
    if isinstance(model, dict) and "preset" in model:
        model = dict(model)
        preset = _read_yaml(model_preset_path(str(model.pop("preset"))))
        raw = {**raw, "model": {**preset, **model}}
    return raw


_VARIABLE = re.compile(r"\$\{([^}]*)\}")


def substitute_variables(
    root: Any,
    variables: dict[str, str],
    where: str,
    extra: dict[str, str] | None = None,
    skip: tuple[str, ...] = ("vars",),
) -> None:
    """Replaces ``${vars.NAME}`` (and ``${NAME}`` for each name in ``extra``) in every string of the
    config dataclass ``root``, in place; ``root``'s fields named in ``skip`` are left alone. One rule
    for every config medjax reads (training, curation): variables may not refer to other variables,
    and an unknown name is an error naming the key that used it and the names that exist."""
    extra = extra or {}
    for name, value in variables.items():
        if _VARIABLE.search(value):
            raise ConfigError(f"{where}: key 'vars.{name}' may not refer to other variables ({value!r})")

    def sub(text: str, key: str) -> str:
        def one(m: re.Match) -> str:
            name = m.group(1).strip()
            if name in extra:
                return extra[name]
            if name.startswith("vars.") and name[5:] in variables:
                return variables[name[5:]]
            known = ["${vars.%s}" % k for k in sorted(variables)] + ["${%s}" % k for k in sorted(extra)]
            raise ConfigError(
                f"{where}: key '{key}' uses unknown variable ${{{name}}} (known: {', '.join(known) or 'none'})"
            )

        return _VARIABLE.sub(one, text)

    def walk(node: Any, key: str) -> Any:
        if isinstance(node, str):
            return sub(node, key)
        if isinstance(node, list):
            return [walk(v, f"{key}[{i}]") for i, v in enumerate(node)]
        if isinstance(node, dict):
            return {k: walk(v, f"{key}.{k}") for k, v in node.items()}
        if dataclasses.is_dataclass(node):
            for f in dataclasses.fields(node):
                if node is not root or f.name not in skip:
                    setattr(node, f.name, walk(getattr(node, f.name), f"{key}.{f.name}" if key else f.name))
        return node

    walk(root, "")


def load_typed_config(cls: type, path: str | os.PathLike, overrides: typing.Sequence[str] = ()) -> Any:
    """A config dataclass with a ``vars`` field (curation, retrieval) from YAML and dotted
    key=value overrides, with the training configs' rules: unknown keys and bad types are errors
    naming the key, and ``${vars.NAME}`` is substituted."""
    where = str(packaged_config(path))
    raw = _read_yaml(Path(where))
    for item in overrides:
        _apply_override(raw, item)
    cfg = from_dict(cls, raw, where=where)
    substitute_variables(cfg, cfg.vars, where)
    return cfg


@dataclass
class _Workdir:
    workdir: str


def _substitute_variables(cfg: Config, where: str) -> None:
    """``workdir`` may use ``${vars.NAME}``; every other string may use those and ``${workdir}``."""
    holder = _Workdir(cfg.workdir)
    substitute_variables(holder, cfg.vars, where)
    cfg.workdir = holder.workdir
    substitute_variables(cfg, cfg.vars, where, extra={"workdir": cfg.workdir}, skip=("vars", "workdir"))


def absolute_path(path: str) -> str:
    """``path`` made absolute against the current directory (URLs such as gs://... unchanged).
    Orbax and the run's config.yaml need paths that do not depend on where a later command runs."""
    if not path or "://" in path:
        return path
    return os.path.abspath(os.path.expanduser(path))


def _absolute_paths(cfg: Config) -> None:
    d = cfg.data
    cfg.workdir = absolute_path(cfg.workdir)
    d.train_files = [absolute_path(f) for f in d.train_files]
    d.eval_files = [absolute_path(f) for f in d.eval_files]
    d.tokenizer = absolute_path(d.tokenizer)
    d.tfds.data_dir = absolute_path(d.tfds.data_dir)
    for task in d.seqio.tasks:
        task.files = [absolute_path(f) for f in task.files]
        task.eval_files = [absolute_path(f) for f in task.eval_files]
        task.tfds_data_dir = absolute_path(task.tfds_data_dir)
    cfg.init_from = absolute_path(cfg.init_from)
    cfg.model.lora.adapter = absolute_path(cfg.model.lora.adapter)
    for reward in cfg.rl.rewards:
        if isinstance(reward.options, dict) and isinstance(reward.options.get("model"), str):
            reward.options["model"] = absolute_path(reward.options["model"])


# ----------------------------------------------------------------------------------------------
# Typed conversion


def from_dict(cls: type, raw: Any, *, where: str = "<config>", prefix: str = "") -> Any:
    """Builds dataclass ``cls`` from a mapping, checking every key and value type."""
    return _coerce(raw, cls, where, prefix)


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def _coerce(value: Any, tp: Any, where: str, key: str) -> Any:
    name = key or "<root>"
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: key '{name}' must be a mapping, got {value!r}")
        hints = typing.get_type_hints(tp)
        fields = {f.name for f in dataclasses.fields(tp)}
        kwargs = {}
        for k, v in value.items():
            full = f"{key}.{k}" if key else str(k)
            if k not in fields:
                close = difflib.get_close_matches(str(k), sorted(fields), n=3)
                hint = f"; did you mean {', '.join(repr(f'{key}.{c}' if key else c) for c in close)}?" if close else ""
                raise ConfigError(f"{where}: unknown key '{full}'{hint}")
            kwargs[k] = _coerce(v, hints[k], where, full)
        return tp(**kwargs)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[-1] if errors else f"{where}: key '{name}' has invalid value {value!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{where}: key '{name}' must be one of {list(choices)}, got {value!r}")
        return value
    if origin is dict:
        key_tp, value_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: key '{name}' must be a mapping, got {value!r}")
        return {_coerce(k, key_tp, where, name): _coerce(v, value_tp, where, f"{name}.{k}") for k, v in value.items()}
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool) and item_tp is str:
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"{where}: key '{name}' must be a list, got {value!r}")
        return [_coerce(v, item_tp, where, f"{name}[{i}]") for i, v in enumerate(value)]
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: key '{name}' must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: key '{name}' must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # PyYAML reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: key '{name}' must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: key '{name}' must be a string, got {value!r}")
        return value
    raise TypeError(f"config field '{name}' has unsupported type {tp!r}")
