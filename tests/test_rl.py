"""RL stage: advantage, loss and aggregation math against hand computation; rewards and the
plugin path; the retrieval hook; a synthetic verifiable task learned from chance; exact resume."""

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import straight_and_resumed, tiny_config

from medjax.config import ConfigError, RewardSpec, RLConfig
from medjax.models.config import ModelConfig
from medjax.models.decoder import ModelDef
from medjax.rl.advantages import group_advantages, informative_groups, overlong_penalty
from medjax.rl.objective import (
    PolicyGradientObjective,
    aggregate,
    completion_window,
    per_token_loss,
    token_logprobs,
)
from medjax.rl.packing import first_fit, pack_micro_batches, row_step
from medjax.rl.retrieval import InMemoryRetriever
from medjax.rl.rewards import RewardComposer, Sample, exam_reward, format_reward, length_reward
from medjax.tasks.items import ExamItem
from medjax.train.loop import train

# -- advantages -----------------------------------------------------------------------------------


def test_group_advantages_by_hand():
    rewards = np.array([[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    # Group 0: mean 0.5, population std 0.5; group 1: mean 0.25, std sqrt(3)/4; group 2: all equal.
    np.testing.assert_allclose(group_advantages(rewards, "grpo")[0], [1, -1, -1, 1], atol=1e-5)
    s = math.sqrt(3) / 4
    np.testing.assert_allclose(
        group_advantages(rewards, "grpo")[1], [-0.25 / s, -0.25 / s, -0.25 / s, 0.75 / s], rtol=1e-5
    )
    np.testing.assert_allclose(group_advantages(rewards, "grpo")[2], 0, atol=1e-6)
    np.testing.assert_allclose(group_advantages(rewards, "drgrpo")[1], [-0.25, -0.25, -0.25, 0.75])
    np.testing.assert_array_equal(informative_groups(rewards), [True, True, False])
    with pytest.raises(ValueError, match="unknown advantage"):
        group_advantages(rewards, "ppo")


def test_overlong_penalty_by_hand():
    # max 32 tokens, buffer 8: no penalty up to 24, then -1/8 per token down to -1 at 32.
    np.testing.assert_allclose(overlong_penalty(np.array([10, 24, 26, 32]), 32, 8, 1.0), [0, 0, -0.25, -1.0])


# -- loss -----------------------------------------------------------------------------------------


def test_clipped_loss_and_kl_by_hand():
    cfg = RLConfig(clip_low=0.2, clip_high=0.28, kl_coef=0.1, kl_estimator="k3")
    logp = jnp.log(jnp.array([0.5, 0.5, 0.5, 0.5]))
    old = jnp.log(jnp.array([0.25, 0.25, 0.5, 0.8]))  # ratios 2, 2, 1, 0.625
    ref = jnp.log(jnp.array([0.5, 0.25, 0.5, 0.5]))
    adv = jnp.array([1.0, -1.0, 2.0, -1.0])
    loss, clipped, kl = per_token_loss(logp, old, ref, adv, cfg)
    # pg = -min(r A, clip(r) A): A>0 clips at 1.28; A<0 keeps r=2 (the pessimistic side); clip 0.8 for r=0.625.
    pg = np.array([-1.28, 2.0, -2.0, 0.8])
    k3 = np.array([0.0, 0.5 - math.log(0.5) - 1, 0.0, 0.0])  # exp(ref-logp) - (ref-logp) - 1
    np.testing.assert_allclose(np.asarray(kl), k3, atol=1e-6)
    np.testing.assert_allclose(np.asarray(loss), pg + 0.1 * k3, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(clipped), [1, 0, 0, 1])
    _, _, k1 = per_token_loss(logp, old, ref, adv, RLConfig(kl_estimator="k1"))
    np.testing.assert_allclose(np.asarray(k1), [0.0, math.log(2), 0.0, 0.0], atol=1e-6)


def test_aggregation_by_hand():
    loss = jnp.array([[1.0, 2.0, 3.0, 0.0], [4.0, 0.0, 0.0, 0.0], [9.0, 9.0, 9.0, 9.0]])
    mask = jnp.array([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    total, count = aggregate(loss, mask, RLConfig(aggregation="token"))
    assert (float(total), float(count)) == (10.0, 4.0)  # DAPO: 10 / 4 tokens
    total, count = aggregate(loss, mask, RLConfig(aggregation="sequence"))
    assert (float(total), float(count)) == (6.0, 2.0)  # GRPO: (6/3 + 4/1) / 2 sequences
    total, count = aggregate(loss, mask, RLConfig(aggregation="constant", max_new_tokens=8))
    assert float(total) == pytest.approx(10 / 8) and float(count) == 2.0  # Dr.GRPO: 10 / (2 x 8)


# The model the objective's tests score rows with (vocab 61, width 32: hand-checkable FLOPs).
SMALL = ModelConfig(vocab_size=61, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2)


def _rl_rows(prompt_and_completion, seq, vocab, seed=0):
    """RL update rows as RolloutIterator._rows lays them out: prompt + completion from position 0,
    loss on the completion's targets, padding after."""
    rng = np.random.default_rng(seed)
    n = len(prompt_and_completion)
    rows = {k: np.zeros((n, seq), np.int32) for k in ("tokens", "targets", "positions", "segment_ids")}
    rows |= {k: np.zeros((n, seq), np.float32) for k in ("loss_mask", "old_logprobs", "ref_logprobs", "advantages")}
    for r, (prompt, completion) in enumerate(prompt_and_completion):
        full = rng.integers(1, vocab, prompt + completion)
        length, start = len(full) - 1, prompt - 1
        rows["tokens"][r, :length], rows["targets"][r, :length] = full[:-1], full[1:]
        rows["positions"][r, :length], rows["segment_ids"][r, :length] = np.arange(length), 1
        rows["loss_mask"][r, start:length] = 1.0
        rows["old_logprobs"][r, start:length] = -rng.random(completion) * 3
        rows["ref_logprobs"][r, start:length] = -rng.random(completion) * 3
        rows["advantages"][r, start:length] = rng.normal()
    return {k: jnp.asarray(v) for k, v in rows.items()}


@pytest.mark.parametrize("aggregation", ["token", "sequence", "constant"])
@pytest.mark.parametrize("chunk", [0, 3])
def test_head_over_the_completion_window_equals_every_position(aggregation, chunk):
    """The objective forms logits only over each row's last max_new_tokens positions: its loss,
    metrics and gradients equal those of the loss computed at every position. Rows: a completion
    shorter than the window, a row shorter than the window, one ending at the row's end."""
    cfg = RLConfig(max_new_tokens=4, aggregation=aggregation, kl_coef=0.1, kl_estimator="k3")
    model = ModelDef(dataclasses.replace(SMALL, logits_chunk=chunk))
    params = jax.jit(model.init_params)(jax.random.key(0))
    batch = _rl_rows([(6, 3), (2, 2), (12, 4), (13, 4)], seq=16, vocab=61)
    objective = PolicyGradientObjective(cfg)

    def windowed(p):
        return objective.loss(model.bind(p), batch, None)

    def every_position(p):
        logp, entropy = token_logprobs(model.bind(p), batch)
        mask = batch["loss_mask"]
        loss_t, clipped, kl = per_token_loss(
            logp, batch["old_logprobs"], batch["ref_logprobs"], batch["advantages"], cfg
        )
        total, count = aggregate(loss_t, mask, cfg)
        ratio = jnp.exp(logp - batch["old_logprobs"])
        extra = {
            "tokens": mask.sum(),
            "clipped": (clipped * mask).sum(),
            "kl": (kl * mask).sum(),
            "entropy": (entropy * mask).sum(),
            "ratio": (ratio * mask).sum(),
        }
        return total, count, extra

    got, want = jax.jit(windowed)(params), jax.jit(every_position)(params)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-6)
    assert float(got[1]) == float(want[1])
    for k in want[2]:
        np.testing.assert_allclose(got[2][k], want[2][k], rtol=1e-5, atol=1e-5, err_msg=k)
    g_got = jax.jit(jax.grad(lambda p: windowed(p)[0]))(params)
    g_want = jax.jit(jax.grad(lambda p: every_position(p)[0]))(params)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_got), jax.tree.leaves(g_want)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))


def test_reference_logprobs_at_the_window_are_those_at_every_position():
    from medjax.rl.rollout import RolloutIterator

    model = ModelDef(dataclasses.replace(SMALL, num_layers=1))
    params = jax.jit(model.init_params)(jax.random.key(0))
    batch = _rl_rows([(6, 3), (2, 2), (12, 4)], seq=16, vocab=61)
    got = jax.jit(RolloutIterator._window_logprobs(model, 4))(params, batch) * batch["loss_mask"]
    want = token_logprobs(model.bind(params), batch, entropy=False)[0] * batch["loss_mask"]
    assert got.shape == (3, 16)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_the_update_counts_its_head_over_the_window_alone():
    """MFU and the planner count the update's model FLOPs: the layers at every position, the head
    (6 x hidden x vocab a token) at rl.max_new_tokens positions of each row."""
    from medjax.train.metrics import train_flops_per_token

    every = train_flops_per_token(SMALL, 16)
    assert train_flops_per_token(SMALL, 16, 16) == train_flops_per_token(SMALL, 16, 99) == every
    assert train_flops_per_token(SMALL, 16, 4) == pytest.approx(every - 6 * 32 * 61 * 12 / 16)


def test_a_window_narrower_than_a_completion_would_lose_its_first_tokens():
    """The window is a row's last max_new_tokens positions, so it must not be narrower than a
    completion: with max_new_tokens=2 for a 4-token completion, the loss differs (the test above
    is not vacuous)."""
    model = ModelDef(dataclasses.replace(SMALL, num_layers=1))
    params = jax.jit(model.init_params)(jax.random.key(0))
    batch = _rl_rows([(6, 4)], seq=12, vocab=61)
    narrow = PolicyGradientObjective(RLConfig(max_new_tokens=2)).loss(model.bind(params), batch, None)
    wide = PolicyGradientObjective(RLConfig(max_new_tokens=4)).loss(model.bind(params), batch, None)
    assert float(narrow[2]["tokens"]) == 2.0 and float(wide[2]["tokens"]) == 4.0


def test_first_fit_places_every_sequence_once_within_capacity_and_count():
    lengths = [16, 3, 15, 8, 3, 8, 1, 1, 1]
    rows = first_fit(lengths, capacity=16, max_per_row=3)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 16 and len(row) <= 3 for row in rows)
    assert rows == [[0], [2, 6], [3, 5], [1, 4, 7], [8]]  # longest first, each into the first row with room
    assert first_fit(lengths, 16, 1) == [[i] for i in sorted(range(9), key=lambda i: (-lengths[i], i))]
    with pytest.raises(ValueError, match="17 tokens does not fit a row of 16"):
        first_fit([17], 16, 2)


