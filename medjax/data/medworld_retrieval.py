"""Labelled retrieval data from the synthetic medical world, in BEIR's layout: the encyclopedia
passages as the corpus, one question per fact kind and condition as queries, and as relevant every
passage of that condition that states the asked fact (string match on the fact, which the passage
templates state verbatim). The labels are exact by construction, so retrieval metrics on them
measure the retriever, not the labelling."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from medjax.data.medworld import _QUESTIONS, Condition, World, _fields

_PASSAGE_ID = re.compile(r"^pretrain-(\d{4})-\d{4}$")


def _facts(c: Condition, kind: str) -> list[str]:
    """The strings a passage must state to answer a ``kind`` question about ``c``."""
    return {
        "diagnosis": list(c.symptoms),
        "symptoms": list(c.symptoms),
        "drug": [c.first_line_drug],
        "contra": [c.contraindicated_drug],
        "test": [c.test],
        "risk": [c.risk_factor],
        "subject": [c.subject],
        "pathogen": [c.pathogen or ""],
    }[kind]


def write_beir(data_dir: str | Path, out_dir: str | Path, seed: int = 0) -> dict[str, Path]:
    """Reads world.json and pretrain(_eval).jsonl from ``data_dir`` (medworld.generate's output);
    writes corpus.jsonl, queries.jsonl and qrels/test.tsv under ``out_dir``."""
    data_dir, out = Path(data_dir), Path(out_dir)
    world = World.from_json(json.loads((data_dir / "world.json").read_text()))
    passages: dict[int, list[tuple[str, str, str]]] = {}  # condition index -> (id, title, body)
    for name in ("pretrain.jsonl", "pretrain_eval.jsonl"):
        for line in (data_dir / name).read_text(encoding="utf-8").splitlines():
            rec = json.loads(line)
            m = _PASSAGE_ID.match(rec["id"])
            if m:
                title, _, body = rec["text"].partition("\n")
                passages.setdefault(int(m.group(1)), []).append((rec["id"], title, body))
    rng = random.Random(f"medworld-retrieval:{seed}")
    queries, qrels = [], []
    for ci, c in enumerate(world.conditions):
        for kind in _QUESTIONS:
            if kind == "pathogen" and not c.pathogen:
                continue
            facts = _facts(c, kind)
            relevant = sorted(
                pid
                for pid, title, body in passages.get(ci, [])
                if all(f.lower() in body.lower() for f in facts)
                and (kind == "diagnosis" or c.name.lower() in (title + " " + body).lower())
            )
            if not relevant:
                continue
            qid = f"q-{ci:04d}-{kind}"
            queries.append({"_id": qid, "text": rng.choice(_QUESTIONS[kind]).format(**_fields(rng, c))})
            qrels += [(qid, pid) for pid in relevant]
    (out / "qrels").mkdir(parents=True, exist_ok=True)
    paths = {"corpus": out / "corpus.jsonl", "queries": out / "queries.jsonl", "qrels": out / "qrels" / "test.tsv"}
    with open(paths["corpus"], "w", encoding="utf-8") as f:
        for ci in sorted(passages):
            for pid, title, body in sorted(passages[ci]):
                f.write(json.dumps({"_id": pid, "title": title, "text": body}) + "\n")
    paths["queries"].write_text("".join(json.dumps(q) + "\n" for q in queries), encoding="utf-8")
    paths["qrels"].write_text(
        "query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{p}\t1\n" for q, p in qrels), encoding="utf-8"
    )
    return paths
