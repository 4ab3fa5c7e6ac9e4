"""Batched KV-cache generation, compiled once per (batch, prompt bucket, sampling settings).

Prompts are left-padded to a bucketed length so every row's last prompt token sits in the same
cache slot; positions count real tokens only, so padding changes nothing a row computes. The
decode loop is a lax.while_loop inside one jit, stopping early once every row has hit a stop
token. RL rollouts use this with the behaviour log-probabilities it records.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from medjax.models.decoder import ModelDef
from medjax.models.sharding import ActivationLayout, activation_layout


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int = 64
    # 0 means greedy (argmax), deterministic.
    temperature: float = 0.0
    top_p: float = 1.0
    # 0 disables top-k.
    top_k: int = 0
    stop_token_ids: tuple[int, ...] = ()

    def validate(self) -> "SamplingConfig":
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ValueError(f"invalid sampling settings: {self}")
        return self


@dataclasses.dataclass
class Generation:
    tokens: np.ndarray  # [batch, max_new_tokens], pad after a row stops
    lengths: np.ndarray  # [batch] generated tokens per row (a stop token included)
    logprobs: np.ndarray  # [batch, max_new_tokens] log p(token) under the unscaled model, 0 after stop

    def sequences(self) -> list[list[int]]:
        return [row[:n].tolist() for row, n in zip(self.tokens, self.lengths)]


def filter_logits(logits: jax.Array, temperature: float, top_k: int, top_p: float) -> jax.Array:
    """Temperature, then top-k, then nucleus (top-p) filtering; removed entries become -inf."""
    logits = logits / temperature
    if top_k:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of strictly more likely tokens
        keep = jnp.sum(before < top_p, axis=-1, keepdims=True)  # at least one token
        threshold = jnp.take_along_axis(sorted_logits, keep - 1, axis=-1)
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return logits


def sample_token(logits: jax.Array, rng: jax.Array, cfg: SamplingConfig) -> jax.Array:
    if cfg.temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    filtered = filter_logits(logits, cfg.temperature, cfg.top_k, cfg.top_p)
    return jax.random.categorical(rng, filtered, axis=-1).astype(jnp.int32)


def bucket(length: int, multiple: int = 32) -> int:
    return max(multiple, -(-length // multiple) * multiple)


class Sampler:
    """Generates from a ModelDef's params; compiled functions are cached by shape and settings.

    ``layout`` (the trainer's parallel.rules.MeshLayout) gives the model's activation names their
    mesh meaning while the program traces, as in the train step: under FSDP the rows stay split
    rather than XLA gathering the whole rollout batch onto each device."""

    def __init__(self, model: ModelDef, pad_id: int = 0, layout: ActivationLayout | None = None):
        self.model = model
        self.pad_id = pad_id
        self.layout = layout
        self._compiled: dict = {}

    def generate(
        self,
        params: dict,
        prompts: Sequence[Sequence[int]],
        cfg: SamplingConfig,
        rng: jax.Array | None = None,
        batch_sharding=None,
    ) -> Generation:
        """``batch_sharding`` (e.g. the trainer's batch sharding) lays the prompt rows over devices, so
        generation is data-parallel like training; without it the batch sits whole on each device."""
        cfg = cfg.validate()
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        width = bucket(max(len(p) for p in prompts))
        if width + cfg.max_new_tokens > self.model.cfg.max_position_embeddings:
            raise ValueError(
                f"prompt ({width}) + max_new_tokens ({cfg.max_new_tokens}) exceeds the model's "
                f"max_position_embeddings ({self.model.cfg.max_position_embeddings})"
            )
        tokens = np.full((len(prompts), width), self.pad_id, np.int32)
        valid = np.zeros((len(prompts), width), bool)
        for i, p in enumerate(prompts):
            tokens[i, width - len(p) :] = p
            valid[i, width - len(p) :] = True
        rng = jax.random.key(0) if rng is None else rng
        if batch_sharding is not None:
            tokens, valid = jax.device_put(tokens, batch_sharding), jax.device_put(valid, batch_sharding)
        out_tokens, lengths, logprobs = host_arrays(self.program(width, cfg)(params, tokens, valid, rng))
        return Generation(np.asarray(out_tokens), np.asarray(lengths), np.asarray(logprobs))

    def program(self, width: int, cfg: SamplingConfig):
        """The jitted generation program for prompts left-padded to ``width``: (params, tokens
        [batch, width], valid [batch, width], rng) -> (tokens, lengths, logprobs). The planner
        lowers it for a TPU slice (train/plan.py)."""
        key = (width, cfg.validate())
        if key not in self._compiled:
            self._compiled[key] = jax.jit(self._build(width, cfg))
        return self._compiled[key]

    def _build(self, width: int, cfg: SamplingConfig):
        steps = cfg.max_new_tokens
        stop_ids = jnp.asarray(cfg.stop_token_ids or (-1,), jnp.int32)
        pad = self.pad_id

        def run(params, tokens, valid, rng):
            with activation_layout(self.layout):
                return generate(params, tokens, valid, rng)

        def generate(params, tokens, valid, rng):
            model = self.model.bind(params)
            batch = tokens.shape[0]
            cache = model.init_cache(batch, width + steps)
            positions = jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0)
            kv_mask = jnp.zeros((batch, width + steps), bool).at[:, :width].set(valid)
            # The prompt fills the cache; only its last position's distribution is needed (whole
            # float32 prefill logits of a 152k vocabulary would be 0.6 GB per 1k-token row).
            logits, cache = model.decode(tokens, positions, kv_mask, cache, 0, last_only=True)

            def pick(logits, rng):
                rng, sub = jax.random.split(rng)
                token = sample_token(logits, sub, cfg)
                logprob = jnp.take_along_axis(jax.nn.log_softmax(logits, -1), token[:, None], -1)[:, 0]
                return token, logprob, rng

            token, logprob, rng = pick(logits[:, -1], rng)
            carry = dict(
                i=jnp.zeros((), jnp.int32),
                token=token,
                logprob=logprob,
                done=jnp.zeros((batch,), bool),
                lengths=jnp.zeros((batch,), jnp.int32),
                cache=cache,
                kv_mask=kv_mask,
                position=positions[:, -1] + 1,
                rng=rng,
                out=jnp.full((batch, steps), pad, jnp.int32),
                out_logprobs=jnp.zeros((batch, steps), jnp.float32),
            )

            def cond(c):
                return (c["i"] < steps) & ~jnp.all(c["done"])

            def body(c):
                i, live = c["i"], ~c["done"]
                out = c["out"].at[:, i].set(jnp.where(live, c["token"], pad))
                out_logprobs = c["out_logprobs"].at[:, i].set(jnp.where(live, c["logprob"], 0.0))
                lengths = c["lengths"] + live.astype(jnp.int32)
                done = c["done"] | jnp.isin(c["token"], stop_ids)
                slot = width + i
                kv_mask = c["kv_mask"].at[:, slot].set(True)
                logits, cache = model.decode(c["token"][:, None], c["position"][:, None], kv_mask, c["cache"], slot)
                token, logprob, rng = pick(logits[:, 0], c["rng"])
                return dict(
                    i=i + 1,
                    token=token,
                    logprob=logprob,
                    done=done,
                    lengths=lengths,
                    cache=cache,
                    kv_mask=kv_mask,
                    position=c["position"] + 1,
                    rng=rng,
                    out=out,
                    out_logprobs=out_logprobs,
                )

            final = jax.lax.while_loop(cond, body, carry)
            return final["out"], final["lengths"], final["out_logprobs"]

        return run


def host_arrays(tree):
    """Global arrays as whole numpy arrays on every process (in a multi-process job their rows sit
    on several hosts: gathered, so each process sees every sample)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        tree = multihost_utils.process_allgather(tree, tiled=True)
    return jax.tree.map(np.asarray, jax.device_get(tree))
