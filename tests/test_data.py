import json
import re

import numpy as np
import pytest

from medjax.config import DataConfig
from medjax.data import DataError
from medjax.data.pipeline import pretrain_dataset
from medjax.data.sources import JsonlSource, write_token_records
from medjax.data.tokenizer import load_tokenizer


def data_cfg(world, **kw) -> DataConfig:
    return DataConfig(train_files=[str(world.files["pretrain"])], tokenizer=str(world.tokenizer), seq_len=32, **kw)


def take(ds, n):
    it = iter(ds)
    return [next(it) for _ in range(n)]


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n\n{"text": "also fine"}\n{"text": broken\n')
    src = JsonlSource([path], required_keys=["text"])
    assert len(src) == 3 and src[1]["text"] == "also fine"
    with pytest.raises(DataError, match=rf"{path}:4: malformed JSON"):
        src[2]
    path.write_text('{"text": "fine"}\n{"body": "no text"}\n')
    with pytest.raises(DataError, match=rf"{path}:2: missing key 'text'"):
        JsonlSource([path], required_keys=["text"])[1]


def test_missing_paths_are_named(world, tmp_path):
    with pytest.raises(DataError, match="tokenizer not found: .*nowhere"):
        load_tokenizer(tmp_path / "nowhere")
    cfg = data_cfg(world)
    with pytest.raises(DataError, match="data file not found: .*missing.jsonl"):
        pretrain_dataset(cfg, files=[str(tmp_path / "missing.jsonl")], seq_len=32, batch_size=2)
    bad_tok = DataConfig(train_files=cfg.train_files, tokenizer=str(tmp_path / "tok"), seq_len=32)
    with pytest.raises(DataError, match="tokenizer not found"):
        take(pretrain_dataset(bad_tok, files=bad_tok.train_files, seq_len=32, batch_size=2), 1)


def test_packing_rows_are_next_token_pairs_within_documents(world):
    cfg = data_cfg(world, shuffle=False)
    tok = load_tokenizer(world.tokenizer)
    first_doc = json.loads(open(world.files["pretrain"]).readline())["text"]
    ids = tok.encode(first_doc).ids + [tok.token_to_id("<|endoftext|>")]
    (batch,) = take(pretrain_dataset(cfg, files=cfg.train_files, seq_len=32, batch_size=4), 1)
    assert batch["tokens"].shape == (4, 32) and batch["tokens"].dtype == np.int32
    # The first row starts with the first document, and targets are inputs shifted by one.
    np.testing.assert_array_equal(batch["tokens"][0], ids[:32])
    np.testing.assert_array_equal(batch["targets"][0], ids[1:33])
    for row in range(4):
        seg, pos = batch["segment_ids"][row], batch["positions"][row]
        starts = np.flatnonzero(np.diff(seg) != 0) + 1
        for s in starts:  # positions restart at every new document in the row
            if seg[s] != 0:
                assert pos[s] == 0
        np.testing.assert_array_equal(batch["loss_mask"][row], (seg != 0).astype(np.float32))


def test_shuffle_is_seeded(world):
    first = lambda seed: take(
        pretrain_dataset(
            data_cfg(world, seed=seed),
            files=[str(world.files["pretrain"])],  # noqa: E731
            seq_len=32,
            batch_size=2,
        ),
        3,
    )
    a, b, c = first(1), first(1), first(2)
    assert all((x["tokens"] == y["tokens"]).all() for x, y in zip(a, b))
    assert any((x["tokens"] != z["tokens"]).any() for x, z in zip(a, c))


def test_each_process_reads_a_disjoint_share(world):
    cfg = data_cfg(world, shuffle=False, num_epochs=1)
    shards = [
        np.concatenate(
            [
                b["tokens"].ravel()
                for b in pretrain_dataset(
                    cfg, files=cfg.train_files, seq_len=32, batch_size=1, train=False, process_index=i, process_count=2
                )
            ]
        )
        for i in range(2)
    ]
    full = np.concatenate(
        [
            b["tokens"].ravel()
            for b in pretrain_dataset(cfg, files=cfg.train_files, seq_len=32, batch_size=1, train=False)
        ]
    )
    assert abs(len(shards[0]) - len(shards[1])) < 0.2 * len(full)
    assert len(shards[0]) + len(shards[1]) == pytest.approx(len(full), rel=0.02)
    assert not np.array_equal(shards[0][:64], shards[1][:64])


def test_iterator_state_restores_exactly(world):
    cfg = data_cfg(world)
    ds = pretrain_dataset(cfg, files=cfg.train_files, seq_len=32, batch_size=4)
    it = iter(ds)
    for _ in range(5):
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(3)]
    resumed = iter(ds)
    resumed.set_state(state)
    for want in expected:
        got = next(resumed)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])


def test_arrayrecord_token_shards(world, tmp_path):
    docs = [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16]]
    path = tmp_path / "tokens.arrayrecord"
    assert write_token_records(path, docs) == 3
    assert not list(tmp_path.glob(".*tmp"))
    cfg = DataConfig(train_files=[str(path)], format="arrayrecord", seq_len=4, shuffle=False)
    batches = list(pretrain_dataset(cfg, files=cfg.train_files, seq_len=4, batch_size=1, train=False))
    inputs = np.concatenate([b["tokens"][0][b["segment_ids"][0] != 0] for b in batches])
    targets = np.concatenate([b["targets"][0][b["segment_ids"][0] != 0] for b in batches])
    np.testing.assert_array_equal(inputs, [5, 6, 7, 9, 10, 12, 13, 14, 15])
    np.testing.assert_array_equal(targets, [6, 7, 8, 10, 11, 13, 14, 15, 16])


def test_a_damaged_arrayrecord_shard_is_named_with_its_record(tmp_path):
    """Bytes overwritten inside a chunk (a bad disk, a half-copied object): reading is refused
    naming the shard and the record; a shard whose footer is gone is refused when opened."""
    from medjax.data import DataError
    from medjax.data.sources import TokenRecordSource

    good, bad, cut = tmp_path / "a.arrayrecord", tmp_path / "b.arrayrecord", tmp_path / "c.arrayrecord"
    write_token_records(good, [list(range(i, i + 50)) for i in range(200)])
    data = bytearray(good.read_bytes())
    data[4100:4116] = b"\xff" * 16  # inside the chunk that holds records 27 and on
    bad.write_bytes(bytes(data))
    cut.write_bytes(bytes(data[: len(data) // 2]))
    source = TokenRecordSource([good, bad])
    assert source[199]["ids"][0] == 199 and source[226]["ids"][0] == 26
    with pytest.raises(DataError, match=rf"^{re.escape(str(bad))}: record 27: unreadable \(Corrupted Riegeli"):
        source[227]
    with pytest.raises(DataError, match=rf"^{re.escape(str(cut))}: not a readable ArrayRecord file"):
        TokenRecordSource([good, cut])


def test_chatml_formatter_equals_the_shipped_template(world):
    jinja2 = pytest.importorskip("jinja2")
    from medjax.data.tokenizer import format_chatml

    template = json.loads((world.tokenizer / "tokenizer_config.json").read_text())["chat_template"]
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Dose?"},
        {"role": "assistant", "content": "See a clinician."},
        {"role": "user", "content": "Why?"},
    ]
    for prompt in (True, False):
        rendered = jinja2.Template(template).render(messages=messages, add_generation_prompt=prompt)
        assert format_chatml(messages, prompt) == rendered
