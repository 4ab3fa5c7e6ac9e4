"""The rerank stage's scorer (medjax.rag.rerank.Reranker) on its own: batched, padded scores equal
transformers' forward pass on each pair alone, for a cross-encoder, a binary classifier and a chat
reward model (question as the user turn, passage as the reply, read at the named label); a
truncated pair keeps its end, where the score is read; a tokenizer without a pad token pads with
eos; a folder that is not a model is rejected naming it. (tests/test_rag.py covers the stage inside
RagIndex.search and the label-choice errors.)"""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from medjax.rag.corpus import RagError  # noqa: E402
from medjax.rag.rerank import Reranker  # noqa: E402

QUESTION = "which inhaled treatment relieves an asthma attack?"
PASSAGES = [
    "Salbutamol, a short-acting beta agonist, is inhaled to relieve acute bronchospasm.",
    "Sepsis",
    "Broad-spectrum antibiotics are started within the first hour when sepsis is suspected, after blood cultures.",
    "Inhaled corticosteroids control asthma over weeks; they do not relieve an attack.",
    "Metformin is the first-line drug for type 2 diabetes.",
]
LABELS = ["honesty", "helpfulness", "compliance"]


def _spread(model):
    """Every weight random at a scale that makes the pairs' scores differ clearly (HF's init gives
    a head so small that all pairs score alike, and a permuted order would not show)."""
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    model.eval()


def _distinct(scores):
    s = np.sort(scores)
    return bool(np.all(np.diff(s) > 1e-3))


@pytest.fixture(scope="module")
def cross_encoder(tmp_path_factory):
    """A one-layer BERT cross-encoder (random, seeded) with the bundled MiniLM tokenizer."""
    from medjax.rag.encoder import encoder_path

    built = {}

    def build(num_labels: int):
        if num_labels in built:
            return built[num_labels]
        torch.manual_seed(num_labels)
        tok = transformers.AutoTokenizer.from_pretrained(encoder_path("minilm"))
        model = transformers.BertForSequenceClassification(
            transformers.BertConfig(
                vocab_size=tok.vocab_size,
                hidden_size=32,
                num_hidden_layers=1,
                num_attention_heads=2,
                intermediate_size=64,
                num_labels=num_labels,
            )
        )
        _spread(model)
        out = tmp_path_factory.mktemp(f"bert{num_labels}")
        tok.save_pretrained(out)
        model.save_pretrained(out)
        built[num_labels] = out
        return out

    return build


@pytest.fixture(scope="module")
def chat_tokenizer(tmp_path_factory):
    from medjax.data.tokenizer import train_tokenizer

    texts = [QUESTION, *PASSAGES] * 4
    return train_tokenizer(texts, tmp_path_factory.mktemp("tok"), vocab_size=300)


def _reward_model(directory, tokenizer_dir, pad: bool):
    """A one-layer reward model with three labels beside the chat tokenizer: Qwen2 (whose
    tokenizer transformers pads with <|endoftext|>), or with ``pad`` False a Llama whose tokenizer
    files and model config name no pad token at all."""
    torch.manual_seed(3)
    common = dict(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=64,
        num_labels=3,
        id2label=dict(enumerate(LABELS)),
        label2id={x: i for i, x in enumerate(LABELS)},
    )
    directory.mkdir()
    if pad:
        tok = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
        model = transformers.Qwen2ForSequenceClassification(
            transformers.Qwen2Config(vocab_size=len(tok), pad_token_id=tok.pad_token_id, **common)
        )
        tok.save_pretrained(directory)
    else:
        for f in tokenizer_dir.iterdir():
            text = f.read_text()
            if f.name in ("tokenizer_config.json", "special_tokens_map.json"):
                config = json.loads(text)
                config.pop("pad_token", None)
                text = json.dumps(config)
            (directory / f.name).write_text(text)
        tok = transformers.AutoTokenizer.from_pretrained(directory)
        assert tok.pad_token is None
        model = transformers.LlamaForSequenceClassification(
            transformers.LlamaConfig(vocab_size=len(tok), pad_token_id=None, **common)
        )
        assert model.config.pad_token_id is None
    _spread(model)
    model.save_pretrained(directory)
    return directory


def _alone(model_dir, question, passages, column, chat, max_length=None):
    """transformers' forward pass on each pair by itself (no padding); a chat pair longer than
    ``max_length`` keeps its last ``max_length`` tokens."""
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    out = []
    with torch.inference_mode():
        for p in passages:
            if chat:
                text = tok.apply_chat_template(
                    [{"role": "user", "content": question}, {"role": "assistant", "content": p}], tokenize=False
                )
                ids = tok(text, add_special_tokens=False)["input_ids"]
                if max_length is not None:
                    ids = ids[-max_length:]
                batch = {"input_ids": torch.tensor([ids])}
            else:
                batch = tok(question, p, return_tensors="pt")
            out.append(float(model(**batch).logits[0, column]))
    return np.array(out, np.float32)


