"""Matplotlib as every medjax picture uses it: the Agg backend (no screen on these machines) and a
font that has Chinese glyphs, since exam subjects, levels and question types are often Chinese.
tools/setup_env.sh installs WenQuanYi Micro Hei where it may; any installed CJK family below is
used as a per-glyph fall-back behind DejaVu Sans. Without one, ``label`` rewrites Chinese text that
a chart would otherwise draw as boxes: known exam labels in English, anything else as code points."""

from __future__ import annotations

import functools
import re
from pathlib import Path

CJK_FAMILIES = (
    "WenQuanYi Micro Hei",
    "Noto Sans CJK SC",
    "Noto Sans CJK JP",
    "Source Han Sans SC",
    "Droid Sans Fallback",
    "SimHei",
    "Microsoft YaHei",
    "PingFang SC",
)
_CJK_FILES = ("wqy", "notosanscjk", "sourcehansans", "droidsansfallback", "simhei", "msyh")
_CJK = re.compile(r"[\u2e80-\u9fff\uf900-\ufaff\uff00-\uffef]+")
# CPQExam's levels and question groups, the labels an exam chart shows most.
GLOSSARY = {
    "初级": "Primary",
    "中级": "Intermediate",
    "副高": "Associate senior",
    "高级": "Senior",
    "正高": "Senior",
    "单选题": "Single answer",
    "多选题": "Multiple answer",
    "共用题干题": "Shared stem",
    "案例分析题": "Case analysis",
}


@functools.cache
def cjk_family() -> str | None:
    """The first installed font family with Chinese glyphs (fonts installed after matplotlib built
    its cache are found on disk and added)."""
    from matplotlib import font_manager

    names = {f.name for f in font_manager.fontManager.ttflist}
    found = next((n for n in CJK_FAMILIES if n in names), None)
    if found is None:
        for path in font_manager.findSystemFonts():
            if any(k in Path(path).name.lower().replace("-", "") for k in _CJK_FILES):
                try:
                    font_manager.fontManager.addfont(path)
                except (OSError, RuntimeError, ValueError):
                    continue
        names = {f.name for f in font_manager.fontManager.ttflist}
        found = next((n for n in CJK_FAMILIES if n in names), None)
    return found


def pyplot():
    """matplotlib.pyplot on Agg, with the CJK fall-back font configured."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    family = cjk_family()
    if family:
        plt.rcParams["font.family"] = ["DejaVu Sans", family]
    return plt


def label(text: str) -> str:
    """``text`` as a chart can draw it: unchanged when a CJK font is installed; otherwise known exam
    labels in English and other Chinese as code points, never as boxes."""
    if cjk_family() or not _CJK.search(text):
        return text
    if text in GLOSSARY:
        return GLOSSARY[text]
    return _CJK.sub(lambda m: GLOSSARY.get(m.group(0)) or " ".join(f"U+{ord(c):04X}" for c in m.group(0)), text)


def save(fig, path: Path) -> Path:
    """Written beside ``path`` and renamed over it, so a reader never sees half a PNG."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.tight_layout()
    fig.savefig(tmp, dpi=100)
    import matplotlib.pyplot as plt

    plt.close(fig)
    tmp.replace(path)
    return path
