"""The core's shape, checked from its source: no import loops (counting imports inside functions, so none
can hide one), no private names used across modules, and no module that recognises a kind of cell or a
defense by its name (kinds of cell and defenses describe themselves through their interfaces)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from leakbench.registry import CELL_KINDS, DEFENSES

REPO = Path(__file__).resolve().parents[1]
# the installed package `leakbench` is assembled from these folders (pyproject's package-dir)
PACKAGES = {"benchmark": "leakbench", "attacks": "leakbench.attacks", "defenses": "leakbench.defenses"}


def modules() -> dict[str, Path]:
    out = {}
    for folder, package in PACKAGES.items():
        for path in sorted((REPO / folder).rglob("*.py")):
            parts = path.relative_to(REPO / folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join((package, *parts))] = path
    return out


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def _type_checking_only(tree: ast.AST) -> set[int]:
    """Line numbers of imports under ``if TYPE_CHECKING:`` (annotations only, never executed)."""
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            for inner in ast.walk(node):
                if isinstance(inner, (ast.Import, ast.ImportFrom)):
                    lines.add(inner.lineno)
    return lines


def imports(name: str, path: Path, known: dict[str, Path]) -> list[tuple[str, list[str], int]]:
    """(imported leakbench module, names imported from it, line) for every executed import of ``name``,
    at any depth (inside functions too)."""
    tree = ast.parse(path.read_text())
    skip = _type_checking_only(tree)
    package = name if _is_package(path) else name.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names if a.name in known]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("leakbench"):
                continue
            names = [a.name for a in node.names]
            submodules = [f"{target}.{n}" for n in names if f"{target}.{n}" in known]
            out += [(m, [], node.lineno) for m in submodules]
            rest = [n for n in names if f"{target}.{n}" not in known]
            if rest or not submodules:
                out.append((target, rest, node.lineno))
    return out


def test_the_core_has_no_import_loop():
    known = modules()
    graph = {name: sorted({m for m, _, _ in imports(name, path, known) if m in known and m != name})
             for name, path in known.items()}
    # a package's __init__ runs before any of its modules: an edge to `leakbench` itself (or another
    # package) is still an edge, and must not close a loop either
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                loop = stack[stack.index(nxt):] + [nxt]
                pytest.fail("import loop: " + " -> ".join(loop))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for name in graph:
        if name not in state:
            visit(name)
    assert len(graph) > 40  # the walk saw the whole core


def test_no_private_name_is_imported_from_another_module():
    known = modules()
    offenders = [f"{path.relative_to(REPO)}:{line}: {target}.{n}"
                 for name, path in known.items() for target, names, line in imports(name, path, known)
                 for n in names if n.startswith("_") and not n.startswith("__")]
    assert not offenders, offenders


def _compared_strings(path: Path) -> list[tuple[int, str]]:
    """String constants that code compares with (``==``, ``!=``, ``in``, ``match``/``case``)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Compare):
            for part in [node.left, *node.comparators]:
                elts = part.elts if isinstance(part, (ast.Tuple, ast.List, ast.Set)) else [part]
                found += [(node.lineno, e.value) for e in elts
                          if isinstance(e, ast.Constant) and isinstance(e.value, str)]
        elif isinstance(node, ast.MatchValue) and isinstance(node.value, ast.Constant):
            found.append((node.lineno, node.value.value))
    return found


def test_no_module_tests_a_setting_or_a_defense_by_name():
    """Kinds of cell are looked up in their registry, never compared by name; adaptive attacks use what
    a defense describes of itself (``Defense.attacker_map``), never its name."""
    names = set(CELL_KINDS.list()) | set(DEFENSES.list())
    offenders = [f"{path.relative_to(REPO)}:{line}: compares with {value!r}"
                 for path in modules().values() for line, value in _compared_strings(path) if value in names]
    assert not offenders, offenders


def test_the_checks_above_can_fail(tmp_path):
    """Controls: the helpers do see a loop, a private import and a compared setting when there is one."""
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("def f():\n    from .b import _helper\n    return _helper\n")
    b.write_text("from .a import f\nif kind == 'collaborative':\n    pass\n")
    known = {"leakbench.a": a, "leakbench.b": b}
    assert imports("leakbench.a", a, known) == [("leakbench.b", ["_helper"], 2)]
    assert imports("leakbench.b", b, known) == [("leakbench.a", ["f"], 1)]
    assert (2, "collaborative") in _compared_strings(b)
