"""The conformance suite every multilayer backend passes.

Run it against any layer URL::

    pytest --pyargs multilayer.conformance --multilayer-url redis://localhost:6379/0
    multilayer check redis://localhost:6379/0

``--multilayer-url`` may be given several times; every test then runs once per URL.
Two layer objects built from one URL and one prefix stand in for two processes; the tests
marked ``multiprocess`` start real OS processes (:mod:`multilayer.conformance.worker`).
Tests that a backend cannot run skip by capability (:class:`multilayer.Capabilities`),
with the reason, never by backend name.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil

__all__ = ["suite_test_names"]


def suite_test_names() -> list[str]:
    """The ids (``module.py::test_name``) of every test in the suite, in file order."""
    names = []
    for module_info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if not module_info.name.startswith("test_"):
            continue
        module = importlib.import_module(f"{__name__}.{module_info.name}")
        functions = [
            (obj.__code__.co_firstlineno, name)
            for name, obj in vars(module).items()
            if name.startswith("test_") and inspect.isfunction(obj)
        ]
        names += [f"{module_info.name}.py::{name}" for _, name in sorted(functions)]
    return names
