"""The import graph: every module imports only from its own layer or the layers below it (no upward
arrows, hence no cycles). Lazy imports inside functions count as much as top-level ones."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "appdistill"
#: bottom to top; a module may import from its own layer and every layer before it
LAYERS = [
    {"errors", "registry", "io", "progress", "distributed"},  # the ground floor: storage, logs, devices
    {"data"}, {"features"}, {"foundation"}, {"student"}, {"eval"}, {"teachers"}, {"cache"}, {"methods"},
    {"config"}, {"train"}, {"export"}, {"pipeline"}, {"bench"}, {"cli", "__main__"},
]
RANK = {name: i for i, layer in enumerate(LAYERS) for name in layer}


def _unit(path: Path) -> str:
    rel = path.relative_to(PKG)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("appdistill"):
            mods = [f"appdistill.{a.name}" for a in node.names] if node.module == "appdistill" else [node.module]
        elif isinstance(node, ast.Import):
            mods = [a.name for a in node.names if a.name.startswith("appdistill")]
        else:
            continue
        out |= {m.split(".")[1] for m in mods if m.count(".") >= 1}
    return out


def test_every_module_has_a_layer() -> None:
    units = {_unit(p) for p in PKG.rglob("*.py") if _unit(p) != "__init__"}
    assert units <= set(RANK), f"place these in LAYERS: {sorted(units - set(RANK))}"


def test_no_upward_imports() -> None:
    bad = []
    for p in PKG.rglob("*.py"):
        src = _unit(p)
        if src == "__init__":
            continue
        for dst in _imports(p) & set(RANK):
            if RANK[dst] > RANK[src]:
                bad.append(f"{p.relative_to(PKG.parent)} ({src}) imports {dst}")
    assert not bad, "upward imports:\n" + "\n".join(sorted(bad))
