"""`medjax import|export`: Hugging Face directories and GGUF files in, safetensors directories out;
registered on medjax's parser."""

from __future__ import annotations

import argparse
import sys

from medjax.convert import ConversionError


def _cmd_import(args: argparse.Namespace) -> int:
    from medjax.convert.gguf_import import import_gguf, is_gguf, resolve_source
    from medjax.convert.hf_import import import_hf

    source = resolve_source(args.hf_dir)
    if not source.exists():
        raise ConversionError(
            f"{source}: no such file or directory (give a Hugging Face model directory, a .gguf file or bundled:NAME)"
        )
    if is_gguf(source):
        out = import_gguf(source, args.ckpt_dir, param_dtype=args.param_dtype)
        print(f"imported {source} -> {out}")
        if args.hf_out:
            from medjax.convert.hf_export import export_hf

            hf = export_hf(out, args.hf_out, dtype=args.param_dtype or "float32")
            print(f"wrote the Hugging Face directory {hf} (serve it with: medjax serve {hf})")
        return 0
    if args.hf_out or args.param_dtype:
        raise ConversionError("--hf-out and --param-dtype apply to GGUF files only")
    out = import_hf(args.hf_dir, args.ckpt_dir, allow_pickle=args.allow_pickle, tokenizer=args.tokenizer)
    print(f"imported {args.hf_dir} -> {out}")
    if args.tokenizer == "file" and not (source / "tokenizer.json").is_file():
        print(
            f"note: {source} has no tokenizer.json, so {out} has no tokenizer: `--tokenizer transformers` builds "
            "one from the directory's other tokenizer files (tokenizer.model, vocab.json + merges.txt), or name "
            "one when training (data.tokenizer=DIR)",
            file=sys.stderr,
        )
    elif args.tokenizer == "file":
        from medjax.data.tokenizer_agreement import warn_if_disagreeing

        warn_if_disagreeing(
            args.hf_dir,
            hint=f"`medjax import {args.hf_dir} OUT --tokenizer transformers` imports "
            "the tokenizer transformers and vLLM use instead (do it before training on it)",
        )
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from medjax.convert.hf_export import export_hf

    if args.adapter:
        from medjax.convert.lora import export_adapter

        out = export_adapter(args.ckpt_dir, args.hf_dir, dtype=args.dtype, base=args.base)
        print(f"exported the LoRA adapters of {args.ckpt_dir} -> {out} (PEFT)")
        print(f"serve it beside its base model with: medjax serve BASE_HF_DIR --lora NAME={out}")
        return 0
    out = export_hf(
        args.ckpt_dir,
        args.hf_dir,
        dtype=args.dtype,
        max_shard_bytes=int(args.max_shard_gb * 1024**3),
        merge=args.merge,
    )
    print(f"exported {args.ckpt_dir} -> {out}" + (" (LoRA adapters merged)" if args.merge else ""))
    from medjax.data.tokenizer_agreement import warn_if_disagreeing

    warn_if_disagreeing(out, hint="transformers and vLLM will tokenize this export unlike the model was trained")
    print(f"serve it with: medjax serve {out}")
    return 0


def add_import(sub) -> None:
    p = sub.add_parser("import", help="Hugging Face directory or GGUF file -> medjax model directory")
    p.add_argument(
        "hf_dir",
        metavar="SOURCE",
        help="a Hugging Face model directory, a .gguf file, or a model an "
        "installed package carries: bundled:smollm2-135m-instruct (the `real` extra)",
    )
    p.add_argument("ckpt_dir", metavar="OUT")
    p.add_argument(
        "--hf-out",
        default=None,
        metavar="DIR",
        help="GGUF only: also write the dequantised model as a Hugging Face directory (safetensors)",
    )
    p.add_argument(
        "--param-dtype",
        choices=("float32", "bfloat16"),
        default=None,
        help="GGUF only: dtype the dequantised weights are kept in (default float32)",
    )
    p.add_argument("--allow-pickle", action="store_true", help="also read pickle-based pytorch_model*.bin files")
    p.add_argument(
        "--tokenizer",
        choices=("file", "transformers"),
        default="file",
        help="file: the directory's tokenizer.json as is (default; a mismatch with transformers is "
        "reported); transformers: the tokenizer transformers' AutoTokenizer (and vLLM) builds",
    )
    p.set_defaults(func=_cmd_import)


def add_export(sub) -> None:
    p = sub.add_parser("export", help="medjax checkpoint -> Hugging Face safetensors directory")
    p.add_argument("ckpt_dir", help="model directory, training workdir, or one checkpoint step folder")
    p.add_argument("hf_dir")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--max-shard-gb", type=float, default=2.0, help="largest safetensors shard (GiB)")
    lora = p.add_mutually_exclusive_group()
    lora.add_argument(
        "--adapter", action="store_true", help="a LoRA run: write its adapters as a PEFT adapter directory"
    )
    lora.add_argument("--merge", action="store_true", help="a LoRA run: write full weights, adapters merged in")
    p.add_argument(
        "--base", help="with --adapter: base_model_name_or_path in adapter_config.json (the base model's HF directory)"
    )
    p.set_defaults(func=_cmd_export)
