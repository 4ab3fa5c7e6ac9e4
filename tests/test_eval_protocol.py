"""CPQExam as its authors score it, on the released 7,600 items (../shared/benchmarks/cpqexam, read in
place): shared stems before the question, multi-answer sets, the three malformed items repaired and
reported; and `medjax eval --protocol quarkmed` through a real local HTTP server speaking the OpenAI
chat API, which answers each prompt in one of the reply styles models use, right or wrong by design.
medjax's accuracy must equal the accuracy computed here from the replies themselves."""

import json
import re
import threading
import zlib
from collections import defaultdict
from pathlib import Path

import pytest
from chat_server import ChatServer

from medjax.eval.protocols import QUARKMED
from medjax.tasks.readers import read_benchmark

CPQEXAM = Path(__file__).resolve().parents[2] / "shared" / "benchmarks" / "cpqexam" / "cpqexam.jsonl"
pytestmark = pytest.mark.skipif(not CPQEXAM.is_file(), reason=f"CPQExam is not at {CPQEXAM}")

# The release's three malformed option lists (1-based line numbers) and what each must read as.
REPAIRED = {
    803: "the letters restart at A: a second list of five options pasted after the first",
    1199: "a stray 'G. 精神分裂症' after option I",
    5989: "'1.' written for option I",
}


def raw_records():
    return [json.loads(line) for line in CPQEXAM.read_text(encoding="utf-8").splitlines()]


def expected_prompt(rec: dict, lineno: int) -> str:
    """The QuarkMed prompt for one record, written from the published protocol: instruction, the JSON
    example, 问题: (stem, then question), 回答: and the options as "A. text" lines."""
    lines = [line for line in rec["option"].split("\n") if line.strip()]
    if lineno == 803:
        lines = lines[:5]
    elif lineno == 1199:
        lines = lines[:-1]
    elif lineno == 5989:
        lines = [("I." + line[2:]) if line.startswith("1.") else line for line in lines]
    options = []
    for line in lines:
        m = re.match(r"^\s*([A-Za-z])[.．、]\s*(.*)$", line)
        if m:
            options.append(f"{m.group(1).upper()}. {m.group(2).strip()}")
        else:  # a wrapped option continues on the next line
            options[-1] += "\n" + line.strip()
    stem, question = rec["stem"].strip(), rec["question"].strip()
    return (
        "请思考后回答以下选择题目，以json格式返回结果，除此以外不要返回其它任何信息。如:\n"
        '{"answer": "A/B/C"}\n问题:\n'
        + (f"{stem}\n{question}" if stem else question)
        + "\n回答:\n"
        + "\n".join(sorted(options))
    )


def test_cpqexam_reads_all_7600_items_repairing_the_three_broken_ones():
    bench = read_benchmark(CPQEXAM)
    assert bench.format == "cpqexam" and len(bench.items) == bench.records == 7600 and not bench.skipped
    assert [r.split(": ", 1)[0] for r in bench.repaired] == [f"{CPQEXAM}:{n}" for n in REPAIRED]
    by_line = {int(item.source.rsplit(":", 1)[1]): item for item in bench.items}
    assert by_line[803].options == {"A": "3mm", "B": "5mm", "C": "8mm", "D": "19mm", "E": "23mm"}
    assert "腮腺" in bench.repaired[0]  # the dropped lines are shown, not silently lost
    assert list(by_line[1199].options) == list("ABCDEFGHI") and by_line[1199].options["G"] == "帕罗西汀"
    assert by_line[5989].options["I"] == "抗生素防止感染" and by_line[5989].answer == {"F", "I"}
    # The README counts 2,150 answers longer than one character; line 4300's is "B " (a trailing space).
    assert sum(len(item.answer) > 1 for item in bench.items) == 2149 and by_line[4300].answer == {"B"}
    groups = defaultdict(int)
    for item in bench.items:
        groups[item.meta["option_type"]] += 1
    assert groups == {"单选题": 4254, "多选题": 684, "共用题干题": 712, "案例分析题": 1950}
    # The same items without repair: exactly those three are errors naming their line.
    from medjax.tasks.readers import parse_option_lines

    recs = raw_records()
    broken = []
    for n, rec in enumerate(recs, 1):
        try:
            options = parse_option_lines(rec["option"], f"line {n}", "option")
            if not set(rec["answer"].strip()) <= set(options):
                broken.append(n)
        except Exception:
            broken.append(n)
    assert broken == list(REPAIRED)


def test_quarkmed_prompt_is_the_published_one_for_every_item():
    """Every item's prompt equals the protocol's text built here from the raw record; the README's
    worked example, byte for byte."""
    from medjax.tasks.prompts import PromptConfig, build_prompt

    bench = read_benchmark(CPQEXAM)
    cfg = PromptConfig(generative=True, template=QUARKMED.template)
    for rec, item, n in zip(raw_records(), bench.items, range(1, 7601)):
        assert build_prompt(item, cfg=cfg) == expected_prompt(rec, n), f"line {n}"
    example = next(i for i in bench.items if i.question.startswith("鼻腔鼻窦上皮源性恶性肿瘤CT征象中"))
    assert build_prompt(example, cfg=cfg) == (
        "请思考后回答以下选择题目，以json格式返回结果，除此以外不要返回其它任何信息。如:\n"
        '{"answer": "A/B/C"}\n问题:\n鼻腔鼻窦上皮源性恶性肿瘤CT征象中，比较有特征性表现的是\n回答:\n'
        "A. 鼻腔、鼻窦内软组织影\nB. 肿瘤呈膨胀性生长\nC. 有明显的骨质破坏\nD. 无明显的骨质破坏\nE. 增强扫描肿瘤无强化"
    )
    stem_item = next(i for i in bench.items if i.meta["option_type"] == "共用题干题")
    prompt = build_prompt(stem_item, cfg=cfg)
    assert prompt.index(stem_item.context) < prompt.index(stem_item.question)


