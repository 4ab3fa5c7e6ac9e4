import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medjax.models.config import ModelConfig
from medjax.models.decoder import ModelDef
from medjax.models.sampler import Sampler, SamplingConfig, filter_logits


@pytest.fixture(scope="module")
def setup():
    model = ModelDef(
        ModelConfig(
            vocab_size=61,
            hidden_size=32,
            intermediate_size=64,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            head_dim=8,
            max_position_embeddings=256,
        )
    )
    params = model.init_params(jax.random.key(0))
    params = jax.tree.map(lambda x: x * 20 if x.ndim == 2 else x, params)  # peaked, varied outputs
    return Sampler(model), params


def test_batched_left_padded_rows_equal_single_rows(setup):
    sampler, params = setup
    prompts = [[3, 4, 5, 6, 7, 8, 9], [10], [11, 12, 13]]
    cfg = SamplingConfig(max_new_tokens=10)
    batched = sampler.generate(params, prompts, cfg).sequences()
    assert batched == [sampler.generate(params, [p], cfg).sequences()[0] for p in prompts]
    assert len({tuple(s) for s in batched}) > 1


def test_a_mesh_layout_changes_placement_not_tokens(setup):
    """RL rollouts trace the sampler under the trainer's activation layout (rows split over
    data x fsdp, weights by the rule table): same tokens and log-probs as the plain program."""
    from medjax.config import MeshConfig
    from medjax.parallel.mesh import make_mesh
    from medjax.parallel.rules import MeshLayout, batch_sharding, param_shardings

    sampler, params = setup
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    placed = jax.device_put(params, param_shardings(sampler.model.abstract_state, mesh))
    laid_out = Sampler(sampler.model, layout=MeshLayout(mesh))
    prompts = [[3, 4, 5, 6], [7], [8, 9], [10, 11, 12], [13], [14, 15], [16], [17, 18]]
    cfg = SamplingConfig(max_new_tokens=8, temperature=1.0)
    plain = sampler.generate(params, prompts, cfg, jax.random.key(3))
    sharded = laid_out.generate(placed, prompts, cfg, jax.random.key(3), batch_sharding=batch_sharding(mesh))
    assert sharded.sequences() == plain.sequences()
    np.testing.assert_allclose(sharded.logprobs, plain.logprobs, atol=1e-5)


def test_a_sharded_prefill_gathers_weights_not_every_rows_activations():
    """A prefill over fsdp-sharded weights keeps its rows split, as a training forward does: the
    partitioner gathers each layer's weights. Left alone it contracted over the sharded embed
    dimension and all-reduced every row's activations (at 7B, 64 x 512 prompt tokens on v5e-64:
    78 GB a device against the weights' 14 GB, by libtpu's compile)."""
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    from medjax.models.sharding import activation_layout
    from medjax.parallel.costs import collectives_of
    from medjax.parallel.rules import MeshLayout, param_shardings

    mesh = Mesh(np.array(jax.devices()[:8]).reshape(1, 8, 1), ("data", "fsdp", "tensor"))
    model = ModelDef(
        ModelConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4, num_kv_heads=2)
    )
    params = jax.jit(model.init_params, out_shardings=param_shardings(model.abstract_state, mesh))(jax.random.key(0))
    rows, width = 8, 64
    tokens = jax.random.randint(jax.random.key(1), (rows, width), 0, 256)

    def prefill(p, tokens):
        m = model.bind(p)
        positions = jnp.broadcast_to(jnp.arange(width), (rows, width))
        kv_mask = jnp.zeros((rows, width + 8), bool).at[:, :width].set(True)
        return m.decode(tokens, positions, kv_mask, m.init_cache(rows, width + 8), 0, last_only=True)[0]

    def laid_out(p, tokens):
        with activation_layout(MeshLayout(mesh)):
            return prefill(p, tokens)

    split = jax.device_put(tokens, NamedSharding(mesh, P(("data", "fsdp"))))
    compiled = jax.jit(laid_out).lower(params, split).compile()
    kinds = {c.kind for c in collectives_of(compiled.as_text().splitlines(), mesh, None)}
    assert "all-gather" in kinds and "all-reduce" not in kinds, kinds
    np.testing.assert_allclose(compiled(params, split), jax.jit(prefill)(params, tokens), atol=1e-5)


def test_stop_tokens_end_rows_and_pad_the_rest(setup):
    sampler, params = setup
    free = sampler.generate(params, [[3, 4, 5]], SamplingConfig(max_new_tokens=12)).tokens[0]
    stop = int(free[4])
    first = list(free).index(stop)
    out = sampler.generate(params, [[3, 4, 5]], SamplingConfig(max_new_tokens=12, stop_token_ids=(stop,)))
    assert out.lengths[0] == first + 1 and out.tokens[0, first] == stop
    assert (out.tokens[0, first + 1 :] == sampler.pad_id).all() and (out.logprobs[0, first + 1 :] == 0).all()
    assert (out.logprobs[0, : first + 1] < 0).all()


def test_sampling_is_seeded_and_top_k_one_is_greedy(setup):
    sampler, params = setup
    hot = SamplingConfig(max_new_tokens=8, temperature=1.5)
    a = sampler.generate(params, [[3, 4]] * 4, hot, jax.random.key(1)).tokens
    b = sampler.generate(params, [[3, 4]] * 4, hot, jax.random.key(1)).tokens
    c = sampler.generate(params, [[3, 4]] * 4, hot, jax.random.key(2)).tokens
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()
    greedy = sampler.generate(params, [[3, 4]], SamplingConfig(max_new_tokens=8)).tokens
    top1 = sampler.generate(
        params, [[3, 4]], SamplingConfig(max_new_tokens=8, temperature=1.0, top_k=1), jax.random.key(5)
    ).tokens
    np.testing.assert_array_equal(greedy, top1)


def test_filter_logits_by_hand():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    kept = lambda out: np.isfinite(np.asarray(out))[0].tolist()  # noqa: E731
    assert kept(filter_logits(logits, 1.0, 0, 0.5)) == [True, False, False, False]
    assert kept(filter_logits(logits, 1.0, 0, 0.8)) == [True, True, False, False]
    assert kept(filter_logits(logits, 1.0, 0, 0.81)) == [True, True, True, False]
    assert kept(filter_logits(logits, 1.0, 3, 1.0)) == [True, True, True, False]
    np.testing.assert_allclose(filter_logits(logits, 2.0, 0, 1.0), logits / 2.0)


def test_bad_requests_are_refused(setup):
    sampler, params = setup
    with pytest.raises(ValueError, match="at least one token"):
        sampler.generate(params, [[]], SamplingConfig())
    with pytest.raises(ValueError, match="exceeds the model's max_position_embeddings"):
        sampler.generate(params, [[1]], SamplingConfig(max_new_tokens=300))
    with pytest.raises(ValueError, match="invalid sampling"):
        sampler.generate(params, [[1]], SamplingConfig(top_p=0.0))
