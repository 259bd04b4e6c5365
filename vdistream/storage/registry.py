"""Storage addressed by URL: ``scheme://...`` resolved through a scheme registry.

A plain path (``/backups``, ``backups/db1``), having no scheme, means ``file://``; it
is made absolute against the current directory when opened. Registering a scheme twice
is a programming error (``ValueError``), as in restic's location registry.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

from vdistream.errors import StorageURLError
from vdistream.storage.base import Storage
from vdistream.storage.memory import MemoryStores
from vdistream.storage.null import NullStorage

__all__ = ("StorageFactory", "StorageRegistry", "default_registry", "open_storage")

#: Builds a storage from its full URL; raises ``StorageURLError`` if it is malformed.
StorageFactory = Callable[[str], Storage]

# RFC 3986 scheme, then ":". Anything else is a plain path.
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*):")


def _open_file(url: str) -> Storage:
    """``file://...``; the file back end (and aiofiles) is imported here."""
    from vdistream.storage.file import FileStorage

    return FileStorage.from_url(url)


def _open_s3(url: str) -> Storage:
    """``s3://bucket/prefix?...``; the S3 backend (and aiobotocore) is imported here."""
    from vdistream.storage.s3 import S3Storage

    return S3Storage.from_url(url)


def _open_azure(url: str) -> Storage:
    """``azure://account/container/prefix?...``; the Azure backend (and its SDK) is
    imported here."""
    from vdistream.storage.azure import AzureStorage

    return AzureStorage.from_url(url)


class StorageRegistry:
    """Maps URL schemes to storage factories."""

    def __init__(self) -> None:
        self._factories: dict[str, StorageFactory] = {}

    @classmethod
    def with_builtins(cls) -> StorageRegistry:
        """A registry knowing ``file``, ``memory`` (its own named stores), ``null``,
        ``s3`` and ``azure`` (``file``, ``s3`` and ``azure`` imported on first use, so
        that aiofiles, aiobotocore and the Azure SDK load only when needed)."""
        registry = cls()
        registry.register("file", _open_file)
        registry.register("memory", MemoryStores().open_storage)
        registry.register("null", NullStorage.from_url)
        registry.register("s3", _open_s3)
        registry.register("azure", _open_azure)
        return registry

    @property
    def schemes(self) -> tuple[str, ...]:
        """The registered schemes, sorted."""
        return tuple(sorted(self._factories))

    def register(self, scheme: str, factory: StorageFactory) -> None:
        """Resolve ``scheme://...`` URLs (case-insensitive scheme) with ``factory``."""
        if not _SCHEME.fullmatch(scheme + ":"):
            raise ValueError(f"invalid URL scheme {scheme!r}")
        key = scheme.lower()
        if key in self._factories:
            raise ValueError(f"storage scheme {key!r} is already registered")
        self._factories[key] = factory

    def open_storage(self, url: str | os.PathLike[str]) -> Storage:
        """The storage ``url`` names. No I/O: a missing directory is created on use.

        Raises ``StorageURLError`` naming the URL and the known schemes when the URL is
        malformed or its scheme is not registered.
        """
        text = os.fspath(url)
        match = _SCHEME.match(text)
        if match is None:
            if not text or "\0" in text or "://" in text:
                raise self._error("malformed storage URL", text)
            return self._resolve("file", Path(text).absolute().as_uri(), text)
        return self._resolve(match.group(1).lower(), text, text)

    def _resolve(self, scheme: str, url: str, given: str) -> Storage:
        factory = self._factories.get(scheme)
        if factory is None:
            raise self._error(f"unknown storage scheme {scheme!r}", given)
        try:
            return factory(url)
        except StorageURLError as exc:
            reason = str(exc).removesuffix(f" ({exc.url})")
            raise self._error(reason, given) from exc

    def _error(self, reason: str, url: str) -> StorageURLError:
        return StorageURLError(
            f"{reason}; known schemes: {', '.join(self.schemes) or 'none'}", url=url
        )


#: The registry ``open_storage`` uses; its ``memory://`` stores live as long as it does.
default_registry = StorageRegistry.with_builtins()


def open_storage(url: str | os.PathLike[str]) -> Storage:
    """``default_registry.open_storage(url)``."""
    return default_registry.open_storage(url)
