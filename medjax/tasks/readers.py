"""Readers for medical benchmarks in their published formats, each yielding ExamItems.

Formats: MedQA (US 4/5 options and Mainland-China MCMLE), MedMCQA (original 1-based ``cop`` or the
Hugging Face 0-based one), PubMedQA (the original PMID-keyed JSON or one record per line), CMExam
(CSV or JSONL, options in one string), CMB-Exam, MedXpertQA (options A-J), MMLU medical subsets
(header-less CSV) and CPQExam (the QuarkMed release). The format is detected from the fields of the
first record, or named. Every error names the file and line (or record index / key).

A file is read by its content, not its suffix: one JSON record per line (MedMCQA's own train.json /
dev.json / test.json are JSON lines, as is what ``datasets.Dataset.to_json`` writes), a JSON array
(CMB), one JSON object of id -> record (PubMedQA's ori_pqal.json, pretty-printed or on one line), or
CSV. A split published without answers (MedMCQA's and CMB's test sets, PubMedQA's unlabeled set) is an
error naming the file rather than items that would be scored against nothing.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Callable, Iterator

from medjax.tasks import ItemError
from medjax.tasks.items import LETTERS, ExamItem, detect_language

Record = dict
Reader = Callable[[Record, str], ExamItem]

_OPTION_LINE = re.compile(r"^\s*([A-Za-z])\s*(?:[.．、:：)）]\s*|\s+|(?=[^A-Za-z]))(.*)$")


@dataclasses.dataclass
class Benchmark:
    path: Path
    format: str
    items: list[ExamItem]
    skipped: list[str] = dataclasses.field(default_factory=list)  # errors of items left out (skip_bad)
    repaired: list[str] = dataclasses.field(default_factory=list)  # "file:line: what was mended"
    records: int = 0  # records read (before --limit): "scored n of records"

    @property
    def name(self) -> str:
        return self.path.stem


def _get(rec: Record, key: str, where: str, types=(str,)):
    if key not in rec:
        raise ItemError(f"{where}: missing field {key!r} (fields: {', '.join(sorted(rec))})")
    value = rec[key]
    if not isinstance(value, types):
        raise ItemError(
            f"{where}: field {key!r} should be {'/'.join(t.__name__ for t in types)}, got {type(value).__name__}"
        )
    return value


def _answer_letters(value: str, where: str, key: str) -> frozenset[str]:
    cleaned = re.sub(r"[\s,，、;；/]", "", str(value)).upper()
    if not cleaned or not set(cleaned) <= set(LETTERS):
        raise ItemError(f"{where}: field {key!r} should be option letters, got {value!r}")
    return frozenset(cleaned)


def _options_dict(value, where: str, key: str) -> dict[str, str]:
    if not isinstance(value, dict) or not value:
        raise ItemError(f"{where}: field {key!r} should be a non-empty object of letter -> text")
    out = {}
    for k in sorted(value):
        text = value[k]
        if text is None or (isinstance(text, str) and not text.strip()):
            continue  # some releases pad to a fixed letter count with empty options
        if not isinstance(k, str) or len(k.strip()) != 1 or k.strip().upper() not in LETTERS:
            raise ItemError(f"{where}: option key {k!r} in {key!r} is not a letter")
        out[k.strip().upper()] = str(text).strip()
    return out


_DIGIT_ONE = re.compile(r"^\s*[1l]\s*[.．、:：)）]\s*(.*)$")


def parse_option_lines(text: str, where: str, key: str, repairs: list[str] | None = None) -> dict[str, str]:
    """ "A.text\nB.text" or "A 胃窦\nB 胃底" -> {letter: text}, keyed by the letters as written (real
    files skip a letter, list D before C or write "c."; the gold answer uses the written letters).
    A line that does not start with an unused letter continues the previous option.

    With ``repairs`` (a list the notes are appended to), two release defects that have one reading
    are mended instead of raised: "1." or "l." where I follows H (a digit typed for the letter), and
    letters that go back (a repeated letter after the run: the lines from there on are a stray option
    or a second item's list pasted after this one's, and are dropped). The caller checks the gold
    letters are still among the options, so a repair cannot change which answer is right."""
    out: dict[str, str] = {}
    last = None
    lines = str(text).splitlines()
    for n, line in enumerate(lines):
        if not line.strip():
            continue
        m = _OPTION_LINE.match(line)
        letter = m.group(1).upper() if m else None
        body = m.group(2) if m else None
        if repairs is not None and letter is None and last == "H" and (one := _DIGIT_ONE.match(line)):
            letter, body = "I", one.group(1)
            repairs.append(f"option {line.strip()[:2]!r} after H read as I")
        if letter is not None and letter in out and last is not None and letter <= last:
            if repairs is None:
                raise ItemError(f"{where}: option {letter} appears twice in field {key!r}")
            dropped = [ln.strip() for ln in lines[n:] if ln.strip()]
            repairs.append(
                f"dropped {len(dropped)} option line(s) from the repeated letter {letter} on "
                f"(after {last}): {' | '.join(dropped)[:80]}"
            )
            break
        if letter is not None and letter not in out:
            last = letter
            out[letter] = body.strip()
        elif last is not None:
            out[last] += "\n" + line.strip()
        else:
            raise ItemError(f"{where}: field {key!r} should start with an option letter, got {line.strip()[:40]!r}")
    if not out:
        raise ItemError(f"{where}: field {key!r} holds no options")
    return dict(sorted(out.items()))


def _item(rec_id, question, options, answer, where, **kw) -> ExamItem:
    language = detect_language(question + "".join(options.values()))
    return ExamItem(
        id=str(rec_id), question=question.strip(), options=options, answer=answer, source=where, language=language, **kw
    )


def _medqa(rec: Record, where: str) -> ExamItem:
    options = _options_dict(_get(rec, "options", where, (dict,)), where, "options")
    if "answer_idx" in rec:
        answer = _answer_letters(_get(rec, "answer_idx", where), where, "answer_idx")
    else:  # some MedQA files give only the answer text
        text = str(_get(rec, "answer", where)).strip()
        hits = [k for k, v in options.items() if v == text]
        if len(hits) != 1:
            raise ItemError(f"{where}: answer {text!r} matches {len(hits)} options (no answer_idx)")
        answer = frozenset(hits)
    return _item(
        rec.get("id", where),
        _get(rec, "question", where),
        options,
        answer,
        where,
        subject=rec.get("subject") or rec.get("meta_info"),
    )


def _medmcqa(rec: Record, where: str, base: int) -> ExamItem:
    options = {L: str(_get(rec, f"op{L.lower()}", where, (str, int, float))).strip() for L in "ABCD"}
    if rec.get("cop") is None or rec.get("cop") == -1:  # the test split: no cop (original) or -1 (HF)
        raise ItemError(f"{where}: no answer (cop is {'-1' if rec.get('cop') == -1 else 'missing'})")
    cop = _get(rec, "cop", where, (int,))
    if not base <= cop < base + 4:
        raise ItemError(f"{where}: cop {cop} is outside {base}..{base + 3}")
    return _item(
        rec.get("id", where),
        _get(rec, "question", where),
        options,
        frozenset(LETTERS[cop - base]),
        where,
        subject=rec.get("subject_name"),
        meta={"topic": rec.get("topic_name"), "choice_type": rec.get("choice_type")},
    )


PUBMEDQA_OPTIONS = {"A": "yes", "B": "no", "C": "maybe"}


def _pubmedqa(rec: Record, where: str) -> ExamItem:
    question = rec.get("question", rec.get("QUESTION"))
    if not isinstance(question, str):
        raise ItemError(f"{where}: missing field 'question' (or 'QUESTION')")
    context = rec.get("context", rec.get("CONTEXTS"))
    if isinstance(context, dict):
        context = context.get("contexts")
    if isinstance(context, list):
        context = "\n".join(str(c) for c in context)
    decision = str(_get(rec, "final_decision", where)).strip().lower()
    if decision not in PUBMEDQA_OPTIONS.values():
        raise ItemError(f"{where}: final_decision {decision!r} is not yes, no or maybe")
    answer = next(k for k, v in PUBMEDQA_OPTIONS.items() if v == decision)
    return _item(
        rec.get("pubid", rec.get("id", where)),
        question,
        dict(PUBMEDQA_OPTIONS),
        frozenset(answer),
        where,
        context=context or None,
    )


def _cmexam(rec: Record, where: str) -> ExamItem:
    options = parse_option_lines(_get(rec, "Options", where), where, "Options")
    answer = _answer_letters(_get(rec, "Answer", where), where, "Answer")
    subject = rec.get("Medical Discipline") or rec.get("Clinical Department") or None
    return _item(
        rec.get("id", where),
        _get(rec, "Question", where),
        options,
        answer,
        where,
        subject=subject,
        multi=len(answer) > 1,
        meta={k: rec[k] for k in ("Competency", "Difficulty level") if rec.get(k)},
    )


def _cmb(rec: Record, where: str) -> ExamItem:
    options = _options_dict(_get(rec, "option", where, (dict,)), where, "option")
    answer = _answer_letters(_get(rec, "answer", where), where, "answer")
    qtype = str(rec.get("question_type", ""))
    return _item(
        rec.get("id", where),
        _get(rec, "question", where),
        options,
        answer,
        where,
        subject=rec.get("exam_subject") or rec.get("exam_class"),
        multi="多" in qtype or len(answer) > 1,
        meta={k: rec[k] for k in ("exam_type", "exam_class", "question_type") if k in rec},
    )


_ANSWER_CHOICES = re.compile(r"\s*Answer Choices:.*$", re.S)


def _medxpertqa(rec: Record, where: str) -> ExamItem:
    if rec.get("images"):
        raise ItemError(
            f"{where}: the question refers to images {rec['images']!r} (MedXpertQA MM), which a "
            "text-only evaluation cannot show; score the Text subset"
        )
    options = _options_dict(_get(rec, "options", where, (dict,)), where, "options")
    # The published question repeats the options after "Answer Choices:"; the prompt lists them.
    question = _ANSWER_CHOICES.sub("", _get(rec, "question", where))
    return _item(
        rec.get("id", where),
        question,
        options,
        _answer_letters(_get(rec, "label", where), where, "label"),
        where,
        subject=rec.get("medical_task"),
        meta={k: rec[k] for k in ("body_system", "question_type") if k in rec},
    )


def cpqexam_option_type(qtype: str, answer: frozenset[str]) -> str:
    """The four question groups the CPQExam authors report accuracy by (their evaluate.py): case
    analysis, shared stem (A3/A4, 共用题干), and otherwise single or multiple answer by the gold."""
    if "案例分析" in qtype:
        return "案例分析题"
    if "题干" in qtype or "A3/A4" in qtype:
        return "共用题干题"
    return "多选题" if len(answer) > 1 else "单选题"


def _cpqexam(rec: Record, where: str) -> ExamItem:
    # The authors scored all 7,600 items, so the release's few broken option lists are repaired
    # where there is one reading, and each repair is reported (Benchmark.repaired).
    repairs: list[str] = []
    options = parse_option_lines(_get(rec, "option", where), where, "option", repairs)
    answer = _answer_letters(_get(rec, "answer", where), where, "answer")
    qtype = str(rec.get("type", ""))
    return _item(
        _get(rec, "uid", where),
        _get(rec, "question", where),
        options,
        answer,
        where,
        context=(rec.get("stem") or "").strip() or None,
        subject=rec.get("department") or None,
        multi=len(answer) > 1 or "多选" in qtype or "案例分析" in qtype or "不定项" in qtype,
        meta={"level": rec.get("level"), "type": qtype, "option_type": cpqexam_option_type(qtype, answer)},
        repaired="; ".join(repairs) or None,
    )


def _mmlu(rec: Record, where: str) -> ExamItem:
    row = rec["_row"]
    if len(row) != 6:
        raise ItemError(f"{where}: MMLU rows have 6 columns (question, A, B, C, D, answer), got {len(row)}")
    options = dict(zip("ABCD", (c.strip() for c in row[1:5])))
    return _item(where, row[0], options, _answer_letters(row[5], where, "answer"), where, subject=rec["_subject"])


READERS: dict[str, Reader] = {
    "medqa": _medqa,
    "medmcqa": lambda r, w: _medmcqa(r, w, base=1),
    "medmcqa_hf": lambda r, w: _medmcqa(r, w, base=0),
    "pubmedqa": _pubmedqa,
    "cmexam": _cmexam,
    "cmb": _cmb,
    "medxpertqa": _medxpertqa,
    "cpqexam": _cpqexam,
    "mmlu": _mmlu,
}
FORMATS = tuple(READERS)


# The field each format keeps its answer in, and what to do when a whole file has none.
ANSWER_FIELDS = {
    "medqa": ("answer_idx", "answer"),
    "medmcqa": ("cop",),
    "medmcqa_hf": ("cop",),
    "pubmedqa": ("final_decision",),
    "cmexam": ("Answer",),
    "cmb": ("answer",),
    "medxpertqa": ("label",),
    "cpqexam": ("answer",),
    "mmlu": ("answer",),
}
_NO_ANSWERS_HINT = {
    "medmcqa": "MedMCQA does not publish its test answers; score dev.json (the Hugging Face validation split)",
    "pubmedqa": "PubMedQA's unlabeled set (ori_pqau.json, pqa_unlabeled) has none; score ori_pqal.json or pqa_labeled",
    "cmb": "CMB-Exam does not publish its test answers; score CMB-val/CMB-val-merge.json",
}
_NO_ANSWERS_HINT["medmcqa_hf"] = _NO_ANSWERS_HINT["medmcqa"]


def _has_answer(rec: Record, format: str) -> bool:
    if format == "mmlu":
        row = rec.get("_row", ())
        values = [row[5]] if len(row) > 5 else []
    else:
        values = [rec.get(k) for k in ANSWER_FIELDS[format]]
    return any(v is not None and v != -1 and str(v).strip() != "" for v in values)


def _check_has_answers(path: Path, format: str, records: list[tuple[Record, str]]) -> None:
    """A split published without answers is an error naming the file: scored, every item would be
    wrong (or, worse, -1 would be read as an answer)."""
    if any(_has_answer(rec, format) for rec, _ in records):
        return
    hint = _NO_ANSWERS_HINT.get(format)
    raise ItemError(
        f"{path}: this split has no answers (no record of {len(records)} has "
        f"{' or '.join(repr(k) for k in ANSWER_FIELDS[format])}"
        f"{'' if format not in ('medmcqa', 'medmcqa_hf') else ' other than -1'})" + (f"; {hint}" if hint else "")
    )


def detect_format(rec: Record, where: str) -> str:
    """The format a record's fields say it is in."""
    keys = set(rec)
    if "_row" in keys:
        return "mmlu"
    if {"opa", "opb", "opc", "opd"} <= keys:  # cop is absent from the original test split
        return "medmcqa"
    if "final_decision" in keys or "QUESTION" in keys or {"pubid", "question", "context"} <= keys:
        return "pubmedqa"
    if {"uid", "option"} <= keys and isinstance(rec["option"], str):
        return "cpqexam"
    if {"question", "option"} <= keys and isinstance(rec["option"], dict):  # CMB's test split has no answer
        return "cmb"
    if {"Question", "Options", "Answer"} <= keys:
        return "cmexam"
    if {"question", "options", "label"} <= keys:
        return "medxpertqa"
    if {"question", "options"} <= keys and ({"answer_idx", "answer"} & keys):
        return "medqa"
    raise ItemError(
        f"{where}: cannot tell the benchmark format from fields {sorted(keys)}; "
        f"name it with --format ({', '.join(FORMATS)})"
    )


