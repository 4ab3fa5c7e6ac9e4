"""A raw corpus with known faults planted in it: what the demo curates first, and what the tests
check each stage against. Around clean passages it plants exact and near duplicates, clinical
notes carrying PHI of every type (English and Chinese), a leaked exam question, off-topic,
foreign-language and boilerplate pages, and broken records (undecodable bytes, malformed JSON, a
missing text field, an empty file), and returns what it planted so a caller can check the report.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from data_pipelines.curate.phi import cn_resident_id

# One note per PHI type at least; each is medical enough to pass the relevance filter.
PHI_NOTES = [
    (
        "Patient: John Smith, a 58-year-old man with hypertension and type 2 diabetes, was admitted with chest "
        "pain. DOB: 03/14/1966. MRN: 48213377. Contact phone (555) 201-3344, e-mail john.smith@example.com. "
        "Home address: 42 Maple Street, Springfield, IL 62704. Troponin was elevated and the electrocardiogram "
        "showed ST depression; treatment with aspirin and heparin was started and the patient was stable.",
        {"NAME": 1, "DOB": 1, "MRN": 1, "PHONE": 1, "EMAIL": 1, "ADDRESS": 1},
    ),
    (
        "Maria Garcia, a 45-year-old woman, presented with fever, cough and dyspnea for three days. Chest "
        "radiograph showed a right lower lobe pneumonia; sputum culture grew Streptococcus pneumoniae. "
        "SSN 123-45-6789 was recorded at registration. Seen by Dr. Alan Brooks, who prescribed amoxicillin; "
        "the infection resolved and the patient was discharged with follow-up in the clinic.",
        {"NAME": 2, "ID": 1},
    ),
    (
        f"患者张伟，男，62岁，身份证号{cn_resident_id('19620508')}，住院号ZY20231234，手机13812345678。因胸痛3小时入院，"
        "心电图提示急性心肌梗死，肌钙蛋白升高，予阿司匹林、肝素抗凝治疗及急诊冠脉介入手术，术后症状缓解，血压平稳。",
        {"NAME": 1, "ID": 1, "MRN": 1, "PHONE": 1},
    ),
    (
        "姓名：李晓明 出生日期：1978年6月2日 电话：010-87654321 住址：北京市朝阳区建国路88号。患者因发热、咳嗽一周就诊，"
        "血常规提示白细胞升高，胸部CT示肺炎，诊断为社区获得性肺炎，予抗生素治疗后体温恢复正常，症状明显好转。",
        {"NAME": 1, "DOB": 1, "PHONE": 1, "ADDRESS": 1},
    ),
]

OFF_TOPIC = (
    "The quarterly earnings call covered revenue growth in the retail segment, new store openings in "
    "three regions, supply chain costs and the outlook for the holiday season. Analysts asked about "
    "marketing spend and the dividend, and management expects steady margins next year."
)
FOREIGN = (
    "Le patient a présenté une douleur thoracique aiguë irradiant vers le bras gauche. L'électrocardiogramme "
    "a montré un sus-décalage du segment ST et le traitement par aspirine a été commencé rapidement."
)
BOILERPLATE = "\n".join(
    [
        "Home | About us | Contact | Privacy policy | Sitemap",
        "Please accept our cookie policy to continue reading",
        "Click here to subscribe to our newsletter for health tips",
        "Heart failure causes dyspnea, edema and fatigue in many patients.",
        "Terms of use apply; all rights reserved by the publisher",
        "Share this article with friends and click here for more",
    ]
)


def write_world_lexicon(world_json: str | Path, out_file: str | Path) -> Path:
    """The synthetic world's own medical vocabulary (its conditions, drugs, tests, pathogens and
    specialties) as a lexicon file: its invented names are medical terms no general lexicon knows,
    as a team adds its own domain's terms beside the bundled lexicons."""
    world = json.loads(Path(world_json).read_text(encoding="utf-8"))
    terms = set(world["subjects"]) | set(world["drugs"]) | set(world["tests"])
    for c in world["conditions"]:
        terms |= {c["name"], *c["symptoms"]} | ({c["pathogen"]} if c.get("pathogen") else set())
    out = Path(out_file)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        "# terms of the synthetic medical world (medjax.data.medworld)\n"
        + "".join(t.lower() + "\n" for t in sorted(terms)),
        encoding="utf-8",
    )
    return out


