"""The package's shape: no module of trainer/ imports, directly or through others, a module that imports it back."""

import ast
from pathlib import Path

TRAINER = Path(__file__).resolve().parents[1] / "trainer"


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The trainer modules `path` imports, at the top or inside a function (a lazy import is still a dependency)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module == "trainer":
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("trainer."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {alias.name.split(".")[1] for alias in node.names if alias.name.startswith("trainer.")}
    return (found & modules) - {path.stem}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Each import cycle once, as the path that closes it."""
    found, done = [], set()

    def visit(module: str, path: list[str]) -> None:
        for dep in sorted(graph[module]):
            if dep in path:
                cycle = path[path.index(dep):]
                if set(cycle) not in [set(c) for c in found]:
                    found.append(cycle + [dep])
            elif dep not in done:
                visit(dep, path + [dep])
        done.add(module)

    for module in sorted(graph):
        if module not in done:
            visit(module, [module])
    return found


def test_cycles_are_found():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_trainer_has_no_import_cycle():
    paths = {p.stem: p for p in TRAINER.glob("*.py")}
    graph = {name: imports_of(path, set(paths)) for name, path in paths.items()}
    assert graph["setup"] and graph["loop"], "the import graph was read"
    assert cycles(graph) == []
