"""`medjax generate`: text in, text out, from a medjax checkpoint, a Hugging Face directory or a GGUF file."""

from __future__ import annotations

import os

import jax

from medjax.convert import ConversionError
from medjax.convert.loading import load_params_streaming, open_model
from medjax.data.chat import ChatTemplate, stop_token_ids
from medjax.data.tokenizer import load_tokenizer
from medjax.models.decoder import ModelDef
from medjax.models.sampler import Generation, Sampler, SamplingConfig


def generate_text(
    model_path: str | os.PathLike,
    prompts: list[str],
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int = 0,
    chat: bool = False,
) -> list[str]:
    source = open_model(model_path)
    model_cfg, tokenizer_dir = source.model, source.tokenizer_dir
    if tokenizer_dir is None:
        raise ConversionError(f"{model_path}: no tokenizer found beside the weights")
    tok = load_tokenizer(tokenizer_dir)
    if chat:
        template = ChatTemplate(tokenizer_dir)  # the model's own, as transformers and vLLM render it
        prompts = [template.render([{"role": "user", "content": p}], add_generation_prompt=True) for p in prompts]
    # A chat rendering already holds its special tokens (transformers tokenizes it with
    # add_special_tokens=False); a raw prompt gets what the tokenizer adds (e.g. a bos).
    ids = [tok.encode(p, add_special_tokens=not chat).ids for p in prompts]
    cfg = SamplingConfig(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        stop_token_ids=stop_token_ids(tok, model_cfg, tokenizer_dir),
    )
    model = ModelDef(model_cfg)
    params, _ = load_params_streaming(source, abstract=model.abstract_params())
    out: Generation = Sampler(model).generate(params, ids, cfg, jax.random.key(seed))
    return [tok.decode(seq, skip_special_tokens=True) for seq in out.sequences()]