def _records(path: Path) -> Iterator[tuple[Record, str]]:
    """(record, where) pairs from JSON lines, JSON (array, or object keyed by id) or CSV, told apart by
    content (a .json file may hold JSON lines). ``where`` is file:line (a CSV record's first line),
    file[index] in an array or file['key'] in an id-keyed object."""
    suffix = path.suffix.lower()
    if suffix == ".csv":
        with open(path, encoding="utf-8-sig", newline="") as f:
            first = f.readline()
            f.seek(0)
            has_header = {"Question", "Options", "Answer"} <= set(next(csv.reader([first]), []))
            reader = csv.reader(f)
            header = next(reader) if has_header else None
            subject = re.sub(r"_(test|dev|val|validation|train)$", "", path.stem)
            end = reader.line_num
            for row in reader:
                where = f"{path}:{end + 1}"  # the record's first line (a quoted cell may span several)
                end = reader.line_num
                if not any(c.strip() for c in row):
                    continue
                if header is None:
                    yield {"_row": row, "_subject": subject}, where
                elif len(row) != len(header):
                    raise ItemError(f"{where}: {len(row)} columns, the header has {len(header)}")
                else:
                    yield dict(zip(header, row)), where
        return
    text = path.read_text(encoding="utf-8-sig")
    start = len(text) - len(text.lstrip())
    if start == len(text):
        return
    if text[start] == "[":
        yield from _json_document(path, text)
        return
    # One JSON object (an id-keyed benchmark or a single record), or one record per line: whatever the
    # suffix says (MedMCQA's original .json files, Dataset.to_json output are JSON lines).
    try:
        _, end = json.JSONDecoder().raw_decode(text, start)
    except json.JSONDecodeError:
        # A broken file: JSON lines if another line holds a whole object (then the bad line is named),
        # else one document (then the line where it breaks is).
        lines = [ln for ln in text.split("\n") if ln.strip()]
        if len(lines) > 1 and _is_object(lines[1]):
            yield from _json_lines(path, text)
        else:
            yield from _json_document(path, text)
        return
    if text[end:].strip():
        yield from _json_lines(path, text)
    else:
        yield from _json_document(path, text)


