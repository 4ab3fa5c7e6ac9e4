"""Reward-model stage: pairs packed whole score as they would alone, the Bradley-Terry loss and
accuracies against a hand computation, exact resume, held-out accuracy, the scorer RL will call,
`medjax score-rm`, and bad input."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import stage_config, straight_and_resumed

from medjax.cli import main
from medjax.data import DataError
from medjax.data.preferences import fit_pair
from medjax.models.decoder import ModelDef
from medjax.train.loop import train
from medjax.train.objectives import PairwiseRewardObjective
from medjax.train.stages import PAIR_RECORDS

LABELS = ["honesty", "helpfulness", "compliance"]


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_fit_pair_keeps_each_side_at_least_half():
    assert fit_pair(10, 20, 64) == (10, 20)
    assert fit_pair(100, 100, 64) == (32, 32)
    assert fit_pair(10, 100, 64) == (10, 54)
    assert fit_pair(100, 10, 64) == (54, 10)


def test_packed_pairs_score_as_alone_and_loss_matches_hand_computation(world, tmp_path, make_config):
    cfg = stage_config(world, tmp_path / "run", "reward_model", "data.seq_len=512")
    assert cfg.model.score_labels == LABELS
    files = [str(world.files["preferences"])]
    rows = next(iter(PAIR_RECORDS.dataset(cfg, files, batch_size=2, train=False, process_index=0, process_count=1)))
    model_def = ModelDef(cfg.model)
    model = model_def.bind(model_def.init_params(jax.random.key(2)))
    objective = PairwiseRewardObjective(LABELS)
    batch = {k: jnp.asarray(v) for k, v in rows.items()}
    chosen, rejected, dim, valid = map(np.asarray, objective.pair_scores(model, batch))
    assert valid.sum() >= 4, "several pairs share each row"
    # Each response scored alone, at the start of a row of its own; the padding after it is
    # invisible to a causal model, and one padded width compiles once.
    alone_scores = jax.jit(lambda tokens, length: model.sequence_scores(tokens, length))
    margins, dims = [], []
    for b in range(2):
        for pair in sorted(set(rows["pair_ids"][b].tolist()) - {0}):
            assert valid[b, pair]
            for side, got in ((1, chosen[b, pair]), (2, rejected[b, pair])):
                tokens = rows["tokens"][b][(rows["pair_ids"][b] == pair) & (rows["segment_ids"][b] % 2 == side % 2)]
                d = int(rows["dimension"][b][rows["pair_ids"][b] == pair][0])
                padded = np.zeros((1, rows["tokens"].shape[1]), np.int32)
                padded[0, : len(tokens)] = tokens
                alone = alone_scores(jnp.asarray(padded), jnp.asarray([len(tokens)]))[0, d]
                assert got == pytest.approx(float(alone), abs=2e-5)
            margins.append(chosen[b, pair] - rejected[b, pair])
            dims.append(d)
    margins, dims = np.array(margins), np.array(dims)
    total, count, extra = jax.device_get(objective.loss(model, batch, jax.random.key(0)))
    assert count == len(margins)
    assert total == pytest.approx(np.sum(np.log1p(np.exp(-margins))), rel=1e-5)  # -log sigmoid(m)
    summary = jax.device_get(objective.summarize(count, extra))
    assert summary["accuracy"] == pytest.approx(np.mean(margins > 0))
    for i, label in enumerate(LABELS):
        if (dims == i).any():
            assert summary[f"accuracy_{label}"] == pytest.approx(np.mean(margins[dims == i] > 0))
        else:
            assert np.isnan(summary[f"accuracy_{label}"])


@pytest.fixture(scope="module")
def prefs(tmp_path_factory):
    """The demo-sized world's pairs (72 held out, 24 per dimension, about unseen conditions)."""
    from medjax.data import medworld

    files = medworld.generate(tmp_path_factory.mktemp("world40") / "data", seed=0, passages_per_condition=1)
    return files["preferences"], files["preferences_eval"]


