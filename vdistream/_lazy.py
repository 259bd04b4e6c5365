"""Lazy re-exports for package ``__init__`` modules (PEP 562).

A package that re-exports names from heavy modules (the SQL Server binding,
cryptography, the daemon) lists them as ``name -> module`` and hands the module's
``__getattr__``/``__dir__`` to ``lazy_exports``: ``package.Name`` imports the module on
first access and caches the very object it defines in the package, so that a command
that never uses it never pays for its import. A submodule is imported on first access
too (``package.submodule``), as the eager re-exports used to make it reachable.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable, Iterable, Mapping, MutableMapping
from typing import Any

__all__ = ("lazy_exports",)


def lazy_exports(
    namespace: MutableMapping[str, Any], names: Mapping[str, str], public: Iterable[str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for the module whose ``globals()`` is ``namespace``:
    ``names`` maps each lazy public name to the module that defines it; ``public`` is
    the module's ``__all__``."""
    listed = tuple(public)
    where = namespace.get("__name__", "?")

    def __getattr__(name: str) -> Any:
        module = names.get(name)
        if module is None:
            # A submodule: the eager package had imported most of them, so that
            # ``import vdistream`` then ``vdistream.storage.open_storage`` worked.
            if _submodule(name) and importlib.util.find_spec(f"{where}.{name}"):
                return importlib.import_module(f"{where}.{name}")
            raise AttributeError(f"module {where!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted({*namespace, *listed})

    return __getattr__, __dir__


def _submodule(name: str) -> bool:
    """Whether ``name`` could be a submodule's (not a dunder probe, not dotted)."""
    return name.isidentifier() and not name.startswith("__")
