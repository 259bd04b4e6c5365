"""The live virtual device set on anyio: client and server facades over one core."""

from vdistream.vdi.client import ClientVirtualDevice as ClientVirtualDevice
from vdistream.vdi.client import ClientVirtualDeviceSet as ClientVirtualDeviceSet
from vdistream.vdi.contract import ClientDevice as ClientDevice
from vdistream.vdi.contract import ClientSet as ClientSet
from vdistream.vdi.core import PendingCommand as PendingCommand
from vdistream.vdi.core import SetStatistics as SetStatistics
from vdistream.vdi.registry import Registry as Registry
from vdistream.vdi.registry import default_registry as default_registry
from vdistream.vdi.server import ServerVirtualDevice as ServerVirtualDevice
from vdistream.vdi.server import ServerVirtualDeviceSet as ServerVirtualDeviceSet

__all__ = (
    "ClientDevice",
    "ClientSet",
    "ClientVirtualDevice",
    "ClientVirtualDeviceSet",
    "PendingCommand",
    "Registry",
    "ServerVirtualDevice",
    "ServerVirtualDeviceSet",
    "SetStatistics",
    "default_registry",
)