def test_micro_batches_pack_to_one_row_count_rounded_for_their_devices():
    """Every micro-batch of a step gets the row count the fullest needs, rounded up to the devices'
    multiple but never past the unpacked count; each sequence's tokens move whole, segment by
    segment, positions kept."""
    lengths = [9, 9, 9, 2, 2, 2]
    buffer = {k: np.zeros((6, 10), np.int32) for k in ("tokens", "positions", "segment_ids")}
    for i, n in enumerate(lengths):
        buffer["tokens"][i, :n], buffer["positions"][i, :n], buffer["segment_ids"][i, :n] = i + 1, np.arange(n), 1
    packed = pack_micro_batches(buffer, np.array([[0, 1, 2], [3, 4, 5]]), max_per_row=3, row_multiple=2)
    assert packed["tokens"].shape == (2, 4, 10)  # 3 rows for [0, 1, 2], 1 for [3, 4, 5]: 4
    np.testing.assert_array_equal(packed["segment_ids"][1, 0], [1, 1, 2, 2, 3, 3, 0, 0, 0, 0])
    np.testing.assert_array_equal(packed["tokens"][1, 0], [4, 4, 5, 5, 6, 6, 0, 0, 0, 0])
    np.testing.assert_array_equal(packed["positions"][1, 0], [0, 1, 0, 1, 0, 1, 0, 0, 0, 0])
    assert not packed["segment_ids"][1, 1:].any()
    capped = pack_micro_batches(buffer, np.array([[0, 1, 2]]), max_per_row=3, row_multiple=2, most=3)
    assert capped["tokens"].shape == (1, 3, 10)


