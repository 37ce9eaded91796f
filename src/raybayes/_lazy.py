"""Packages whose public names are imported on first use (PEP 562)."""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types


def lazy_exports(package: str, exports: dict[str, str]):
    """Make ``package`` import each exported name from its module on first access.

    ``exports`` maps a public name to ``"module"`` or ``"module:attribute"``;
    other submodules of the package are imported on first access as well.
    A submodule that shares a name with an export (``raybayes.plan``, the module,
    and ``raybayes.plan``, the function) does not replace the export when it is
    imported.

    Returns:
        ``(__getattr__, __dir__)`` for the package's namespace.
    """
    module = sys.modules[package]

    def __getattr__(name):
        target = exports.get(name)
        if target is None:
            # A subpackage (``raybayes.optim``) is imported on first access too.
            if not name.startswith("_") and importlib.util.find_spec(
                f"{package}.{name}"
            ):
                return importlib.import_module(f"{package}.{name}")
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        source, _, attribute = target.partition(":")
        value = getattr(importlib.import_module(source), attribute or name)
        types.ModuleType.__setattr__(module, name, value)
        return value

    def __dir__():
        return sorted(set(vars(module)) | set(exports))

    class _Package(types.ModuleType):
        def __setattr__(self, name, value):
            if isinstance(value, types.ModuleType) and name in exports:
                return  # the submodule keeps its place in sys.modules only
            super().__setattr__(name, value)

    module.__class__ = _Package
    return __getattr__, __dir__
