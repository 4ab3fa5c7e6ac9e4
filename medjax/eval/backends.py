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
from medjax.models.sampler import bucket
from medjax.models.sharding import activation_layout
from medjax.parallel.inference import place


@dataclasses.dataclass(frozen=True)
class GenerationSettings:
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0


@dataclasses.dataclass
class LoglikelihoodRequest:
    context: str
    continuations: list[str]


# A batch width (a compiled program) is worth its compile only when this many batches use it;
# fewer are scored at the next wider width instead (a compile costs more than padding them).
MIN_BATCHES_PER_WIDTH = 4


def batch_widths(longest: Sequence[int], limit: int, multiple: int = 64) -> list[int]:
    """Each batch's padded width (``longest``: its longest row, batches sorted by it): the next
    multiple of ``multiple``, except that a width fewer than MIN_BATCHES_PER_WIDTH batches would use
    is merged into the next wider one, so a small benchmark compiles one or two programs, not one
    per 64 tokens of spread, while a large one keeps its tight buckets."""
    widths = [min(bucket(n, multiple), limit) for n in longest]
    counts: dict[int, int] = {}
    for w in widths:
        counts[w] = counts.get(w, 0) + 1
    target, pending = {}, []
    ordered = sorted(counts)
    for i, w in enumerate(ordered):  # narrowest first: small groups ride up to a wider width
        pending.append(w)
        if sum(counts[p] for p in pending) >= MIN_BATCHES_PER_WIDTH or i == len(ordered) - 1:
            target.update({p: w for p in pending})
            pending = []
    return [target[w] for w in widths]