def test_packed_row_counts_split_over_the_devices_in_at_most_eight_steps():
    for micro, split in [(32, 1), (16, 4), (8, 8), (24, 8), (20, 1), (12, 2), (64, 8), (96, 12)]:
        step = row_step(micro, split)
        assert step % split == 0 and step >= micro / 8 and step - split < micro / 8, (micro, split, step)
        assert len({min(step * math.ceil(r / step), micro) for r in range(1, micro + 1)}) <= 8
    assert row_step(24, 8) == 8  # not lcm(8, 3) = 24: that would leave one row count, the unpacked one


def test_completion_windows_of_packed_segments():
    """Segments 1..3 end to end, padding after: each window is its segment's last 4 positions
    (from the row's start when the segment is shorter), valid only where the segment is; segment
    4 is absent, all invalid."""
    segments = jnp.asarray([[1, 1, 2, 2, 2, 2, 2, 3, 0, 0]])
    window, valid = completion_window(segments, 4, segments=4)
    np.testing.assert_array_equal(window[0].reshape(4, 4), [[0, 1, 2, 3], [3, 4, 5, 6], [4, 5, 6, 7], [4, 5, 6, 7]])
    np.testing.assert_array_equal(valid[0].reshape(4, 4), [[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 1], [0, 0, 0, 0]])