def _near_copy(text: str, rng: random.Random) -> str:
    """The text as a mirror site serves it: one word changed and a credit line added (Jaccard of
    5-word shingles about 0.85 for the world's passages)."""
    words = text.split(" ")
    i = rng.randrange(len(words))
    words[i] = words[i].upper()
    return " ".join(words) + " Mirrored from the original source."


def plant_corpus(
    passages: list[dict],
    out_dir: str | Path,
    *,
    leaked_question: str,
    seed: int = 0,
    duplicates: int = 8,
    near_duplicates: int = 8,
    heldout: list[dict] = (),
) -> dict:
    """Writes out_dir/{passages.jsonl, heldout.jsonl, notes.jsonl, web.jsonl, broken.jsonl, empty.jsonl,
    note.txt}.

    ``passages`` are clean {id, text} records kept as they are (source "textbook"), ``heldout`` the
    same for evaluation (source "textbook-heldout"). Returns the planted counts by kind."""
    rng = random.Random(seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    clean = [{"id": p["id"], "text": p["text"], "source": "textbook"} for p in passages]
    picks = rng.sample(range(len(clean)), duplicates + near_duplicates)
    dups = [{**clean[i], "id": f"{clean[i]['id']}-copy", "source": "web-mirror"} for i in picks[:duplicates]]
    nears = [
        {"id": f"{clean[i]['id']}-near", "text": _near_copy(clean[i]["text"], rng), "source": "web-mirror"}
        for i in picks[duplicates:]
    ]
    leak = clean[rng.randrange(len(clean))]
    leaked = {
        "id": "leaked-exam-question",
        "source": "forum",
        "text": f"{leak['text']} A reader asked this exam question on a forum: {leaked_question}",
    }
    rows = {
        "passages.jsonl": clean,
        "heldout.jsonl": [{"id": p["id"], "text": p["text"], "source": "textbook-heldout"} for p in heldout],
        "notes.jsonl": [
            {"id": f"note-{i}", "text": t, "source": "hospital-notes"} for i, (t, _) in enumerate(PHI_NOTES)
        ],
        "web.jsonl": [
            *dups,
            *nears,
            leaked,
            {"id": "off-topic", "text": OFF_TOPIC, "source": "news"},
            {"id": "foreign", "text": FOREIGN, "source": "web"},
            {"id": "boilerplate", "text": BOILERPLATE, "source": "web"},
        ],
    }
    for name, records in rows.items():
        if not records:
            continue
        with open(out / name, "w", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
    with open(out / "broken.jsonl", "wb") as f:
        f.write(b'{"id": "bytes", "text": "caf\xe9 au lait \xff"}\n')  # Latin-1, not UTF-8
        f.write(b'{"id": "truncated", "text": "Aspirin inhib\n')
        f.write(json.dumps({"id": "no-text", "body": "Heparin is an anticoagulant."}).encode() + b"\n")
    (out / "empty.jsonl").write_bytes(b"")
    (out / "note.txt").write_text(PHI_NOTES[0][0].replace("John Smith", "Robert Jones"), encoding="utf-8")
    phi: dict[str, int] = {}
    for _, counts in PHI_NOTES + [PHI_NOTES[0]]:
        for kind, n in counts.items():
            phi[kind] = phi.get(kind, 0) + n
    # note.txt is note 0 about another patient: redacted, the two are one text, and the copy goes.
    return {
        "clean": len(clean),
        "heldout": len(heldout),
        "duplicates": duplicates + 1,
        "near_duplicates": near_duplicates,
        "leaked": 1,
        "off_topic": 1,
        "foreign": 1,
        "boilerplate": 1,
        "phi_notes": len(PHI_NOTES) + 1,
        "phi": phi,
        "phi_notes_kept": len(PHI_NOTES),
        "broken": {"undecodable_bytes": 1, "malformed_json": 1, "missing_text_field": 1, "empty_file": 1},
    }
