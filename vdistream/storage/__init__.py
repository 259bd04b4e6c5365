"""Client-side media: where each device's byte stream goes (``Sink``) or comes from
(``Source``), addressed by URL (``open_storage("file:///backups")``).

The contracts, including what every call guarantees after cancellation, are in
``vdistream.storage.base``; ``vdistream.testing.check_storage`` checks an implementation
against them.

The back ends and the registry are imported on first access (``vdistream._lazy``): a
program that only needs the contracts does not load them.
"""

import typing as _typing

from vdistream._lazy import lazy_exports as _lazy_exports
from vdistream.storage.base import BackupInProgressError as BackupInProgressError
from vdistream.storage.base import OrphanUploadsError as OrphanUploadsError
from vdistream.storage.base import Sink as Sink
from vdistream.storage.base import SinkBase as SinkBase
from vdistream.storage.base import SinkState as SinkState
from vdistream.storage.base import Source as Source
from vdistream.storage.base import SourceBase as SourceBase
from vdistream.storage.base import Storage as Storage
from vdistream.storage.base import StorageProbeError as StorageProbeError
from vdistream.storage.base import byte_view as byte_view

if _typing.TYPE_CHECKING:
    from vdistream.storage.file import FileSink as FileSink
    from vdistream.storage.file import FileSource as FileSource
    from vdistream.storage.file import FileStorage as FileStorage
    from vdistream.storage.memory import MemorySink as MemorySink
    from vdistream.storage.memory import MemorySource as MemorySource
    from vdistream.storage.memory import MemoryStorage as MemoryStorage
    from vdistream.storage.memory import MemoryStore as MemoryStore
    from vdistream.storage.memory import MemoryStores as MemoryStores
    from vdistream.storage.null import NullSink as NullSink
    from vdistream.storage.null import NullStorage as NullStorage
    from vdistream.storage.registry import StorageFactory as StorageFactory
    from vdistream.storage.registry import StorageRegistry as StorageRegistry
    from vdistream.storage.registry import default_registry as default_registry
    from vdistream.storage.registry import open_storage as open_storage

# Public name -> the module that defines it, imported on first access (PEP 562).
_LAZY: dict[str, str] = {
    "FileSink": "vdistream.storage.file",
    "FileSource": "vdistream.storage.file",
    "FileStorage": "vdistream.storage.file",
    "MemorySink": "vdistream.storage.memory",
    "MemorySource": "vdistream.storage.memory",
    "MemoryStorage": "vdistream.storage.memory",
    "MemoryStore": "vdistream.storage.memory",
    "MemoryStores": "vdistream.storage.memory",
    "NullSink": "vdistream.storage.null",
    "NullStorage": "vdistream.storage.null",
    "StorageFactory": "vdistream.storage.registry",
    "StorageRegistry": "vdistream.storage.registry",
    "default_registry": "vdistream.storage.registry",
    "open_storage": "vdistream.storage.registry",
}

__all__ = (
    "BackupInProgressError",
    "FileSink",
    "FileSource",
    "FileStorage",
    "MemorySink",
    "MemorySource",
    "MemoryStorage",
    "MemoryStore",
    "MemoryStores",
    "NullSink",
    "NullStorage",
    "OrphanUploadsError",
    "Sink",
    "SinkBase",
    "SinkState",
    "Source",
    "SourceBase",
    "Storage",
    "StorageFactory",
    "StorageProbeError",
    "StorageRegistry",
    "byte_view",
    "default_registry",
    "open_storage",
)


__getattr__, __dir__ = _lazy_exports(globals(), _LAZY, __all__)
