"""Engines: the server side of a virtual device set (the database's part of VDI).

``Engine`` is the contract (``vdistream.engines.base``); ``StripedBackup`` and
``StripedRestore`` are the SQL-Server-like engine (``vdistream.engines.striping``),
whose stream format is ``vdistream.engines.framing``. The real engines reuse it with
producers and consumers of their own (``vdistream.engines.scoped``): any command
(``command``, over ``process``), SQLite (``sqlite``), PostgreSQL (``postgres``);
``vdistream.engines.databases`` picks one from a URL; PostgreSQL's files mode reads the
data directory itself (``pgfiles``); ``external`` serves a set to an engine in another
process (``vdistream.transport``). This module only re-exports.
"""

import typing as _typing

from vdistream._lazy import lazy_exports as _lazy_exports
from vdistream.engines.base import CommandFailedError as CommandFailedError
from vdistream.engines.base import DeviceStats as DeviceStats
from vdistream.engines.base import Direction as Direction
from vdistream.engines.base import Engine as Engine
from vdistream.engines.base import EngineAbortedError as EngineAbortedError
from vdistream.engines.base import EngineError as EngineError
from vdistream.engines.base import EngineResult as EngineResult
from vdistream.engines.base import StreamFormatError as StreamFormatError
from vdistream.engines.base import device_names as device_names
from vdistream.engines.command import CommandBackup as CommandBackup
from vdistream.engines.command import CommandRestore as CommandRestore
from vdistream.engines.command import DiscardConsumer as DiscardConsumer
from vdistream.engines.databases import DatabaseSource as DatabaseSource
from vdistream.engines.databases import content_check as content_check
from vdistream.engines.databases import resolve_source as resolve_source
from vdistream.engines.databases import restore_engine as restore_engine
from vdistream.engines.faults import Action as Action
from vdistream.engines.faults import FailPoint as FailPoint
from vdistream.engines.faults import InjectedFaultError as InjectedFaultError
from vdistream.engines.faults import Phase as Phase
from vdistream.engines.postgres import PostgresBaseBackup as PostgresBaseBackup
from vdistream.engines.postgres import PostgresBaseRestore as PostgresBaseRestore
from vdistream.engines.postgres import PostgresDump as PostgresDump
from vdistream.engines.postgres import PostgresDumpFile as PostgresDumpFile
from vdistream.engines.postgres import PostgresDumpRestore as PostgresDumpRestore
from vdistream.engines.postgres import PostgresURL as PostgresURL
from vdistream.engines.process import ConsumerFailedError as ConsumerFailedError
from vdistream.engines.process import ProcessConsumer as ProcessConsumer
from vdistream.engines.process import ProcessFailedError as ProcessFailedError
from vdistream.engines.process import ProcessProducer as ProcessProducer
from vdistream.engines.process import ProducerFailedError as ProducerFailedError
from vdistream.engines.process import ToolFailedError as ToolFailedError
from vdistream.engines.scoped import EndpointError as EndpointError
from vdistream.engines.scoped import ScopedBackup as ScopedBackup
from vdistream.engines.scoped import ScopedRestore as ScopedRestore
from vdistream.engines.scoped import ScopedStream as ScopedStream
from vdistream.engines.scoped import TargetExistsError as TargetExistsError
from vdistream.engines.session import ServerSession as ServerSession
from vdistream.engines.sqlite import SQLiteBackup as SQLiteBackup
from vdistream.engines.sqlite import SQLiteError as SQLiteError
from vdistream.engines.sqlite import SQLiteRestore as SQLiteRestore
from vdistream.engines.streams import ByteConsumer as ByteConsumer
from vdistream.engines.streams import ByteProducer as ByteProducer
from vdistream.engines.streams import BytesConsumer as BytesConsumer
from vdistream.engines.streams import BytesProducer as BytesProducer
from vdistream.engines.streams import CallableConsumer as CallableConsumer
from vdistream.engines.streams import CallableProducer as CallableProducer
from vdistream.engines.streams import FileConsumer as FileConsumer
from vdistream.engines.streams import FileProducer as FileProducer
from vdistream.engines.streams import IterableProducer as IterableProducer
from vdistream.engines.streams import as_consumer as as_consumer
from vdistream.engines.streams import as_producer as as_producer
from vdistream.engines.striping import StripedBackup as StripedBackup
from vdistream.engines.striping import StripedRestore as StripedRestore
from vdistream.engines.striping import StripingOptions as StripingOptions

if _typing.TYPE_CHECKING:
    from vdistream.engines.external import ExternalBackup as ExternalBackup
    from vdistream.engines.external import ExternalOptions as ExternalOptions
    from vdistream.engines.external import ExternalRestore as ExternalRestore
    from vdistream.engines.pgfiles import PgFilesBackup as PgFilesBackup
    from vdistream.engines.pgfiles import PgFilesRestore as PgFilesRestore

# Imported on first access: the files-mode backup loads psycopg; engines in other
# processes load the transport.
_LAZY: dict[str, str] = {
    "ExternalBackup": "vdistream.engines.external",
    "ExternalOptions": "vdistream.engines.external",
    "ExternalRestore": "vdistream.engines.external",
    "PgFilesBackup": "vdistream.engines.pgfiles",
    "PgFilesRestore": "vdistream.engines.pgfiles",
}

__all__ = (
    "Action",
    "ByteConsumer",
    "ByteProducer",
    "BytesConsumer",
    "BytesProducer",
    "CallableConsumer",
    "CallableProducer",
    "CommandBackup",
    "CommandFailedError",
    "CommandRestore",
    "ConsumerFailedError",
    "DatabaseSource",
    "DeviceStats",
    "Direction",
    "DiscardConsumer",
    "EndpointError",
    "Engine",
    "EngineAbortedError",
    "EngineError",
    "EngineResult",
    "ExternalBackup",
    "ExternalOptions",
    "ExternalRestore",
    "FailPoint",
    "FileConsumer",
    "FileProducer",
    "InjectedFaultError",
    "IterableProducer",
    "PgFilesBackup",
    "PgFilesRestore",
    "Phase",
    "PostgresBaseBackup",
    "PostgresBaseRestore",
    "PostgresDump",
    "PostgresDumpFile",
    "PostgresDumpRestore",
    "PostgresURL",
    "ProcessConsumer",
    "ProcessFailedError",
    "ProcessProducer",
    "ProducerFailedError",
    "SQLiteBackup",
    "SQLiteError",
    "SQLiteRestore",
    "ScopedBackup",
    "ScopedRestore",
    "ScopedStream",
    "ServerSession",
    "StreamFormatError",
    "StripedBackup",
    "StripedRestore",
    "StripingOptions",
    "TargetExistsError",
    "ToolFailedError",
    "as_consumer",
    "as_producer",
    "content_check",
    "device_names",
    "resolve_source",
    "restore_engine",
)

__getattr__, __dir__ = _lazy_exports(globals(), _LAZY, __all__)
