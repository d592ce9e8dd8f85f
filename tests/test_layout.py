"""The house plan holds: no import cycle (function-local and TYPE_CHECKING imports count), no import that runs up
the layers, no module over 500 lines, and ``analysis`` reads records without the training code."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("stability", "analysis")
MAX_LINES = 500

# Bottom up. A module may import its own layer or a lower one; within a layer, cycles are still refused.
LAYERS = [
    ("stability.errors", "stability.steps", "stability._version"),
    ("stability.config", "stability.registry", "stability.plugins", "stability.store"),
    ("stability.presets", "stability.data", "stability.models"),
    ("stability.engine", "stability.maths", "stability.align", "stability.hessian", "stability.trackers"),
    ("stability.methods", "stability.lmc"),
    ("stability.stages",),
    ("stability.grid", "stability.testing", "stability.integrations", "analysis"),
    ("stability.apps", "stability.__main__", "stability"),
]
# What `analysis` may take from `stability`: file names and columns, steps, errors, and the pure metrics.
ANALYSIS_MAY_IMPORT = ("stability.store.schema", "stability.steps", "stability.errors", "stability.maths.metrics")


def _modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


MODULES = _modules()


def _resolve(name: str) -> str | None:
    """The longest known module that ``name`` starts with (``a.b.c`` where ``c`` is a function of ``a.b``)."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def imports_of(module: str) -> set[str]:
    """Every module of the packages that ``module`` imports anywhere in its file (functions and TYPE_CHECKING too)."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            targets = [f"{stem}.{a.name}" for a in node.names]  # a submodule, or a name of ``stem``
        for t in targets:
            found = _resolve(t)
            if found is not None and found != module:
                out.add(found)
    return out


GRAPH = {m: imports_of(m) for m in MODULES}


def _layer(module: str) -> int:
    best, best_len = None, -1
    for i, names in enumerate(LAYERS):
        for n in names:
            if (module == n or module.startswith(n + ".")) and len(n) > best_len:
                best, best_len = i, len(n)
    assert best is not None, f"{module} is in no layer of LAYERS: place it"
    return best


def test_no_import_cycle():
    """Tarjan's strongly connected components of the import graph: every one is a single module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_no_upward_import():
    upward = [f"{m} -> {t}" for m, targets in GRAPH.items() for t in sorted(targets) if _layer(t) > _layer(m)]
    assert not upward, "imports that run up the layers:\n" + "\n".join(upward)


def test_no_module_over_500_lines():
    long = {m: n for m, p in MODULES.items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_analysis_needs_only_the_records_side_of_stability():
    taken = {t for m, targets in GRAPH.items() if m.startswith("analysis") for t in targets if t.startswith("stability")}
    assert taken <= set(ANALYSIS_MAY_IMPORT), f"analysis imports {sorted(taken - set(ANALYSIS_MAY_IMPORT))}"


def test_the_graph_sees_function_local_imports():
    """The walker is real: a function-local import in a known module shows as an edge."""
    assert "stability.apps.cli" in GRAPH["stability.__main__"]
    assert any("stability.stages" in t for t in GRAPH["stability.grid.units"])
