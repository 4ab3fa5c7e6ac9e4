"""TFDS as a pretraining source: a curated corpus written as a TFDS dataset (ArrayRecord files),
read through TFDS's random-access data source into the same Grain packing as ArrayRecord shards."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tensorflow_datasets", reason="the tf extra is not installed (pip install -e '.[tf]')")

from conftest import straight_and_resumed, tiny_config  # noqa: E402

from medjax.config import ConfigError, DataConfig, TfdsConfig, load_config  # noqa: E402
from medjax.data import DataError  # noqa: E402
from medjax.data.pipeline import pretrain_dataset  # noqa: E402
from medjax.data.sources import TfdsSource, TokenRecordSource, write_token_records  # noqa: E402
from medjax.data.tokenizer import eos_id, load_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def corpus(world, tmp_path_factory):
    """A curation output (clean/ JSONL and report.json, as `medjax curate` writes them) over the
    world's passages, built into a TFDS dataset by `medjax data tfds-build`."""
    from medjax.cli import main

    tensorflow_before = "tensorflow" in sys.modules
    root = tmp_path_factory.mktemp("tfds")
    curated = root / "curated"
    (curated / "clean").mkdir(parents=True)
    passages = [json.loads(line) for line in Path(world.files["pretrain"]).read_text().splitlines()]
    with open(curated / "clean" / "docs-00000-of-00001.jsonl", "w") as f:
        for i, p in enumerate(passages):
            f.write(
                json.dumps(
                    {
                        "id": p.get("id", f"p{i}"),
                        "text": p["text"],
                        "source": "textbook" if i % 3 else "forum",
                        "authority": "A" if i % 3 else "E",
                        "lang": "en",
                        "url": "",
                        "file": "raw/passages.jsonl",
                        "line": i + 1,
                    }
                )
                + "\n"
            )
    shards = {"tokenizer": str(world.tokenizer), "add_eos": True, "eval_fraction": 0.0, "eval_sources": ["forum"]}
    (curated / "report.json").write_text(json.dumps({"kept": {"docs": len(passages)}, "config": {"shards": shards}}))
    data_dir = root / "data"
    assert main(["data", "tfds-build", str(curated), "--data-dir", str(data_dir)]) == 0
    assert tensorflow_before or "tensorflow" not in sys.modules  # nor does building
    return curated, data_dir, passages


def _tfds(data_dir, **kw) -> DataConfig:
    return DataConfig(source="tfds", tfds=TfdsConfig(name="medjax_corpus", data_dir=str(data_dir), **kw), seq_len=32)


