"""GGUF import on small files written here with the gguf library's own writer (llama.cpp's layout:
GGML tensor names, q/k rows permuted for llama, Q8_0 quantisation, the tokenizer in metadata),
checked against transformers' GGUF loading; bad files are errors that name what is wrong."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

from medjax.convert import ConversionError  # noqa: E402
from medjax.convert.gguf_import import import_gguf  # noqa: E402
from medjax.convert.hf_export import export_hf  # noqa: E402
from medjax.data.tokenizer import load_tokenizer  # noqa: E402

HF_TO_GGUF = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
Q8 = gguf.GGMLQuantizationType.Q8_0


def _gguf_name(hf_name):
    if hf_name in HF_TO_GGUF:
        return HF_TO_GGUF[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    return f"blk.{layer}.{HF_TO_GGUF[rest]}"


def write_gguf(path, family, tokenizer_dir, *, pre=None, seed=0, int_tensor=None):
    """A random 2-layer model of ``family`` written as llama.cpp's converter would, with its
    matrices quantised to Q8_0 and ``tokenizer_dir``'s tokenizer in the metadata."""
    tok = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.get)
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    specials = {t["content"] for t in tok["added_tokens"]}
    heads, kv = 4, 2
    config = dict(
        vocab_size=len(tokens),
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        tie_word_embeddings=family == "qwen2",
    )
    cls = transformers.Qwen2Config if family == "qwen2" else transformers.LlamaConfig
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cls(**config), dtype=torch.float32)
    w = gguf.GGUFWriter(str(path), family)
    w.add_block_count(2)
    w.add_context_length(256)
    w.add_embedding_length(64)
    w.add_feed_forward_length(96)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre or ("qwen2" if family == "qwen2" else "gpt-2"))
    w.add_token_list(tokens)
    w.add_token_types([3 if t in specials else 1 for t in tokens])
    w.add_token_merges(merges)
    w.add_eos_token_id(vocab["<|endoftext|>"])
    w.add_chat_template(json.loads((tokenizer_dir / "tokenizer_config.json").read_text())["chat_template"])
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and config["tie_word_embeddings"]:
            continue
        x = t.detach().numpy().astype(np.float32)
        if family == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            n = heads if "q_proj" in name else kv  # llama.cpp's rope row permutation
            x = x.reshape(n, 2, x.shape[0] // n // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)
        if int_tensor == name:
            w.add_tensor(_gguf_name(name), x.astype(np.int32), raw_dtype=gguf.GGMLQuantizationType.I32)
        elif x.ndim == 2:
            q = gguf.quantize(x, Q8)
            w.add_tensor(_gguf_name(name), q, raw_shape=q.shape, raw_dtype=Q8)
        else:
            w.add_tensor(_gguf_name(name), x)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_gguf_import_equals_transformers_gguf_loading(world, tmp_path, family):
    path = write_gguf(tmp_path / "m.gguf", family, world.tokenizer)
    model_dir = import_gguf(path, tmp_path / "mj")
    hf_dir = export_hf(model_dir, tmp_path / "hf", dtype="float32")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32)
    ours = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    a, b = theirs.state_dict(), ours.state_dict()
    assert set(a) == set(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    # The tokenizer travels through GGUF metadata and comes back splitting as it was trained.
    original, rebuilt = load_tokenizer(world.tokenizer), load_tokenizer(model_dir / "tokenizer")
    text = "A 54-year-old patient, ＨｂＡ１ｃ 7.2%; café <|im_start|>user\nhi<|im_end|>"
    if family == "qwen2":
        assert rebuilt.encode(text).ids == original.encode(text).ids
    assert (model_dir / "tokenizer" / "chat_template.jinja").read_text() == json.loads(
        (world.tokenizer / "tokenizer_config.json").read_text()
    )["chat_template"]


def test_an_unreadable_quantisation_type_is_named(world, tmp_path):
    path = write_gguf(tmp_path / "m.gguf", "qwen2", world.tokenizer, int_tensor="model.layers.1.mlp.up_proj.weight")
    with pytest.raises(ConversionError, match=r"blk\.1\.ffn_up\.weight has quantisation type I32"):
        import_gguf(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_an_unknown_pre_tokenizer_is_named(world, tmp_path):
    path = write_gguf(tmp_path / "m.gguf", "qwen2", world.tokenizer, pre="mystery-bpe")
    with pytest.raises(ConversionError, match="tokenizer.ggml.pre 'mystery-bpe' is not known"):
        import_gguf(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_damaged_file_is_named(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 40)
    with pytest.raises(ConversionError, match="broken.gguf: not a readable GGUF file"):
        import_gguf(bad, tmp_path / "out")
