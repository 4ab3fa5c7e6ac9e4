"""`medjax eval` on a trained tiny model: log-likelihood parity between a medjax checkpoint, its
Hugging Face export and transformers; generative scoring; output files; bad input."""

import functools
import json
from pathlib import Path

import numpy as np
import pytest

from medjax.cli import main
from medjax.eval.backends import LocalModel
from medjax.eval.runner import EvalConfig, evaluate, summary_path
from medjax.tasks import ItemError
from medjax.tasks.answers import extract_for_item
from medjax.tasks.readers import read_benchmark

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

LIMIT = 12


@pytest.fixture(scope="module")
def trained(world, tmp_path_factory):
    from conftest import tiny_config

    from medjax.convert.hf_export import export_hf
    from medjax.train.loop import train

    root = tmp_path_factory.mktemp("eval")
    cfg = tiny_config(world, root / "run", "train.max_steps=8", "train.checkpoint_every=8")
    train(cfg)
    export_hf(root / "run", root / "hf", dtype="float32")
    return root


def transformers_logprob(hf_dir, context, continuation):
    """log p(continuation | context) from transformers, tokenised the way LocalModel splits it."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    ctx = tok.encode(context).ids
    whole = tok.encode(context + continuation).ids
    assert whole[: len(ctx)] == ctx
    with torch.no_grad():
        logits = model(torch.tensor([whole])).logits[0]
    logp = torch.log_softmax(logits, -1)
    return float(sum(logp[i - 1, whole[i]] for i in range(len(ctx), len(whole))))


@pytest.mark.parametrize("choices", ["letters", "texts"])
def test_checkpoint_export_and_transformers_agree(world, trained, tmp_path, choices):
    cfg = EvalConfig(choices=choices, limit=LIMIT, batch_size=4)
    bench = world.files["exam"]
    ours = evaluate(str(trained / "run"), bench, tmp_path / "ckpt.jsonl", cfg, quiet=True)
    hf = evaluate(str(trained / "hf"), bench, tmp_path / "hf.jsonl", cfg, quiet=True)
    rows_a = [json.loads(x) for x in (tmp_path / "ckpt.jsonl").read_text().splitlines()]
    rows_b = [json.loads(x) for x in (tmp_path / "hf.jsonl").read_text().splitlines()]
    assert len(rows_a) == len(rows_b) == LIMIT
    assert [r["prediction"] for r in rows_a] == [r["prediction"] for r in rows_b]
    for a, b in zip(rows_a, rows_b):
        np.testing.assert_allclose(list(a["logprobs"].values()), list(b["logprobs"].values()), atol=1e-3)
    assert ours["accuracy"] == hf["accuracy"] == np.mean([r["correct"] for r in rows_a])
    # Against transformers on the exported weights, for the first item's options.
    from medjax.tasks.prompts import PromptConfig, answer_continuation, build_prompt

    item = read_benchmark(bench, limit=1).items[0]
    # Option texts are scored after a prompt that does not list them (cloze), as the runner does;
    # a model this briefly trained barely conditions on the prompt, so only a tight tolerance
    # tells the two prompts apart.
    prompt = build_prompt(item, cfg=PromptConfig(list_options=choices == "letters"))
    for letter, text in item.options.items():
        cont = answer_continuation(item, letter) if choices == "letters" else answer_continuation(item, text=text)
        ref = transformers_logprob(trained / "hf", prompt, cont)
        assert rows_a[0]["logprobs"][letter] == pytest.approx(ref, abs=1e-4)


def test_options_packed_after_one_context_score_as_each_alone(trained):
    """One row holds the context once and every option after it, each in its own attention segment
    (positions restarting after the context): each option's log-likelihood equals transformers'
    for context + that option alone, for option letters (no tokens added), options of different
    lengths and an empty one; and equals the one-row-per-option path taken when the packed row
    passes the model's context."""
    import dataclasses

    from medjax.eval.backends import LoglikelihoodRequest

    model = LocalModel(trained / "run", batch_size=4)
    context = "The first-line drug for the condition is"
    requests = [
        LoglikelihoodRequest(context, [" A", " B", " C"]),
        LoglikelihoodRequest(context, [" Velvaxia", " a drug given twice daily with food", "", " B and more"]),
    ]
    rows = model._rows(1, *model._encoded(requests)[1], model.model_cfg.max_position_embeddings)
    assert len(rows) == 1 and max(rows[0].segments) == 4 and rows[0].spans[2][3] == 0
    packed = model.loglikelihood(requests)
    for req, scores in zip(requests, packed):
        for cont, ours in zip(req.continuations, scores):
            ref = transformers_logprob(trained / "hf", context, cont) if cont else 0.0
            assert ours == pytest.approx(ref, abs=1e-4), cont
    # a context that holds the longest option alone, not all four packed
    limit = len(model.tok.encode(context).ids) + max(len(model.tok.encode(c).ids) for c in requests[1].continuations)
    model.model_cfg = dataclasses.replace(model.model_cfg, max_position_embeddings=limit)
    assert len(model._rows(1, *model._encoded(requests)[1], limit)) == 4
    np.testing.assert_allclose(np.concatenate(model.loglikelihood(requests)), np.concatenate(packed), atol=1e-4)


