"""Dependencies inside multilayer point one way, read from the code's own imports.

The core (``multilayer/*.py`` but the CLI) knows no backend, no conformance suite, no CLI
and no bench; a backend knows the core's modules but not the package root (whose
``__init__`` gathers the whole library), the CLI, the suite or the bench; the CLI and the
suite reach backends only through the plugins (entry points). Every ``import`` counts,
relative or absolute, at module level or inside a function.
"""

from __future__ import annotations

import ast
import textwrap
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

SOURCE = Path(__file__).resolve().parent.parent / "multilayer"


@dataclass(frozen=True)
class Import:
    """One name binding an import statement makes, and the module it reads."""

    path: Path
    line: int
    statement: str
    #: the dotted module whose code runs and whose namespace the name comes from
    target: str


@dataclass(frozen=True)
class Rule:
    """Modules that ``governs`` accepts (by their path in the package, in POSIX form) may
    not import what ``forbidden`` names."""

    governs: Callable[[str], bool]
    #: packages and modules forbidden with everything under them
    forbidden: tuple[str, ...]
    #: whether names from the package root's own namespace are forbidden too
    root_forbidden: bool = False

    def breaks(self, target: str, root: str) -> bool:
        if self.root_forbidden and target == root:
            return True
        return any(target == name or target.startswith(name + ".") for name in self.forbidden)


def module_name(path: Path, source: Path) -> str:
    """The dotted name of the module at ``path`` in the package at ``source``."""
    parts = [source.name, *path.relative_to(source).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(dotted: str, source: Path) -> bool:
    """Whether ``dotted`` names a module or package in the tree at ``source``."""
    location = source.parent.joinpath(*dotted.split("."))
    return location.with_suffix(".py").is_file() or (location / "__init__.py").is_file()


def imports_of(path: Path, source: Path) -> Iterator[Import]:
    """Every import in the module at ``path``, relative ones resolved against its package."""
    text = path.read_text()
    name = module_name(path, source)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(text, str(path))):
        if not isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        statement = " ".join((ast.get_source_segment(text, node) or "").split())
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(path, node.lineno, statement, alias.name)
        else:
            if node.level:
                parts = package.split(".")
                anchor = parts[: len(parts) - node.level + 1]
                base_name = ".".join([*anchor, node.module] if node.module else anchor)
            else:
                base_name = node.module or ""
            for alias in node.names:
                submodule = f"{base_name}.{alias.name}"
                target = submodule if is_module(submodule, source) else base_name
                yield Import(path, node.lineno, statement, target)


def breaches(rule: Rule, source: Path) -> list[str]:
    """One line per import under ``source`` that ``rule`` forbids."""
    found = []
    for path in sorted(source.rglob("*.py")):
        if not rule.governs(path.relative_to(source).as_posix()):
            continue
        for item in imports_of(path, source):
            if rule.breaks(item.target, source.name):
                where = item.path.relative_to(source.parent)
                what = (
                    f"the package root {item.target}" if item.target == source.name else item.target
                )
                found.append(f"{where}:{item.line}: `{item.statement}` imports {what}")
    return found


def governed(rule: Rule, source: Path) -> list[Path]:
    return [
        path for path in source.rglob("*.py") if rule.governs(path.relative_to(source).as_posix())
    ]


def _core(path: str) -> bool:
    return "/" not in path and path not in ("cli.py", "__main__.py")


def _backend(path: str) -> bool:
    return path.startswith("backends/")


def _plugin_user(path: str) -> bool:
    return path in ("cli.py", "__main__.py") or path.startswith("conformance/")


def rules(root: str) -> dict[str, Rule]:
    """The layering rules for the package named ``root``."""
    return {
        "core": Rule(
            _core,
            tuple(
                f"{root}.{name}" for name in ("backends", "conformance", "cli", "__main__", "bench")
            ),
        ),
        "backends": Rule(
            _backend,
            tuple(f"{root}.{name}" for name in ("cli", "__main__", "conformance", "bench")),
            root_forbidden=True,
        ),
        # A backend is found by its entry point, as a third-party one is.
        "cli-and-suite": Rule(_plugin_user, (f"{root}.backends",)),
    }


@pytest.mark.parametrize("name", list(rules(SOURCE.name)))
def test_dependencies_point_one_way(name: str) -> None:
    rule = rules(SOURCE.name)[name]
    assert governed(rule, SOURCE), f"the {name} rule governs no module: the tree moved"
    found = breaches(rule, SOURCE)
    assert not found, f"{name}: forbidden imports\n" + "\n".join(found)


def _write(source: Path, relative: str, text: str) -> None:
    path = source / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))


def test_the_rules_catch_every_kind_of_import(tmp_path: Path) -> None:
    source = tmp_path / "pkg"
    for module in ("__init__", "cli", "names", "backends/__init__", "conformance/__init__"):
        _write(source, f"{module}.py", "")
    _write(source, "layer.py", "def load():\n    from .backends import memory\n")
    _write(source, "url.py", "import pkg.cli\n")
    _write(source, "backends/memory.py", "from .. import __version__, names\n")
    _write(source, "backends/deep/__init__.py", "from ...conformance import suite\n")
    _write(source, "backends/ok.py", "from ..names import check\nfrom pkg import names\n")
    _write(source, "cli.py", "def hub():\n    from pkg.backends.memory import main\n")
    found = {name: breaches(rule, source) for name, rule in rules("pkg").items()}
    assert found == {
        "core": [
            "pkg/layer.py:2: `from .backends import memory` imports pkg.backends.memory",
            "pkg/url.py:1: `import pkg.cli` imports pkg.cli",
        ],
        "backends": [
            "pkg/backends/deep/__init__.py:1: `from ...conformance import suite` imports "
            "pkg.conformance",
            "pkg/backends/memory.py:1: `from .. import __version__, names` imports the "
            "package root pkg",
        ],
        "cli-and-suite": [
            "pkg/cli.py:2: `from pkg.backends.memory import main` imports pkg.backends.memory",
        ],
    }
