"""Models an evaluation can score: medjax or Hugging Face weights run in JAX (``LocalModel``), or an
OpenAI-compatible server such as `medjax serve`/vLLM (``ServerModel``, PATH ``openai:URL``).

Both answer the same two questions, so every scoring mode works against either:
- ``loglikelihood(context, continuations)``: log p(continuation | context), summed over its tokens;
- ``generate(prompts, ...)``: completions as text.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from medjax.config import ConfigError
from medjax.models.attention import shared_prefix_mask
from medjax.models.sampler import bucket
from medjax.models.sharding import activation_layout
from medjax.parallel.inference import load_placed


@dataclasses.dataclass(frozen=True)
class GenerationSettings:
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    # The prompts were rendered by a chat template, which writes its own special tokens (a bos):
    # they are encoded without adding any, as transformers and vLLM encode a templated prompt.
    templated: bool = False


@dataclasses.dataclass
class LoglikelihoodRequest:
    context: str
    continuations: list[str]
    templated: bool = False  # the context was rendered by a chat template (see GenerationSettings)


# A scoring program is compiled per (rows, width) shape. A row's natural width is its length rounded
# up to WIDTH_MULTIPLE (vector-friendly on a CPU, the MXU's tile elsewhere); a batch rides up to a
# width already compiled when the padding that adds costs less than one more compile. What a compile
# costs is reckoned in FLOPs of the device's own scoring work: the seconds it takes (with the layers
# scanned, about 0.5 s for SmolLM2-135M on a 2-core CPU, whatever the width) times the rate the
# device scores at (about 1.5e11 FLOP/s there). Accelerators compile no faster but score hundreds
# of times faster, so there a compile is worth far more padding. Only the batching depends on this
# estimate, never a score.
WIDTH_MULTIPLE = {"cpu": 16}
DEFAULT_WIDTH_MULTIPLE = 128
COMPILE_FLOPS = {"cpu": 7.5e10}
DEFAULT_COMPILE_FLOPS = 2e14


def plan_batches(
    lengths: Sequence[int], limit: int, rows_for, compile_tokens: float, multiple: int = 16
) -> list[tuple[list[int], int]]:
    """Scoring batches as (indices into ``lengths``, padded width), longest rows first (a batch
    that does not fit fails at once, as lm-eval's does). Each batch holds ``rows_for(width)`` rows;
    its width is its longest row's, rounded up to ``multiple`` and capped by ``limit`` (the model's
    context), unless a width already used is wider by so little that padding its rows there costs
    fewer than ``compile_tokens`` tokens of scoring work: then it reuses that program. A small model
    thus scores a benchmark through one or two programs, and a large one pads hardly at all."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    used: list[int] = []
    batches, start = [], 0
    while start < len(order):
        width = min(bucket(lengths[order[start]], multiple), limit)
        compiled = min((w for w in used if w >= width), default=None)
        if compiled is not None and rows_for(compiled) * (compiled - width) <= compile_tokens:
            width = compiled
        if width not in used:
            used.append(width)
        size = rows_for(width)
        batches.append((order[start : start + size], width))
        start += size
    return batches


@dataclasses.dataclass
class ScoringRow:
    """One row of a scoring batch: its tokens with their RoPE positions and attention segments, and
    the entries it scores: target token ``targets[i]`` read at slot ``where[i]``; ``spans`` says
    which (request, continuation) owns which entries (first entry, count)."""

    tokens: list[int]
    positions: list[int]
    segments: list[int]
    where: list[int] = dataclasses.field(default_factory=list)
    targets: list[int] = dataclasses.field(default_factory=list)
    spans: list[tuple[int, int, int, int]] = dataclasses.field(default_factory=list)

    def add(self, request: int, continuation: int, where: list[int], targets: list[int]) -> None:
        self.spans.append((request, continuation, len(self.where), len(targets)))
        self.where += where
        self.targets += targets


