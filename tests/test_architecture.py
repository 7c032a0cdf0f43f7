"""The import graph of src/posae follows the data: no cycle, and nothing imports a later layer.

Every module under src/posae is parsed with `ast`; an import at module level and one inside a function
are separate edge kinds. (1) The module-level imports have no cycle (a cycle makes import order matter).
(2) No edge, of either kind, runs from an earlier layer to a later one: base < data < saes < checks <
train < eval < report < pipeline (base includes `paper`, the quoted numbers, since notebook 05 writes
them into ablations.csv). Inside `eval` the notebooks' order holds too: the shared primitives
(probing) < metrics (03) and structure (02) < probes (04) < ablations (05), so notebook 02's structure
does not import notebook 04's probes; the planted ground truth (notebook 00) scores with notebook 04's
probes, so it sits just above them. The pipeline is the top layer of a reproduction: its lazy imports of
everything are downward by construction. The robustness study (`posae.study`, notebook 08) sits above it, since
it runs its notebook as the driver runs a stage.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "posae"

# (layer name, the modules in it: exact names, or a prefix ending in "."), lowest first.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("base", ("posae", "posae.paths", "posae.config", "posae.progress", "posae.provenance", "posae.paper",
              "posae.pool", "posae.memory")),
    ("data", ("posae.data", "posae.data.")),
    ("saes", ("posae.saes", "posae.saes.")),
    ("checks", ("posae.checks",)),
    ("train", ("posae.optim", "posae.train", "posae.checkpoint")),
    ("eval: shared primitives", ("posae.eval", "posae.eval.probing")),
    ("eval: metrics and structure (notebooks 02, 03)", ("posae.eval.metrics", "posae.eval.structure")),
    ("eval: probes and downstream fidelity (notebook 04)", ("posae.eval.probes", "posae.eval.fidelity")),
    ("eval: the planted ground truth (notebook 00)", ("posae.eval.ground_truth",)),
    ("eval: ablations (notebook 05)", ("posae.eval.ablations",)),
    ("report", ("posae.report", "posae.report.")),
    ("inspect: looking at features (notebook 07)", ("posae.inspect",)),
    ("pipeline", ("posae.pipeline", "posae.pipeline.", "posae.notebook", "posae.__main__")),
    ("study: the robustness grid on top of a run (notebook 08, make study)", ("posae.study",)),
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(module: str) -> int | None:
    exact = [i for i, (_, names) in enumerate(LAYERS) if module in names]
    if exact:
        return exact[0]
    prefixed = [i for i, (_, names) in enumerate(LAYERS) for n in names if n.endswith(".") and module.startswith(n)]
    return prefixed[0] if prefixed else None


def _resolve(target: str, modules: set[str]) -> str | None:
    """The posae module an import names: `posae.saes.build` -> `posae.saes`."""
    while target and target not in modules:
        target = target.rpartition(".")[0]
    return target or None


def import_graph() -> tuple[set[str], set[tuple[str, str, str]]]:
    """(the modules, the edges (importer, imported, "module" | "function"))."""
    files = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
    modules = set(files)
    edges: set[tuple[str, str, str]] = set()
    for name, path in files.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]

        def visit(node: ast.AST, kind: str) -> None:
            for child in ast.iter_child_nodes(node):
                inner = "function" if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)) else kind
                targets: list[str] = []
                if isinstance(child, ast.Import):
                    targets = [a.name for a in child.names]
                elif isinstance(child, ast.ImportFrom):
                    base = child.module or ""
                    if child.level:
                        up = package.split(".")[: len(package.split(".")) - child.level + 1]
                        base = ".".join(up + ([base] if base else []))
                    targets = [f"{base}.{a.name}" for a in child.names] or [base]
                for t in targets:
                    if t.split(".")[0] != "posae":
                        continue
                    hit = _resolve(t, modules)
                    if hit and hit != name:
                        edges.add((name, hit, kind))
                visit(child, inner)

        visit(tree, "module")
    return modules, edges


def _cycles(modules: set[str], edges: set[tuple[str, str]]) -> list[list[str]]:
    graph = {m: sorted(b for a, b in edges if a == m) for m in modules}
    found, state, stack = [], {}, []

    def dfs(m: str) -> None:
        state[m] = "open"
        stack.append(m)
        for n in graph[m]:
            if state.get(n) == "open":
                found.append(stack[stack.index(n):] + [n])
            elif n not in state:
                dfs(n)
        stack.pop()
        state[m] = "done"

    for m in sorted(modules):
        if m not in state:
            dfs(m)
    return found


def test_every_module_has_a_layer():
    modules, _ = import_graph()
    missing = sorted(m for m in modules if layer_of(m) is None)
    assert not missing, f"modules in no layer of LAYERS (add them): {missing}"


def test_no_import_cycle_at_module_level():
    modules, edges = import_graph()
    cycles = _cycles(modules, {(a, b) for a, b, kind in edges if kind == "module"})
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_no_import_from_a_later_layer():
    _, edges = import_graph()
    bad = []
    for a, b, kind in sorted(edges):
        la, lb = layer_of(a), layer_of(b)
        if la is not None and lb is not None and lb > la:
            bad.append(f"{a} ({LAYERS[la][0]}) imports {b} ({LAYERS[lb][0]}) at {kind} level")
    assert not bad, "imports up the layers:\n" + "\n".join(bad)


def test_no_import_cycle_even_through_imports_inside_functions():
    """A late import inside a function only hides a cycle from import time; the modules still need each other."""
    modules, edges = import_graph()
    cycles = _cycles(modules, {(a, b) for a, b, _ in edges})
    assert not cycles, "import cycles (module or function level):\n" + "\n".join(" -> ".join(c) for c in cycles)
