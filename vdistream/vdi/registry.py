"""Rendezvous by name: where a client's set and an engine's server object meet.

The default registry is process-wide, so a client set created anywhere in the process
is found by a server object created anywhere else. A registry is also the seam where
an out-of-process transport plugs in: it can publish a set under the same name to an
engine in another process.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vdistream.errors import VDInvalidError

if TYPE_CHECKING:
    from vdistream.vdi.core import SetCore
    from vdistream.vdi.server import ServerVirtualDeviceSet

__all__ = ("Registry", "default_registry")


def _key(instance: str | None, name: str) -> tuple[str, str]:
    # Instance names are case-insensitive (Windows service names); set names are not.
    return ((instance or "").casefold(), name)


class Registry:
    """Maps ``(instance, name)`` to the live set of that name."""

    def __init__(self) -> None:
        self._sets: dict[tuple[str, str], SetCore] = {}

    def claim(self, instance: str | None, name: str, core: SetCore) -> None:
        key = _key(instance, name)
        if key in self._sets:
            raise VDInvalidError("a virtual device set of this name already exists", set_name=name)
        self._sets[key] = core

    def lookup(self, instance: str | None, name: str) -> SetCore | None:
        return self._sets.get(_key(instance, name))

    def release(self, instance: str | None, name: str, core: SetCore) -> None:
        key = _key(instance, name)
        if self._sets.get(key) is core:
            del self._sets[key]

    def names(self) -> list[str]:
        return sorted(name for _, name in self._sets)

    def server_set(self) -> ServerVirtualDeviceSet:
        """A new server (engine) object that opens sets of this registry: the seam an
        engine uses, so that a registry serving sets of another process can hand out
        its own server objects instead."""
        from vdistream.vdi.server import ServerVirtualDeviceSet

        return ServerVirtualDeviceSet(registry=self)


#: The process-wide registry used when a set is created without ``registry=``.
default_registry = Registry()