_QUESTION_KEYS = {"question", "Question", "QUESTION"}  # every format's record has one, an id-keyed object not


def _is_object(line: str) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except json.JSONDecodeError:
        return False


def _json_lines(path: Path, text: str) -> Iterator[tuple[Record, str]]:
    for lineno, line in enumerate(text.split("\n"), start=1):  # not splitlines: U+2028 may sit in a string
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ItemError(f"{path}:{lineno}: not valid JSON ({e.msg})") from e
        yield rec, f"{path}:{lineno}"


def _json_document(path: Path, text: str) -> Iterator[tuple[Record, str]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ItemError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from e
    if isinstance(data, list):
        for i, rec in enumerate(data):
            yield rec, f"{path}[{i}]"
    elif data == {}:
        return
    elif (
        isinstance(data, dict)
        and not _QUESTION_KEYS & set(data)
        and sum(isinstance(v, dict) for v in data.values()) * 2 > len(data)
    ):
        for key, rec in data.items():  # PubMedQA's original release: {pmid: record}
            if isinstance(rec, dict):
                rec = {"id": key, **rec}
            yield rec, f"{path}[{key!r}]"
    elif isinstance(data, dict) and data and all(k.isdigit() and isinstance(v, str) for k, v in data.items()):
        raise ItemError(
            f"{path}: holds only answers (id -> {next(iter(data.values()))!r}), no questions, like "
            "PubMedQA's test_ground_truth.json; score the file of records (ori_pqal.json, test_set.json)"
        )
    elif isinstance(data, dict):  # one record: a one-line JSON lines file
        yield data, f"{path}:{text[: len(text) - len(text.lstrip())].count(chr(10)) + 1}"
    else:
        raise ItemError(f"{path}: a JSON benchmark is a list of records or an object of id -> record")


def read_benchmark(
    path: str | os.PathLike, format: str | None = None, limit: int | None = None, skip_bad: bool = False
) -> Benchmark:
    """Every item of a benchmark file (the first ``limit`` if given); ids must be unique.

    A malformed item is an error naming its file and line. With ``skip_bad`` it is left out and its
    error kept in ``Benchmark.skipped`` instead, so a real release with a few broken items (CPQExam
    has 3 of 7,600) can still be scored, and the report says which were dropped."""
    path = Path(path)
    if not path.is_file():
        raise ItemError(f"benchmark file not found: {path}")
    if format is not None and format not in READERS:
        raise ItemError(f"unknown benchmark format {format!r}; known: {', '.join(FORMATS)}")
    records = []
    for rec, where in _records(path):
        if not isinstance(rec, dict):
            raise ItemError(f"{where}: a record should be a JSON object, got {type(rec).__name__}")
        records.append((rec, where))
    if not records:
        raise ItemError(f"{path}: no records")
    # Detection and the no-answers check look at the whole file; ``limit`` only bounds what is scored.
    detected = format is None
    if detected:
        format = detect_format(*records[0])
        _check_has_answers(path, format, records)
    else:  # named: the check only where the fields agree (a wrong --format fails on a missing field instead)
        try:
            agrees = detect_format(*records[0]).removesuffix("_hf") == format.removesuffix("_hf")
        except ItemError:
            agrees = False
        if agrees:
            _check_has_answers(path, format, records)
    if detected and format == "medmcqa":
        format = _medmcqa_base(path, records)
    reader = READERS[format]
    items, seen, skipped = [], {}, []
    for rec, where in records[:limit]:
        try:
            item = reader(rec, where)
        except ItemError as e:
            if not skip_bad:
                raise
            skipped.append(str(e))
            continue
        if item.id in seen:
            raise ItemError(f"{where}: duplicate id {item.id!r} (first at {seen[item.id]})")
        seen[item.id] = where
        items.append(item)
    repaired = [f"{item.source}: {item.repaired}" for item in items if item.repaired]
    return Benchmark(path, format, items, skipped, repaired, len(records))


def _medmcqa_base(path: Path, records: list[tuple[Record, str]]) -> str:
    """MedMCQA's own release numbers the correct option 1-4, the Hugging Face copy 0-3; a file that
    shows neither a 0 nor a 4 cannot be told apart, and guessing would silently shift every answer."""
    cops = {rec.get("cop") for rec, _ in records} - {None, -1}  # -1, or no cop: an item without an answer
    if 0 in cops and 4 in cops:
        raise ItemError(
            f"{path}: cop holds both 0 and 4; name the format (--format medmcqa for 1-4, medmcqa_hf for 0-3)"
        )
    if 0 in cops:
        return "medmcqa_hf"
    if 4 in cops:
        return "medmcqa"
    raise ItemError(
        f"{path}: cannot tell whether cop counts from 0 or 1 (no 0 or 4 seen); "
        "name it: --format medmcqa (1-4, the original release) or medmcqa_hf (0-3)"
    )
