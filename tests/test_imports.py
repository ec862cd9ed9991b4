"""The package's import graph (every import, at module level or inside a function): no cycle, and no module
imports a CLI module (topocl.cli, */cli.py) unless it is one itself."""

import ast
from pathlib import Path

PKG = Path(__file__).parents[1] / "topocl"


def modules() -> dict[str, Path]:
    out = {}
    for p in PKG.rglob("*.py"):
        parts = list(p.relative_to(PKG.parent).with_suffix("").parts)
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> the topocl modules it imports. `from a.b import c` counts as a.b.c when that is a module,
    else as a.b; importing a submodule does not count as importing its parent packages."""
    mods = modules()
    graph = {}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([node.module] if node.module else []))
                for a in node.names:
                    deps.add(f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base)
        graph[name] = {d for d in deps if d in mods and d != name}
    return graph


def is_cli(name: str) -> bool:
    return name.rpartition(".")[2] in ("cli", "__main__")


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                return path[path.index(d):] + [d]
            if d not in state and (c := visit(d)):
                return c
        path.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (c := visit(m)):
            return c
    return None


def test_the_graph_sees_known_edges():
    g = import_graph()
    assert "topocl.config" in g["topocl.pretrain"] and "topocl.jsonl" in g["topocl.results"]
    assert "topocl.sweep_report" in g["topocl.report"]  # a function-level import counts
    assert "topocl.attention.flex" in g["topocl.attention.nsa"]  # `from topocl.attention import flex`
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_no_module_imports_a_cli_module():
    bad = [f"{m} imports {d}" for m, deps in sorted(import_graph().items()) if not is_cli(m)
           for d in sorted(deps) if is_cli(d)]
    assert not bad, bad


def test_the_import_graph_has_no_cycle():
    assert find_cycle(import_graph()) is None
