"""PHI redaction: identifiers in clinical text become typed placeholders ([NAME], [PHONE], [EMAIL],
[ID], [MRN], [DOB], [ADDRESS]), counted by type.

Patterns follow how identifiers appear in notes, in English and Chinese: structured ones by shape
(e-mail, phone numbers, the Chinese resident ID with its ISO 7064 check digit, US SSN), contextual
ones by the field or phrase that introduces them ("MRN:", "DOB", "住院号", "姓名：", "Dr.", "患者"
plus a surname). A trigger word stays and only the identifier is replaced, so the sentence still
reads. Types run in a fixed order (e-mail and IDs before phone numbers, whose digits they contain).
Dates, doses and lab values without a trigger are left alone: the target is fewer than 1% of clean
sentences altered.
"""

from __future__ import annotations

import datetime
import re
from typing import Callable

from data_pipelines.curate.config import PhiConfig
from data_pipelines.curate.documents import Stage, stat

_MONTH = r"(?:Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Sept|Oct|Nov|Dec)[a-z]*\.?"
_DATE = (
    rf"(?:\d{{1,2}}[/.-]\d{{1,2}}[/.-]\d{{2,4}}|\d{{4}}[/.-]\d{{1,2}}[/.-]\d{{1,2}}|\d{{4}}年\d{{1,2}}月\d{{1,2}}日"
    rf"|{_MONTH}\s+\d{{1,2}}(?:st|nd|rd|th)?,?\s+\d{{4}}|\d{{1,2}}\s+{_MONTH}\s+\d{{4}})"
)
# Common Chinese surnames that are not also everyday words after 患者 (黄疸, 周身, 严重, 白细胞 ... are left out).
_SURNAMES = (
    "王李张刘陈杨赵吴徐孙胡朱郭何林罗郑梁谢宋唐许韩冯邓曹彭曾肖董袁潘蒋蔡杜程魏苏吕丁沈姚卢姜崔钟谭陆汪"
    "范廖贾韦侯邹熊孟秦阎薛尹黎陶贺顾郝龚邵钱覃戴莫汤"
)
_NAME_EN = r"(?!(?:Mr|Mrs|Ms|Dr|Prof|The|This|Patient)\b)[A-Z][a-z]+(?:[-'][A-Z][a-z]+)?(?:\s+[A-Z]\.)?(?:\s+[A-Z][a-z]+(?:[-'][A-Z][a-z]+)?){0,2}"
_CN_ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)


def valid_cn_resident_id(value: str) -> bool:
    """GB 11643-1999: 17 digits (region, birth date YYYYMMDD, sequence) and an ISO 7064 MOD 11-2 check."""
    if len(value) != 18 or not value[:17].isdigit():
        return False
    try:
        born = datetime.date(int(value[6:10]), int(value[10:12]), int(value[12:14]))
    except ValueError:
        return False
    if not 1900 <= born.year <= 2100:
        return False
    check = "10X98765432"[sum(int(d) * w for d, w in zip(value[:17], _CN_ID_WEIGHTS)) % 11]
    return value[17].upper() == check


def cn_resident_id(birth: str, region: str = "110105", sequence: str = "123") -> str:
    """A valid ID for a birth date YYYYMMDD (for planting test identifiers)."""
    body = region + birth + sequence
    return body + "10X98765432"[sum(int(d) * w for d, w in zip(body, _CN_ID_WEIGHTS)) % 11]


def _p(pattern: str, flags: int = 0) -> re.Pattern:
    return re.compile(pattern, flags)


