"""seqio as a pretraining source: a Vocabulary over the project's tokenizer, Tasks and Mixtures from
config, the same Grain packing as files, exact resume by position.

TensorFlow is imported inside the tests, never at module level: pytest imports every test module
first (test_vllm imports vLLM then), and TensorFlow imported before vLLM aborts the process."""

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import straight_and_resumed, tiny_config  # noqa: E402

from medjax.config import load_config, to_dict  # noqa: E402
from medjax.data import DataError  # noqa: E402
from medjax.data.pipeline import pretrain_dataset  # noqa: E402
from medjax.data.tokenizer import load_tokenizer  # noqa: E402

# find_spec, not importorskip: importing seqio at collection would import TensorFlow then.
pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("seqio") is None, reason="the tf extra is not installed (pip install -e '.[tf]')"
)


def _mixture(world, tmp_path, *overrides, rates=(0.7, 0.3)):
    """Two JSONL tasks over the world's texts, mixed at ``rates``."""
    general = tmp_path / "general.jsonl"
    if not general.exists():
        texts = [json.loads(line)["text"] for line in Path(world.files["pretrain"]).read_text().splitlines()]
        general.write_text("".join(json.dumps({"body": " ".join(reversed(t.split()))}) + "\n" for t in texts))
    tasks = (
        f"[{{name: medical, files: [{world.files['pretrain']}], eval_files: [{world.files['pretrain_eval']}]}}, "
        f"{{name: general, files: [{general}], eval_files: [{general}], text_key: body}}]"
    )
    return tiny_config(
        world,
        tmp_path / "run",
        "data.source=seqio",
        "data.train_files=[]",
        "data.eval_files=[]",
        "data.seqio.name=medjax_test_mix",
        f"data.seqio.tasks={tasks}",
        f"data.seqio.mixture={{medical: {rates[0]}, general: {rates[1]}}}",
        *overrides,
    )


def test_the_vocabulary_is_the_tokenizer(world):
    import tensorflow as tf

    from medjax.data.seqio_source import vocabulary

    tok = load_tokenizer(world.tokenizer)
    vocab = vocabulary(str(world.tokenizer))
    assert vocab is vocabulary(str(world.tokenizer)) and vocab.vocab_size == tok.get_vocab_size()
    assert vocab.eos_id == tok.token_to_id("<|endoftext|>")
    texts = [json.loads(line)["text"] for line in Path(world.files["pretrain"]).read_text().splitlines()[:20]]
    texts += ["高血压患者首选哪种药物？", "mixed 中文 and English, with punctuation: (a) 5 mg/kg!", ""]
    for text in texts:
        ids = tok.encode(text).ids
        assert list(vocab.encode(text)) == ids
        assert vocab.decode(ids) == tok.decode(ids)
        assert vocab.encode_tf(tf.constant(text)).numpy().tolist() == ids
        if ids:
            assert vocab.decode_tf(tf.constant(ids, tf.int32)).numpy().decode() == tok.decode(ids)
    assert vocab.decode(tok.encode("chest pain").ids + [vocab.eos_id, 7, 8]) == "chest pain"  # seqio stops at EOS


@pytest.mark.slow  # thousands of seqio examples
def test_mixture_rates_are_realised(world, tmp_path, capsys):
    """`medjax data inspect` counts each task's share of the first N documents: within 2 points of
    the configured rates, for two different blends."""
    from medjax.cli import main
    from medjax.data.inspect import inspect_data

    for rates in ((0.7, 0.3), (0.2, 0.8)):
        cfg = _mixture(world, tmp_path, rates=rates)
        got = inspect_data(cfg, n=2000, show=2, say=lambda _: None)
        assert got["n"] == 2000 and got["configured"] == pytest.approx({"general": rates[1], "medical": rates[0]})
        for task, share in got["configured"].items():
            assert abs(got["realised"][task] - share) < 0.02, (task, got)
    config = tmp_path / "mix.yaml"
    config.write_text(yaml.safe_dump({k: v for k, v in to_dict(cfg).items() if k in ("stage", "workdir", "data")}))
    assert main(["data", "inspect", str(config), "--n", "500", "--show", "2"]) == 0
    out = capsys.readouterr().out
    assert "seqio mixture medjax_test_mix: 500 documents read" in out and ("[general]" in out or "[medical]" in out)
    assert out.count("\n") >= 6 and "configured" in out


