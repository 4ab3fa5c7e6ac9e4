"""LoRA SFT throughput and peak memory on CPU: medjax (model.lora) against PEFT + transformers + torch.

Why: a user tuning adapters on one host compares against PEFT. Each side runs tools/bench_train.py
in its own process (``--side``), so the peak resident memory each reports is its own: the same
decoder shape (default: the smollm2-135m preset, the shapes of the real SmolLM2-135M-Instruct;
throughput does not depend on the weights' values), the same adapters (rank R on q k v o gate up
down, alpha 2R, no dropout), the same batch and sequence length, AdamW over the adapters alone.
The sides run one after the other, so keep the machine otherwise idle.

    .venv/bin/python tools/bench_lora.py --out /tmp/lora.json
    python tools/benchmarks_table.py add lora-sft-smollm2-135m /tmp/lora.json --command "python tools/bench_lora.py" \\
        --headline "medjax tokens/s=medjax.tokens_per_s" --headline "peft tokens/s=torch.tokens_per_s" \\
        --headline "medjax/peft=ratio_medjax_over_torch" --headline "medjax peak MB=medjax.peak_rss_mb" \\
        --headline "peft peak MB=torch.peak_rss_mb"

``--base-qtype int8`` adds a third run: medjax with the frozen base quantized (QLoRA), its own
tokens/s and peak memory beside the other two.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="smollm2-135m")
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--base-qtype", default="", help="also run medjax with the base quantized (QLoRA: int8, int4, nf4)")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    common = [
        f"--preset={args.preset}",
        f"--lora-rank={args.lora_rank}",
        f"--batch={args.batch}",
        f"--seq-len={args.seq_len}",
        f"--steps={args.steps}",
        f"--warmup={args.warmup}",
        f"--rounds={args.rounds}",
    ]
    results: dict = {"preset": args.preset, "lora_rank": args.lora_rank, "batch": args.batch, "seq_len": args.seq_len}
    with tempfile.TemporaryDirectory() as tmp:
        runs = [("medjax", "medjax", []), ("torch", "torch", [])]
        if args.base_qtype:
            runs.append((f"medjax_{args.base_qtype}", "medjax", [f"--base-qtype={args.base_qtype}"]))
        for name, side, extra in runs:
            out = Path(tmp) / f"{name}.json"
            cmd = [
                sys.executable,
                str(ROOT / "tools" / "bench_train.py"),
                *common,
                *extra,
                f"--side={side}",
                f"--out={out}",
            ]
            print("running:", " ".join(cmd[1:]), flush=True)
            subprocess.run(cmd, check=True)
            one = json.loads(out.read_text())
            results[name] = {**one[side], "peak_rss_mb": one["peak_rss_mb"]}
            results.setdefault("model", one["model"])
            results.setdefault("cpu_count", one["cpu_count"])
    results["ratio_medjax_over_torch"] = results["medjax"]["tokens_per_s"] / results["torch"]["tokens_per_s"]
    results["memory_medjax_over_torch"] = results["medjax"]["peak_rss_mb"] / results["torch"]["peak_rss_mb"]
    print(
        f"medjax {results['medjax']['tokens_per_s']:.0f} tokens/s, peak {results['medjax']['peak_rss_mb']:.0f} MB; "
        f"peft {results['torch']['tokens_per_s']:.0f} tokens/s, peak {results['torch']['peak_rss_mb']:.0f} MB; "
        f"throughput {results['ratio_medjax_over_torch']:.2f}x, memory {results['memory_medjax_over_torch']:.2f}x"
    )
    if args.base_qtype:
        q = results[f"medjax_{args.base_qtype}"]
        print(f"medjax over a {args.base_qtype} base: {q['tokens_per_s']:.0f} tokens/s, peak {q['peak_rss_mb']:.0f} MB")
    if args.out is not None:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
