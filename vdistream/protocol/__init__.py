"""Sans-I/O model of the Virtual Device Interface: values, records and state tables.

Nothing here imports anyio or does I/O; ``vdistream.vdi`` runs these tables live.
"""

from vdistream.protocol.codes import INFINITE_MS as INFINITE_MS
from vdistream.protocol.codes import CommandCode as CommandCode
from vdistream.protocol.codes import Completion as Completion
from vdistream.protocol.codes import Fault as Fault
from vdistream.protocol.codes import Features as Features
from vdistream.protocol.codes import HResult as HResult
from vdistream.protocol.codes import Whence as Whence
from vdistream.protocol.commands import Command as Command
from vdistream.protocol.commands import CommandResult as CommandResult
from vdistream.protocol.config import VDConfig as VDConfig
from vdistream.protocol.states import ClientCall as ClientCall
from vdistream.protocol.states import ClientState as ClientState
from vdistream.protocol.states import DeviceState as DeviceState
from vdistream.protocol.states import Outcome as Outcome
from vdistream.protocol.states import ServerCall as ServerCall
from vdistream.protocol.states import ServerState as ServerState
from vdistream.protocol.states import SetAbortCause as SetAbortCause
from vdistream.protocol.states import SetEvent as SetEvent
from vdistream.protocol.states import client_event as client_event
from vdistream.protocol.states import client_transition as client_transition
from vdistream.protocol.states import server_event as server_event
from vdistream.protocol.states import server_transition as server_transition

__all__ = (
    "INFINITE_MS",
    "ClientCall",
    "ClientState",
    "Command",
    "CommandCode",
    "CommandResult",
    "Completion",
    "DeviceState",
    "Fault",
    "Features",
    "HResult",
    "Outcome",
    "ServerCall",
    "ServerState",
    "SetAbortCause",
    "SetEvent",
    "VDConfig",
    "Whence",
    "client_event",
    "client_transition",
    "server_event",
    "server_transition",
)
