"""Engines: the server side of a virtual device set (the database's part of VDI).

``Engine`` is the contract (``vdistream.engines.base``); ``SimulatedBackup`` and
``SimulatedRestore`` are the SQL-Server-like engine (``vdistream.engines.simulator``),
whose stream format is ``vdistream.engines.framing``. This module only re-exports.
"""

from vdistream.engines.base import CommandFailedError as CommandFailedError
from vdistream.engines.base import DeviceStats as DeviceStats
from vdistream.engines.base import Direction as Direction
from vdistream.engines.base import Engine as Engine
from vdistream.engines.base import EngineAbortedError as EngineAbortedError
from vdistream.engines.base import EngineError as EngineError
from vdistream.engines.base import EngineResult as EngineResult
from vdistream.engines.base import StreamFormatError as StreamFormatError
from vdistream.engines.base import device_names as device_names
from vdistream.engines.faults import Action as Action
from vdistream.engines.faults import FailPoint as FailPoint
from vdistream.engines.faults import InjectedFaultError as InjectedFaultError
from vdistream.engines.faults import Phase as Phase
from vdistream.engines.session import ServerSession as ServerSession
from vdistream.engines.simulator import SimulatedBackup as SimulatedBackup
from vdistream.engines.simulator import SimulatedRestore as SimulatedRestore
from vdistream.engines.simulator import SimulatorOptions as SimulatorOptions
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

__all__ = (
    "Action",
    "ByteConsumer",
    "ByteProducer",
    "BytesConsumer",
    "BytesProducer",
    "CallableConsumer",
    "CallableProducer",
    "CommandFailedError",
    "DeviceStats",
    "Direction",
    "Engine",
    "EngineAbortedError",
    "EngineError",
    "EngineResult",
    "FailPoint",
    "FileConsumer",
    "FileProducer",
    "InjectedFaultError",
    "IterableProducer",
    "Phase",
    "ServerSession",
    "SimulatedBackup",
    "SimulatedRestore",
    "SimulatorOptions",
    "StreamFormatError",
    "as_consumer",
    "as_producer",
    "device_names",
)
