"""The layout docs/design.md's code map describes: imports point down the layers (each
package's ``__init__.py`` says what it may import), no module imports itself back through
others, and no module is over 500 lines."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("app", "events", "projections", "mirrors")
MAX_LINES = 500

# The layers, bottom to top: each may import those below it (and app/ layers the shared
# settings and logs). A module belongs to the longest layer name that prefixes it.
STACK = ["events", "projections", "mirrors", "app.access", "app.write", "app.services",
         "app.ops", "app.console", "app.api", "app.cli"]  # fmt: skip
SHARED = {"app.settings", "app.logs"}
ALLOWED: dict[str, set[str]] = {
    name: set(STACK[:i]) | (SHARED if name.startswith("app.") else set())
    for i, name in enumerate(STACK)
}
ALLOWED["app.settings"] = {"events", "mirrors"}  # mirrors.FORMATS
ALLOWED["app.logs"] = set()
ALLOWED["app.mcp"] = {"app.settings"}  # a client of the HTTP API, in process or remote
ALLOWED["app"] = set()  # app/__init__.py
ALLOWED["app.api"].add("app.mcp")  # mounted at /mcp
ALLOWED["app.cli"].add("app.mcp")  # ledgerlake mcp


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = path
    return found


def layer(module: str) -> str:
    matches = [name for name in ALLOWED if module == name or module.startswith(name + ".")]
    return max(matches, key=len)


def imports(path: Path, names: set[str]) -> set[str]:
    """The project modules a module imports, anywhere in it (lazy imports too), with the
    packages whose ``__init__`` that runs."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            targets = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in names:
                target = target.rpartition(".")[0]
            parts = target.split(".")
            out.update(".".join(parts[:i]) for i in range(1, len(parts) + 1) if target)
    return out & names


GRAPH = {name: imports(path, set(modules())) for name, path in modules().items()}


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_imports_point_down(module: str) -> None:
    own = layer(module)
    wrong = sorted(
        target
        for target in GRAPH[module]
        if not module.startswith(target + ".")  # a package of its own runs first anyway
        and layer(target) != own
        and layer(target) not in ALLOWED[own]
    )
    assert not wrong, f"{module} ({own}) may not import {wrong}"


def test_no_import_cycles() -> None:
    edges = {m: {t for t in ts if not m.startswith(t + ".")} - {m} for m, ts in GRAPH.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        stack.append(module)
        for target in sorted(edges[module]):
            if state.get(target) == 1:
                cycle = [*stack[stack.index(target) :], target]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target)
        stack.pop()
        state[module] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module)


def test_no_module_over_500_lines() -> None:
    long = {
        name: n
        for name, path in modules().items()
        if (n := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert not long, f"over {MAX_LINES} lines: {long}"


def test_every_package_says_what_it_holds() -> None:
    silent = [
        str(path.relative_to(ROOT))
        for name, path in modules().items()
        if path.name == "__init__.py" and not ast.get_docstring(ast.parse(path.read_text()))
    ]
    assert not silent, f"packages without a docstring: {silent}"


def test_the_checks_see_a_wrong_import(tmp_path: Path) -> None:
    """The import check reads what a module imports, so a violation cannot pass unseen."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from app.api.app import create_app\n")
    found = imports(bad, set(modules()))
    assert "app.api.app" in found and "app.api" in found
    assert layer("app.api.app") not in ALLOWED["events"]
