"""The package's layers import one way: no import cycle among ckptplan's modules (imports at module level,
those under ``if TYPE_CHECKING:`` included; an import inside a function is a deliberate lazy one), and
the runtime, which runs inside a user's training step, imports nothing from the tracer or the solver.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "ckptplan"
# what applies a plan to a live model: it reads plans, never traces or solves
RUNTIME = ("ckptplan.runtime", "ckptplan.checkpointing", "ckptplan.rematerialize")
FORBIDDEN = ("ckptplan.trace", "ckptplan.solver", "ckptplan.planner", "ckptplan.kernels", "ckptplan.serve")


def _name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _top_level_imports(tree: ast.Module) -> list[ast.ImportFrom]:
    """Relative imports run when the module is imported: at module level, in its ``if``/``try`` blocks."""
    out, todo = [], list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, ast.ImportFrom) and node.level:
            out.append(node)
        elif isinstance(node, (ast.If, ast.Try)):
            todo += node.body + node.orelse + getattr(node, "finalbody", [])
            todo += [s for h in getattr(node, "handlers", []) for s in h.body]
    return out


def _graph() -> dict[str, set[str]]:
    files = {_name(p): p for p in PACKAGE.rglob("*.py")}
    edges: dict[str, set[str]] = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps = set()
        for node in _top_level_imports(ast.parse(path.read_text())):
            base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
            target = ".".join(base + ([node.module] if node.module else []))
            deps.add(target)
            deps.update(f"{target}.{a.name}" for a in node.names)  # ``from . import wire``
        edges[name] = {d for d in deps if d in files and d != name}
    return edges


def _cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the path, 2: done

    def visit(m: str, path: list[str]) -> list[str] | None:
        state[m] = 1
        for d in sorted(edges[m]):
            if state.get(d) == 1:
                return path[path.index(d) :] + [d]
            if d not in state and (found := visit(d, path + [d])):
                return found
        state[m] = 2
        return None

    for m in sorted(edges):
        if m not in state and (found := visit(m, [m])):
            return found
    return None


def test_the_graph_reads_what_it_parses():
    edges = _graph()
    assert "ckptplan.graph" in edges["ckptplan.planner"]
    assert "ckptplan.solver.regions" in edges["ckptplan.planner"]


def test_no_import_cycle():
    cycle = _cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_runtime_imports_nothing_from_the_tracer_or_the_solver():
    edges = _graph()
    reach, todo = set(), list(RUNTIME)
    while todo:
        m = todo.pop()
        for d in edges[m] - reach:
            reach.add(d)
            todo.append(d)
    bad = sorted(d for d in reach if d.startswith(FORBIDDEN))
    assert not bad, f"the runtime imports {bad}"


def test_every_public_name_resolves():
    """``ckptplan``'s names are imported lazily, each from the module ``_LAZY`` names: a name moved to
    another module (check_plan, to decisions.py) must be found where the package says it is."""
    import ckptplan

    for name in ckptplan.__all__:
        assert getattr(ckptplan, name) is not None, name