class LocalModel:
    """A medjax checkpoint (model dir or training run) or an HF directory, scored in JAX.

    Log-likelihoods are computed in fixed-shape batches: rows sorted longest first, right-padded to
    a width (plan_batches: near each batch's longest row, or a wider program already compiled where
    that costs less than a compile), and at most ``max_batch_tokens`` padded tokens per batch (per
    data shard), so long prompts are scored a few rows at a time and short ones ``batch_size`` at a
    time: XLA's attention holds [rows, heads, width, width] scores, which a fixed row count would
    let grow with the square of the longest prompt. The layers run scanned whatever the weights'
    own layout (one compiled layer body: a new width compiles in a third of the time, and runs
    no slower).
    A request is one row: its context once, then each continuation's tokens but its last, each
    continuation in its own attention segment with positions restarting after the context
    (attention.shared_prefix_mask), so four options cost the context once and their own tokens,
    where lm-eval runs context + option four times; option letters add no tokens (each is read at
    the context's last slot). A request too long to pack falls back to a row per continuation.
    Logits are formed only at the slots a continuation's tokens are read from (``logits_chunk``
    slots at a time: the model's, else LOGITS_CHUNK), so float32 logits of a whole
    [rows, width, vocab] batch never exist, a 152k vocabulary scores long contexts in bounded
    memory, and no time goes to the logits of context positions. Packed rows run XLA's attention
    (the mask is not a segment mask the kernels take); unpacked ones the model's own.
    Docs: docs/evaluation.md."""

    LOGITS_CHUNK = 512
    MAX_BATCH_TOKENS = 8192  # padded tokens a scoring batch holds per data shard

    def __init__(
        self, path: str | os.PathLike, batch_size: int = 8, mesh: str = "", max_batch_tokens: int | None = None
    ):
        """``mesh`` ("fsdp=4,tensor=2", axes of parallel.mesh; "" for one device) shards the params
        by the training rule table and lays each batch over (data, fsdp), so a model too large for
        one device evaluates; the batch is rounded up to a multiple of data x fsdp.
        ``max_batch_tokens`` (default MAX_BATCH_TOKENS) bounds rows x padded width of a scoring
        batch on each data shard; a row longer than it is scored alone."""
        from medjax.convert.loading import open_model as open_weights
        from medjax.data.chat import stop_token_ids
        from medjax.data.tokenizer import load_tokenizer
        from medjax.models.decoder import ModelDef
        from medjax.models.families import family_spec
        from medjax.models.sampler import Sampler

        source = open_weights(path)
        self.model_cfg = dataclasses.replace(source.model, scan_layers=True)
        self.tokenizer_dir = source.tokenizer_dir
        if self.tokenizer_dir is None:
            raise FileNotFoundError(f"{path}: no tokenizer found beside the weights")
        self.tok = load_tokenizer(self.tokenizer_dir)
        self.model_def = ModelDef(self.model_cfg)
        # read tensor by tensor onto the device(s) (medjax.convert.loading)
        self.placement = load_placed(self.model_def.abstract_state, source, mesh, model=self.model_cfg)
        self.params, self.mesh, self.batch_sharding = (
            self.placement.params,
            self.placement.mesh,
            self.placement.batch_sharding,
        )
        self.batch_size = self.placement.batch_size(batch_size)
        self.max_batch_tokens = max_batch_tokens or self.MAX_BATCH_TOKENS
        platform = jax.devices()[0].platform
        self.width_multiple = WIDTH_MULTIPLE.get(platform, DEFAULT_WIDTH_MULTIPLE)
        # a scored token's work: two FLOPs per block weight it passes (the head runs at one position)
        weights = self.model_cfg.num_layers * family_spec(self.model_cfg.family).layer_matmul_params(self.model_cfg)
        self.compile_tokens = COMPILE_FLOPS.get(platform, DEFAULT_COMPILE_FLOPS) / max(2 * weights, 1)
        self.sampler = Sampler(self.model_def)
        self.stop_ids = stop_token_ids(self.tok, self.model_cfg, self.tokenizer_dir)
        scoring = ModelDef(
            dataclasses.replace(self.model_cfg, logits_chunk=self.model_cfg.logits_chunk or self.LOGITS_CHUNK)
        )

        layout = None
        if self.mesh is not None:
            from medjax.parallel.rules import MeshLayout

            layout = MeshLayout(self.mesh)

        @functools.partial(jax.jit, static_argnames="shared", **self.placement.jit_kwargs())
        def score(params, tokens, positions, segments, where, targets, shared: bool):
            """log p(targets) [rows, entries]: each entry's target token scored from the hidden state
            at slot ``where`` (logits of no other slot are formed). ``shared``: rows hold a context
            and its continuations after it (segments 0 and 1.., positions restarting after the
            context; attention.shared_prefix_mask), so a context runs once for all its options;
            otherwise rows are causal, padding at the right."""
            with activation_layout(layout):
                model = scoring.bind(params)
                mask = shared_prefix_mask(segments) if shared else None
                hidden = model.hidden_states(tokens, positions, mask=mask)
                at = jnp.take_along_axis(hidden, where[..., None], axis=1)
                return model.token_logprobs(at, targets)[0]

        self._score = score

    def _encoded(self, requests: Sequence[LoglikelihoodRequest]) -> list[tuple[list[int], list[list[int]]]]:
        """Each request's context ids, and each continuation's ids after them such that context +
        continuation tokenises as the whole text does (BPE merges across the boundary would
        otherwise score a different string); where the whole text does not begin with the
        context's ids, the continuation alone. The tokenizer's own special tokens (a bos) go
        before the context only. Encoded in batches (the tokenizer's own loop, not Python's)."""
        out: list = [None] * len(requests)
        for templated in (False, True):
            picked = [r for r, req in enumerate(requests) if req.templated == templated]
            if not picked:
                continue
            special = not templated
            contexts = self.tok.encode_batch([requests[r].context for r in picked], add_special_tokens=special)
            wholes = iter(
                self.tok.encode_batch(
                    [requests[r].context + c for r in picked for c in requests[r].continuations],
                    add_special_tokens=special,
                )
            )
            for r, context in zip(picked, contexts):
                ctx, conts = context.ids, []
                for c in requests[r].continuations:
                    whole = next(wholes).ids
                    if whole[: len(ctx)] == ctx and len(whole) > len(ctx):
                        conts.append(whole[len(ctx) :])
                    else:
                        conts.append(self.tok.encode(c, add_special_tokens=False).ids)
                out[r] = (ctx, conts)
        return out

    def _rows_for(self, width: int) -> int:
        """Rows of a scoring batch of this width: ``batch_size``, fewer where they would pass
        ``max_batch_tokens`` per data shard (a multiple of the placement's rows, at least one each)."""
        shards = self.placement.rows
        return min(self.batch_size, shards * max(1, self.max_batch_tokens // width))

    @staticmethod
    def _rows(r: int, ctx: list[int], conts: list[list[int]], limit: int) -> list[ScoringRow]:
        """Request ``r``'s scoring rows from its context's ids and its continuations' (``_encoded``):
        every continuation's tokens but the last packed into one row behind the context, each
        continuation its own segment (option letters add no tokens at all: each is read at the
        context's last slot). Where the packed row passes the model's context, one row per
        continuation instead, keeping the continuation and the newest context that fits."""
        if ctx and len(ctx) + sum(max(len(c) - 1, 0) for c in conts) <= limit:
            row = ScoringRow(list(ctx), list(range(len(ctx))), [0] * len(ctx))
            for c, cont in enumerate(conts):
                start = len(row.tokens)
                row.tokens += cont[:-1]
                row.positions += range(len(ctx), len(ctx) + len(cont) - 1)
                row.segments += [c + 1] * (len(cont) - 1)
                reads = [len(ctx) - 1] + list(range(start, start + len(cont) - 1))
                row.add(r, c, reads[: len(cont)], cont)
            return [row]
        rows = []
        for c, cont in enumerate(conts):
            ids = (ctx + cont)[-(limit + 1) :]  # keep the continuation, drop the oldest context
            scored = max(min(len(cont), len(ids) - 1), 0)
            row = ScoringRow(ids[:-1], list(range(len(ids) - 1)), [0] * (len(ids) - 1))
            row.add(r, c, list(range(len(ids) - 1 - scored, len(ids) - 1)), ids[len(ids) - scored :])
            rows.append(row)
        return rows

    def loglikelihood(self, requests: Sequence[LoglikelihoodRequest]) -> list[list[float]]:
        limit = max(self.model_cfg.max_position_embeddings, 1)
        rows = [
            row for r, (ctx, conts) in enumerate(self._encoded(requests)) for row in self._rows(r, ctx, conts, limit)
        ]
        out = [[0.0] * len(req.continuations) for req in requests]
        plan = plan_batches(
            [max(len(row.tokens), 1) for row in rows], limit, self._rows_for, self.compile_tokens, self.width_multiple
        )
        # one entry count for the whole call: a batch's program is then new only where its width is
        entries = bucket(max(len(row.where) for row in rows), 8) if rows else 0
        shared = any(max(row.segments, default=0) > 0 for row in rows)  # one mask kind per call, too
        for indices, width in plan:
            chunk = [rows[i] for i in indices]
            size = self._rows_for(width)
            tokens = np.zeros((size, width), np.int32)
            positions = np.zeros((size, width), np.int32)
            segments = np.full((size, width), -1, np.int32)  # padding: a segment of its own
            where = np.zeros((size, entries), np.int32)
            targets = np.zeros((size, entries), np.int32)
            for b, row in enumerate(chunk):
                n = len(row.tokens)
                tokens[b, :n], positions[b, :n], segments[b, :n] = row.tokens, row.positions, row.segments
                where[b, : len(row.where)], targets[b, : len(row.targets)] = row.where, row.targets
            arrays = self.placement.put(tokens, positions, segments, where, targets)
            token_lp = jax.device_get(self._score(self.params, *arrays, shared=shared))
            for b, row in enumerate(chunk):
                for r, c, first, count in row.spans:
                    out[r][c] = float(token_lp[b, first : first + count].sum())
        return out

    def generate(self, prompts: Sequence[str], settings: GenerationSettings) -> list[str]:
        from medjax.models.sampler import SamplingConfig

        cfg = SamplingConfig(
            max_new_tokens=settings.max_new_tokens,
            temperature=settings.temperature,
            top_p=settings.top_p,
            stop_token_ids=self.stop_ids,
        )
        room = self.model_cfg.max_position_embeddings - settings.max_new_tokens
        if room < 1:
            raise ConfigError(
                f"--max-new-tokens {settings.max_new_tokens} leaves no room for a prompt in the model's "
                f"{self.model_cfg.max_position_embeddings}-token context (max_position_embeddings)"
            )
        ids = [self.tok.encode(p, add_special_tokens=not settings.templated).ids[-room:] for p in prompts]
        texts = []
        key = jax.random.key(settings.seed)
        for start in range(0, len(ids), self.batch_size):
            batch = ids[start : start + self.batch_size]
            padded = batch + [batch[-1]] * (self.batch_size - len(batch))  # one compiled batch shape
            key, sub = jax.random.split(key)
            seqs = self.sampler.generate(self.params, padded, cfg, sub, batch_sharding=self.batch_sharding).sequences()[
                : len(batch)
            ]
            texts.extend(self.tok.decode(s, skip_special_tokens=True) for s in seqs)
        return texts


# vLLM's completions field for a prompt that carries its chat template's special tokens; sent only
# then, so a server without the field (not vLLM) sees plain OpenAI requests otherwise.
_TEMPLATED_REQUEST = {"add_special_tokens": False}


class ServerModel:
    """An OpenAI-compatible completions server (vLLM). Log-likelihoods use the completions API's
    echo with prompt log-probabilities, the way lm-evaluation-harness scores served models."""

    def __init__(self, url: str, model: str | None = None, concurrency: int = 8, timeout_s: float = 600.0):
        try:
            import openai
        except ImportError as e:
            raise RuntimeError("scoring a server needs the openai package (pip install 'medjax[serve]')") from e
        base = url.rstrip("/")
        if not base.endswith("/v1"):
            base += "/v1"
        self.client = openai.OpenAI(
            base_url=base, api_key=os.environ.get("OPENAI_API_KEY", "EMPTY"), timeout=timeout_s, max_retries=3
        )
        self.model = model or self.client.models.list().data[0].id
        self.concurrency = concurrency
        self.tokenizer_dir = Path(self.model) if Path(self.model).is_dir() else None

    def _map(self, fn, xs):
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(fn, xs))

    def loglikelihood(self, requests: Sequence[LoglikelihoodRequest]) -> list[list[float]]:
        def one(pair):
            context, continuation, templated = pair
            r = self.client.completions.create(
                model=self.model,
                prompt=context + continuation,
                max_tokens=1,
                temperature=0.0,
                echo=True,
                logprobs=1,
                extra_body=_TEMPLATED_REQUEST if templated else None,
            )
            lp = r.choices[0].logprobs
            start = len(context)
            total = 0.0
            for offset, value in zip(lp.text_offset, lp.token_logprobs):
                if offset >= start and value is not None and offset < len(context + continuation):
                    total += value
            return total

        pairs = [(req.context, c, req.templated) for req in requests for c in req.continuations]
        flat = iter(self._map(one, pairs))
        return [[next(flat) for _ in req.continuations] for req in requests]

    def generate(self, prompts: Sequence[str], settings: GenerationSettings) -> list[str]:
        def one(prompt):
            r = self.client.completions.create(
                model=self.model,
                prompt=prompt,
                max_tokens=settings.max_new_tokens,
                temperature=settings.temperature,
                top_p=settings.top_p,
                seed=settings.seed,
                extra_body=_TEMPLATED_REQUEST if settings.templated else None,
            )
            return r.choices[0].text

        return self._map(one, prompts)

    def generate_chat(self, prompts: Sequence[str], settings: GenerationSettings) -> list[str]:
        """Each prompt as one user turn through the chat API: the server applies its own template
        (a served model's, which a client may not have)."""

        def one(prompt):
            r = self.client.chat.completions.create(
                model=self.model,
                messages=[{"role": "user", "content": prompt}],
                max_tokens=settings.max_new_tokens,
                temperature=settings.temperature,
                top_p=settings.top_p,
                seed=settings.seed,
            )
            return r.choices[0].message.content or ""

        return self._map(one, prompts)


def open_model(path: str, batch_size: int = 8, mesh: str = ""):
    """LocalModel for a checkpoint or HF directory, ServerModel for ``openai:URL``."""
    if path.startswith("openai:"):  # a server batches requests itself: batch_size of them in flight
        return ServerModel(path[len("openai:") :], concurrency=batch_size)
    return LocalModel(path, batch_size=batch_size, mesh=mesh)
