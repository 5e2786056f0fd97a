"""The package's shape: imports resolve, no import cycle, planning stays pure, modules stay small."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from conftest import ROOT

PACKAGE = ROOT / "retro_dask"
MAX_LINES = 520  # "about 500"


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def imports_of(name: str, path: Path) -> list[tuple[str, int]]:
    """Every module this one imports, anywhere in it (function-level imports included), resolved."""
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.append((target, node.lineno))
            found += [(f"{target}.{alias.name}", node.lineno) for alias in node.names]
    return found


def internal_graph() -> dict[str, set[str]]:
    mods = modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        for target, _ in imports_of(name, path):
            if target.startswith("retro_dask") and target in mods and target != name:
                graph[name].add(target)
    return graph


def test_every_internal_import_names_a_module_or_a_name_in_one():
    mods = modules()
    bad = []
    for name, path in mods.items():
        for target, line in imports_of(name, path):
            if not target.startswith("retro_dask"):
                continue
            if target in mods:
                continue
            parent, _, attr = target.rpartition(".")
            if parent in mods and attr:
                source = mods[parent].read_text()
                if any(f"{kw} {attr}" in source for kw in ("def", "class")) or f"\n{attr} =" in source \
                        or f"\n{attr}:" in source or f"import {attr}" in source or f" as {attr}" in source:
                    continue
            bad.append(f"{path.relative_to(ROOT)}:{line}: {target}")
    assert not bad, "imports of modules or names that do not exist:\n" + "\n".join(bad)


def test_no_import_cycle():
    graph = internal_graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for dep in sorted(graph[m]):
            if state.get(dep) == 1:
                return stack[stack.index(dep):] + [dep]
            if dep not in state:
                cycle = visit(dep)
                if cycle:
                    return cycle
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            cycle = visit(m)
            assert cycle is None, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize("layer, forbidden", [
    ("retro_dask.plan", ("zarr", "faiss", "torch", "dask", "distributed", "retro_dask.formats",
                         "retro_dask.engine", "retro_dask.stages", "retro_dask.text")),  # pure arithmetic
    ("retro_dask.formats", ("retro_dask.engine", "retro_dask.stages", "retro_dask.read", "torch")),
    ("retro_dask.engine", ("retro_dask.stages", "retro_dask.read", "retro_dask.text", "torch", "faiss")),
    ("retro_dask.text", ("retro_dask.stages", "retro_dask.read", "zarr", "faiss")),
    ("retro_dask.stages", ("retro_dask.read", "retro_dask.build", "retro_dask.cli")),
])
def test_layers_import_only_downwards(layer, forbidden):
    bad = []
    for name, path in modules().items():
        if name != layer and not name.startswith(layer + "."):
            continue
        for target, line in imports_of(name, path):
            if any(target == f or target.startswith(f + ".") for f in forbidden):
                bad.append(f"{path.relative_to(ROOT)}:{line}: {target}")
    assert not bad, f"{layer} imports what it must not:\n" + "\n".join(bad)


def test_no_module_is_over_about_500_lines():
    long = {str(p.relative_to(ROOT)): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, long


def test_only_the_executor_writes_completion_records():
    """Completion has one form, owned by the executor: no other module appends to, clears or forgets a ledger."""
    import re

    writes = re.compile(r"(Ledger\([^)]*\)|\bledgers?\b(\[[^\]]*\])?)\.(append|clear|forget|start)\(")
    owners = {"retro_dask/formats/ledger.py", "retro_dask/engine/executor.py"}
    bad = [f"{p.relative_to(ROOT)}:{n}: {line.strip()}" for p in PACKAGE.rglob("*.py")
           if str(p.relative_to(ROOT)) not in owners
           for n, line in enumerate(p.read_text().splitlines(), 1) if writes.search(line)]
    assert not bad, "\n".join(bad)