def _packed(rows: dict, per_row: int, row_multiple: int = 1) -> dict:
    host = {k: np.asarray(v) for k, v in rows.items()}
    packed = pack_micro_batches(host, np.arange(len(host["tokens"]))[None], per_row, row_multiple)
    return {k: jnp.asarray(v[0]) for k, v in packed.items()}


@pytest.mark.parametrize("aggregation", ["token", "sequence", "constant"])
@pytest.mark.parametrize("chunk", [0, 3])
def test_packed_update_rows_equal_one_sequence_a_row(aggregation, chunk):
    """Six sequences packed three a row into four rows (plus two empty rows to a multiple of 3):
    loss, count, every metric sum and every gradient equal the unpacked rows'. Two sequences
    shorter than the window share a row, so a window reaching into its neighbour's completion
    must be masked to its own segment."""
    cfg = RLConfig(max_new_tokens=4, aggregation=aggregation, kl_coef=0.1, kl_estimator="k3")
    model = ModelDef(dataclasses.replace(SMALL, logits_chunk=chunk))
    params = jax.jit(model.init_params)(jax.random.key(0))
    rows = _rl_rows([(6, 3), (2, 2), (12, 4), (13, 4), (2, 2), (5, 4)], seq=16, vocab=61)
    packed = _packed(rows, 3, row_multiple=3)
    assert packed["tokens"].shape == (6, 16) and int(packed["segment_ids"].max()) == 2
    assert int((packed["segment_ids"] > 0).sum()) == int((rows["segment_ids"] > 0).sum())
    one = PolicyGradientObjective(cfg)
    three = PolicyGradientObjective(dataclasses.replace(cfg, sequences_per_row=3))

    def loss(objective, batch):
        return lambda p: objective.loss(model.bind(p), batch, None)

    got, want = jax.jit(loss(three, packed))(params), jax.jit(loss(one, rows))(params)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-6)
    assert float(got[1]) == float(want[1])
    for k in want[2]:
        np.testing.assert_allclose(got[2][k], want[2][k], rtol=1e-5, atol=1e-5, err_msg=k)
    g_got = jax.jit(jax.grad(lambda p: loss(three, packed)(p)[0]))(params)
    g_want = jax.jit(jax.grad(lambda p: loss(one, rows)(p)[0]))(params)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_got), jax.tree.leaves(g_want)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))
    # Without the segments (as one sequence a row would read them), the neighbours' tokens leak in.
    leaky = jax.jit(loss(one, packed))(params)
    assert float(leaky[2]["tokens"]) != float(want[2]["tokens"])


# -- rewards --------------------------------------------------------------------------------------

ITEM = ExamItem(
    id="q1",
    question="Which drug?",
    options={"A": "x", "B": "y", "C": "z", "D": "w"},
    answer=frozenset("B"),
    source="t:1",
)
MULTI = ExamItem(
    id="q2",
    question="Which?",
    options={"A": "x", "B": "y", "C": "z", "D": "w"},
    answer=frozenset("AC"),
    source="t:2",
    multi=True,
)


def _sample(text, item=ITEM, n=10, truncated=False):
    return Sample(prompt="p", completion=text, num_tokens=n, truncated=truncated, item=item)


