"""Training throughput on CPU: the medjax train step against Hugging Face transformers + torch.

Why: the goal is for medjax to train at least as fast as the reference PyTorch stack (a ratio of
at least 1.0x) on a CPU. This script times both in one process on the same machine. Both train
the same decoder (same shapes, tied embeddings, attention biases, fp32) on the same random tokens,
with AdamW using the same hyper-parameters and global-norm clipping (torch runs at the peak
learning rate, medjax with its warmup-cosine schedule: the schedule does not change the cost). Each side first runs
``--warmup`` untimed steps (medjax compiles in the first), then ``--rounds`` windows of ``--steps``
timed steps, alternating between the sides; the median window counts. A window ends only when its
results are ready (``jax.block_until_ready`` for medjax; torch runs eagerly).

Run (from the repository root):

    .venv/bin/python tools/bench_train.py                        # tiny-qwen2, batch 8, seq 256
    .venv/bin/python tools/bench_train.py --seq-len 128 --batch 16 --out /tmp/bench.json
    .venv/bin/python tools/bench_train.py --hidden-size 512 --layers 4 --intermediate-size 1536
    .venv/bin/python tools/bench_train.py --preset smollm2-135m --lora-rank 16 --side medjax   # LoRA vs PEFT

``--lora-rank R`` trains LoRA adapters on every projection (q k v o gate up down, alpha 2R, no
dropout) over a frozen base: medjax's model.lora against PEFT's LoraConfig on the transformers
model, the optimizer over the adapters alone on both sides. ``--side`` runs one side only, so that
``peak_rss_mb`` (this process's peak resident memory) is that side's; tools/bench_lora.py runs each
side in its own process.

``--threads`` sets torch's intra-op threads. JAX's CPU client sizes its own thread pool from the
visible cores; use ``taskset`` (or XLA_FLAGS) to limit both sides the same way.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the torch side runs on CPU; compare like with like
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from medjax.config import MeshConfig, OptimizerConfig, load_model_preset  # noqa: E402
from medjax.models.config import LoraConfig, ModelConfig  # noqa: E402
from medjax.models.decoder import ModelDef  # noqa: E402
from medjax.parallel.mesh import make_mesh  # noqa: E402
from medjax.train.objectives import NextTokenObjective  # noqa: E402
from medjax.train.optimizer import make_optimizer, split_params, trained_patterns  # noqa: E402
from medjax.train.quantized_base import quantize_base  # noqa: E402
from medjax.train.step import init_train_state, make_train_step, state_shardings  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny-qwen2", help="model preset in configs/models/")
    for flag in ("--hidden-size", "--layers", "--vocab-size", "--intermediate-size"):
        p.add_argument(flag, type=int, help="override the preset")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before timing (at least 1)")
    p.add_argument("--rounds", type=int, default=3, help="timed windows of --steps per side; the median counts")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch.set_num_threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lora-rank", type=int, default=0, help="train LoRA adapters of this rank (0: full weights)")
    p.add_argument("--base-qtype", default="", help="with --lora-rank: the frozen base quantized (int8, int4, nf4)")
    p.add_argument("--side", choices=["both", "medjax", "torch"], default="both")
    p.add_argument("--out", type=Path, help="also write the results as one JSON object here")
    return p.parse_args(argv)


def model_config(args: argparse.Namespace) -> ModelConfig:
    cfg = load_model_preset(args.preset)
    overrides = {
        "hidden_size": args.hidden_size,
        "num_layers": args.layers,
        "vocab_size": args.vocab_size,
        "intermediate_size": args.intermediate_size,
    }
    cfg = dataclasses.replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
    lora = LoraConfig(rank=args.lora_rank, alpha=2.0 * args.lora_rank, base_qtype=args.base_qtype)
    return dataclasses.replace(cfg, param_dtype="float32", dtype="float32", remat="none", lora=lora).validate()


class MedjaxTrainer:
    """The medjax train step on a one-device mesh; ``run`` blocks until its last step is done."""

    def __init__(self, cfg: ModelConfig, opt: OptimizerConfig, data: np.ndarray, args: argparse.Namespace):
        mesh = make_mesh(MeshConfig(data=1))
        model = ModelDef(cfg)
        tx, schedule = make_optimizer(opt, max_steps=args.warmup + args.steps * args.rounds)
        trained = trained_patterns(opt, cfg)  # LoRA: the adapters alone
        shardings = state_shardings(model, tx, mesh, trained=trained)
        self.state = init_train_state(model, tx, mesh, seed=args.seed, trained=trained)
        if cfg.lora.base_qtype:  # QLoRA: as train/loop.py does after init_from
            self.state["params"] = quantize_base(self.state["params"], shardings["params"], cfg, trained)
        self.step = make_train_step(model, NextTokenObjective(), tx, schedule, mesh, shardings, trained)
        self.trained = int(sum(x.size for x in jax.tree.leaves(split_params(self.state["params"], trained)[0])))
        b, s = data.shape[0], data.shape[1] - 1  # batch arrays are [accum=1, batch, seq]
        self.batch = {
            "tokens": jnp.asarray(data[None, :, :-1]),
            "targets": jnp.asarray(data[None, :, 1:]),
            "positions": jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (1, b, s)),
            "segment_ids": jnp.ones((1, b, s), jnp.int32),
            "loss_mask": jnp.ones((1, b, s), jnp.float32),
        }
        self.params = int(sum(x.size for x in jax.tree.leaves(model.abstract_params())))
        self.metrics: dict[str, jax.Array] = {}

    def run(self, steps: int) -> None:
        for _ in range(steps):  # the state is donated: always keep the returned one
            self.state, self.metrics = self.step(self.state, self.batch)
        jax.block_until_ready((self.state, self.metrics))

    def loss(self) -> float:
        return float(self.metrics["loss"])


def hf_model_config(cfg: ModelConfig) -> Any:
    import transformers

    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling is not None:
        rope = {**dataclasses.asdict(cfg.rope_scaling), "rope_theta": cfg.rope_theta}
    common: dict[str, Any] = dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        rms_norm_eps=cfg.rms_norm_eps,
        rope_parameters=rope,
        tie_word_embeddings=cfg.tie_word_embeddings,
        max_position_embeddings=cfg.max_position_embeddings,
        initializer_range=cfg.initializer_range,
        use_cache=False,
        attn_implementation="sdpa",
    )
    head_dim = cfg.resolved_head_dim
    if cfg.family == "qwen2":  # q/k/v biases are built into Qwen2's attention
        hf = transformers.Qwen2Config(**common)
        hf.head_dim = head_dim  # read with getattr by Qwen2Attention
        return hf
    if cfg.family == "qwen3":
        return transformers.Qwen3Config(**common, head_dim=head_dim, attention_bias=cfg.attention_bias)
    return transformers.LlamaConfig(**common, head_dim=head_dim, attention_bias=cfg.attention_bias)


class TorchTrainer:
    """The same model and optimizer in transformers + torch (eager, so ``run`` is synchronous)."""

    def __init__(self, cfg: ModelConfig, opt: OptimizerConfig, data: np.ndarray, args: argparse.Namespace):
        import torch
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(args.threads)
        torch.manual_seed(args.seed)
        self.max_grad_norm = opt.max_grad_norm
        self.clip_grad_norm = torch.nn.utils.clip_grad_norm_
        self.model = AutoModelForCausalLM.from_config(hf_model_config(cfg), dtype=torch.float32).train()
        if cfg.lora.enabled:
            import peft

            modules = [f"{t}_proj" for t in cfg.lora.targets]
            lora = peft.LoraConfig(r=cfg.lora.rank, lora_alpha=cfg.lora.alpha, lora_dropout=0.0, target_modules=modules)
            self.model = peft.get_peft_model(self.model, lora)
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.trained = int(sum(p.numel() for p in trainable))
        self.optimizer = torch.optim.AdamW(
            trainable,
            lr=opt.learning_rate,
            betas=(opt.b1, opt.b2),
            eps=opt.eps,
            weight_decay=opt.weight_decay,
        )
        self.tokens = torch.from_numpy(data[:, :-1].astype(np.int64))  # the model shifts the labels itself
        self.params = int(sum(p.numel() for p in self.model.parameters()))
        self.last_loss = float("nan")

    def run(self, steps: int) -> None:
        for _ in range(steps):
            loss = self.model(input_ids=self.tokens, labels=self.tokens).loss
            loss.backward()
            if self.max_grad_norm > 0:
                self.clip_grad_norm([p for p in self.model.parameters() if p.requires_grad], self.max_grad_norm)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.last_loss = float(loss.detach())

    def loss(self) -> float:
        return self.last_loss


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.warmup < 1 or args.steps < 1 or args.rounds < 1:
        raise SystemExit("--warmup, --steps and --rounds must be at least 1")
    cfg = model_config(args)
    opt = OptimizerConfig()
    data = np.random.default_rng(args.seed).integers(0, cfg.vocab_size, (args.batch, args.seq_len + 1), np.int32)
    load = os.getloadavg()[0]
    if load > 0.5 * (os.cpu_count() or 1):
        print(f"warning: 1-minute load average is {load:.2f}; other processes will skew the timings")
    results: dict[str, Any] = {
        "preset": args.preset,
        "model": dataclasses.asdict(cfg),
        "optimizer": dataclasses.asdict(opt),
        "batch": args.batch,
        "seq_len": args.seq_len,
        "steps": args.steps,
        "warmup": args.warmup,
        "rounds": args.rounds,
        "lora_rank": args.lora_rank,
        "side": args.side,
        "torch_threads": args.threads,
        "cpu_count": os.cpu_count(),
        "load_avg_1m": load,
        "jax_device": str(jax.devices()[0]),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }
    trainers: dict[str, MedjaxTrainer | TorchTrainer] = {}
    sides = (("medjax", MedjaxTrainer), ("torch", TorchTrainer))
    for name, cls in [(n, c) for n, c in sides if args.side in ("both", n)]:
        t0 = time.perf_counter()
        trainer = cls(cfg, opt, data, args)
        trainer.run(1)  # medjax compiles here
        first = time.perf_counter() - t0
        trainer.run(args.warmup - 1)
        trainers[name] = trainer
        results[name] = {
            "params": trainer.params,
            "trained_params": trainer.trained,
            "setup_and_first_step_s": first,
            "window_s": [],
        }
        print(
            f"[{name}] {trainer.params:,} params ({trainer.trained:,} trained), setup + first step {first:.2f}s",
            flush=True,
        )
    # Rounds alternate between the two sides so that a burst of outside load hits both alike.
    for _ in range(args.rounds):
        for name, trainer in trainers.items():
            t0 = time.perf_counter()
            trainer.run(args.steps)
            results[name]["window_s"].append(time.perf_counter() - t0)
    tokens = args.batch * args.seq_len * args.steps
    for name, trainer in trainers.items():
        r = results[name]
        window = float(np.median(r["window_s"]))
        r.update(step_ms=1000.0 * window / args.steps, tokens_per_s=tokens / window, final_loss=trainer.loss())
        print(
            f"[{name}] {r['step_ms']:.1f} ms/step  {r['tokens_per_s']:,.0f} tokens/s  "
            f"(median of {args.rounds} x {args.steps} steps)  loss {r['final_loss']:.4f}"
        )
    # ru_maxrss is KiB on Linux: the whole process's peak, so one side's alone under --side
    results["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if len(trainers) == 2:
        if trainers["medjax"].params != trainers["torch"].params:
            print("warning: the two models have different parameter counts; they are not the same model")
        medjax_tps, torch_tps = results["medjax"]["tokens_per_s"], results["torch"]["tokens_per_s"]
        ratio = results["ratio_medjax_over_torch"] = medjax_tps / torch_tps
        print(f"medjax/torch throughput ratio: {ratio:.2f}x (batch {args.batch}, seq {args.seq_len})")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return results


if __name__ == "__main__":
    main()
