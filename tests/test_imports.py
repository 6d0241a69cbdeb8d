"""The import graph: arrows point one way (lora -> minilm, never back) and there is no cycle.

The graph is read from the source with `ast`, every import statement counted, at module level or
inside a function (a lazy import is still an arrow). An edge goes from a module to the module it
names: `from lora.attach import attach` -> lora.attach, `from minilm import bench` -> minilm.bench,
`import lora` -> lora (its __init__). Only the command line, minilm/cli/, may wire minilm and lora
together. The checker is itself tested on small packages written here that break each rule.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("minilm", "lora")
WIRING = "minilm.cli"  # the one place inside minilm that may import lora


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path, packages=PACKAGES) -> dict[str, set[str]]:
    """{module: the project modules it imports}, for every .py file of `packages` under `root`."""
    files = {module_name(p, root): p for pkg in packages for p in sorted((root / pkg).rglob("*.py"))}
    graph = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from . import x, from ..y import z
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                for a in node.names:  # `from pkg import mod` names a module; `from mod import f` does not
                    targets.add(f"{base}.{a.name}" if f"{base}.{a.name}" in files else base)
        graph[name] = {t for t in targets if t in files and t != name}
    return graph


def back_arrows(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    """(module, lora module it imports) for every module of minilm outside the command line that imports lora."""
    inside_minilm = lambda m: m == "minilm" or m.startswith("minilm.")
    wiring = lambda m: m == WIRING or m.startswith(WIRING + ".")
    return sorted((m, t) for m, ts in graph.items() if inside_minilm(m) and not wiring(m)
                  for t in ts if t == "lora" or t.startswith("lora."))


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as [a, b, ..., a], or None (depth-first search, colouring the modules)."""
    state: dict[str, str] = {}  # "open" while on the current path, "done" after
    path: list[str] = []

    def visit(m):
        state[m] = "open"
        path.append(m)
        for t in sorted(graph.get(m, ())):
            if state.get(t) == "open":
                return path[path.index(t):] + [t]
            if t not in state and (found := visit(t)):
                return found
        state[m] = "done"
        path.pop()
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


# ---------------------------------------------------------------- the project itself


def test_the_graph_is_read_from_every_module():
    graph = import_graph(ROOT)
    assert {"minilm", "minilm.model", "minilm.cli", "lora", "lora.weight", "lora.cost"} <= set(graph)
    assert "minilm.precision" in graph["lora.weight"]  # lora builds on minilm (its mixed-precision product)
    wired = set().union(*(ts for m, ts in graph.items() if m == "minilm.cli" or m.startswith("minilm.cli.")))
    assert any(t == "lora" or t.startswith("lora.") for t in wired), "the command line wires lora in"


def test_minilm_never_imports_lora_outside_the_command_line():
    assert back_arrows(import_graph(ROOT)) == []


def test_the_import_graph_has_no_cycle():
    assert cycle(import_graph(ROOT)) is None


# ---------------------------------------------------------------- the checker can fail


def write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def test_a_lazy_back_arrow_is_found(tmp_path):
    root = write(tmp_path, {
        "minilm/__init__.py": "", "minilm/model.py": "def f():\n    import lora.weight\n",
        "minilm/cli/__init__.py": "import lora\n", "lora/__init__.py": "from lora import weight\n",
        "lora/weight.py": "from minilm.model import f\n"})
    graph = import_graph(root)
    assert graph["lora"] == {"lora.weight"} and graph["lora.weight"] == {"minilm.model"}
    assert back_arrows(graph) == [("minilm.model", "lora.weight")]  # the cli's import is allowed
    assert cycle(graph) == ["lora.weight", "minilm.model", "lora.weight"]


def test_a_cycle_through_relative_imports_is_found(tmp_path):
    root = write(tmp_path, {
        "minilm/__init__.py": "", "minilm/a.py": "from .b import x\n", "minilm/b.py": "from . import c\n",
        "minilm/c.py": "from minilm.a import y\n", "lora/__init__.py": ""})
    graph = import_graph(root)
    assert graph["minilm.a"] == {"minilm.b"} and graph["minilm.b"] == {"minilm.c"}
    assert cycle(graph) == ["minilm.a", "minilm.b", "minilm.c", "minilm.a"]
    assert back_arrows(graph) == []
