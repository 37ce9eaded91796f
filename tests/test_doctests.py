"""The ``Examples:`` of every docstring in the package run as doctests.

The modules are found from the imported package (installed or editable alike), so
the API reference cannot drift from the code. One test per module.
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import raybayes

# Modules whose import needs an optional extra that may be absent.
_OPTIONAL = {"raybayes.serve": "fastapi"}


def _modules() -> list[str]:
    names = []
    for info in pkgutil.walk_packages(raybayes.__path__, prefix="raybayes."):
        names.append(info.name)
    return sorted(names)


def _with_examples(name: str) -> bool:
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
        return False
    with open(spec.origin, encoding="utf-8") as f:
        return ">>>" in f.read()


MODULES = [m for m in _modules() if _with_examples(m)]


def test_the_package_has_examples():
    assert len(MODULES) >= 20, MODULES


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    for prefix, package in _OPTIONAL.items():
        if name.startswith(prefix):
            pytest.importorskip(package)
    module = importlib.import_module(name)
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(
        optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
    )
    tests = [t for t in finder.find(module, name) if t.examples]
    assert tests, f"{name} mentions '>>>' but no doctest was found"
    for test in tests:
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}"
