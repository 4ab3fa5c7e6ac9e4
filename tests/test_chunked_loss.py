"""The loss in chunks (model.logits_chunk): the same numbers as whole logits, without holding them."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medjax.models.config import ModelConfig
from medjax.models.decoder import ModelDef
from medjax.rl.objective import token_logprobs
from medjax.train.objectives import NextTokenObjective

CFG = ModelConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2)


def _batch(seq=12, vocab=97):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, vocab, (2, seq))
    return {
        "tokens": jnp.asarray(tokens),
        "targets": jnp.asarray(np.roll(tokens, -1, 1)),
        "positions": jnp.broadcast_to(jnp.arange(seq), (2, seq)),
        "segment_ids": jnp.ones((2, seq), jnp.int32),
        "loss_mask": jnp.asarray(rng.random((2, seq)) < 0.7, jnp.float32),
    }


@pytest.mark.slow  # gradients over every chunking
@pytest.mark.parametrize("chunk", [5, 4])  # a chunk that does not divide the sequence, and one that does
def test_chunked_loss_and_gradients_equal_whole_logits(chunk):
    whole, chunked = ModelDef(CFG), ModelDef(dataclasses.replace(CFG, logits_chunk=chunk))
    params = jax.jit(whole.init_params)(jax.random.key(0))
    batch = _batch()

    def loss(model):
        return jax.jit(jax.value_and_grad(lambda p: NextTokenObjective().loss(model.bind(p), batch, None)[0]))

    (a, ga), (b, gb) = loss(whole)(params), loss(chunked)(params)
    np.testing.assert_allclose(b, a, rtol=1e-6)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(y, x, atol=1e-6, rtol=1e-5), ga, gb)
    # and both are the textbook cross-entropy of the full logits
    logits = whole.bind(params)(batch["tokens"])
    ce = -jnp.take_along_axis(jax.nn.log_softmax(logits), batch["targets"][..., None], -1)[..., 0]
    np.testing.assert_allclose(a, (ce * batch["loss_mask"]).sum(), rtol=1e-6)


def test_chunked_rl_logprobs_and_entropy_equal_whole_logits():
    whole, chunked = ModelDef(CFG), ModelDef(dataclasses.replace(CFG, logits_chunk=5))
    params = jax.jit(whole.init_params)(jax.random.key(1))
    batch = _batch()
    lp_a, ent_a = jax.jit(lambda p: token_logprobs(whole.bind(p), batch))(params)
    lp_b, ent_b = jax.jit(lambda p: token_logprobs(chunked.bind(p), batch))(params)
    assert lp_b.shape == ent_b.shape == (2, 12)
    np.testing.assert_allclose(lp_b, lp_a, atol=1e-6)
    np.testing.assert_allclose(ent_b, ent_a, atol=1e-5)
    logp_all = jax.nn.log_softmax(whole.bind(params)(batch["tokens"]))
    np.testing.assert_allclose(ent_a, -(jnp.exp(logp_all) * logp_all).sum(-1), atol=1e-5)


def test_chunked_gradient_never_holds_whole_logits():
    """XLA's own accounting of the compiled gradient: whole logits need at least batch x seq x
    vocab float32 of scratch; in chunks of 16 positions the scratch stays below that."""
    cfg = dataclasses.replace(CFG, vocab_size=16384)
    batch = _batch(seq=256, vocab=16384)
    logits_bytes = 2 * 256 * 16384 * 4

    def temp_bytes(chunk):
        model = ModelDef(dataclasses.replace(cfg, logits_chunk=chunk))
        grad = jax.jit(jax.grad(lambda p: NextTokenObjective().loss(model.bind(p), batch, None)[0]))
        return grad.lower(model.abstract_params()).compile().memory_analysis().temp_size_in_bytes

    whole, chunked = temp_bytes(0), temp_bytes(16)
    assert whole >= logits_bytes > chunked, (whole, chunked, logits_bytes)


def test_negative_chunk_is_refused():
    with pytest.raises(ValueError, match="model.logits_chunk must be >= 0"):
        dataclasses.replace(CFG, logits_chunk=-1).validate()


@pytest.mark.parametrize("tied", [True, False])
def test_sharded_chunks_sum_the_head_gradient_once_into_its_own_layout(tied):
    """On a data x fsdp mesh the chunked loss keeps one copy of the head per batch shard: loss and
    gradients equal whole logits, and no collective runs inside the chunk loop: the head is gathered
    before it and its gradient reduced after it (laid out as the weight, the head was gathered in
    every chunk and its whole gradient all-reduced in every chunk)."""
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    from medjax.models.sharding import activation_layout
    from medjax.parallel.rules import MeshLayout, param_shardings

    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4, 1), ("data", "fsdp", "tensor"))
    cfg = dataclasses.replace(CFG, vocab_size=96, hidden_size=64, tie_word_embeddings=tied)
    whole, chunked = ModelDef(cfg), ModelDef(dataclasses.replace(cfg, logits_chunk=4))
    params = jax.jit(whole.init_params)(jax.random.key(2))
    batch = {k: jnp.concatenate([v] * 4) for k, v in _batch(seq=16, vocab=96).items()}  # 8 rows

    def grad_fn(model):
        def loss(p, b):
            with activation_layout(MeshLayout(mesh)):
                return NextTokenObjective().loss(model.bind(p), b, None)[0]

        rows = NamedSharding(mesh, P(("data", "fsdp")))
        return jax.jit(
            jax.value_and_grad(loss),
            in_shardings=(param_shardings(model.abstract_state, mesh), rows),
        )

    (a, ga), (b, gb) = grad_fn(whole)(params, batch), grad_fn(chunked)(params, batch)
    np.testing.assert_allclose(b, a, rtol=1e-6)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(y, x, atol=1e-5, rtol=1e-5), ga, gb)

    hlo = grad_fn(chunked).lower(params, batch).compile().as_text()
    in_loop = _ops_in_loop_bodies(hlo)
    assert in_loop and not in_loop & {"all-reduce", "reduce-scatter", "all-gather"}, in_loop


def _ops_in_loop_bodies(hlo: str) -> set[str]:
    """The op names run inside while loops' bodies (and what those bodies call) of compiled HLO."""
    computations, name = {}, None
    for line in hlo.splitlines():
        head = re.match(r"^(?:ENTRY )?%?([\w.\-]+) ", line)
        if head and line.rstrip().endswith("{"):
            name = head[1]
            computations[name] = []
        elif name:
            computations[name].append(line)
    called = lambda lines: {
        c for ln in lines for c in re.findall(r"(?:calls|to_apply|body|condition)=%?([\w.\-]+)", ln)
    }  # noqa: E731
    todo = [b for lines in computations.values() for ln in lines for b in re.findall(r"body=%?([\w.\-]+)", ln)]
    seen: set[str] = set()
    while todo:
        c = todo.pop()
        if c not in seen and c in computations:
            seen.add(c)
            todo += called(computations[c])
    return {m[1] for c in seen for ln in computations[c] if (m := re.search(r"= \S+ ([a-z\-]+)\(", ln))}


def test_unrolled_chunks_compute_the_same_without_a_loop():
    """medjax plan traces the chunk loop unrolled (libtpu's cost analysis counts a loop's body
    once): the same loss and gradients, from a program with no loop left in it."""
    from medjax.models.loops import unrolled_loops

    model = ModelDef(dataclasses.replace(CFG, logits_chunk=4))
    params = jax.jit(model.init_params)(jax.random.key(3))
    batch = _batch(seq=16)

    def loss():  # a new function each time: jit's trace cache does not know the switch
        return jax.value_and_grad(lambda p: NextTokenObjective().loss(model.bind(p), batch, None)[0])

    looped = jax.jit(loss()).lower(params)
    with unrolled_loops():
        unrolled = jax.jit(loss()).lower(params)
    assert "stablehlo.while" in looped.as_text() and "stablehlo.while" not in unrolled.as_text()
    (a, ga), (b, gb) = looped.compile()(params), unrolled.compile()(params)
    np.testing.assert_allclose(b, a, rtol=1e-6)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(y, x, atol=1e-6, rtol=1e-5), ga, gb)
