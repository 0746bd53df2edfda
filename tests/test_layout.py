"""The package's layering: module-level imports go downwards only, and never in a cycle.

Levels (lower never imports higher at module level; a function may import upwards lazily
only where a test here allows it):

    0  config, validation, functional, params, atomic, registry, precision, _saelens_hook, run_folder
    1  architectures, model_io
    2  storage, attach
    3  saelens, sources, training, evals, metadata
    4  circuits, export, probing
    5  experiments
    6  cli, __main__

Re-export shims at the old module paths (io, mxd, patching, ...) and the lazy package
`__init__`s sit outside the levels: they import what moved, nothing imports them.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "mxd_lens"

LEVELS = {
    "config": 0, "validation": 0, "functional": 0, "params": 0, "atomic": 0, "registry": 0, "precision": 0,
    "_saelens_hook": 0, "run_folder": 0,
    "architectures": 1, "model_io": 1,
    "storage": 2, "attach": 2,
    "saelens": 3, "sources": 3, "training": 3, "evals": 3, "metadata": 3,
    "circuits": 4, "export": 4, "probing": 4,
    "experiments": 5,
    "cli": 6, "__main__": 6,
}
SHIMS = {"io", "mxd", "transcoder", "replacement", "patching", "steering", "experts", "frontier", "plots",
         "publish", "sae_site"}


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(["mxd_lens", *parts])] = path
    return out


def _top_level_imports(path: Path) -> set[str]:
    """mxd_lens modules imported at module level (not inside functions or TYPE_CHECKING)."""
    tree = ast.parse(path.read_text())
    found: set[str] = set()

    def visit(body) -> None:
        for node in body:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            if isinstance(node, (ast.If, ast.Try)):
                visit(node.body)
                visit(getattr(node, "orelse", []))
                for handler in getattr(node, "handlers", []):
                    visit(handler.body)
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.startswith("mxd_lens"))
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mxd_lens"):
                found.add(node.module)
                found.update(f"{node.module}.{a.name}" for a in node.names)

    visit(tree.body)
    return found


def _area(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def test_every_module_has_a_level():
    areas = {_area(m) for m in _modules()} - {None}
    assert areas <= set(LEVELS) | SHIMS, f"modules without a level: {sorted(areas - set(LEVELS) - SHIMS)}"


@pytest.mark.parametrize("module", sorted(m for m in _modules() if _area(m) in LEVELS))
def test_imports_go_downwards(module):
    modules = _modules()
    level = LEVELS[_area(module)]
    for imported in _top_level_imports(modules[module]):
        if imported not in modules or imported == "mxd_lens":
            continue  # a name imported from a module, not a module
        area = _area(imported)
        assert area not in SHIMS, f"{module} imports the re-export shim {imported}; import the module itself"
        if area == _area(module):
            continue
        assert LEVELS[area] <= level, (
            f"{module} (level {level}) imports {imported} (level {LEVELS[area]}) at module level"
        )


def test_no_import_cycles():
    modules = _modules()
    graph = {m: {i for i in _top_level_imports(p) if i in modules and i != m} for m, p in modules.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if nxt.startswith(node + "."):
                continue  # a package's __init__ importing its own submodules is not a cycle
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                if not all(c.startswith(nxt + ".") or c == nxt for c in cycle[1:-1]):
                    raise AssertionError("import cycle: " + " -> ".join(cycle))
            elif nxt not in state:
                dfs(nxt)
        stack.pop()
        state[node] = 2

    for m in sorted(graph):
        if m not in state:
            dfs(m)
