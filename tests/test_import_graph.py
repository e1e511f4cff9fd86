"""No import cycles (issue 19): between the packages below, and between any two modules.

Every `import` and `from ... import` in the source is read with ast, at module level and inside functions alike (a
deferred import is still a dependency: it only moves the failure to run time). A package depends on another if
any of its modules imports one of the other's. A module belongs to the deepest package listed that contains it;
the root's own modules (cli.py, __main__.py) are the entry point and may import anything. Strings handed to
importlib (the CLI's command table) are not imports and are not read.
"""

from __future__ import annotations

import ast
from pathlib import Path

import specrelay

ROOT = Path(specrelay.__file__).resolve().parent
PACKAGES = ("kernels", "models", "shared", "shared.modeling", "services", "services.gateway", "services.verifier",
            "services.drafter", "services.kvstore", "services.toolcoord", "loadgen", "bench")
SKIP_DIRS = {"tests", ".venv", "build", "dist", ".git", "specrelay.egg-info", "__pycache__"}
# Known module cycles, allowed for now (issue 19): each sits inside one package, in code another open piece of work
# was changing when this test landed (2026-12-03). Remove an entry once it is broken; any other cycle fails.
KNOWN_MODULE_CYCLES = [
    {"loadgen.slo_mix", "loadgen.workloads"},  # make_task defers its import of slo_mix, built on TaskSpec (issue 20)
]


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_of(module: str) -> str | None:
    owners = [p for p in PACKAGES if module == p or module.startswith(p + ".")]
    return max(owners, key=len, default=None)


def imports(path: Path, root: Path, modules: set[str]) -> list[tuple[str, int]]:
    """(module imported, line) for every specrelay module `path` imports; `from a import b` counts as a.b when
    b is a module, else as a."""
    here = module_name(path, root).split(".")
    if path.name != "__init__.py":
        here = here[:-1]  # the package a relative import starts from
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(here[:len(here) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = (node.module or "").removeprefix("specrelay").removeprefix(".")
                if node.module != "specrelay" and not (node.module or "").startswith("specrelay."):
                    continue
            names = [f"{base}.{a.name}".lstrip(".") if f"{base}.{a.name}".lstrip(".") in modules else base
                     for a in node.names]
            found += [(n, node.lineno) for n in names if n in modules]
            continue
        else:
            continue
        found += [(n.removeprefix("specrelay."), node.lineno) for n in names
                  if n.startswith("specrelay.") and n.removeprefix("specrelay.") in modules]
    return found


def module_graph(root: Path = ROOT) -> dict[str, dict[str, str]]:
    """module -> {module it imports: where (file:line)}."""
    paths = [p for p in root.rglob("*.py") if not SKIP_DIRS & set(p.relative_to(root).parts)]
    modules = {module_name(p, root) for p in paths}
    graph: dict[str, dict[str, str]] = {}
    for path in paths:
        src = module_name(path, root)
        for dst, line in imports(path, root, modules):
            if dst != src:
                graph.setdefault(src, {}).setdefault(dst, f"{path.relative_to(root)}:{line}")
    return graph


def package_graph(graph: dict[str, dict[str, str]]) -> dict[str, dict[str, str]]:
    packages: dict[str, dict[str, str]] = {}
    for src, targets in graph.items():
        for dst, where in targets.items():
            a, b = package_of(src), package_of(dst)
            if a is not None and b is not None and a != b:
                packages.setdefault(a, {}).setdefault(b, where)
    return packages


def cycles(graph: dict[str, dict[str, str]]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(set(graph) | {w for targets in graph.values() for w in targets}):
        if v not in index:
            visit(v)
    return found


def explain(component: list[str], graph: dict[str, dict[str, str]]) -> str:
    edges = [f"  {a} -> {b} ({graph[a][b]})" for a in component for b in component if b in graph.get(a, {})]
    return " <-> ".join(component) + "\n" + "\n".join(edges)


def test_no_import_cycle_between_packages():
    graph = package_graph(module_graph())
    assert {"services.verifier", "services.toolcoord", "shared.modeling", "bench"} <= set(graph)  # the walk works
    found = cycles(graph)
    assert not found, "import cycles between packages:\n" + "\n".join(explain(c, graph) for c in found)


def test_no_import_cycle_between_modules():
    graph = module_graph()
    found = [c for c in cycles(graph) if set(c) not in KNOWN_MODULE_CYCLES]
    assert not found, "import cycles between modules:\n" + "\n".join(explain(c, graph) for c in found)


def test_the_walk_finds_deferred_and_relative_imports(tmp_path):
    pkg = tmp_path / "shared"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from specrelay.shared.b import g\n")
    (pkg / "b.py").write_text("from . import a\n")
    graph = module_graph(tmp_path)
    assert graph == {"shared.a": {"shared.b": "shared/a.py:2"}, "shared.b": {"shared.a": "shared/b.py:1"}}
    assert cycles(graph) == [["shared.a", "shared.b"]]
