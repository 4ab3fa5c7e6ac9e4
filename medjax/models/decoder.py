"""The decoder-only transformer shared by every stage (pretrain, SFT, reward model, RL)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from medjax.models.config import ModelConfig
from medjax.models.families import family_spec
from medjax.models.layers import ATTENTION_SAVED, BLOCK_TYPES, DTYPES, DecoderBlock, LayerCache, RMSNorm, param
from medjax.models.loops import chunk_map
from medjax.models.sharding import constrain, shards, sum_copies

ACTIVATION = ("batch", None, None)  # [batch, seq, hidden]: the batch stays split, like the data

REMAT_POLICIES = {
    "full": None,  # save nothing, recompute the whole block
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    # the values layers.Attention names: the backward recomputes only the norms and the MLP
    "save_attention": jax.checkpoint_policies.save_only_these_names(*ATTENTION_SAVED),
}


class Decoder(nnx.Module):
    """The decoder of every registered family (models/families.py), its layers of the family's
    block type. Inputs may be packed: ``segment_ids`` keep documents apart in attention and
    ``positions`` restart RoPE at each document."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        cfg.validate()
        self.cfg = cfg
        pdt = DTYPES[cfg.param_dtype]
        self.embed = param(rngs, (cfg.vocab_size, cfg.hidden_size), cfg.initializer_range, pdt, ("vocab", "embed"))
        block = BLOCK_TYPES[family_spec(cfg.family).block_type]
        blocks = [block(cfg, rngs=rngs) for _ in range(cfg.num_layers)]
        # Scanned: one block whose params are all blocks' stacked on a leading "layers" axis.
        self.layers = stack_blocks(blocks) if cfg.scan_layers else nnx.List(blocks)
        self.final_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, pdt)
        if cfg.score_labels:
            self.score = param(
                rngs, (cfg.hidden_size, len(cfg.score_labels)), cfg.initializer_range, pdt, ("embed", None)
            )
        elif not cfg.tie_word_embeddings:
            self.lm_head = param(
                rngs, (cfg.hidden_size, cfg.vocab_size), cfg.initializer_range, pdt, ("embed", "vocab")
            )

    def hidden_states(
        self,
        tokens: jax.Array,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        dropout_rng: jax.Array | None = None,
        mask: jax.Array | None = None,
    ) -> jax.Array:
        """Final-norm hidden states [batch, seq, hidden] (the reward model's head reads these).
        ``dropout_rng`` makes it a training forward: the LoRA adapters' inputs are dropped at
        model.lora.dropout, each layer with its own key (evaluation and sampling pass none).
        ``mask`` [batch, 1, seq, seq] replaces the causal mask of ``segment_ids`` (attention.
        shared_prefix_mask: options scored after one context), through XLA's attention; it must be
        causal (no position sees a later one), since CPUs read each query block's prefix of keys only."""
        if not (self.cfg.lora.enabled and self.cfg.lora.dropout > 0):
            dropout_rng = None
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        if segment_ids is None:
            segment_ids = jnp.ones_like(tokens)
        x = constrain(self.embed[...].astype(DTYPES[self.cfg.dtype])[tokens], ACTIVATION)
        if self.cfg.scan_layers:
            graphdef, stacked = nnx.split(self.layers)

            def body(h, xs):
                layer_params, key = xs
                out = nnx.merge(graphdef, layer_params)(h, positions, segment_ids, mask=mask, dropout_rng=key)[0]
                return constrain(out, ACTIVATION), None

            if self.cfg.remat != "none":
                body = jax.checkpoint(body, policy=REMAT_POLICIES[self.cfg.remat], prevent_cse=False)
            keys = None if dropout_rng is None else jax.random.split(dropout_rng, self.cfg.num_layers)
            x, _ = jax.lax.scan(body, x, (stacked, keys))
            return self.final_norm(x)
        for i, layer in enumerate(self.layers):
            key = None if dropout_rng is None else jax.random.fold_in(dropout_rng, i)
            if self.cfg.remat == "none":
                x, _ = layer(x, positions, segment_ids, mask=mask, dropout_rng=key)
            else:
                block = nnx.remat(
                    lambda blk, h, p, s, m, k: blk(h, p, s, mask=m, dropout_rng=k)[0],
                    policy=REMAT_POLICIES[self.cfg.remat],
                )
                x = block(layer, x, positions, segment_ids, mask, key)
            x = constrain(x, ACTIVATION)
        return self.final_norm(x)

    def init_cache(self, batch: int, length: int, dtype=None) -> list[LayerCache] | LayerCache:
        """One LayerCache per layer, or (scanned) one whose arrays have a leading layers axis."""
        cfg = self.cfg
        shape = (batch, length, cfg.num_kv_heads, cfg.resolved_head_dim)
        dtype = dtype or DTYPES[cfg.dtype]
        if cfg.scan_layers:
            return LayerCache(jnp.zeros((cfg.num_layers, *shape), dtype), jnp.zeros((cfg.num_layers, *shape), dtype))
        return [LayerCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(cfg.num_layers)]

    def decode(
        self,
        tokens: jax.Array,
        positions: jax.Array,
        kv_mask: jax.Array,
        cache: list[LayerCache],
        index,
        last_only: bool = False,
    ) -> tuple[jax.Array, list[LayerCache]]:
        """Generation step: ``tokens`` [batch, new] go to cache slots index..index+new; each
        attends to earlier slots that ``kv_mask`` [batch, cache_len] marks as real tokens.
        ``last_only`` returns the logits of the last new position alone ([batch, 1, vocab])."""
        new, length = tokens.shape[1], kv_mask.shape[1]
        q_slots = index + jnp.arange(new)
        causal = jnp.arange(length)[None, :] <= q_slots[:, None]
        mask = (causal[None] & kv_mask[:, None, :])[:, None]
        # A prefill is a forward over many tokens: its rows stay split as a training batch's, so
        # the partitioner gathers each layer's weights, not every row's activations (at 7B, 64 x
        # 512 prompt tokens on v5e-64 it gathered all rows' queries in each layer). A decode
        # step's few tokens are left to the partitioner, which gathers them instead of weights.
        split = constrain if new > 1 else (lambda h, _: h)
        x = split(self.embed[...].astype(DTYPES[self.cfg.dtype])[tokens], ACTIVATION)
        if self.cfg.scan_layers:
            graphdef, stacked = nnx.split(self.layers)

            def body(h, layer):
                layer_params, layer_cache = layer
                h, layer_cache = nnx.merge(graphdef, layer_params)(
                    h, positions, mask=mask, cache=layer_cache, index=index
                )
                return split(h, ACTIVATION), layer_cache

            x, out_cache = jax.lax.scan(body, x, (stacked, cache))
        else:
            out_cache = []
            for layer, layer_cache in zip(self.layers, cache):
                x, layer_cache = layer(x, positions, mask=mask, cache=layer_cache, index=index)
                x = split(x, ACTIVATION)
                out_cache.append(layer_cache)
        if last_only:
            x = x[:, -1:]
        return self.logits(self.final_norm(x)), out_cache

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Float32 logits; the matmul accumulates in float32 even with bf16 activations."""
        w, spec, _ = self._head()
        return jnp.einsum(f"bse,{spec}->bsv", hidden, w.astype(hidden.dtype), preferred_element_type=jnp.float32)

    def _head(self) -> tuple[jax.Array, str, tuple[str, str]]:
        """(the language-model head's weight, its einsum letters, its logical axes): the
        embedding [vocab, embed] when tied, else lm_head [embed, vocab]."""
        if self.cfg.score_labels:
            raise ValueError("a reward model (model.score_labels set) has no language-model head")
        if self.cfg.tie_word_embeddings:
            return self.embed[...], "ve", ("vocab", "embed")
        return self.lm_head[...], "ev", ("embed", "vocab")

    def token_logprobs(
        self, hidden: jax.Array, targets: jax.Array, entropy: bool = False
    ) -> tuple[jax.Array, jax.Array | None]:
        """log p(target) [batch, seq] in float32, and with ``entropy`` the entropy of each next-token
        distribution, computed ``cfg.logits_chunk`` positions at a time: float32 logits of the
        whole [batch, seq, vocab] never exist at once (152k vocab x 8k tokens is 5 GB a sequence),
        and the backward pass recomputes each chunk's logits instead of keeping them.

        In chunks, each of the layout's batch shards holds one whole copy of the head, gathered
        once before the loop. The head's gradient then sums in that copy chunk after chunk, on
        the device, and is reduced over the batch shards once, after the loop (a reduce-scatter
        into the weight's own layout). Used in place, as the weight laid out by the rule table,
        it would be gathered again in each chunk's forward and recompute, and its whole gradient
        all-reduced once per chunk."""

        def lse_and_entropy(logits, t):
            lse = jax.nn.logsumexp(logits, axis=-1)
            logp = jnp.take_along_axis(logits, t[..., None], axis=-1)[..., 0] - lse
            ent = lse - (jax.nn.softmax(logits, axis=-1) * logits).sum(-1) if entropy else jnp.zeros_like(lse)
            return logp, ent

        batch, seq, width = hidden.shape
        chunk = self.cfg.logits_chunk
        if not chunk or chunk >= seq:
            logits = constrain(self.logits(constrain(hidden, ACTIVATION)), ("batch", None, "vocab"))
            logp, ent = lse_and_entropy(logits, targets)
            return logp, ent if entropy else None
        groups = shards("batch")
        w, spec, axes = self._head()
        w = copy_per_shard(w.astype(hidden.dtype), groups if batch % groups == 0 else 1, axes)
        pad = -seq % chunk
        n = (seq + pad) // chunk

        def chunked(x):  # [batch, seq, ...] -> [n, groups, batch / groups, chunk, ...]
            x = jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2))
            x = x.reshape(groups, batch // groups, n, chunk, *x.shape[2:])
            return jnp.moveaxis(x, 2, 0)

        def one(xs):
            h, t = xs
            h = constrain(h, ("batch", None, None, None))
            logits = jnp.einsum(f"gbce,g{spec}->gbcv", h, w, preferred_element_type=jnp.float32)
            return lse_and_entropy(constrain(logits, ("batch", None, None, "vocab")), t)

        logp, ent = chunk_map(jax.checkpoint(one), (chunked(hidden), chunked(targets)))

        def unchunk(x):  # [n, groups, batch / groups, chunk] -> [batch, seq]
            return jnp.moveaxis(x, 0, 2).reshape(batch, n * chunk)[:, :seq]

        return unchunk(logp), unchunk(ent) if entropy else None

    def scores(self, hidden: jax.Array) -> jax.Array:
        """Float32 reward scores [batch, seq, labels] at every position; a sequence's score is the
        one at its last token, which has seen the whole prompt and response."""
        w = self.score[...].astype(hidden.dtype)
        return jnp.einsum("bse,el->bsl", hidden, w, preferred_element_type=jnp.float32)

    def sequence_scores(self, tokens: jax.Array, lengths: jax.Array) -> jax.Array:
        """Reward scores [batch, labels] of right-padded sequences, read at each one's last real
        token (the reward model's verdict on the whole prompt and response)."""
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        segment_ids = (positions < lengths[:, None]).astype(jnp.int32)
        scores = self.scores(self.hidden_states(tokens, positions, segment_ids))
        return jnp.take_along_axis(scores, (lengths - 1)[:, None, None], axis=1)[:, 0]

    def __call__(self, tokens, positions=None, segment_ids=None, dropout_rng=None) -> jax.Array:
        return self.logits(self.hidden_states(tokens, positions, segment_ids, dropout_rng))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def copy_per_shard(w: jax.Array, groups: int, axes: tuple[str, ...]) -> jax.Array:
    """[groups, *w.shape]: one whole copy of ``w`` (its embed dimension gathered) on each of the
    ``groups`` batch shards. The copies' gradients are summed straight into ``w``'s own layout
    (sum_copies: a reduce-scatter), where a plain broadcast's gradient would be all-reduced whole
    and then sliced."""
    per_shard = ("batch", *(None if a == "embed" else a for a in axes))
    return constrain(jnp.broadcast_to(w, (groups, *w.shape)), per_shard)


def _copy_per_shard_fwd(w, groups, axes):
    return copy_per_shard(w, groups, axes), None


def _copy_per_shard_bwd(groups, axes, _, grad):
    return (sum_copies(grad, axes),)


copy_per_shard.defvjp(_copy_per_shard_fwd, _copy_per_shard_bwd)


def stack_blocks(blocks: list[DecoderBlock]) -> DecoderBlock:
    """The first block with each parameter replaced by all blocks' values stacked on a leading
    "layers" axis, so the layers run as one scanned body: compile time and program size stop
    growing with depth. The axis is named like any other, so the rule table decides its sharding."""
    per_block = [{path: v for path, v in nnx.iter_graph(b) if isinstance(v, nnx.Param)} for b in blocks]
    for path, var in per_block[0].items():
        var.set_value(jnp.stack([params[path][...] for params in per_block]))
        var.set_metadata(logical_axes=("layers", *var.get_metadata()["logical_axes"]))
    return blocks[0]


def count_params(cfg: ModelConfig) -> int:
    """Parameter count from shapes alone (no memory is allocated)."""
    abstract = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))
    return sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))


class ModelDef:
    """The model's structure without its weights: rebuilds a Decoder around any params (a pure
    nested dict of arrays), which is what jitted code, checkpoints and converters pass around."""

    def __init__(self, cfg: ModelConfig):
        self.cfg = cfg
        self.graphdef, self.abstract_state = nnx.split(nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0))))

    def bind(self, params: dict) -> Decoder:
        state = jax.tree.map(lambda v: v, self.abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))
        nnx.replace_by_pure_dict(state, params)
        return nnx.merge(self.graphdef, state)

    def init_params(self, rng: jax.Array) -> dict:
        return nnx.to_pure_dict(nnx.state(Decoder(self.cfg, rngs=nnx.Rngs(params=rng)), nnx.Param))

    def abstract_params(self) -> dict:
        """ShapeDtypeStructs shaped like the params (no memory)."""
        return nnx.to_pure_dict(self.abstract_state)