def reply_for(prompt: str, gold: str, options: str) -> tuple[str, bool | None]:
    """One reply in one of seven styles, right or wrong, both chosen by the prompt's hash; returns
    (reply, meant to be right), None for a reply that answers nothing."""
    h = zlib.crc32(prompt.encode())
    style, right = h % 7, (h >> 8) % 5 < 3
    if style == 6:
        return "抱歉，这个问题我无法回答。", None
    if right:
        letters = gold
    elif len(gold) > 1:
        letters = gold[:-1]  # a subset is wrong under exact set match
    else:
        letters = next(x for x in options if x != gold)
    shuffled = letters[::-1]
    return [
        f'{{"answer": "{letters}"}}',
        f'```json\n{{"answer": "{", ".join(letters)}"}}\n```',
        json.dumps({"answer": list(shuffled)}),
        f'根据题干逐项分析，结合临床表现综合判断。\n\n{{"answer": "{shuffled}"}}',
        f"综合分析，答案：{letters}",
        f'{{"answer": "{"/".join(letters)}"}}',
    ][style], right


@pytest.mark.slow  # an OpenAI-compatible server
def test_quarkmed_protocol_through_an_openai_server_equals_the_replies(tmp_path):
    from medjax.cli import main

    recs = raw_records()
    gold_of = {}
    for n, rec in enumerate(recs, 1):
        letters = "".join(re.findall(r"^([A-Z])\.", expected_prompt(rec, n).split("\n回答:\n")[1], re.M))
        gold_of.setdefault(expected_prompt(rec, n), (rec["answer"], letters))
    unknown = []

    def reply(body):
        prompt = body["messages"][-1]["content"]
        if prompt not in gold_of:
            unknown.append(prompt)
            return "?"
        return reply_for(prompt, *gold_of[prompt])[0]

    server = ChatServer(reply)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    out = tmp_path / "cpqexam.jsonl"
    try:
        assert (
            main(
                [
                    "eval",
                    "--protocol",
                    "quarkmed",
                    "--model",
                    f"openai:{server.url}",
                    "--benchmark",
                    str(CPQEXAM),
                    "--out",
                    str(out),
                ]
            )
            == 0
        )
    finally:
        server.shutdown()
    assert not unknown, f"{len(unknown)} prompts differ from the protocol's, e.g.\n{unknown[0]}"
    assert len(server.requests) == 7600
    assert {(b["temperature"], b["max_tokens"], len(b["messages"])) for b in server.requests} == {(0.6, 2048, 1)}

    meant = [reply_for(expected_prompt(rec, n), *gold_of[expected_prompt(rec, n)])[1] for n, rec in enumerate(recs, 1)]
    summary = json.loads(out.with_name("cpqexam.summary.json").read_text())
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert summary["protocol"] == "quarkmed" and summary["n"] == summary["items_in_file"] == 7600
    assert len(summary["repaired"]) == 3
    assert [r["id"] for r in rows] == [rec["uid"] for rec in recs]
    assert [r["correct"] for r in rows] == [m is True for m in meant]
    assert summary["accuracy"] == sum(m is True for m in meant) / 7600
    assert summary["no_answer"] + summary["refused"] + summary["off_options"] == sum(m is None for m in meant)
    for level in ("初级", "中级", "副高", "高级"):
        picked = [m is True for m, rec in zip(meant, recs) if rec["level"] == level]
        assert summary["by_level"][level]["accuracy"] == sum(picked) / len(picked)
        assert summary["by_level"][level]["n"] == len(picked)
    assert set(summary["by_option_type"]) == {"单选题", "多选题", "共用题干题", "案例分析题"}

    # --greedy: one sample at temperature 0; explicit flags win over the preset.
    server = ChatServer(reply)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        main(
            [
                "eval",
                "--protocol",
                "quarkmed",
                "--greedy",
                "--max-new-tokens",
                "512",
                "--limit",
                "5",
                "--model",
                f"openai:{server.url}",
                "--benchmark",
                str(CPQEXAM),
                "--out",
                str(tmp_path / "greedy.jsonl"),
            ]
        )
    finally:
        server.shutdown()
    assert {(b["temperature"], b["max_tokens"]) for b in server.requests} == {(0.0, 512)}


def test_protocol_refuses_settings_it_cannot_honour(tmp_path):
    from medjax.eval.runner import EvalConfig

    with pytest.raises(ValueError, match="zero-shot and generative: drop --mode loglikelihood"):
        EvalConfig.for_protocol("quarkmed", mode="loglikelihood").validate()
    with pytest.raises(ValueError, match="generative: drop --shots$"):
        EvalConfig.for_protocol("quarkmed", shots=2).validate()
    with pytest.raises(ValueError, match="unknown --protocol 'medqa'; known: quarkmed"):
        EvalConfig.for_protocol("medqa")
    assert EvalConfig.for_protocol(None, temperature=None) == EvalConfig()
