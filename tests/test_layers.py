"""The package's layers, read from the source: no package imports a higher one, no module import circle.

Layers, top to bottom (docs/design.md): cli -> stages -> agent -> migration -> plan/vmm ->
core/rpc/sev/kvm/transport -> errors. Every import counts, also one inside a function or under
TYPE_CHECKING: a circle that only type checking sees is still two modules that cannot be read apart.
"""

from __future__ import annotations

import ast
from pathlib import Path

import confplan

ROOT = Path(confplan.__file__).parent
RANK = {
    "errors": 0, "__init__": 0, "statefile": 0.5, "guest": 0.75,
    "kvm": 1, "core": 1, "rpc": 1, "sev": 1, "transport": 1,
    "vmm": 2, "plan": 2,
    "migration": 3,
    "agent": 4,
    "preflight": 4.5,
    "stages": 5,
    "report": 5.5,
    "report_junit": 5.5, "report_html": 5.5, "report_plots": 5.4,
    "cli": 6, "__main__": 7,
}  # fmt: skip


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    """Every confplan module ``path`` imports (``from confplan.x import y`` is x.y when that is a module)."""
    tree = ast.parse(path.read_text(), str(path))
    here = module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("confplan"))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join([*parts[: len(parts) - node.level + 1], base])
            if not base.startswith("confplan"):
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in MODULES else base)
    found.discard(here)
    return {name for name in found if name in MODULES}


MODULES = {module_name(path): path for path in ROOT.rglob("*.py")}
GRAPH = {name: imports_of(path) for name, path in MODULES.items()}


def layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_every_package_has_a_layer() -> None:
    assert {layer(name) for name in MODULES} <= set(RANK), "add the new package to RANK and docs/design.md"


def test_no_package_imports_a_higher_layer() -> None:
    upward = sorted(
        f"{name} imports {dep}"
        for name, deps in GRAPH.items()
        for dep in deps
        if layer(dep) != layer(name) and RANK[layer(dep)] >= RANK[layer(name)]
    )
    assert upward == []


def _cycles() -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for dep in GRAPH[node]:
            if dep not in index:
                visit(dep)
                low[node] = min(low[node], low[dep])
            elif dep in on_stack:
                low[node] = min(low[node], index[dep])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for name in sorted(GRAPH):
        if name not in index:
            visit(name)
    return out


def test_no_import_circle() -> None:
    assert _cycles() == []


def test_the_design_doc_names_every_module() -> None:
    text = (ROOT.parent / "docs" / "design.md").read_text()
    table = text[text.index("## The tree today") :]
    missing = []
    for path in MODULES.values():
        rel = path.relative_to(ROOT).as_posix()
        if (path.name == "__init__.py" and rel != "cli/__init__.py") or rel in ("__main__.py", "__init__.py"):
            continue
        folder = rel.rsplit("/", 1)[0]
        if f"`{rel}`" not in table and f"`{folder}/*.py`" not in table:
            missing.append(rel)
    assert missing == [], "add these to docs/design.md's module table"