def test_a_mixture_by_authority_grade(world, tmp_path):
    """One curated-style corpus split into tasks by authority grade and weighted: every document of
    a task has that task's grades, and the shares follow the rates."""
    from medjax.data import seqio_source

    corpus = tmp_path / "graded.jsonl"
    texts = [json.loads(line)["text"] for line in Path(world.files["pretrain"]).read_text().splitlines()]
    grades = {t: "ABCDE"[i % 5] for i, t in enumerate(texts)}
    corpus.write_text("".join(json.dumps({"text": t, "authority": g}) + "\n" for t, g in grades.items()))
    tasks = (
        f"[{{name: medjax_test_high, files: [{corpus}], authorities: [A, B]}}, "
        f"{{name: medjax_test_low, files: [{corpus}], authorities: [D, E]}}]"
    )
    cfg = tiny_config(
        world,
        tmp_path / "run",
        "data.source=seqio",
        "data.seqio.name=medjax_test_by_grade",
        f"data.seqio.tasks={tasks}",
        "data.seqio.mixture={medjax_test_high: 0.8, medjax_test_low: 0.2}",
    )
    provider = seqio_source.register(cfg.data.seqio, cfg.data.tokenizer)
    realised, seen = seqio_source.realised_rates(provider, 1500, seed=0)
    assert abs(realised["medjax_test_high"] - 0.8) < 0.02 and abs(realised["medjax_test_low"] - 0.2) < 0.02
    tok = load_tokenizer(world.tokenizer)
    for example in seen[:300]:
        text = tok.decode(example["targets"][:-1].tolist())  # EOS appended by seqio
        assert grades[text] in ({"A", "B"} if example["task"] == "medjax_test_high" else {"D", "E"})
    bad = tiny_config(
        world,
        tmp_path / "run",
        "data.source=seqio",
        "data.seqio.name=medjax_test_none",
        f"data.seqio.tasks=[{{name: medjax_test_none, files: [{corpus}], authorities: [Z]}}]",
    )
    with pytest.raises(DataError, match="medjax_test_none: no train document has an authority grade in \\['Z'\\]"):
        next(iter(pretrain_dataset(bad.data, files=[], seq_len=32, batch_size=4)))


def test_seqio_and_files_give_identical_packed_batches(world, tmp_path):
    """One JSONL task through seqio (tokenized by the Vocabulary, EOS appended by seqio) and the same
    file through the files pipeline: in file order, over two data streams, batch for batch equal."""
    files = load_config(
        None,
        [
            f"workdir={tmp_path}",
            f"data.train_files=[{world.files['pretrain']}]",
            f"data.tokenizer={world.tokenizer}",
            "data.shuffle=false",
            "data.num_epochs=1",
        ],
    )
    seq = load_config(
        None,
        [
            f"workdir={tmp_path}",
            "data.source=seqio",
            f"data.tokenizer={world.tokenizer}",
            "data.shuffle=false",
            "data.num_epochs=1",
            "data.seqio.name=medjax_test_one",
            f"data.seqio.tasks=[{{name: medjax_test_one, files: [{world.files['pretrain']}]}}]",
        ],
    )
    for stream in (0, 1):

        def rows(cfg):
            return list(
                pretrain_dataset(
                    cfg.data,
                    files=cfg.data.train_files,
                    seq_len=32,
                    batch_size=4,
                    process_index=stream,
                    process_count=2,
                )
            )

        want, got = rows(files), rows(seq)
        assert len(want) == len(got) > 5
        for a, b in zip(want, got):
            for key in a:
                np.testing.assert_array_equal(a[key], b[key])


@pytest.mark.slow  # three training runs
def test_pretraining_from_a_seqio_mixture_resumes_exactly(world, tmp_path):
    """2N steps straight equal N, a stop, a resume and N more (the iterator's position travels in
    Grain's state in the Orbax checkpoint); evaluation reads the mixture's validation split."""
    straight, _ = straight_and_resumed(
        lambda workdir, *o: _mixture(
            world,
            tmp_path,
            f"workdir={workdir}",
            "data.seqio.eval_split=validation",
            "train.eval_every=3",
            "train.eval_batches=2",
            *o,
        ),
        tmp_path,
    )
    assert len(straight.losses) == 6 and sorted(straight.eval_losses) == [3, 6]


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["data.seqio.mixture={medical: 0.7, general: 0}"], "the rate of 'general' is 0.0; rates must be positive"),
        (["data.seqio.mixture={medical: 0.7, general: -1}"], "the rate of 'general' is -1.0; rates must be positive"),
        (["data.seqio.mixture={medical: 0.7, surgery: 0.3}"], "no seqio Task named 'surgery'"),
        (["data.seqio.name=medical"], "is a Task's name; name the Mixture differently"),
        (
            ["data.seqio.mixture={}", "data.seqio.name=nowhere_mix"],
            "'nowhere_mix' is not a registered seqio Task or Mixture \\(registered: .*medical",
        ),
        (["data.seqio.modules=[no_such_registry]"], "data.seqio.modules: cannot import 'no_such_registry'"),
        (
            [
                "data.seqio.tasks=[{name: medjax_test_both, files: [a.jsonl], tfds_name: x}]",
                "data.seqio.mixture={}",
                "data.seqio.name=medjax_test_both",
            ],
            "give either files \\(JSONL\\) or tfds_name",
        ),
    ],
)
def test_bad_seqio_settings_are_named(world, tmp_path, overrides, message):
    cfg = _mixture(world, tmp_path, *overrides)
    with pytest.raises(DataError, match=message):
        next(iter(pretrain_dataset(cfg.data, files=[], seq_len=32, batch_size=4)))


def test_a_split_the_tasks_lack_is_named_and_the_extra_is_named_when_missing(world, tmp_path, monkeypatch):
    cfg = _mixture(world, tmp_path, "data.seqio.eval_split=test")
    with pytest.raises(DataError, match="split 'test' of medjax_test_mix: not one of its splits"):
        pretrain_dataset(cfg.data, files=[], seq_len=32, batch_size=4, train=False)
    monkeypatch.setitem(sys.modules, "seqio", None)  # as on an install without the tf extra
    with pytest.raises(DataError, match=r"needs seqio and TensorFlow: pip install -e '\.\[tf\]'"):
        pretrain_dataset(cfg.data, files=[], seq_len=32, batch_size=4)
