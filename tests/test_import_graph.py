"""The import graph DESIGN.md declares: no module imports another that (directly or through others)
imports it back, and no package imports one of a higher layer. Read from the source with `ast`,
imports inside functions included (they hide edges, not remove them); imports under
`if TYPE_CHECKING:` are left out, as they never run."""

import ast
from collections import defaultdict
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent

# Layers from the bottom: a module of medjax/<name> may import its own package and any package of
# a lower layer, never one of its own layer or above. Keep in step with DESIGN.md ("Layers").
LAYERS = [
    {"utils", "charts", "integrity"},
    {"models", "tasks"},
    {"config"},
    {"data", "rag"},
    {"convert"},
    {"parallel"},
    {"rl"},
    {"train"},
    {"eval", "serve"},
    {"demo", "launch"},
    {"cli"},
]
RANK = {name: i for i, layer in enumerate(LAYERS) for name in layer}
# The curation pipelines (data_pipelines/) sit on medjax's layers up to data; of medjax, only the
# commands that run them (cli, demo) import them.
PIPELINES = "data_pipelines"
PIPELINES_MAY_IMPORT = {"utils", "charts", "models", "tasks", "config", "data"}
PIPELINES_IMPORTED_BY = {"cli", "demo"}


def _modules(*roots: Path) -> dict[str, Path]:
    mods = {}
    for root in roots:
        for f in sorted(root.rglob("*.py")):
            name = ".".join(f.relative_to(root.parent).with_suffix("").parts)
            mods[name.removesuffix(".__init__")] = f
    return mods


def _imports(f: Path, known: set[str]) -> list[tuple[str, int]]:
    """(module, line) for each medjax module ``f`` imports; `from pkg import mod` counts as mod."""
    out = []
    tree = ast.parse(f.read_text(encoding="utf-8"), str(f))
    type_only = {
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING")
        for stmt in node.body
        for inner in ast.walk(stmt)
    }
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            subs = [f"{node.module}.{a.name}" for a in node.names]
            names = [n for n in subs if n in known] or [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        out += [(n, node.lineno) for n in names if n in known]
    return out


def import_graph(*roots: Path) -> dict[str, dict[str, int]]:
    mods = _modules(*(roots or (REPO_ROOT / "medjax", REPO_ROOT / PIPELINES)))
    graph: dict[str, dict[str, int]] = defaultdict(dict)
    for name, f in mods.items():
        for target, line in _imports(f, set(mods)):
            if target != name:
                graph[name].setdefault(target, line)
    return graph


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in list(graph):
        if v not in index:
            visit(v)
    return found


def _package(module: str) -> str:
    parts = module.split(".")
    if parts[0] == PIPELINES:
        return PIPELINES
    return parts[1] if len(parts) > 1 else "__init__"


def upward_imports(graph: dict[str, dict[str, int]]) -> list[str]:
    bad = []
    for src, targets in graph.items():
        a = _package(src)
        for dst, line in targets.items():
            b = _package(dst)
            if a == b or b == "__init__":
                continue
            if a == PIPELINES or b == PIPELINES:
                if (b if a == PIPELINES else a) not in (
                    PIPELINES_MAY_IMPORT if a == PIPELINES else PIPELINES_IMPORTED_BY
                ):
                    bad.append(f"{src}:{line} imports {dst} (outside what {PIPELINES} and medjax may share)")
                continue
            if a not in RANK or b not in RANK:
                bad.append(f"{src}:{line} -> {dst}: package not in LAYERS")
            elif RANK[b] >= RANK[a]:
                bad.append(f"{src}:{line} imports {dst} ({b} is not below {a})")
    return bad


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_no_import_reaches_up_or_across_a_layer():
    assert upward_imports(import_graph()) == []


def test_the_checks_find_a_cycle_and_an_upward_import(tmp_path):
    """The checks can fail: a planted circle and a models/ module importing train/ are reported."""
    pkg = tmp_path / "medjax"
    for sub in ("models", "train"):
        (pkg / sub).mkdir(parents=True)
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "models" / "a.py").write_text("from medjax.train import b\n")
    (pkg / "train" / "b.py").write_text("def f():\n    import medjax.models.a\n")
    graph = import_graph(pkg)
    assert cycles(graph) == [["medjax.models.a", "medjax.train.b"]]
    assert upward_imports(graph) == ["medjax.models.a:1 imports medjax.train.b (train is not below models)"]


def test_type_only_imports_are_not_edges(tmp_path):
    """An import under `if TYPE_CHECKING:` never runs, so it closes no circle (models/families.py
    names ModelConfig that way, while models/config.py imports the family table)."""
    pkg = tmp_path / "medjax"
    (pkg / "models").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "models" / "__init__.py").write_text("")
    (pkg / "models" / "a.py").write_text("from medjax.models import b\n")
    (pkg / "models" / "b.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from medjax.models import a\nimport medjax.models.c\n"
    )
    (pkg / "models" / "c.py").write_text("")
    graph = import_graph(pkg)
    assert cycles(graph) == []
    assert set(graph["medjax.models.b"]) == {"medjax.models.c"}
