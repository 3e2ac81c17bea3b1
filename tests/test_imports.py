"""The package's import graph: no module imports itself back through a chain of top-level imports, and (slow) each
module imports on its own in a fresh interpreter.

The graph is read from the source with ``ast``: the ``import`` / ``from ... import`` statements that run when a
module is imported (module level, ``if`` / ``try`` / ``with`` blocks and class bodies; not function bodies, which run
later, nor ``if TYPE_CHECKING:`` blocks, which never run). A lazy import inside a function is how such a cycle is
papered over; it is allowed, but a top-level cycle is not.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "cytologia"


def package_modules(src: Path = SRC, package: str = PACKAGE) -> dict[str, tuple[Path, bool]]:
    """``dotted name -> (file, is_package)`` for every module of ``package`` under ``src``."""
    out: dict[str, tuple[Path, bool]] = {}
    for path in sorted((src / package).rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_time_statements(body: list[ast.stmt]) -> list[ast.Import | ast.ImportFrom]:
    """The import statements among ``body`` that run when the module is imported."""
    found: list[ast.Import | ast.ImportFrom] = []
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        elif isinstance(node, ast.If):
            if not _is_type_checking(node.test):
                found += _import_time_statements(node.body)
            found += _import_time_statements(node.orelse)
        elif isinstance(node, (ast.Try, getattr(ast, "TryStar", ast.Try))):  # try / try-except* (3.11+)
            found += _import_time_statements(node.body) + _import_time_statements(node.orelse)
            for handler in node.handlers:
                found += _import_time_statements(handler.body)
            found += _import_time_statements(node.finalbody)
        elif isinstance(node, (ast.With, ast.ClassDef)):
            found += _import_time_statements(node.body)
    return found


def import_graph(src: Path = SRC, package: str = PACKAGE) -> dict[str, set[str]]:
    """``module -> modules of the package it imports at import time``. ``from a.b import c`` counts as importing
    ``a.b.c`` when that is a module, else ``a.b``; importing ``a.b.c`` also runs the packages ``a`` and ``a.b``,
    counted unless they enclose the importing module (those are initialised first, whatever the module imports)."""
    modules = package_modules(src, package)
    graph: dict[str, set[str]] = {}
    for name, (path, is_package) in modules.items():
        here = name if is_package else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in _import_time_statements(ast.parse(path.read_text(), str(path)).body):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
                continue
            base = node.module or ""
            if node.level:
                anchor = here.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets.add(base)
            targets.update(f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in modules)
        edges: set[str] = set()
        for target in targets:
            parts = target.split(".")
            for i in range(1, len(parts) + 1):
                dotted = ".".join(parts[:i])
                if dotted in modules and dotted != name and not name.startswith(dotted + "."):
                    edges.add(dotted)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as ``[a, b, ..., a]``, or None when it is acyclic (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for root in sorted(graph):
        if state.get(root):
            continue
        path = [root]
        stack = [iter(sorted(graph[root]))]
        state[root] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph.get(nxt, ()))))
    return None


def _write(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def test_the_graph_reader_finds_cycles_and_skips_lazy_imports(tmp_path: Path) -> None:
    """Hand-made packages: a top-level cycle through ``from pkg import mod`` and a relative import is found; the
    same imports inside a function, under ``if TYPE_CHECKING:`` or from a package's own ``__init__`` are not edges."""
    _write(
        tmp_path,
        {
            "pkg/__init__.py": "from pkg import a\n",
            "pkg/sub/__init__.py": "",
            "pkg/a.py": "import os\nfrom pkg.sub import b\n",
            "pkg/sub/b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import a\n"
            "def f():\n    from pkg import a\n",
        },
    )
    graph = import_graph(tmp_path, "pkg")
    assert graph == {"pkg": {"pkg.a"}, "pkg.a": {"pkg.sub", "pkg.sub.b"}, "pkg.sub": set(), "pkg.sub.b": set()}
    assert find_cycle(graph) is None
    (tmp_path / "pkg/sub/b.py").write_text("try:\n    from .. import a\nexcept ImportError:\n    pass\n")
    assert find_cycle(import_graph(tmp_path, "pkg")) == ["pkg.a", "pkg.sub.b", "pkg.a"]


def test_no_import_cycle_in_the_package() -> None:
    """No module of cytologia reaches itself through top-level imports (e.g. classification.models imports
    classification.dinobloom; both read weight files through classification.weight_files, which imports neither)."""
    graph = import_graph()
    assert "cytologia.classification.dinobloom" in graph["cytologia.classification.models"]  # the graph is read
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph) or [])}"


@pytest.mark.slow
@pytest.mark.parametrize("module", sorted(package_modules()))
def test_each_module_imports_alone(module: str) -> None:
    """Each module imports in a fresh interpreter, first: nothing relies on another module having been imported
    before it, and a cycle that breaks initialisation fails here (~5 s a module: torch)."""
    run = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, f"import {module} failed:\n{run.stderr[-3000:]}"


def argparse_users(src: Path = SRC, package: str = PACKAGE) -> list[str]:
    """Modules that import argparse anywhere (function bodies included)."""
    users = []
    for name, (path, _) in package_modules(src, package).items():
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            if any(n == "argparse" or n.startswith("argparse.") for n in names):
                users.append(name)
                break
    return users


def test_only_the_cli_and_its_commands_parse_arguments(tmp_path: Path) -> None:
    """Library code never drives the CLI: argument parsing lives in ``cytologia.cli`` and ``cytologia.commands``."""
    outside = [m for m in argparse_users() if m != f"{PACKAGE}.cli" and not m.startswith(f"{PACKAGE}.commands.")]
    assert outside == [], f"argparse outside cytologia.commands: {outside}"
    # The check itself finds a parser in a library module.
    (tmp_path / "pkg" / "runtime").mkdir(parents=True)
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "runtime" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "runtime" / "bench.py").write_text("def add_arguments(p):\n    import argparse\n")
    assert argparse_users(tmp_path, "pkg") == ["pkg.runtime.bench"]