def test_builtin_rewards():
    samples = [
        _sample("Because y.\nThe answer is B."),
        _sample("The answer is C."),
        _sample("I cannot answer that."),
        _sample("A is partly right.\nThe answer is A", item=MULTI),
    ]
    assert exam_reward(samples, {}) == [1.0, 0.0, 0.0, 0.0]
    assert exam_reward(samples, {"partial_credit": True})[3] == 0.5
    assert format_reward(samples, {}) == [1.0, 0.0, 0.0, 1.0]  # reasoning first, then the answer line
    assert format_reward([_sample("Because y.\nThe answer is B.", truncated=True)], {}) == [0.0]
    # an answer line naming the option's text is explicit for format exactly as for the exam reward
    by_text = [_sample("Because y fits.\nThe answer is y."), _sample("Because q fits.\nThe answer is q.")]
    assert exam_reward(by_text, {}) == [1.0, 0.0]
    assert format_reward(by_text, {}) == [1.0, 0.0]
    assert length_reward(
        [_sample("", n=10), _sample("", n=150)], {"target_tokens": 100, "per_token": 0.01}
    ) == pytest.approx([0.0, -0.5])


def half_reward(samples, options):
    """The synthetic task: every completion token should come from the half of the vocabulary the
    prompt names (question ends in 0: ids below half, 1: ids at or above half)."""
    half = int(options.get("vocab", 512)) // 2
    out = []
    for s in samples:
        want_low = s.item.question.endswith("0")
        ids = s.completion_ids or (0,)
        out.append(float(np.mean([(t < half) == want_low for t in ids])))
    return out


def test_composer_weights_plugins_and_errors():
    composer = RewardComposer(
        [RewardSpec("exam", 1.0), RewardSpec("format", 0.5), RewardSpec("test_rl:half_reward", 2.0, {"vocab": 4})]
    )
    s = Sample(
        prompt="p",
        completion="Because y.\nThe answer is B.",
        num_tokens=2,
        truncated=False,
        item=ExamItem(id="q", question="pick 0", options={"A": "x", "B": "y"}, answer=frozenset("B"), source="t"),
        completion_ids=(1, 3),
    )
    total, parts = composer([s])
    assert sorted(parts) == ["exam", "format", "half_reward"]
    assert float(total[0]) == pytest.approx(1.0 + 0.5 * 1.0 + 2.0 * 0.5)
    with pytest.raises(ConfigError, match="unknown reward 'exma'"):
        RewardComposer([RewardSpec("exma")])
    with pytest.raises(ConfigError, match="cannot import"):
        RewardComposer([RewardSpec("no_such_module:fn")])


def test_normalize_by_hand_and_by_default():
    from medjax.rl.rewards import normalize

    v = np.array([-2.0, 0.0, 2.0])
    np.testing.assert_allclose(normalize(v, "sigmoid", 2.0), 1 / (1 + np.exp(-v / 2)), rtol=1e-6)
    np.testing.assert_allclose(normalize(v, "zscore"), v / np.sqrt(8 / 3), rtol=1e-6)
    np.testing.assert_array_equal(normalize(np.ones(3), "zscore"), 0.0)  # a constant batch carries no signal
    np.testing.assert_array_equal(normalize(v, "none"), v)
    composer = RewardComposer(
        [
            RewardSpec("reward_model", 0.5, {"model": "unused", "dimension": "honesty"}),
            RewardSpec("test_rl:raw_scores", 1.0, normalize="zscore"),
            RewardSpec("exam"),
        ]
    )
    assert [(p[0], p[4]) for p in composer.parts] == [
        ("rm_honesty", "sigmoid"),
        ("raw_scores", "zscore"),
        ("exam", "none"),
    ]
    composer = RewardComposer([RewardSpec("test_rl:raw_scores", 2.0, normalize="sigmoid", temperature=4.0)])
    samples = [_sample(f"score {x}") for x in (-8, 0, 8)]
    total, parts = composer(samples)
    np.testing.assert_allclose(parts["raw_scores"], [-8, 0, 8])  # raw values are kept for metrics
    np.testing.assert_allclose(parts["raw_scores_normalized"], 1 / (1 + np.exp(-np.array([-8, 0, 8]) / 4)), rtol=1e-6)
    np.testing.assert_allclose(total, 2 * parts["raw_scores_normalized"], rtol=1e-6)
    with pytest.raises(ConfigError, match="temperature must be positive"):
        RewardComposer([RewardSpec("exam", temperature=0.0)])


