"""Virtual device sets across processes: an engine in another process opens a set by
name over a Unix socket and maps the set's buffer area (``docs/transport.md``).

The client side publishes a set with ``serve_set``; the engine side opens it with a
``RemoteServerVirtualDeviceSet`` (or runs any engine over a ``RemoteRegistry``).
"""

import typing as _typing

from vdistream._lazy import lazy_exports as _lazy_exports

if _typing.TYPE_CHECKING:
    from vdistream.transport.engine import RemotePendingCommand as RemotePendingCommand
    from vdistream.transport.engine import RemoteRegistry as RemoteRegistry
    from vdistream.transport.engine import RemoteServerVirtualDevice as RemoteServerVirtualDevice
    from vdistream.transport.engine import (
        RemoteServerVirtualDeviceSet as RemoteServerVirtualDeviceSet,
    )
    from vdistream.transport.host import DeviceTraffic as DeviceTraffic
    from vdistream.transport.host import HostResult as HostResult
    from vdistream.transport.host import serve_set as serve_set
    from vdistream.transport.rendezvous import DAEMON_RUNTIME_DIR as DAEMON_RUNTIME_DIR
    from vdistream.transport.rendezvous import RuntimeDirectory as RuntimeDirectory
    from vdistream.transport.rendezvous import default_runtime_dir as default_runtime_dir

_LAZY: dict[str, str] = {
    "DAEMON_RUNTIME_DIR": "vdistream.transport.rendezvous",
    "RuntimeDirectory": "vdistream.transport.rendezvous",
    "default_runtime_dir": "vdistream.transport.rendezvous",
    "DeviceTraffic": "vdistream.transport.host",
    "HostResult": "vdistream.transport.host",
    "serve_set": "vdistream.transport.host",
    "RemotePendingCommand": "vdistream.transport.engine",
    "RemoteRegistry": "vdistream.transport.engine",
    "RemoteServerVirtualDevice": "vdistream.transport.engine",
    "RemoteServerVirtualDeviceSet": "vdistream.transport.engine",
}

__all__ = (
    "DAEMON_RUNTIME_DIR",
    "DeviceTraffic",
    "HostResult",
    "RemotePendingCommand",
    "RemoteRegistry",
    "RemoteServerVirtualDevice",
    "RemoteServerVirtualDeviceSet",
    "RuntimeDirectory",
    "default_runtime_dir",
    "serve_set",
)

__getattr__, __dir__ = _lazy_exports(globals(), _LAZY, __all__)