def test_tfds_alone_loads_the_built_corpus(corpus, world, tmp_path, capsys):
    """A fresh interpreter with only tensorflow_datasets (no medjax code) loads the dataset: splits,
    features, the card and each example's fields."""
    from medjax.cli import main

    curated, data_dir, passages = corpus
    script = (
        "import json, sys\nimport tensorflow_datasets as tfds\n"
        "b = tfds.builder('medjax_corpus', data_dir=sys.argv[1])\n"
        "src = tfds.data_source('medjax_corpus', split='validation', data_dir=sys.argv[1])\n"
        "ex = src[0]\n"
        "print(json.dumps({'builder': type(b).__name__, 'features': sorted(b.info.features.keys()),\n"
        "  'splits': {k: v.num_examples for k, v in b.info.splits.items()}, 'card': b.info.description,\n"
        "  'file_format': str(b.info.file_format), 'tokenizer': b.info.metadata['tokenizer'],\n"
        "  'first': {k: (v.decode() if isinstance(v, bytes) else v.tolist()) for k, v in ex.items()},\n"
        "  'tensorflow_imported': 'tensorflow' in sys.modules,\n"
        "  'medjax_imported': any(m.split('.')[0] in ('medjax', 'data_pipelines') for m in sys.modules)}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, str(data_dir)], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    held_out = [p for i, p in enumerate(passages) if i % 3 == 0]  # source "forum": shards.eval_sources
    assert got["builder"] == "ReadOnlyBuilder" and not got["medjax_imported"]
    assert not got["tensorflow_imported"]  # reading needs no TensorFlow (which must not precede vLLM in a process)
    assert got["splits"] == {"train": len(passages) - len(held_out), "validation": len(held_out)}
    assert got["features"] == ["authority", "id", "lang", "provenance", "source", "text", "tokens"]
    assert "curated by `medjax curate`" in got["card"] and "array_record" in got["file_format"].lower()
    assert got["tokenizer"] == str(world.tokenizer)
    first = got["first"]
    tok = load_tokenizer(world.tokenizer)
    assert first["text"] == held_out[0]["text"] and first["source"] == "forum" and first["authority"] == "E"
    assert first["tokens"] == tok.encode(held_out[0]["text"]).ids + [eos_id(tok)]
    assert first["provenance"] == "raw/passages.jsonl:1"

    # A second build into the same place is refused and leaves the dataset whole; --overwrite rebuilds.
    capsys.readouterr()
    assert main(["data", "tfds-build", str(curated), "--data-dir", str(data_dir)]) == 2
    assert "exists (pass --overwrite to rebuild it)" in capsys.readouterr().err
    assert len(TfdsSource("medjax_corpus", str(data_dir), "train", "tokens")) == got["splits"]["train"]
    assert main(["data", "tfds-build", str(curated), "--data-dir", str(data_dir), "--overwrite"]) == 0
    assert sorted(p.name for p in data_dir.iterdir()) == ["medjax_corpus"]  # no staging folders left
    assert main(["data", "tfds-build", str(tmp_path), "--data-dir", str(tmp_path / "x")]) == 2
    assert "is not a `medjax curate` output" in capsys.readouterr().err


def test_tfds_and_arrayrecord_give_identical_packed_batches(corpus, world, tmp_path):
    """The same documents as ArrayRecord token shards and as the TFDS dataset (by token ids, or by
    text tokenized on the fly): shuffled, sharded over two streams and packed, batch for batch equal."""
    _, data_dir, _ = corpus
    source = TfdsSource("medjax_corpus", str(data_dir), "train", "tokens")
    shard = tmp_path / "train.array_record"
    write_token_records(shard, (source[i]["ids"] for i in range(len(source))))
    files = DataConfig(format="arrayrecord", train_files=[str(shard)], seq_len=32)
    by_ids = _tfds(data_dir)
    by_text = _tfds(data_dir, feature="text")
    by_text.tokenizer = str(world.tokenizer)
    for stream in (0, 1):

        def batches(cfg):
            ds = pretrain_dataset(
                cfg, files=cfg.train_files, seq_len=32, batch_size=4, process_index=stream, process_count=2
            )
            it = iter(ds)
            return [next(it) for _ in range(12)]  # past one epoch of this stream's documents

        want = batches(files)
        for cfg in (by_ids, by_text):
            for a, b in zip(want, batches(cfg)):
                for key in a:
                    np.testing.assert_array_equal(a[key], b[key])
    assert len(TokenRecordSource([shard])) == len(source)


@pytest.mark.slow  # three training runs
def test_pretraining_from_tfds_resumes_exactly(corpus, world, tmp_path):
    """2N steps straight equal N, a stop, a resume and N more: Grain's iterator state over the TFDS
    source travels in the Orbax checkpoint; evaluation reads the validation split."""
    _, data_dir, _ = corpus

    def make(workdir, *overrides):
        return tiny_config(
            world,
            workdir,
            "data.source=tfds",
            "data.tfds.name=medjax_corpus",
            f"data.tfds.data_dir={data_dir}",
            "data.tfds.eval_split=validation",
            "data.train_files=[]",
            "data.eval_files=[]",
            "train.eval_every=3",
            "train.eval_batches=2",
            *overrides,
        )

    straight, _ = straight_and_resumed(make, tmp_path)
    assert len(straight.losses) == 6 and sorted(straight.eval_losses) == [3, 6]
    assert all(np.isfinite(v) for v in straight.eval_losses.values())


def test_bad_tfds_settings_are_named(corpus, tmp_path, monkeypatch):
    _, data_dir, _ = corpus
    cases = [
        (dict(data_dir=str(tmp_path / "absent")), f"data.tfds.data_dir does not exist: {tmp_path / 'absent'}"),
        (dict(name="pubmed_corpus"), "no such dataset in .* \\(datasets there: medjax_corpus\\)"),
        (dict(split="test"), "split 'test' of medjax_corpus.*\\(splits: train, validation\\)"),
        (
            dict(feature="body"),
            "feature 'body' is not a feature of medjax_corpus \\(features: authority, id, lang, "
            "provenance, source, text, tokens\\)",
        ),
        (dict(feature="authority", split="train"), None),  # text: fine (tokenized on the fly)
    ]
    for change, message in cases:
        t = {"name": "medjax_corpus", "data_dir": str(data_dir), "split": "train", "feature": "tokens", **change}
        if message is None:
            assert TfdsSource(**t).kind == "text"
            continue
        with pytest.raises(DataError, match=message):
            TfdsSource(**t)
    from medjax.train.loop import train

    with pytest.raises(
        ConfigError,
        match=r"key 'data.source' is 'tfds', which feeds plain-text stages \(pretrain\); "
        "stage sft reads files",
    ):
        train(load_config(None, [f"workdir={tmp_path / 'sft'}", "stage=sft", "data.source=tfds"]))
    assert not (tmp_path / "sft").exists()  # refused before anything was written
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # as on an install without the tf extra
    with pytest.raises(DataError, match=r"needs tensorflow-datasets: pip install -e '\.\[tf\]'"):
        TfdsSource("medjax_corpus", str(data_dir), "train", "tokens")


def test_medjax_works_without_the_tf_extra(tmp_path):
    """With TensorFlow, TFDS and seqio unimportable (an install without the tf extra), medjax and its
    training loop import, and asking for the TFDS build names the extra to install."""
    script = (
        "import sys\n"
        "for name in ('tensorflow', 'tensorflow_datasets', 'seqio'):\n"
        "    sys.modules[name] = None\n"
        "import medjax.cli, medjax.train.loop, medjax.data.pipeline, medjax.demo\n"
        "sys.exit(medjax.cli.main(['data', 'tfds-build', sys.argv[1], '--data-dir', sys.argv[1]]))\n"
    )
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "tfds-build needs tensorflow-datasets (tensorflow_datasets is missing): pip install -e '.[tf]'" in out.stderr
