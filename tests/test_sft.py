"""SFT stage: assistant-only loss masks from the chat template, packing that changes nothing,
init_from every kind of source, exact resume, counted overlong and bad records."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import stage_config, straight_and_resumed

from medjax.data import DataError
from medjax.data.chat import ChatTemplate, tokenize_chat
from medjax.data.examples import DROPPED, TRUNCATED
from medjax.data.sft import chat_example
from medjax.data.tokenizer import load_tokenizer
from medjax.models.decoder import ModelDef
from medjax.train.loop import train
from medjax.train.stages import SFT_RECORDS

CONVERSATION = [
    {"role": "system", "content": "You are a careful clinician."},
    {"role": "user", "content": "What treats Velmora fever?"},
    {"role": "assistant", "content": "Osmkexin is the first-line drug."},
    {"role": "user", "content": "Anything to avoid?"},
    {"role": "assistant", "content": "Avoid Tormumab."},
]


def _write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def test_loss_mask_covers_exactly_the_assistant_turns(world):
    tok = load_tokenizer(world.tokenizer)
    ids, mask = tokenize_chat(tok, ChatTemplate(world.tokenizer), CONVERSATION)
    trained = tok.decode(ids[mask == 1].tolist(), skip_special_tokens=False)
    assert trained == "Osmkexin is the first-line drug.<|im_end|>\nAvoid Tormumab.<|im_end|>\n"
    context = tok.decode(ids[mask == 0].tolist(), skip_special_tokens=False)
    assert "What treats Velmora fever?" in context and "careful clinician" in context
    assert "Osmkexin" not in context
    # The whole sequence is exactly the template's rendering (same text transformers would build).
    assert tok.decode(ids.tolist(), skip_special_tokens=False) == ChatTemplate(world.tokenizer).render(CONVERSATION)
    example, status = chat_example(ids, mask, seq_len=len(ids) + 5, overlong="truncate")
    assert status == "ok"
    np.testing.assert_array_equal(example["targets"], ids[1:])
    np.testing.assert_array_equal(example["loss_mask"], mask[1:])  # loss where the *target* is the assistant's


def test_overlong_rules():
    ids, mask = np.arange(50, dtype=np.int32), np.r_[np.zeros(10), np.ones(40)].astype(np.float32)
    example, status = chat_example(ids, mask, seq_len=20, overlong="truncate")
    assert status == TRUNCATED and len(example["tokens"]) == 20
    np.testing.assert_array_equal(example["tokens"], ids[:20])
    assert chat_example(ids, mask, seq_len=20, overlong="drop") == (None, DROPPED)
    # Truncated down to the prompt alone: nothing left to learn, so dropped (and counted).
    late = np.r_[np.zeros(45), np.ones(5)].astype(np.float32)
    assert chat_example(ids, late, seq_len=20, overlong="truncate") == (None, DROPPED)


def test_packed_rows_equal_each_conversation_alone(world, tmp_path, make_config):
    records = [json.loads(line) for line in world.files["sft"].read_text().splitlines()]
    # Free-form conversations (the lettered items are long enough to fill a row alone).
    records = [r for r in records if "multiple-choice" not in r["messages"][0]["content"]][:6]
    path = _write_jsonl(tmp_path / "chat.jsonl", records)
    cfg = make_config(tmp_path / "run", "stage=sft", f"data.train_files=[{path}]", "data.seq_len=256")
    row = next(iter(SFT_RECORDS.dataset(cfg, [str(path)], batch_size=1, train=False, process_index=0, process_count=1)))
    segments = sorted(set(row["segment_ids"][0].tolist()) - {0})
    assert len(segments) >= 2, "several conversations share the row"
    model = ModelDef(cfg.model).bind(ModelDef(cfg.model).init_params(jax.random.key(1)))
    packed = model(jnp.asarray(row["tokens"]), jnp.asarray(row["positions"]), jnp.asarray(row["segment_ids"]))
    ce = optax.softmax_cross_entropy_with_integer_labels(packed, jnp.asarray(row["targets"]))[0]
    total_alone = 0.0
    # Each conversation alone, at the front of a row of the same width (one compiled program): under
    # the causal mask its logits cannot depend on the filler after it.
    unpacked = jax.jit(lambda tokens: model(tokens))
    for seg in segments:
        where = row["segment_ids"][0] == seg
        n = int(where.sum())
        tokens = np.zeros_like(row["tokens"])
        tokens[0, :n] = row["tokens"][0][where]
        alone = unpacked(jnp.asarray(tokens))[:, :n]  # no packing: positions 0..n-1, one segment
        np.testing.assert_allclose(np.asarray(packed[0][where]), np.asarray(alone[0]), atol=2e-5)
        ce_alone = optax.softmax_cross_entropy_with_integer_labels(alone[0], jnp.asarray(row["targets"][0][where]))
        total_alone += float((ce_alone * row["loss_mask"][0][where]).sum())
    assert float((ce * row["loss_mask"][0]).sum()) == pytest.approx(total_alone, rel=1e-5)
    assert row["loss_mask"][0][row["segment_ids"][0] == 0].sum() == 0  # no loss on padding


@pytest.mark.slow  # three training runs
def test_sft_from_pretrained_resumes_exactly(world, pretrained_run, tmp_path):
    def cfg(workdir):
        return stage_config(
            world,
            workdir,
            "sft",
            f"init_from={pretrained_run}",
            "train.eval_every=3",
            "train.eval_at_start=true",
            "train.eval_batches=2",
        )

    straight, second = straight_and_resumed(cfg, tmp_path)
    assert sorted(straight.eval_losses) == [0, 3, 6]
    assert second.eval_losses[6] == straight.eval_losses[6]
    assert straight.eval_losses[6] < straight.eval_losses[0]
    rows = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    convs = [json.loads(line)["messages"] for line in world.files["sft"].read_text().splitlines()]
    counts = _overlong_counts(world, convs, 128)
    assert counts["truncated"] > 0
    assert rows[0] == {
        "step": 0,
        "data_records": len(convs),
        "data_used": counts["used"],
        "data_truncated": counts["truncated"],
        "data_dropped": counts["dropped"],
        "data_skipped": 0,
    }


def _overlong_counts(world, convs, seq_len):
    """Used / truncated / dropped under data.overlong=truncate, counted here from the token ids and
    masks: a conversation longer than seq_len + 1 tokens is cut there, and dropped when no
    assistant token is left to learn."""
    tok, template = load_tokenizer(world.tokenizer), ChatTemplate(world.tokenizer)
    counts = {"used": 0, "truncated": 0, "dropped": 0}
    for c in convs:
        ids, mask = tokenize_chat(tok, template, c)
        if len(ids) - 1 <= seq_len:
            counts["used"] += 1
        elif np.asarray(mask[1 : seq_len + 1]).any():
            counts["used"] += 1
            counts["truncated"] += 1
        else:
            counts["dropped"] += 1
    return counts


@pytest.mark.slow  # three trainings from three sources
def test_init_from_run_model_dir_and_hf_dir_agree(world, pretrained_run, tmp_path):
    """Step-0 eval loss is the same whichever form the starting weights come in."""
    from medjax.convert.hf_export import export_hf
    from medjax.convert.hf_import import import_hf

    hf = export_hf(pretrained_run, tmp_path / "hf", dtype="float32")
    model_dir = import_hf(hf, tmp_path / "imported")
    losses = []
    for source in (pretrained_run, model_dir, hf):
        result = train(
            stage_config(
                world,
                tmp_path / f"run{len(losses)}",
                "sft",
                f"init_from={source}",
                "train.max_steps=1",
                "train.eval_at_start=true",
                "train.eval_batches=2",
                "data.tokenizer=",
            )
        )  # the tokenizer comes from the source
        losses.append(result.eval_losses[0])
    assert losses[0] == pytest.approx(losses[1], abs=1e-6) and losses[0] == pytest.approx(losses[2], abs=1e-6)
    fresh = train(
        stage_config(
            world, tmp_path / "fresh", "sft", "train.max_steps=1", "train.eval_at_start=true", "train.eval_batches=2"
        )
    )
    assert losses[0] < fresh.eval_losses[0]  # the pretrained weights were really loaded


BAD = [
    ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant turn"),
    (
        {"messages": [{"role": "doctor", "content": "hi"}, {"role": "assistant", "content": "x"}]},
        "unknown role 'doctor'",
    ),
    ({"conversation": []}, "missing key 'messages'"),
    ({"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}, "has no 'content'"),
    ('{"messages": [', "malformed JSON"),
]


@pytest.mark.parametrize("record,message", BAD, ids=[m for _, m in BAD])
def test_bad_conversation_names_file_and_line(world, tmp_path, record, message):
    good = json.loads(world.files["sft"].read_text().splitlines()[0])
    path = _write_jsonl(tmp_path / "chat.jsonl", [good, good, record, good])
    with pytest.raises(DataError, match=rf"chat.jsonl:3: .*{message}"):
        train(stage_config(world, tmp_path / "run", "sft", f"data.train_files=[{path}]"))
    assert not (tmp_path / "run" / "checkpoints").exists() or not any((tmp_path / "run" / "checkpoints").iterdir())


def test_bad_conversations_skipped_and_counted(world, tmp_path):
    good = [json.loads(line) for line in world.files["sft"].read_text().splitlines()[:20]]
    path = _write_jsonl(tmp_path / "chat.jsonl", good[:10] + [r for r, _ in BAD] + good[10:])
    result = train(
        stage_config(
            world, tmp_path / "run", "sft", f"data.train_files=[{path}]", "data.skip_bad=true", "train.max_steps=2"
        )
    )
    assert result.step == 2
    used = _overlong_counts(world, [g["messages"] for g in good], 128)["used"]
    assert result.data_stats["data_skipped"] == len(BAD) and result.data_stats["data_used"] == used
