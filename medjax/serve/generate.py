"""`medjax generate`: text in, text out, from a medjax checkpoint or a Hugging Face directory."""

from __future__ import annotations

import os
from pathlib import Path

import jax

from medjax.convert import ConversionError
from medjax.convert.checkpoints import load_params, resolve_checkpoint
from medjax.convert.hf_import import read_hf
from medjax.data.chat import ChatTemplate, special_tokens
from medjax.data.tokenizer import EOS_TOKEN, IM_END, load_tokenizer
from medjax.models.config import ModelConfig
from medjax.models.decoder import ModelDef
from medjax.models.sampler import Generation, Sampler, SamplingConfig


def load_model(path: str | os.PathLike) -> tuple[ModelConfig, dict, Path | None]:
    """(model config, params, tokenizer folder) from a medjax checkpoint or an HF directory."""
    p = Path(path)
    if (p / "config.json").is_file() and not (p / "model.json").is_file():
        model, params = read_hf(p)
        if not (p / "tokenizer.json").is_file():
            return model, params, None
        from medjax.data.tokenizer_agreement import warn_if_disagreeing

        warn_if_disagreeing(p, hint="medjax reads tokenizer.json; a vLLM server for this directory would "
                            "tokenize with transformers")
        return model, params, p
    ref = resolve_checkpoint(p)
    return ref.model, load_params(ref), ref.tokenizer_dir


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
    model_cfg, params, tokenizer_dir = load_model(model_path)
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
    out: Generation = Sampler(ModelDef(model_cfg)).generate(params, ids, cfg, jax.random.key(seed))
    return [tok.decode(seq, skip_special_tokens=True) for seq in out.sequences()]
