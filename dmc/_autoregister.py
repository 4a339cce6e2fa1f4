"""The DMC model types, registered with transformers' Auto classes when transformers first looks one
up, so that ``import dmc`` itself imports neither torch nor transformers (seconds on a cold start).

``AutoConfig`` finds a model type in ``CONFIG_MAPPING``, whose table of added types is a plain dict;
that dict is swapped for one that, asked about a ``dmc_*`` type it does not hold yet, imports
:mod:`dmc.hf.modeling`, whose import registers every DMC config and model class. Until then nothing
is imported: a hook on the import system waits for transformers' ``configuration_auto`` module (or
finds it already there). A transformers whose mapping looks otherwise gets the classes registered
at once, as before.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys

CONFIG_AUTO = "transformers.models.auto.configuration_auto"
_registering = False


def _register() -> None:
    global _registering
    if _registering:
        return
    _registering = True
    try:
        import dmc.hf.modeling  # noqa: F401 - registers the DMC types on import
    finally:
        _registering = False


class _ModelTypes(dict):
    """``CONFIG_MAPPING``'s added model types; the first question about a DMC one registers them all."""

    def _ensure(self, key) -> None:
        if isinstance(key, str) and key.startswith("dmc_") and not dict.__contains__(self, key):
            _register()

    def __contains__(self, key) -> bool:
        self._ensure(key)
        return dict.__contains__(self, key)

    def __getitem__(self, key):
        self._ensure(key)
        return dict.__getitem__(self, key)

    def get(self, key, default=None):
        self._ensure(key)
        return dict.get(self, key, default)


def _patch(module) -> None:
    mapping = getattr(module, "CONFIG_MAPPING", None)
    extra = getattr(mapping, "_extra_content", None)
    if type(extra) is dict:
        mapping._extra_content = _ModelTypes(extra)
    elif not isinstance(extra, _ModelTypes):
        _register()


class _Loader(importlib.abc.Loader):
    def __init__(self, loader) -> None:
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        self.loader.exec_module(module)
        _patch(module)


class _Finder(importlib.abc.MetaPathFinder):
    """Waits for transformers' configuration_auto to be imported, then patches it (and leaves)."""

    def find_spec(self, name, path, target=None):
        if name != CONFIG_AUTO:
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader)
        return spec


def install() -> None:
    """Register the DMC types lazily (idempotent)."""
    module = sys.modules.get(CONFIG_AUTO)
    if module is not None:
        _patch(module)
    elif not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
