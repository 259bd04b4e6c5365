"""Pieces every storage implementation shares: key rules, owner marks, argument checks."""

from __future__ import annotations

import dataclasses
import datetime
from typing import Any

from vdistream.errors import StorageError, StorageURLError

__all__ = (
    "INTERNAL_PREFIX",
    "MANIFEST_NAME",
    "OwnerMark",
    "byte_view",
    "check_backup_id",
    "check_key",
    "check_position",
    "is_internal",
    "join_url",
    "owner_text",
)

#: Names starting with this are vdistream's own bookkeeping (owner locks and marks,
#: probe objects): never keys, hidden from ``list``, refused as key components.
INTERNAL_PREFIX = ".vdistream-"

#: the name the catalog gives a committed backup's manifest (``<backup_id>/manifest.json``):
#: the one thing storage knows of backups, so that a sweep never removes a committed one
MANIFEST_NAME = "manifest.json"


def is_internal(name: str) -> bool:
    """Whether the last component of ``name`` is one of vdistream's internal names."""
    return name.rpartition("/")[2].startswith(INTERNAL_PREFIX)


@dataclasses.dataclass(frozen=True)
class OwnerMark:
    """The mark ``Storage.in_progress`` leaves for a backup (a lock file, an object).

    ``alive``: True when its owner provably runs, False when provably gone, None when it
    cannot be told (an owner on another host). ``name`` is its key-like name relative
    to the storage; ``modified`` when it was written, if known.
    """

    backup_id: str
    name: str
    alive: bool | None
    modified: datetime.datetime | None = None
    record: dict[str, Any] | None = None

    def owner(self) -> str:
        """``"host, pid N"`` for messages, or ``"unknown owner"``."""
        return owner_text(self.record)


def owner_text(record: dict[str, Any] | None) -> str:
    """An owner record (``vdistream.ownership.owner_record``) as ``"host, pid N"``
    for messages, or ``"unknown owner"`` when it names nobody."""
    record = record or {}
    if "host" in record or "pid" in record:
        return f"{record.get('host', '?')}, pid {record.get('pid', '?')}"
    return "unknown owner"


def check_key(key: str, *, url: str) -> str:
    """Return ``key`` if it is a valid object key (see ``Storage``), else raise."""
    if not key:
        raise StorageURLError("invalid key '': empty", url=url)
    if "\0" in key or any(part in ("", ".", "..") for part in key.split("/")):
        raise StorageURLError(
            f"invalid key {key!r}: needs non-empty '/'-separated names, no '.' or '..'",
            url=url,
        )
    if any(part.startswith(INTERNAL_PREFIX) for part in key.split("/")):
        raise StorageURLError(
            f"invalid key {key!r}: names starting with {INTERNAL_PREFIX!r} are reserved",
            url=url,
        )
    return key


def check_backup_id(backup_id: str, *, url: str) -> str:
    """Return ``backup_id`` if it can name a backup's directory: one valid key component,
    not an internal name."""
    check_key(backup_id, url=url)
    if "/" in backup_id or is_internal(backup_id):
        raise StorageURLError(f"invalid backup id {backup_id!r}", url=url)
    return backup_id


def join_url(base: str, key: str) -> str:
    """The URL of ``key`` under the storage URL ``base``."""
    return base + key if base.endswith("/") else f"{base}/{key}"


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