def raw_scores(samples, options):
    """An unbounded score read from the completion ("score -8"), like a reward model's logit."""
    return [float(s.completion.split()[-1]) for s in samples]


def odd_mastered(samples, options):
    """1.0 on the task items with an odd number (the policy "has mastered" them), 0.0 on the rest."""
    return [float(int(s.item.id[1:]) % 2) for s in samples]


# -- retrieval hook -------------------------------------------------------------------------------

PASSAGES = ["Velvaxia is treated first with Osmkexin.", "Weather today is mild.", "Osmkexin dosing is weekly."]


def make_retriever(cfg):
    return InMemoryRetriever(PASSAGES)


def test_in_memory_retriever_ranks_by_shared_words():
    r = InMemoryRetriever(PASSAGES)
    assert r.retrieve("How is Velvaxia treated?", 2) == [PASSAGES[0]]
    assert r.retrieve("Osmkexin for Velvaxia", 3) == [PASSAGES[0], PASSAGES[2]]


def test_retrieved_passages_reach_the_prompt(world, tmp_path):
    from medjax.data.chat import ChatTemplate
    from medjax.data.tokenizer import load_tokenizer
    from medjax.rl.rollout import PromptSet

    items = _task_file(tmp_path, n=2, question="How is Velvaxia treated? 0")
    cfg = _rl_config(
        world, tmp_path / "run", items, "rl.retriever=test_rl:make_retriever", "rl.passages_k=2", "data.seq_len=256"
    )
    prompts = PromptSet(cfg, load_tokenizer(world.tokenizer), ChatTemplate(world.tokenizer))
    text = load_tokenizer(world.tokenizer).decode(prompts.ids[0])
    assert "Reference passages (quoted" in text and f"[1] «{PASSAGES[0]}»" in text and PASSAGES[1] not in text
    assert "Reference passages" not in prompts.texts[0]  # rewards see the question as asked
    with pytest.raises(ConfigError, match="rl.retriever"):
        PromptSet(
            _rl_config(world, tmp_path / "run2", items, "rl.retriever=test_rl:PASSAGES"),
            load_tokenizer(world.tokenizer),
            ChatTemplate(world.tokenizer),
        )


def test_a_retrieval_fraction_shows_passages_to_that_share_of_draws(world, tmp_path):
    """rl.retrieval_fraction: every item is a prompt bare and a prompt with passages; each draw
    takes one by its position (the same on a second build, so a resumed run draws the same), about
    the configured share with passages; 0 shows none whatever the retriever; a retrieved prompt
    too long for data.seq_len sheds passages until it fits."""
    from medjax.data.chat import ChatTemplate
    from medjax.data.tokenizer import load_tokenizer
    from medjax.rl.rollout import PromptSet

    tokenizer, template = load_tokenizer(world.tokenizer), ChatTemplate(world.tokenizer)
    items = _task_file(tmp_path, n=4, question="How is Velvaxia treated with Osmkexin? 0")
    retrieve = ["rl.retriever=test_rl:make_retriever", "rl.passages_k=2"]

    def prompt_set(*extra):
        return PromptSet(_rl_config(world, tmp_path / "run", items, *retrieve, *extra), tokenizer, template)

    half = prompt_set("rl.retrieval_fraction=0.5")
    assert len(half.ids) == len(half.items) == 8
    for i in range(4):
        bare, shown = (tokenizer.decode(half.ids[j]) for j in (i, i + 4))
        assert "Reference passages" not in bare and f"[2] «{PASSAGES[2]}»" in shown
        assert half.items[i] is half.items[i + 4] and half.texts[i] == half.texts[i + 4]
    draws = half.take(0, 400)
    share = np.mean([half.with_passages(e) for e in draws])
    assert 0.4 < share < 0.6, share
    assert draws == prompt_set("rl.retrieval_fraction=0.5").take(0, 400)
    assert sorted({e % 4 for e in draws[:4]}) == sorted(int(half.order[p]) for p in range(4))  # the item order holds
    none = prompt_set("rl.retrieval_fraction=0")
    assert len(none.ids) == 4 and all("Reference passages" not in tokenizer.decode(x) for x in none.ids)
    one = prompt_set("rl.passages_k=1")  # fraction 1: every prompt with passages
    assert len(one.ids) == 4 and f"«{PASSAGES[2]}»" not in tokenizer.decode(one.ids[0])
    tight = prompt_set(f"data.seq_len={len(one.ids[0]) + 3}")  # room for one passage, not two
    assert tight.ids[0] == one.ids[0]


