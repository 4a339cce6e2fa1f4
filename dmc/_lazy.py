"""Names of a package imported when first used (PEP 562 module ``__getattr__``), so that importing the package
loads neither torch nor transformers."""

from __future__ import annotations

import importlib


def lazy_attributes(package: str, namespace: dict, exports: dict[str, str], submodules=frozenset()):
    """``(__getattr__, __dir__)`` for the package ``package`` whose module dict is ``namespace``: a name of
    ``exports`` (name -> the package's module that defines it) is imported on first use and kept; a name of
    ``submodules`` is that subpackage."""
    def __getattr__(name: str):
        if name in submodules:
            return importlib.import_module(f".{name}", package)
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f".{exports[name]}", package), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(namespace["__all__"]))

    return __getattr__, __dir__