def test_templated_prompts_get_one_bos(trained, tmp_path):
    """A tokenizer that adds a bos (Llama 3's) and a chat template that writes one: a templated
    prompt is encoded without adding another, so it scores and generates as the bare prompt with
    the tokenizer's bos does; the same text not marked templated gets a second bos and differs."""
    import shutil

    from tokenizers import Tokenizer, processors

    from medjax.eval.backends import GenerationSettings, LoglikelihoodRequest

    hf = tmp_path / "hf"
    shutil.copytree(trained / "hf", hf)
    tok = Tokenizer.from_file(str(hf / "tokenizer.json"))
    bos = "<|im_start|>"
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, tok.token_to_id(bos))]
    )
    tok.save(str(hf / "tokenizer.json"))
    model = LocalModel(hf, batch_size=4)
    context, conts = "The first-line drug for the condition is", [" A", " B", " C and more words"]
    bare = model.loglikelihood([LoglikelihoodRequest(context, conts)])[0]
    templated = model.loglikelihood([LoglikelihoodRequest(bos + context, conts, templated=True)])[0]
    doubled = model.loglikelihood([LoglikelihoodRequest(bos + context, conts)])[0]
    np.testing.assert_allclose(templated, bare, atol=1e-5)
    assert np.abs(np.subtract(doubled, bare)).max() > 1e-3
    settings = GenerationSettings(max_new_tokens=8)
    assert model.generate([bos + context], GenerationSettings(max_new_tokens=8, templated=True)) == model.generate(
        [context], settings
    )


def test_loglikelihood_in_logit_chunks_equals_whole_logits(trained, monkeypatch):
    """Chunks of 24 read slots over rows that read 32 (the last chunk padded) give what whole
    float32 logits give, for packed options and for option letters."""
    from medjax.eval.backends import LoglikelihoodRequest

    monkeypatch.setattr(LocalModel, "LOGITS_CHUNK", 24)
    model = LocalModel(trained / "run", batch_size=4)
    req = [
        LoglikelihoodRequest("The first-line drug for the condition is", [" A", " B and more words " * 6]),
        LoglikelihoodRequest("Velvaxia " * 20, [" presents with fever", " C"]),
        LoglikelihoodRequest("Velvaxia is", [" A", " B", " C"]),
    ]
    import jax
    import jax.numpy as jnp

    from medjax.models.attention import shared_prefix_mask

    whole = model.model_def

    @functools.partial(jax.jit, static_argnames="shared")
    def reference(params, tokens, positions, segments, where, targets, shared):
        net = whole.bind(params)
        hidden = net.hidden_states(tokens, positions, mask=shared_prefix_mask(segments) if shared else None)
        logp = jax.nn.log_softmax(net.logits(hidden), axis=-1)
        at = jnp.take_along_axis(logp, where[..., None], axis=1)
        return jnp.take_along_axis(at, targets[..., None], axis=-1)[..., 0]

    ours = np.concatenate(model.loglikelihood(req))
    model._score = reference
    np.testing.assert_allclose(ours, np.concatenate(model.loglikelihood(req)), atol=1e-4)
    assert model.model_cfg.logits_chunk == 0  # the loaded model keeps its own setting


