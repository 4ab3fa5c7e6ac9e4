"""`medjax score-rm`: a reward model's scores (and pairwise accuracy) over records; registered on
medjax's parser."""

from __future__ import annotations

import argparse

from medjax.parallel.cli import add_join_flags, join


def _cmd_score_rm(args: argparse.Namespace) -> int:
    from medjax.rl.reward_scorer import score_file

    join(args)
    summary = score_file(args.model, args.input, args.out, batch_size=args.batch_size, mesh=args.mesh)
    import jax

    if jax.process_index() != 0:  # process 0 reports for the whole job
        return 0
    print(
        f"scored {summary['records']} records with labels {', '.join(summary['labels'])}"
        + (f"; wrote {args.out}" if args.out else "")
    )
    for dim, acc in summary.get("accuracy", {}).items():
        print(f"  pairwise accuracy {dim}: {acc * 100:.1f}%")
    if "accuracy_overall" in summary:
        print(f"  pairwise accuracy overall: {summary['accuracy_overall'] * 100:.1f}%")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("score-rm", help="score (prompt, response) records or preference pairs with a reward model")
    p.add_argument("--model", required=True, help="reward-model run, model directory or Hugging Face directory")
    p.add_argument("--input", required=True, help="JSONL: {prompt, response} or {prompt, chosen, rejected, dimension}")
    p.add_argument("--out", default=None, help="JSON lines with the scores per label (written atomically)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument(
        "--mesh",
        default="",
        metavar="AXIS=N,...",
        help="shard the reward model over the devices, e.g. fsdp=4 (default one device)",
    )
    add_join_flags(p, "score")
    p.set_defaults(func=_cmd_score_rm)