# -- learning and resume --------------------------------------------------------------------------


def _task_file(tmp_path, n=16, question=None):
    path = tmp_path / "task.jsonl"
    with open(path, "w") as f:
        for i in range(n):
            q = question or f"Synthetic task {i}: answer from half 0"
            f.write(
                json.dumps(
                    {
                        "id": f"t{i}",
                        "question": q,
                        "options": {"A": "a", "B": "b", "C": "c", "D": "d"},
                        "answer_idx": "A",
                    }
                )
                + "\n"
            )
    return path


def _rl_config(world, workdir, items, *overrides):
    return tiny_config(
        world,
        workdir,
        "stage=rl",
        f"data.train_files=[{items}]",
        "data.seq_len=256",
        "train.global_batch_size=16",
        "optimizer.learning_rate=0.02",
        "optimizer.warmup_steps=0",
        "optimizer.weight_decay=0",
        "rl.prompts_per_rollout=8",
        "rl.group_size=4",
        "rl.max_new_tokens=4",
        "rl.chat=false",
        "rl.dynamic_sampling=false",
        "rl.rewards=[{name: 'test_rl:half_reward', weight: 1.0}]",
        *overrides,
    )


@pytest.mark.slow  # an RL run to convergence
def test_rl_learns_a_verifiable_task_from_chance(world, tmp_path):
    result = train(
        _rl_config(
            world,
            tmp_path / "run",
            _task_file(tmp_path),
            "train.max_steps=40",
            "train.checkpoint_every=40",
            "rl.epochs=2",
        )
    )
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    rewards = [r["reward_mean"] for r in rows if "reward_mean" in r]
    assert 0.3 < rewards[0] < 0.7, rewards  # chance: half of the vocabulary
    assert max(rewards[-3:]) > 0.8, rewards
    first = rows[0]
    assert first["ratio_mean"] == pytest.approx(1.0, abs=1e-3)  # behaviour log-probs match the trainer's
    for key in (
        "reward_std",
        "kl",
        "clip_fraction",
        "entropy",
        "response_length_mean",
        "groups_dropped_frac",
        "rollout_tokens_per_sec",
        "rollout_time_s",
        "update_time_s",
        "reward_half_reward_mean",
    ):
        assert key in first, key
    assert result.step == 40


@pytest.mark.slow  # three RL runs each
@pytest.mark.parametrize("per_row", [1, 4])
def test_rl_resumes_exactly(world, tmp_path, per_row):
    def cfg(workdir):  # 2 epochs of 2 minibatches per rollout: a stop at step 3 falls inside a rollout
        return _rl_config(
            world,
            workdir,
            _task_file(tmp_path),
            "train.max_steps=6",
            "rl.epochs=2",
            "rl.kl_coef=0.05",
            "rl.dynamic_sampling=true",
            "rl.max_refills=1",
            f"rl.sequences_per_row={per_row}",
        )

    straight_and_resumed(cfg, tmp_path)


