"""Imports point down only: converters/ <- db/ <- {trainer/, node/}, no circles, SQLAlchemy in db/ only.

Read from the source with :mod:`ast` (nothing is imported), lazy imports inside functions included:
they load the module all the same, just later. ruff's TID251 keeps SQLAlchemy out of the other packages
as code is written; this test also says which way the packages may depend on each other.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

#: The packages of the project, bottom first.
PACKAGES = ("converters", "db", "trainer", "node")

#: What each package must not import (its own modules and third-party ones aside).
FORBIDDEN: dict[str, frozenset[str]] = {
    "converters": frozenset({"db", "trainer", "node"}),
    "db": frozenset({"trainer", "node"}),
    "trainer": frozenset({"node"}),
    # The root CLI (node/cli/__init__.py) names the trainer's command group as a string and imports it
    # only when that command runs; nothing else in the node touches the trainer.
    "node": frozenset({"trainer"}),
}


@dataclass(frozen=True)
class Import:
    """One import statement's target, where it is written."""

    path: Path  # relative to the root the file was read under
    line: int
    module: str  # dotted, absolute: ``from node import store`` gives ``node.store``

    @property
    def top(self) -> str:
        return self.module.split(".")[0]

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.module}"


def source_files(*folders: str) -> Iterator[Path]:
    """The Python files under the given folders of the repository, sorted."""
    for folder in folders:
        yield from sorted((ROOT / folder).rglob("*.py"))


def imports_in(path: Path, root: Path = ROOT) -> Iterator[Import]:
    """Every module ``path`` imports, anywhere in the file, as an absolute dotted name.

    ``from a import b`` yields ``a.b`` (``b`` may be a module or a name in ``a``; callers that care
    about packages look at :attr:`Import.top`); relative imports are resolved against the file's
    package, its folder under ``root``.
    """
    where = path.relative_to(root)
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(where, node.lineno, alias.name)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = list(where.parent.parts)
                package = package[: len(package) - (node.level - 1)]
                base = ".".join([*package, base] if base else package)
            for alias in node.names:
                yield Import(where, node.lineno, f"{base}.{alias.name}" if alias.name != "*" else base)


def imports_of(*folders: str) -> list[Import]:
    """The imports of every Python file under ``folders``."""
    return [imp for path in source_files(*folders) for imp in imports_in(path)]


def test_sqlalchemy_is_imported_in_db_only() -> None:
    outside = [
        str(imp)
        for imp in imports_of("converters", "trainer", "node", "benchmarks", "deploy")
        if imp.top == "sqlalchemy"
    ]
    assert outside == []


def test_packages_import_only_downwards() -> None:
    upwards = [
        str(imp)
        for package, forbidden in FORBIDDEN.items()
        for imp in imports_of(package)
        if imp.top in forbidden
    ]
    assert upwards == []


def test_the_walker_resolves_relative_and_lazy_imports(tmp_path: Path) -> None:
    probe = tmp_path / "converters" / "io" / "probe.py"
    probe.parent.mkdir(parents=True)
    probe.write_text(
        "import numpy.typing as npt\nfrom . import volume\n\n\ndef f() -> None:\n"
        "    from ..exceptions import ConverterError\n    from node import store\n",
        encoding="utf-8",
    )
    found = list(imports_in(probe, root=tmp_path))
    assert [imp.module for imp in found] == [
        "numpy.typing",
        "converters.io.volume",
        "converters.exceptions.ConverterError",
        "node.store",
    ]
    assert str(found[-1]) == f"{Path('converters/io/probe.py')}:7: node.store"
    assert found[-1].top == "node"


def module_name(path: Path, root: Path = ROOT) -> str:
    """``node/cli/__init__.py`` -> ``node.cli``; ``db/url.py`` -> ``db.url``."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(*folders: str, root: Path = ROOT) -> dict[str, set[str]]:
    """Module -> the project modules it imports (``from a import b`` counts as ``a.b`` when that is a
    module, else as ``a``); a package's own ``__init__`` imported by its submodules is left out, since
    Python loads it first whatever the code says."""
    files = [p for folder in folders for p in sorted((root / folder).rglob("*.py"))]
    modules = {module_name(p, root): p for p in files}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for imp in imports_in(path, root):
            target = imp.module if imp.module in modules else imp.module.rpartition(".")[0]
            if target in modules and target != name and not name.startswith(target + "."):
                graph[name].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_circles() -> None:
    assert cycles(import_graph(*PACKAGES)) == []


def test_the_circle_finder_finds_a_circle_through_a_lazy_import(tmp_path: Path) -> None:
    pkg = tmp_path / "trainer"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("", encoding="utf-8")
    (pkg / "plots.py").write_text("from trainer.train import x\n", encoding="utf-8")
    (pkg / "train.py").write_text("def f() -> None:\n    from trainer import plots\n", encoding="utf-8")
    (pkg / "unet.py").write_text("from trainer import train\n", encoding="utf-8")
    assert cycles(import_graph("trainer", root=tmp_path)) == [["trainer.plots", "trainer.train"]]