class LocalModel:
    """A medjax checkpoint (model dir or training run) or an HF directory, scored in JAX.

    Log-likelihoods are computed in fixed-shape batches (rows right-padded to a 64-token bucket),
    so a benchmark compiles a handful of programs. When every continuation of a context is a
    single token (option letters), one row scores them all from the context's last position.
    Float32 logits never exist for a whole batch: target log-probs are taken ``logits_chunk``
    positions at a time (the model's, else LOGITS_CHUNK) and the last position's distribution alone
    is formed whole, so a 152k vocabulary scores long contexts in bounded memory."""

    LOGITS_CHUNK = 512

    def __init__(self, path: str | os.PathLike, batch_size: int = 8, mesh: str = ""):
        """``mesh`` ("fsdp=4,tensor=2", axes of parallel.mesh; "" for one device) shards the params
        by the training rule table and lays each batch over (data, fsdp), so a model too large for
        one device evaluates; the batch is rounded up to a multiple of data x fsdp."""
        from medjax.data.tokenizer import load_tokenizer
        from medjax.models.decoder import ModelDef
        from medjax.models.sampler import Sampler
        from medjax.serve.generate import load_model, stop_token_ids

        self.model_cfg, params, self.tokenizer_dir = load_model(path)
        if self.tokenizer_dir is None:
            raise FileNotFoundError(f"{path}: no tokenizer found beside the weights")
        self.tok = load_tokenizer(self.tokenizer_dir)
        self.model_def = ModelDef(self.model_cfg)
        self.placement = place(self.model_def.abstract_state, params, mesh)
        self.params, self.mesh, self.batch_sharding = self.placement.params, self.placement.mesh, \
            self.placement.batch_sharding
        self.batch_size = self.placement.batch_size(batch_size)
        self.sampler = Sampler(self.model_def)
        self.stop_ids = stop_token_ids(self.tok, self.model_cfg, self.tokenizer_dir)
        scoring = ModelDef(dataclasses.replace(self.model_cfg,
                                               logits_chunk=self.model_cfg.logits_chunk or self.LOGITS_CHUNK))

        layout = None
        if self.mesh is not None:
            from medjax.parallel.rules import MeshLayout

            layout = MeshLayout(self.mesh)

        @functools.partial(jax.jit, static_argnames="per_token", **self.placement.jit_kwargs())
        def score(params, tokens, targets, last, per_token: bool):
            """The last position's log-distribution, and with ``per_token`` each target's log-prob
            (a batch of option letters needs only the former: a smaller program, faster to compile)."""
            with activation_layout(layout):
                model = scoring.bind(params)
                hidden = model.hidden_states(tokens)
                at_last = jnp.take_along_axis(hidden, last[:, None, None], axis=1)
                last_lp = jax.nn.log_softmax(model.logits(at_last)[:, 0], axis=-1)
                return (model.token_logprobs(hidden, targets)[0] if per_token else None), last_lp

        self._score = score

    def _split(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Context and continuation ids such that context + continuation tokenises as the
        whole text does (BPE merges across the boundary would otherwise score a different string)."""
        ctx = self.tok.encode(context).ids
        whole = self.tok.encode(context + continuation).ids
        if whole[:len(ctx)] == ctx and len(whole) > len(ctx):
            return ctx, whole[len(ctx):]
        return ctx, self.tok.encode(continuation).ids

    def loglikelihood(self, requests: Sequence[LoglikelihoodRequest]) -> list[list[float]]:
        limit = self.model_cfg.max_position_embeddings
        rows = []  # (request index, continuation indices, input ids, targets (position, token) or None)
        for r, req in enumerate(requests):
            pairs = [self._split(req.context, c) for c in req.continuations]
            if all(len(cont) == 1 for _, cont in pairs) and len({tuple(ctx) for ctx, _ in pairs}) == 1:
                ctx = pairs[0][0][-limit:]
                rows.append((r, list(range(len(pairs))), ctx, [cont[0] for _, cont in pairs]))
                continue
            for c, (ctx, cont) in enumerate(pairs):
                ids = (ctx + cont)[-(limit + 1):]  # keep the continuation, drop the oldest context
                rows.append((r, [c], ids[:-1], (len(ids) - 1 - len(cont), ids[1:])))
        out = [[0.0] * len(req.continuations) for req in requests]
        order = sorted(range(len(rows)), key=lambda i: len(rows[i][2]))  # similar lengths batch together
        chunks = [[rows[i] for i in order[start:start + self.batch_size]]
                  for start in range(0, len(order), self.batch_size)]
        widths = batch_widths([max(len(row[2]) for row in chunk) for chunk in chunks], max(limit, 1))
        for chunk, width in zip(chunks, widths):
            tokens = np.zeros((self.batch_size, width), np.int32)
            targets = np.zeros((self.batch_size, width), np.int32)
            last = np.zeros((self.batch_size,), np.int32)
            for b, (_, _, ids, tgt) in enumerate(chunk):
                tokens[b, :len(ids)] = ids
                last[b] = len(ids) - 1
                if isinstance(tgt, tuple):
                    targets[b, :len(tgt[1])] = tgt[1]
            tokens, targets, last = self.placement.put(tokens, targets, last)
            per_token = any(isinstance(row[3], tuple) for row in chunk)
            token_lp, last_lp = jax.device_get(self._score(self.params, tokens, targets, last, per_token=per_token))
            for b, (r, conts, ids, tgt) in enumerate(chunk):
                if isinstance(tgt, tuple):
                    first = tgt[0]
                    out[r][conts[0]] = float(token_lp[b, first:len(ids)].sum())
                else:
                    for c, token in zip(conts, tgt):
                        out[r][c] = float(last_lp[b, token])
        return out

    def generate(self, prompts: Sequence[str], settings: GenerationSettings) -> list[str]:
        from medjax.models.sampler import SamplingConfig

        cfg = SamplingConfig(max_new_tokens=settings.max_new_tokens, temperature=settings.temperature,
                             top_p=settings.top_p, stop_token_ids=self.stop_ids)
        room = self.model_cfg.max_position_embeddings - settings.max_new_tokens
        if room < 1:
            raise ConfigError(f"--max-new-tokens {settings.max_new_tokens} leaves no room for a prompt in the model's "
                              f"{self.model_cfg.max_position_embeddings}-token context (max_position_embeddings)")
        ids = [self.tok.encode(p).ids[-room:] for p in prompts]
        texts = []
        key = jax.random.key(settings.seed)
        for start in range(0, len(ids), self.batch_size):
            batch = ids[start:start + self.batch_size]
            padded = batch + [batch[-1]] * (self.batch_size - len(batch))  # one compiled batch shape
            key, sub = jax.random.split(key)
            seqs = self.sampler.generate(self.params, padded, cfg, sub,
                                         batch_sharding=self.batch_sharding).sequences()[:len(batch)]
            texts.extend(self.tok.decode(s, skip_special_tokens=True) for s in seqs)
        return texts


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
        self.client = openai.OpenAI(base_url=base, api_key=os.environ.get("OPENAI_API_KEY", "EMPTY"),
                                    timeout=timeout_s, max_retries=3)
        self.model = model or self.client.models.list().data[0].id
        self.concurrency = concurrency
        self.tokenizer_dir = Path(self.model) if Path(self.model).is_dir() else None

    def _map(self, fn, xs):
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(fn, xs))

    def loglikelihood(self, requests: Sequence[LoglikelihoodRequest]) -> list[list[float]]:
        def one(pair):
            context, continuation = pair
            r = self.client.completions.create(model=self.model, prompt=context + continuation, max_tokens=1,
                                               temperature=0.0, echo=True, logprobs=1)
            lp = r.choices[0].logprobs
            start = len(context)
            total = 0.0
            for offset, value in zip(lp.text_offset, lp.token_logprobs):
                if offset >= start and value is not None and offset < len(context + continuation):
                    total += value
            return total

        pairs = [(req.context, c) for req in requests for c in req.continuations]
        flat = iter(self._map(one, pairs))
        return [[next(flat) for _ in req.continuations] for req in requests]

    def generate(self, prompts: Sequence[str], settings: GenerationSettings) -> list[str]:
        def one(prompt):
            r = self.client.completions.create(model=self.model, prompt=prompt, max_tokens=settings.max_new_tokens,
                                               temperature=settings.temperature, top_p=settings.top_p,
                                               seed=settings.seed)
            return r.choices[0].text

        return self._map(one, prompts)

    def generate_chat(self, prompts: Sequence[str], settings: GenerationSettings) -> list[str]:
        """Each prompt as one user turn through the chat API: the server applies its own template
        (a served model's, which a client may not have)."""
        def one(prompt):
            r = self.client.chat.completions.create(
                model=self.model, messages=[{"role": "user", "content": prompt}],
                max_tokens=settings.max_new_tokens, temperature=settings.temperature, top_p=settings.top_p,
                seed=settings.seed)
            return r.choices[0].message.content or ""

        return self._map(one, prompts)


def open_model(path: str, batch_size: int = 8, mesh: str = ""):
    """LocalModel for a checkpoint or HF directory, ServerModel for ``openai:URL``."""
    if path.startswith("openai:"):  # a server batches requests itself: batch_size of them in flight
        return ServerModel(path[len("openai:"):], concurrency=batch_size)
    return LocalModel(path, batch_size=batch_size, mesh=mesh)