@pytest.mark.parametrize("batch_size", [1, 2, 16])
def test_cross_encoder_scores_equal_each_pair_alone(cross_encoder, batch_size):
    """One relevance logit: batches of any size (padded to their longest pair, the last one
    short) give each pair's own score."""
    model_dir = cross_encoder(1)
    reranker = Reranker(model_dir, batch_size=batch_size)
    assert not reranker.chat and reranker.column == 0
    scores = reranker.score(QUESTION, PASSAGES)
    assert scores.dtype == np.float32 and scores.shape == (len(PASSAGES),)
    expected = _alone(model_dir, QUESTION, PASSAGES, 0, chat=False)
    np.testing.assert_allclose(scores, expected, atol=1e-5, rtol=1e-5)
    assert _distinct(expected)  # a permutation of the scores would show
    assert reranker.score(QUESTION, []).shape == (0,)


def test_a_binary_classifier_scores_its_positive_class(cross_encoder):
    model_dir = cross_encoder(2)
    reranker = Reranker(model_dir, batch_size=2)
    assert reranker.column == 1
    expected = _alone(model_dir, QUESTION, PASSAGES, 1, chat=False)
    np.testing.assert_allclose(reranker.score(QUESTION, PASSAGES), expected, atol=1e-5, rtol=1e-5)
    # a named label picks its column
    named = Reranker(model_dir, label="LABEL_0", batch_size=2)
    np.testing.assert_allclose(
        named.score(QUESTION, PASSAGES), _alone(model_dir, QUESTION, PASSAGES, 0, chat=False), atol=1e-5, rtol=1e-5
    )


@pytest.mark.parametrize("pad", [True, False], ids=["pad-token", "no-pad-token"])
def test_chat_reward_model_reads_the_named_label_at_the_last_token(tmp_path, chat_tokenizer, pad):
    """The question is the user turn and the passage the reply, rendered by the chat template; a
    batch is right-padded and each score is the named label's at the pair's own last token. With no
    pad token anywhere, eos pads (transformers refuses a batch otherwise)."""
    model_dir = _reward_model(tmp_path / "rm", chat_tokenizer, pad)
    reranker = Reranker(model_dir, label="helpfulness", batch_size=3)
    assert reranker.chat and reranker.column == 1
    assert reranker.tokenizer.pad_token == "<|endoftext|>"
    assert reranker.model.config.pad_token_id == reranker.tokenizer.pad_token_id
    scores = reranker.score(QUESTION, PASSAGES)
    expected = _alone(model_dir, QUESTION, PASSAGES, 1, chat=True)
    np.testing.assert_allclose(scores, expected, atol=1e-5, rtol=1e-5)
    assert _distinct(expected)
    compliance = Reranker(model_dir, label="compliance", batch_size=8).score(QUESTION, PASSAGES)
    np.testing.assert_allclose(compliance, _alone(model_dir, QUESTION, PASSAGES, 2, chat=True), atol=1e-5, rtol=1e-5)


def test_a_truncated_chat_pair_keeps_its_end(tmp_path, chat_tokenizer):
    """Over max_length tokens, a chat pair loses its beginning (the score is read at the end, the
    template's closing tokens kept); pairs that fit are scored whole in the same batch."""
    model_dir = _reward_model(tmp_path / "rm", chat_tokenizer, pad=True)
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    passages = [PASSAGES[1], " ".join(PASSAGES * 3)]
    lengths = [
        len(
            tok.apply_chat_template(
                [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": p}], tokenize=True
            )["input_ids"]
        )
        for p in passages
    ]
    max_length = lengths[0] + 4
    assert lengths[0] < max_length < lengths[1] - 20
    reranker = Reranker(model_dir, label="honesty", batch_size=4, max_length=max_length)
    scores = reranker.score(QUESTION, passages)
    expected = _alone(model_dir, QUESTION, passages, 0, chat=True, max_length=max_length)
    np.testing.assert_allclose(scores, expected, atol=1e-5, rtol=1e-5)
    # the right end was kept: the cut pair's score is not that of its first max_length tokens
    text = tok.apply_chat_template(
        [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": passages[1]}], tokenize=False
    )
    head = tok(text, add_special_tokens=False)["input_ids"][:max_length]
    model = transformers.AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    with torch.inference_mode():
        head_score = float(model(input_ids=torch.tensor([head])).logits[0, 0])
    assert abs(float(scores[1]) - head_score) > 1e-4


def test_a_folder_that_is_not_a_model_is_named(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(
        RagError, match=rf"search.rerank={tmp_path}: not a Hugging Face model directory \(no config.json\)"
    ):
        Reranker(tmp_path)
    with pytest.raises(RagError, match=r"search.rerank=.*nowhere: not a Hugging Face model directory"):
        Reranker(tmp_path / "nowhere")


def test_a_label_is_needed_for_several_and_must_exist(tmp_path, chat_tokenizer, cross_encoder):
    """Only what tests/test_rag.py does not reach: the error names the directory and lists the labels."""
    model_dir = _reward_model(tmp_path / "rm", chat_tokenizer, pad=True)
    with pytest.raises(RagError, match=rf"^{model_dir} scores 3 labels \(honesty, helpfulness, compliance\)"):
        Reranker(model_dir)
    with pytest.raises(RagError, match=rf"'relevance' is not a label of {cross_encoder(1)} \(LABEL_0\)"):
        Reranker(cross_encoder(1), label="relevance")
