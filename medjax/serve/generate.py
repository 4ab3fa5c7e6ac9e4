"""`medjax generate`: text in, text out, from a medjax checkpoint, a Hugging Face directory or a GGUF file."""

from __future__ import annotations

import os
from pathlib import Path

import jax

from medjax.convert import ConversionError
from medjax.convert.loading import WeightSource, gguf_tokenizer_dir, load_params_streaming, open_source
from medjax.data.chat import ChatTemplate, special_tokens
from medjax.data.tokenizer import EOS_TOKEN, IM_END, load_tokenizer
from medjax.models.config import ModelConfig
from medjax.models.decoder import ModelDef
from medjax.models.sampler import Generation, Sampler, SamplingConfig


def open_model(path: str | os.PathLike) -> WeightSource:
    """The weights (nothing read yet) and tokenizer folder of a model to run: a medjax checkpoint
    or model directory, a Hugging Face directory or a GGUF file (its tokenizer rebuilt from the
    file's metadata into a folder that lives as long as this process)."""
    source = open_source(path)
    if source.kind == "gguf":
        source.tokenizer_dir = gguf_tokenizer_dir(source)
    elif source.kind == "hf" and source.tokenizer_dir is not None:
        from medjax.data.tokenizer_agreement import warn_if_disagreeing

        warn_if_disagreeing(source.path, hint="medjax reads tokenizer.json; a vLLM server for this directory would "
                            "tokenize with transformers")
    return source


def load_model(path: str | os.PathLike, shardings: dict | None = None) -> tuple[ModelConfig, dict, Path | None]:
    """(model config, params, tokenizer folder) of open_model's ``path``; the params are read
    tensor by tensor straight onto the default device (or into ``shardings``), so loading holds
    the weights about once (medjax.convert.loading)."""
    source = open_model(path)
    params, _ = load_params_streaming(source, shardings)
    return source.model, params, source.tokenizer_dir


def stop_token_ids(tok, model_cfg: ModelConfig, tokenizer_dir: Path | None = None) -> tuple[int, ...]:
    """Where generation ends: the tokenizer's end-of-text and end-of-turn tokens, the eos token its
    tokenizer_config.json names and the model's eos."""
    named = special_tokens(tokenizer_dir).get("eos_token") if tokenizer_dir is not None else None
    stops = (tok.token_to_id(EOS_TOKEN), tok.token_to_id(IM_END), model_cfg.eos_token_id,
             tok.token_to_id(named) if named else None)
    return tuple(sorted({t for t in stops if t is not None}))


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
    cfg = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                         stop_token_ids=stop_token_ids(tok, model_cfg, tokenizer_dir))
    model = ModelDef(model_cfg)
    params, _ = load_params_streaming(source, abstract=model.abstract_params())
    out: Generation = Sampler(model).generate(params, ids, cfg, jax.random.key(seed))
    return [tok.decode(seq, skip_special_tokens=True) for seq in out.sequences()]
