"""Pieces every storage implementation shares: key rules, sink states, argument checks."""

from __future__ import annotations

import enum

from vdistream.errors import StorageError, StorageURLError

__all__ = ("SinkState", "byte_view", "check_key", "check_position", "join_url", "require")


class SinkState(enum.Enum):
    """Where a sink is in its life; see ``Sink`` for the transitions."""

    OPEN = "open"
    #: commit was refused (the key exists): data final and kept, nothing published
    SEALED = "sealed"
    COMMITTED = "committed"
    ABORTED = "aborted"
    #: an I/O error happened: only abort() is still allowed
    FAILED = "failed"


def check_key(key: str, *, url: str) -> str:
    """Return ``key`` if it is a valid object key (see ``Storage``), else raise."""
    if not key:
        raise StorageURLError("invalid key '': empty", url=url)
    if "\0" in key or any(part in ("", ".", "..") for part in key.split("/")):
        raise StorageURLError(
            f"invalid key {key!r}: needs non-empty '/'-separated names, no '.' or '..'",
            url=url,
        )
    return key


def join_url(base: str, key: str) -> str:
    """The URL of ``key`` under the storage URL ``base``."""
    return base + key if base.endswith("/") else f"{base}/{key}"


def require(state: SinkState, *allowed: SinkState, what: str, url: str, device: str | None) -> None:
    """Refuse ``what`` unless the sink is in one of the ``allowed`` states."""
    if state not in allowed:
        raise StorageError(f"cannot {what}: the sink is {state.value}", url=url, device=device)


def check_position(
    position: int | None, *, random_access: bool, url: str, device: str | None = None
) -> None:
    """Refuse a ``position=`` that the object cannot take."""
    if position is None:
        return
    if not random_access:
        raise StorageError(
            "positional access is not supported by this storage", url=url, device=device
        )
    if position < 0:
        raise StorageError(f"negative position {position}", url=url, device=device)


def byte_view(view: memoryview) -> memoryview:
    """``view`` as flat unsigned bytes, so lengths count bytes (C-contiguous only)."""
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")