def test_generative_mode_uses_the_shared_extractor(world, trained, tmp_path):
    cfg = EvalConfig(mode="generate", limit=6, max_new_tokens=12, batch_size=4)
    summary = evaluate(str(trained / "run"), world.files["exam"], tmp_path / "gen.jsonl", cfg, quiet=True)
    rows = [json.loads(x) for x in (tmp_path / "gen.jsonl").read_text().splitlines()]
    items = read_benchmark(world.files["exam"], limit=6).items
    for row, item in zip(rows, items):
        assert row["prediction"] == extract_for_item(row["completion"], item).prediction
        assert row["correct"] == (row["prediction"] == item.gold)
    again = evaluate(str(trained / "run"), world.files["exam"], tmp_path / "gen2.jsonl", cfg, quiet=True)
    assert (tmp_path / "gen2.jsonl").read_text() == (tmp_path / "gen.jsonl").read_text()  # greedy: deterministic
    assert summary["n"] == again["n"] == 6


def test_outputs_summary_and_chart(world, trained, tmp_path, capsys):
    out = tmp_path / "res" / "exam.jsonl"
    rc = main(
        [
            "eval",
            "--model",
            str(trained / "hf"),
            "--benchmark",
            str(world.files["exam"]),
            "--out",
            str(out),
            "--limit",
            "16",
            "--shots",
            "1",
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "overall" in printed and "items/s" in printed and "95% CI" in printed
    summary = json.loads(summary_path(out).read_text())
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert summary["n"] == len(rows) == 16
    assert summary["accuracy"] == pytest.approx(np.mean([r["correct"] for r in rows]))
    assert summary["ci95"][0] <= summary["accuracy"] <= summary["ci95"][1]
    assert sum(g["n"] for g in summary["by_subject"].values()) == 16
    assert (tmp_path / "res" / "exam.png").stat().st_size > 1000
    assert {"id", "prediction", "gold", "correct", "logprobs"} <= set(rows[0])


def test_bad_benchmark_leaves_earlier_output_alone(world, trained, tmp_path, capsys):
    out = tmp_path / "keep.jsonl"
    out.write_text("earlier results\n")
    bad = tmp_path / "bad.jsonl"
    good = json.loads(world.files["exam"].read_text().splitlines()[0])
    bad.write_text(json.dumps(good) + "\n" + json.dumps({**good, "id": "other", "answer_idx": "F"}) + "\n")
    with pytest.raises(ItemError, match=r"bad\.jsonl:2: answer letter\(s\) F not among the options ABCD"):
        evaluate(str(trained / "hf"), bad, out, EvalConfig(), quiet=True)
    rc = main(["eval", "--model", str(trained / "hf"), "--benchmark", str(bad), "--out", str(out)])
    assert rc == 2 and "bad.jsonl:2" in capsys.readouterr().err
    assert out.read_text() == "earlier results\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "keep.jsonl"]


def test_eval_ngrams_cli(world, tmp_path):
    out = tmp_path / "grams.txt"
    assert main(["eval", "ngrams", "--benchmark", str(world.files["exam"]), "--n", "8", "--out", str(out)]) == 0
    lines = out.read_text().splitlines()
    assert lines == sorted(set(lines)) and all(len(g.split()) == 8 for g in lines)
    item = read_benchmark(world.files["exam"]).items[0]
    from medjax.tasks.ngrams import ngram_tokens

    assert " ".join(ngram_tokens(item.question)[:8]) in set(lines)


LM_EVAL_TASK = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    train: {data}
test_split: train
output_type: multiple_choice
doc_to_text: "{{{{query}}}}"
doc_to_choice: choices
doc_to_target: gold
target_delimiter: "{delimiter}"
metric_list:
  - metric: acc
  - metric: acc_norm
  - metric: acc_bytes
"""


@pytest.mark.slow  # lm-evaluation-harness as the peer
def test_loglikelihood_agrees_with_lm_evaluation_harness(world, trained, tmp_path, monkeypatch):
    """The same HF model and items through lm-eval's `multiple_choice` scoring (hf backend, local
    task files, medjax's rendered prompts and answer separator): per-option log-likelihoods equal
    medjax's, and each of medjax's predictions equals lm-eval's for the metric it names: letters and
    --text-norm none = acc, chars = acc_norm, bytes = acc_bytes. English (the world's exam, separator
    " ") and Chinese (real CPQExam items, no separator, where a character is three bytes)."""
    pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed (test extra)")
    import lm_eval
    from lm_eval.tasks import TaskManager

    from medjax.tasks.prompts import TEMPLATES, PromptConfig, build_prompt

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))
    hf = trained / "hf"
    cpqexam = Path(__file__).resolve().parents[2] / "shared/benchmarks/cpqexam/cpqexam.jsonl"
    zh = (cpqexam, 40) if cpqexam.is_file() else (Path(__file__).parent / "data/benchmarks/cmexam.csv", None)
    benches = {"en": (world.files["exam"], 24), "zh": zh}
    runs = [("letters", "none"), ("texts", "none"), ("texts", "chars"), ("texts", "bytes")]
    tasks, ours = {}, {}
    for lang, (bench, limit) in benches.items():
        items = read_benchmark(bench, limit=limit).items
        assert {i.language for i in items} == {lang}
        for choices in ("letters", "texts"):
            name = f"medjax_{lang}_{choices}"
            data = tmp_path / f"{name}.jsonl"
            with data.open("w") as f:
                for item in items:
                    query = build_prompt(item, cfg=PromptConfig(list_options=choices == "letters"))
                    options = list(item.options) if choices == "letters" else list(item.options.values())
                    f.write(json.dumps({"query": query, "choices": options, "gold": 0}, ensure_ascii=False) + "\n")
            (tmp_path / f"{name}.yaml").write_text(
                LM_EVAL_TASK.format(name=name, data=data, delimiter=TEMPLATES[lang].letter_sep)
            )
            tasks[(lang, choices)] = name
        for choices, norm in runs:
            evaluate(
                str(hf),
                bench,
                tmp_path / f"{lang}-{choices}-{norm}.jsonl",
                EvalConfig(choices=choices, text_norm=norm, limit=limit, batch_size=8),
                quiet=True,
            )
            ours[(lang, choices, norm)] = [
                json.loads(x) for x in (tmp_path / f"{lang}-{choices}-{norm}.jsonl").read_text().splitlines()
            ]

    results = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={hf},dtype=float32",
        tasks=list(tasks.values()),
        task_manager=TaskManager(include_path=str(tmp_path)),
        device="cpu",
        batch_size=8,
        log_samples=True,
        verbosity="ERROR",
    )
    metric = {"none": "acc", "chars": "acc_norm", "bytes": "acc_bytes"}
    for (lang, choices, norm), rows in ours.items():
        samples = sorted(results["samples"][tasks[(lang, choices)]], key=lambda s: s["doc_id"])
        assert len(samples) == len(rows)
        for row, sample in zip(rows, samples):
            theirs = [float(r[0]) for r in sample["filtered_resps"]]
            np.testing.assert_allclose(list(row["logprobs"].values()), theirs, atol=1e-4, rtol=0)
            # Gold is index 0 in these files, so lm-eval's metric says whether its pick was option A.
            ours_a, theirs_a = row["prediction"] == next(iter(row["logprobs"])), sample[metric[norm]] == 1.0
            assert ours_a == theirs_a or _near_tie(theirs, sample, norm), (lang, choices, norm, row["id"])
    en = [
        (a["prediction"], b["prediction"])
        for a, b in zip(ours[("en", "texts", "chars")], ours[("en", "texts", "bytes")])
    ]
    assert all(a == b for a, b in en)  # ASCII: a character is a byte, and neither length counts the separator


def _near_tie(lls, sample, norm) -> bool:
    """Two options within float noise of each other under the metric's normalisation (torch and XLA
    round differently, so such an item may go either way)."""
    texts = sample["doc"]["choices"]
    size = {"none": lambda t: 1, "chars": len, "bytes": lambda t: len(t.encode())}[norm]
    scores = sorted((ll / max(size(t), 1) for ll, t in zip(lls, texts)), reverse=True)
    return len(scores) > 1 and scores[0] - scores[1] < 1e-4


@pytest.mark.slow  # evaluation on two meshes
def test_sharded_model_evaluates_as_one_device_does(world, trained, tmp_path):
    """--mesh fsdp=4,tensor=2 on the 8-device CPU mesh: params really split by the training rule
    table, batches laid over fsdp; log-likelihoods, predictions and greedy generations equal the
    one-device model's."""
    import jax

    from medjax.eval.backends import GenerationSettings, LoglikelihoodRequest
    from medjax.tasks.prompts import PromptConfig, answer_continuation, build_prompt

    assert jax.device_count() == 8
    one = LocalModel(str(trained / "hf"), batch_size=4)
    sharded = LocalModel(str(trained / "hf"), batch_size=3, mesh="fsdp=4,tensor=2")
    assert sharded.batch_size == 4  # rounded up to a multiple of data x fsdp
    leaves = jax.tree.leaves(sharded.params)
    specs = {str(x.sharding.spec) for x in leaves}
    assert any("fsdp" in s for s in specs) and any("tensor" in s for s in specs), specs
    biggest = max(leaves, key=lambda x: x.size)
    assert biggest.addressable_shards[0].data.size * 4 <= biggest.size

    items = read_benchmark(world.files["exam"], limit=LIMIT).items
    requests = [LoglikelihoodRequest(build_prompt(i), [answer_continuation(i, k) for k in i.letters]) for i in items]
    requests += [
        LoglikelihoodRequest(
            build_prompt(i, cfg=PromptConfig(list_options=False)),
            [answer_continuation(i, text=t) for t in i.options.values()],
        )
        for i in items
    ]
    np.testing.assert_allclose(
        np.concatenate(sharded.loglikelihood(requests)), np.concatenate(one.loglikelihood(requests)), atol=1e-4, rtol=0
    )
    settings = GenerationSettings(max_new_tokens=12)
    prompts = [r.context for r in requests[:6]]
    assert sharded.generate(prompts, settings) == one.generate(prompts, settings)

    a = evaluate(str(trained / "hf"), world.files["exam"], tmp_path / "one.jsonl", EvalConfig(limit=LIMIT), quiet=True)
    b = evaluate(
        str(trained / "hf"),
        world.files["exam"],
        tmp_path / "mesh.jsonl",
        EvalConfig(limit=LIMIT, mesh="fsdp=4,tensor=2"),
        quiet=True,
    )
    assert a["accuracy"] == b["accuracy"]
    with pytest.raises(ValueError, match=r"--mesh 'fsdp4': expected AXIS=SIZE pairs over data, fsdp, tensor"):
        LocalModel(str(trained / "hf"), mesh="fsdp4")
    context = one.model_cfg.max_position_embeddings
    with pytest.raises(ValueError, match=rf"--max-new-tokens {context} leaves no room .* {context}-token context"):
        one.generate(prompts[:1], GenerationSettings(max_new_tokens=context))


def test_plan_batches_pads_to_a_compiled_width_only_when_cheaper_than_a_compile():
    """Longest rows first; a batch's width is its longest row's rounded up to the multiple, or a
    wider one already compiled when padding its rows there costs fewer tokens than a compile; the
    model's context caps every width; every row is scored exactly once."""
    from medjax.eval.backends import plan_batches

    lengths = [100, 30, 250, 90, 240, 35]
    rows = lambda width: 2  # noqa: E731

    def widths(compile_tokens, multiple=16, limit=4096):
        plan = plan_batches(lengths, limit, rows, compile_tokens, multiple)
        assert sorted(i for batch, _ in plan for i in batch) == list(range(len(lengths)))
        assert all(min(max(lengths[i] for i in batch), limit) <= width for batch, width in plan)
        return [([lengths[i] for i in batch], width) for batch, width in plan]

    # A compile dearer than any padding (a small model): one program for the whole benchmark.
    assert widths(1e9) == [([250, 240], 256), ([100, 90], 256), ([35, 30], 256)]
    # A compile cheaper than any padding (a large model): each batch at its own rounded width.
    assert widths(0) == [([250, 240], 256), ([100, 90], 112), ([35, 30], 48)]
    # In between: 2 rows x (112 - 48) = 128 padded tokens beat a compile worth 200, not one worth 100.
    assert widths(200) == [([250, 240], 256), ([100, 90], 112), ([35, 30], 112)]
    assert widths(100) == [([250, 240], 256), ([100, 90], 112), ([35, 30], 48)]
    # The context caps the width; the multiple sets the rounding.
    assert widths(0, limit=200)[0][1] == 200
    assert widths(0, multiple=128) == [([250, 240], 256), ([100, 90], 128), ([35, 30], 128)]
    # Rows per batch follow the width (max_batch_tokens): wide batches hold fewer rows.
    plan = plan_batches([300, 290, 280, 20, 10], 4096, lambda w: 1 if w > 256 else 4, 0)
    assert [len(batch) for batch, _ in plan] == [1, 1, 1, 2]