@pytest.fixture(scope="module")
def trained_rm(world, pretrained_run, prefs, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("rm")
    result = train(
        stage_config(
            world,
            workdir,
            "reward_model",
            f"init_from={pretrained_run}",
            f"data.train_files=[{prefs[0]}]",
            f"data.eval_files=[{prefs[1]}]",
            "data.seq_len=256",
            "train.max_steps=60",
            "train.checkpoint_every=30",
            "train.eval_every=30",
            "train.eval_at_start=true",
            "train.eval_batches=8",
        )
    )
    return workdir, result


@pytest.mark.slow  # trains a reward model to convergence
def test_reward_model_learns_held_out_pairs(trained_rm):
    _, result = trained_rm
    first, last = result.eval_metrics[0], result.eval_metrics[60]
    assert last["eval_accuracy"] > 0.9, last
    assert last["eval_loss"] < first["eval_loss"]
    for label in LABELS:
        assert last[f"eval_accuracy_{label}"] >= 0.8, (label, last)


@pytest.mark.slow  # three training runs
def test_reward_model_resumes_exactly(world, pretrained_run, tmp_path):
    def cfg(workdir):
        return stage_config(world, workdir, "reward_model", f"init_from={pretrained_run}")

    straight_and_resumed(cfg, tmp_path)


@pytest.mark.slow  # needs the reward model trained to convergence
def test_scorer_and_cli_agree_with_training_eval(prefs, trained_rm, tmp_path, capsys):
    from medjax.rl.reward_scorer import RewardScorer

    workdir, result = trained_rm
    out = tmp_path / "scores.jsonl"
    assert main(["score-rm", "--model", str(workdir), "--input", str(prefs[1]), "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    pairs = [json.loads(line) for line in prefs[1].read_text().splitlines()]
    assert [r["id"] for r in rows] == [p["id"] for p in pairs]
    assert np.mean([r["correct"] for r in rows]) == pytest.approx(result.eval_metrics[60]["eval_accuracy"])
    assert "pairwise accuracy overall" in capsys.readouterr().out
    # One (prompt, response) at a time, in another batch shape, gives the same scores.
    scorer = RewardScorer(workdir, batch_size=1)
    single = scorer.score([pairs[0]["prompt"]], [pairs[0]["chosen"]])[0]
    np.testing.assert_allclose(single, [rows[0]["chosen_scores"][label] for label in LABELS], atol=1e-4)
    assert scorer.labels == LABELS
    # A safe refusal outranks recommending a contraindicated drug on compliance.
    compliance = next(p for p in pairs if p["dimension"] == "compliance")
    c, r = scorer.score([compliance["prompt"]] * 2, [compliance["chosen"], compliance["rejected"]])[:, 2]
    assert c > r


@pytest.mark.slow  # needs the reward model trained to convergence
def test_score_rm_bad_input_is_named(world, trained_rm, tmp_path, capsys):
    workdir, _ = trained_rm
    path = _write_jsonl(tmp_path / "in.jsonl", [{"prompt": "q", "response": "a"}, {"prompt": "q"}])
    assert main(["score-rm", "--model", str(workdir), "--input", str(path)]) == 2
    assert "in.jsonl:2: missing key 'response'" in capsys.readouterr().err


@pytest.mark.parametrize(
    "record,message",
    [
        (
            {"prompt": "q", "chosen": "a", "rejected": "b", "dimension": "kindness"},
            "dimension 'kindness' is not one of",
        ),
        ({"prompt": "q", "chosen": "a", "dimension": "honesty"}, "missing key 'rejected'"),
        ({"prompt": "q", "chosen": "", "rejected": "b", "dimension": "honesty"}, "'chosen' must be a non-empty string"),
        (
            {"prompt": [{"role": "assistant", "content": "x"}], "chosen": "a", "rejected": "b", "dimension": "honesty"},
            "the prompt's last turn is the assistant's",
        ),
    ],
)
def test_bad_preference_records_name_file_and_line(world, tmp_path, record, message):
    good = json.loads(world.files["preferences"].read_text().splitlines()[0])
    path = _write_jsonl(tmp_path / "prefs.jsonl", [good, record])
    with pytest.raises(DataError, match=rf"prefs.jsonl:2: .*{message}"):
        train(stage_config(world, tmp_path / "run", "reward_model", f"data.train_files=[{path}]"))


@pytest.mark.slow  # needs the reward model trained to convergence
def test_sft_cannot_start_from_a_reward_model(world, trained_rm, tmp_path):
    from medjax.convert import ConversionError

    workdir, _ = trained_rm
    with pytest.raises(ConversionError, match="score has no place"):
        train(stage_config(world, tmp_path / "run", "sft", f"init_from={workdir}"))
