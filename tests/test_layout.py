"""The package stays readable: small functions, modules of one concern, no private names across modules."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "reducedmpl"
MAX_FUNCTION_LINES = 60
MAX_MODULE_LINES = 650


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_functions_and_modules_stay_small() -> None:
    long_functions, long_modules = [], []
    for path in _modules():
        source = path.read_text()
        if len(source.splitlines()) > MAX_MODULE_LINES:
            long_modules.append(f"{path.relative_to(PACKAGE)} ({len(source.splitlines())} lines)")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long_functions.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name} ({length} lines)")
    assert not long_modules, long_modules
    assert not long_functions, long_functions


def test_no_private_name_is_imported_from_another_module() -> None:
    offenders = []
    for path in _modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("reducedmpl")):
                offenders += [f"{path.relative_to(PACKAGE)}: {a.name}" for a in node.names
                              if a.name.startswith("_") and not a.name.startswith("__")]
    assert not offenders, offenders


def _data_imports() -> dict[str, set[str]]:
    """For each module of reducedmpl/data, the other modules of reducedmpl/data it imports (anywhere in it)."""
    folder = PACKAGE / "data"
    names = {p.stem for p in folder.glob("*.py")} - {"__init__"}
    graph = {}
    for name in names:
        deps = set()
        for node in ast.walk(ast.parse((folder / f"{name}.py").read_text())):
            if isinstance(node, ast.ImportFrom):
                module = node.module or ""
                if node.level == 1:
                    deps.add(module.split(".")[0])
                    deps |= {a.name for a in node.names} if not module else set()
                elif module.startswith("reducedmpl.data."):
                    deps.add(module.split(".")[2])
        graph[name] = (deps & names) - {name}
    return graph


def test_the_data_sources_import_no_circle() -> None:
    """Every source format imports only the shared base; the table of sources imports them (not the other way)."""
    graph = _data_imports()
    formats = ("mnist", "cifar", "hf", "wds")
    assert graph["base"] == set()
    for name in formats:
        assert graph[name] <= {"base"}, (name, graph[name])
        assert name in graph["sources"]
    reach = {name: set(deps) for name, deps in graph.items()}
    for _ in graph:  # transitive closure
        for name in reach:
            reach[name] |= {d for dep in list(reach[name]) for d in reach[dep]}
    circles = sorted(name for name in reach if name in reach[name])
    assert set(circles) <= {"loading", "views"}, circles  # loading <-> views: one concern split in two files