@pytest.mark.slow  # three RL runs
def test_rl_with_retrieval_on_part_of_its_prompts_resumes_exactly(world, tmp_path):
    def cfg(workdir):
        return _rl_config(
            world,
            workdir,
            _task_file(tmp_path, question="How is Velvaxia treated with Osmkexin? 0"),
            "train.max_steps=4",
            "rl.epochs=2",
            "rl.retriever=test_rl:make_retriever",
            "rl.retrieval_fraction=0.5",
        )

    straight, _ = straight_and_resumed(cfg, tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert any(0 < r.get("retrieved_frac", 0) < 1 for r in rows), rows


@pytest.mark.slow  # RL on two meshes
def test_rl_on_a_sharded_mesh_matches_one_device(world, tmp_path):
    """Rollouts sample from the params as training lays them out (data x fsdp x tensor), with the
    rollout rows split over data x fsdp; the samples and the update match one device."""
    items = _task_file(tmp_path)
    runs = {}
    for name, mesh in (("one", ["mesh.data=1"]), ("mesh", ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"])):
        train(_rl_config(world, tmp_path / name, items, "train.max_steps=2", *mesh))
        runs[name] = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(runs["one"], runs["mesh"]):
        assert a["reward_mean"] == b["reward_mean"] and a["response_length_mean"] == b["response_length_mean"]
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)


@pytest.mark.slow  # RL with packed and unpacked update rows
def test_packed_update_rows_train_as_one_sequence_a_row(world, tmp_path):
    """Four sequences a row, on a mesh whose batch splits over 4 devices (the packed rows are
    rounded up to a multiple of 4): the same rollouts and the same losses as one sequence a row on
    one device, computed over fewer rows that hold more tokens."""
    items = _task_file(tmp_path)
    runs = {}
    for name, extra in (
        ("unpacked", ["mesh.data=1"]),
        ("packed", ["mesh.data=2", "mesh.fsdp=2", "rl.sequences_per_row=4"]),
    ):
        train(_rl_config(world, tmp_path / name, items, "train.max_steps=2", "train.log_every=1", *extra))
        runs[name] = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(runs["unpacked"], runs["packed"], strict=True):
        assert a["reward_mean"] == b["reward_mean"] and a["response_length_mean"] == b["response_length_mean"]
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        # 16 sequences of about 84 tokens, three to a row of 256: 6 rows, rounded up to 8.
        assert (a["update_rows"], b["update_rows"]) == (16, 8)
        assert b["update_fill"] == pytest.approx(2 * a["update_fill"])
    with pytest.raises(ConfigError, match=r"rl.sequences_per_row x rl.max_new_tokens = 260 passes data.seq_len=256"):
        train(_rl_config(world, tmp_path / "bad", items, "rl.sequences_per_row=65"))


@pytest.mark.parametrize(
    "override,message",
    [
        ("rl.group_size=3", "not a multiple of train.global_batch_size"),
        ("rl.group_size=1", "rl.group_size must be at least 2"),
        ("rl.temperature=0", "rl.temperature must be positive"),
        ("rl.retrieval_fraction=1.5", "rl.retrieval_fraction must be in"),
    ],
)
def test_bad_rl_settings_are_named(world, tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        train(_rl_config(world, tmp_path / "run", _task_file(tmp_path), override))


@pytest.mark.slow  # RL runs over several passes
def test_mastered_prompts_leave_the_pool_for_later_passes(world, tmp_path):
    """16 prompts, 8 per rollout: the first pass (two rollouts) masters the 8 odd ones; later
    rollouts sample only the even ones (whose odd_mastered reward is 0)."""
    cfg = _rl_config(
        world,
        tmp_path / "run",
        _task_file(tmp_path),
        "train.max_steps=8",
        "rl.drop_mastered=true",
        "rl.mastered_reward=odd_mastered",
        "rl.rewards=[{name: 'test_rl:half_reward'}, {name: 'test_rl:odd_mastered', weight: 0.0}]",
    )
    train(cfg)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    by_rollout = [r for r in rows if "prompt_pool_size" in r][::2]  # two steps per rollout
    assert [r["prompt_pool_size"] for r in by_rollout] == [16 - by_rollout[0]["prompts_dropped"], 8, 8, 8]
    assert sum(r["prompts_dropped"] for r in by_rollout) == 8
    assert [r["reward_odd_mastered_mean"] for r in by_rollout[2:]] == [0.0, 0.0]
    with pytest.raises(ConfigError, match="rl.mastered_reward 'nope' is not one of the configured rewards"):
        train(
            _rl_config(
                world, tmp_path / "bad", _task_file(tmp_path), "rl.drop_mastered=true", "rl.mastered_reward=nope"
            )
        )


@pytest.mark.slow  # three RL runs
def test_rl_with_mastered_pruning_resumes_exactly(world, tmp_path):
    def cfg(workdir):  # the stop at step 3 falls in the second rollout, after the first pruned its prompts
        return _rl_config(
            world,
            workdir,
            _task_file(tmp_path),
            "train.max_steps=8",
            "rl.drop_mastered=true",
            "rl.mastered_reward=odd_mastered",
            "rl.rewards=[{name: 'test_rl:half_reward'}, {name: 'test_rl:odd_mastered', weight: 0.0}]",
        )

    straight_and_resumed(cfg, tmp_path)
