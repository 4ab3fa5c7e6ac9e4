"""`medjax generate|serve`: text from the in-JAX sampler, and vLLM's server over an exported
directory; registered on medjax's parser."""

from __future__ import annotations

import argparse


def _cmd_generate(args: argparse.Namespace) -> int:
    from medjax.serve.generate import generate_text

    for text in generate_text(
        args.model,
        args.prompt,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        chat=args.chat,
    ):
        print(text)
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from medjax.serve.vllm_server import serve

    adapters = {}
    for spec in args.lora:
        name, sep, directory = spec.partition("=")
        if not sep or not name or not directory:
            from medjax.config import ConfigError

            raise ConfigError(f"medjax serve: --lora takes NAME=DIR (a PEFT adapter directory), got {spec!r}")
        adapters[name] = directory
    return serve(args.hf_dir, host=args.host, port=args.port, extra=args.vllm_args, adapters=adapters)


def add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate text with the in-JAX KV-cache sampler")
    p.add_argument("--model", required=True, help="medjax checkpoint or Hugging Face directory")
    p.add_argument("--prompt", required=True, action="append", help="repeat for a batch")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy, deterministic")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    p.set_defaults(func=_cmd_generate)


def add_serve(sub) -> None:
    p = sub.add_parser("serve", help="serve a Hugging Face directory with vLLM's OpenAI-compatible server")
    p.add_argument("hf_dir")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="serve a PEFT adapter (medjax export RUN DIR --adapter) beside the base model; requests name it as "
        "their model; repeat for more",
    )
    p.set_defaults(func=_cmd_serve, vllm_args=[])  # main() puts the arguments after -- here
    p.epilog = "arguments after -- go to vLLM unchanged, e.g. medjax serve DIR -- --enforce-eager"
