"""vdistream: stream database backups through virtual devices, the way SQL Server's VDI does.

This module only re-exports; importing it configures nothing (no logging, no signal
handlers, no global metrics). ``Service`` (the daemon's work, embeddable: ``async with
vdistream.Service(settings) as service:``) is imported on first use, so that a program
that only runs jobs does not load aiohttp and prometheus_client. So is every other name
but the exceptions and ``__version__`` (``vdistream._lazy``): ``import
vdistream.cli`` or ``import vdistream.errors`` does not load the coordinator, the
engines and the storage back ends, most of a command's start-up. ``vdistream.backup``
and the rest are the very objects their modules define, imported on first access and
then cached in this module.
"""

import typing as _typing

from vdistream._lazy import lazy_exports as _lazy_exports
from vdistream._version import __version__ as __version__
from vdistream.errors import ConfigError as ConfigError
from vdistream.errors import JobAbortedError as JobAbortedError
from vdistream.errors import JobError as JobError
from vdistream.errors import StorageError as StorageError
from vdistream.errors import StorageExistsError as StorageExistsError
from vdistream.errors import StorageFullError as StorageFullError
from vdistream.errors import StorageIntegrityError as StorageIntegrityError
from vdistream.errors import StorageNotFoundError as StorageNotFoundError
from vdistream.errors import StorageURLError as StorageURLError
from vdistream.errors import VDAbortError as VDAbortError
from vdistream.errors import VDBusyError as VDBusyError
from vdistream.errors import VDClosedError as VDClosedError
from vdistream.errors import VDIError as VDIError
from vdistream.errors import VDInstanceNameError as VDInstanceNameError
from vdistream.errors import VDInvalidError as VDInvalidError
from vdistream.errors import VdistreamError as VdistreamError
from vdistream.errors import VDMemoryError as VDMemoryError
from vdistream.errors import VDNotOpenError as VDNotOpenError
from vdistream.errors import VDNotSupportedError as VDNotSupportedError
from vdistream.errors import VDOpenError as VDOpenError
from vdistream.errors import VDProtocolError as VDProtocolError
from vdistream.errors import VDSecurityError as VDSecurityError
from vdistream.errors import VDTimeoutError as VDTimeoutError
from vdistream.errors import VDUnexpectedError as VDUnexpectedError

if _typing.TYPE_CHECKING:
    from vdistream.coordinator import AbortCause as AbortCause
    from vdistream.coordinator import DeviceResult as DeviceResult
    from vdistream.coordinator import Job as Job
    from vdistream.coordinator import JobKind as JobKind
    from vdistream.coordinator import JobOptions as JobOptions
    from vdistream.coordinator import JobResult as JobResult
    from vdistream.coordinator import JobStatus as JobStatus
    from vdistream.coordinator import backup as backup
    from vdistream.coordinator import restore as restore
    from vdistream.protocol import ClientState as ClientState
    from vdistream.protocol import Command as Command
    from vdistream.protocol import CommandCode as CommandCode
    from vdistream.protocol import CommandResult as CommandResult
    from vdistream.protocol import Completion as Completion
    from vdistream.protocol import Features as Features
    from vdistream.protocol import HResult as HResult
    from vdistream.protocol import ServerState as ServerState
    from vdistream.protocol import VDConfig as VDConfig
    from vdistream.protocol import Whence as Whence
    from vdistream.service.daemon import Service as Service
    from vdistream.storage import Sink as Sink
    from vdistream.storage import Source as Source
    from vdistream.storage import Storage as Storage
    from vdistream.storage import open_storage as open_storage
    from vdistream.vdi import ClientVirtualDevice as ClientVirtualDevice
    from vdistream.vdi import ClientVirtualDeviceSet as ClientVirtualDeviceSet
    from vdistream.vdi import PendingCommand as PendingCommand
    from vdistream.vdi import Registry as Registry
    from vdistream.vdi import ServerVirtualDevice as ServerVirtualDevice
    from vdistream.vdi import ServerVirtualDeviceSet as ServerVirtualDeviceSet

# Public name -> the module that defines it, imported on first access.
_LAZY: dict[str, str] = {
    "AbortCause": "vdistream.coordinator",
    "DeviceResult": "vdistream.coordinator",
    "Job": "vdistream.coordinator",
    "JobKind": "vdistream.coordinator",
    "JobOptions": "vdistream.coordinator",
    "JobResult": "vdistream.coordinator",
    "JobStatus": "vdistream.coordinator",
    "backup": "vdistream.coordinator",
    "restore": "vdistream.coordinator",
    "ClientState": "vdistream.protocol",
    "Command": "vdistream.protocol",
    "CommandCode": "vdistream.protocol",
    "CommandResult": "vdistream.protocol",
    "Completion": "vdistream.protocol",
    "Features": "vdistream.protocol",
    "HResult": "vdistream.protocol",
    "ServerState": "vdistream.protocol",
    "VDConfig": "vdistream.protocol",
    "Whence": "vdistream.protocol",
    "Sink": "vdistream.storage",
    "Source": "vdistream.storage",
    "Storage": "vdistream.storage",
    "open_storage": "vdistream.storage",
    "ClientVirtualDevice": "vdistream.vdi",
    "ClientVirtualDeviceSet": "vdistream.vdi",
    "PendingCommand": "vdistream.vdi",
    "Registry": "vdistream.vdi",
    "ServerVirtualDevice": "vdistream.vdi",
    "ServerVirtualDeviceSet": "vdistream.vdi",
    "Service": "vdistream.service.daemon",
}

__all__ = (
    "AbortCause",
    "ClientState",
    "ClientVirtualDevice",
    "ClientVirtualDeviceSet",
    "Command",
    "CommandCode",
    "CommandResult",
    "Completion",
    "ConfigError",
    "DeviceResult",
    "Features",
    "HResult",
    "Job",
    "JobAbortedError",
    "JobError",
    "JobKind",
    "JobOptions",
    "JobResult",
    "JobStatus",
    "PendingCommand",
    "Registry",
    "ServerState",
    "ServerVirtualDevice",
    "ServerVirtualDeviceSet",
    "Service",
    "Sink",
    "Source",
    "Storage",
    "StorageError",
    "StorageExistsError",
    "StorageFullError",
    "StorageIntegrityError",
    "StorageNotFoundError",
    "StorageURLError",
    "VDAbortError",
    "VDBusyError",
    "VDClosedError",
    "VDConfig",
    "VDIError",
    "VDInstanceNameError",
    "VDInvalidError",
    "VDMemoryError",
    "VDNotOpenError",
    "VDNotSupportedError",
    "VDOpenError",
    "VDProtocolError",
    "VDSecurityError",
    "VDTimeoutError",
    "VDUnexpectedError",
    "VdistreamError",
    "Whence",
    "backup",
    "open_storage",
    "restore",
)


__getattr__, __dir__ = _lazy_exports(globals(), _LAZY, __all__)