# (type, pattern, validator). A pattern with a group named v replaces that group only.
RULES: list[tuple[str, re.Pattern, Callable[[str], bool] | None]] = [
    ("EMAIL", _p(r"(?<![\w.+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}"), None),
    ("ID", _p(r"(?<![0-9A-Za-z])(?P<v>\d{17}[\dXx])(?![0-9A-Za-z])"), valid_cn_resident_id),
    ("ID", _p(r"(?<![\w-])(?!000|666|9\d\d)\d{3}-(?!00)\d{2}-(?!0000)\d{4}(?![\w-])"), None),
    (
        "ID",
        _p(
            r"(?:SSN|Social Security (?:Number|No\.?)|身份证(?:号码|号)?|ID (?:number|No\.?))\s*[:：#]?\s*"
            r"(?P<v>[0-9Xx][0-9Xx -]{5,22}[0-9Xx])",
            re.IGNORECASE,
        ),
        None,
    ),
    (
        "MRN",
        _p(
            r"(?:MRN|Medical Record (?:Number|No\.?)|Med\.? Rec\.? (?:No\.?|#)|Chart (?:Number|No\.?)|"
            r"Patient ID|病历号|住院号|门诊号|病案号|就诊卡号)\s*(?:[:：#]|No\.?)?\s*(?P<v>[A-Za-z]{0,3}-?\d[\dA-Za-z-]{3,19})",
            re.IGNORECASE,
        ),
        None,
    ),
    (
        "DOB",
        _p(
            rf"(?:DOB|D\.O\.B\.|Date of Birth|Birth ?date|born(?: on)?|出生日期|出生于|生日)\s*[:：]?\s*(?P<v>{_DATE})",
            re.IGNORECASE,
        ),
        None,
    ),
    ("PHONE", _p(r"(?<![\w+])(?:\+?86[-\s]?)?1[3-9]\d{9}(?!\d)"), None),
    ("PHONE", _p(r"(?<![\w-])(?:\+?1[-.\s]?)?(?:\(\d{3}\)\s?|\d{3}[-.\s])\d{3}[-.\s]\d{4}(?![\w-])"), None),
    ("PHONE", _p(r"(?<![\w-])0\d{2,3}-\d{7,8}(?![\w-])"), None),
    (
        "PHONE",
        _p(
            r"(?:Tel|Phone|Telephone|Mobile|Cell|Fax|电话|手机|联系电话|联系方式)\.?\s*[:：]?\s*"
            r"(?P<v>\+?\d[\d\s().-]{5,18}\d)",
            re.IGNORECASE,
        ),
        None,
    ),
    (
        "ADDRESS",
        _p(
            r"\b\d{1,6}\s+(?:[A-Z][a-z]+\.?\s+){1,4}(?:Street|St|Avenue|Ave|Road|Rd|Boulevard|Blvd|Lane|Ln|"
            r"Drive|Dr|Court|Ct|Way|Place|Pl|Terrace|Circle|Parkway|Pkwy|Highway|Hwy)\b\.?"
            r"(?:,?\s+(?:Apt|Suite|Unit|#)\.?\s*\w+)?(?:,\s*[A-Z][a-z]+(?:\s[A-Z][a-z]+)*)?"
            r"(?:,\s*[A-Z]{2}(?:\s+\d{5}(?:-\d{4})?)?)?"
        ),
        None,
    ),
    (
        "ADDRESS",
        _p(r"(?:Address|Home address|Residence)\s*[:：]\s*(?P<v>[^\n;]{5,80}?)(?=[;\n]|\.\s|\.$|$)", re.IGNORECASE),
        None,
    ),
    ("ADDRESS", _p(r"(?:住址|地址|家住|现住址|现住|居住于|住在)\s*[:：]?\s*(?P<v>[^，。；,;\n]{4,40})"), None),
    (
        "ADDRESS",
        _p(
            r"(?:[\u4e00-\u9fff]{2,3}(?:省|自治区))?[\u4e00-\u9fff]{2,3}市(?:[\u4e00-\u9fff]{1,3}(?:区|县))?"
            r"[\u4e00-\u9fff]{1,6}(?:路|街|巷|大道)\d{1,5}号(?:\d+(?:栋|楼|单元|室))*"
        ),
        None,
    ),
    ("NAME", _p(rf"(?:Patient(?: name)?|Pt\.?(?: name)?|Name|Patient's name)\s*:\s*(?P<v>{_NAME_EN})"), None),
    ("NAME", _p(rf"(?:Mr|Mrs|Ms|Miss|Dr|Prof)\.?\s+(?P<v>{_NAME_EN})"), None),
    ("NAME", _p(rf"(?:Signed by|Seen by|Referred by|Attending|Physician|Nurse)\s*:?\s+(?P<v>{_NAME_EN})"), None),
    ("NAME", _p(rf"(?P<v>{_NAME_EN}), (?:a|an) \d{{1,3}}[- ]year[- ]old"), None),
    ("NAME", _p(r"(?:姓名|患者姓名|病人姓名)\s*[:：]\s*(?P<v>[\u4e00-\u9fff]{2,4})"), None),
    (
        "NAME",
        _p(
            rf"(?:患者|病人|患儿|家属|主治医师|医师|医生|护士)\s*[:：]?\s*(?P<v>[{_SURNAMES}][\u4e00-\u9fff]{{1,2}})"
            r"(?=[，,。、;；\s(（:：]|男|女|因|于|是|的|先生|女士|$|\d)"
        ),
        None,
    ),
]


_PLACEHOLDERS = re.compile(r"[\s,.;:]*(?:\[[A-Z]+\][\s,.;:]*)+")  # already redacted by an earlier rule


def redact(
    text: str, types: tuple[str, ...] | list[str] = ("EMAIL", "ID", "MRN", "DOB", "PHONE", "ADDRESS", "NAME")
) -> tuple[str, dict[str, int]]:
    """(redacted text, count by type)."""
    counts: dict[str, int] = {}
    for kind, pattern, valid in RULES:
        if kind not in types:
            continue

        def sub(m: re.Match, kind=kind, valid=valid) -> str:
            group = "v" if "v" in pattern.groupindex else 0
            value = m.group(group)
            if _PLACEHOLDERS.fullmatch(value) or (valid is not None and not valid(value)):
                return m.group(0)
            counts[kind] = counts.get(kind, 0) + 1
            start, end = m.span(group)
            whole = m.group(0)
            return whole[: start - m.start()] + f"[{kind}]" + whole[end - m.start() :]

        text = pattern.sub(sub, text)
    return text, counts


class RedactPhi(Stage):
    name = "phi"
    changes_text = True

    def __init__(self, cfg: PhiConfig):
        self.cfg = cfg

    def apply(self, doc: dict):
        doc["text"], doc["phi"] = redact(doc["text"], self.cfg.types)
        return None

    def stats(self, doc: dict):
        out = [stat(f"phi/{kind}", n) for kind, n in doc["phi"].items()]
        if doc["phi"]:
            out.append(stat("phi/documents"))
        return out
