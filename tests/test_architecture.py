"""The import graph of the code: layers that run one way and no cycle (docs/architecture.md).

Every ``import`` and ``from ... import`` in core/, ui/, pages/ and app.py counts, also those
inside functions: a local import is still an arrow between layers.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Lowest first; a module may import its own layer and the layers below it, never one above.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("foundation", ("core.errors", "core.atomic", "core.config", "core.safe_json", "core.precision", "core.progress",
                    "core.data", "core.visual")),
    ("models, metrics", ("core.models", "core.metrics")),
    ("train, profile", ("core.train", "core.profile", "core.predictions", "core.quantize")),
    ("importance, allocation", ("core.importance", "core.allocation")),
    ("pruning", ("core.pruning", "core.live")),
    ("services", ("core.services", "core.compare")),
    ("run store", ("core.runs",)),
    ("front ends", ("core.commands", "core.cli", "core.__main__", "ui", "pages", "app")),
]
# Front ends never call each other: the CLI and the dashboard both go through the services
# and the run store.
SEPARATE_FRONT_ENDS = (("core.commands", "core.cli", "core.__main__"), ("ui", "pages", "app"))


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _sources() -> dict[str, Path]:
    files = [REPO / "app.py", *sorted((REPO / "core").rglob("*.py")), *sorted((REPO / "ui").rglob("*.py")),
             *sorted((REPO / "pages").rglob("*.py"))]
    return {_module_name(f): f for f in files if f.is_file()}


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The project module an imported name lives in (the longest module prefix), or None."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in modules:
            return candidate
    return None


def import_graph() -> dict[str, set[str]]:
    modules = _sources()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join([*anchor, base] if base else anchor)
                targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
            for target in targets:
                found = _resolve(target, modules)
                if found is not None and found != name:
                    graph[name].add(found)
    return graph


def layer_of(module: str) -> int:
    if module == "core":  # the package itself: nothing in it
        return 0
    for index, (_, prefixes) in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return index
    raise AssertionError(f"{module} belongs to no layer: add it to LAYERS (and docs/architecture.md)")


def _in(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_every_module_has_a_layer():
    for module in import_graph():
        layer_of(module)


def test_imports_never_run_upward():
    upward = sorted(f"{a} ({LAYERS[layer_of(a)][0]}) imports {b} ({LAYERS[layer_of(b)][0]})"
                    for a, targets in import_graph().items() for b in targets if layer_of(b) > layer_of(a))
    assert not upward, "imports that run upward:\n" + "\n".join(upward)


def test_front_ends_do_not_call_each_other():
    crossing = sorted(f"{a} imports {b}" for a, targets in import_graph().items() for b in targets
                      for one, other in (SEPARATE_FRONT_ENDS, SEPARATE_FRONT_ENDS[::-1])
                      if _in(a, one) and _in(b, other))
    assert not crossing, "\n".join(crossing)


def test_no_import_cycle():
    found = cycles(import_graph())
    assert not found, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in found)


@pytest.mark.parametrize("graph, expected", [
    ({"a": {"b"}, "b": {"a"}, "c": set()}, [["a", "b"]]),
    ({"a": {"b"}, "b": {"c"}, "c": set()}, []),
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}, [["a", "b", "c"]]),
])
def test_cycle_finder_finds_what_it_should(graph, expected):
    assert cycles(graph) == expected


def test_graph_sees_local_and_relative_imports(tmp_path, monkeypatch):
    package = tmp_path / "core"
    (package / "pruning").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "errors.py").write_text("")
    (package / "pruning" / "__init__.py").write_text("")
    (package / "pruning" / "step.py").write_text("def f():\n    from ..errors import X\n")
    (package / "pruning" / "loop.py").write_text("from . import step\nimport core.errors\n")
    monkeypatch.setitem(globals(), "REPO", tmp_path)
    graph = import_graph()
    assert graph["core.pruning.step"] == {"core.errors"}
    assert graph["core.pruning.loop"] == {"core.pruning", "core.pruning.step", "core.errors"}
