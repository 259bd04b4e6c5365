"""The state tables of spec §1.6 as pure transition functions.

Three machines live here:

* the client's view of the set (``ClientState`` x ``ClientCall``),
* the server's view of the set (``ServerState`` x ``ServerCall``),
* the per-device I/O-error sub-state of §3.7 (``DeviceState``).

Each table cell gives the result of a call made in a state and the state it leads to.
Calls that the live set answers by *waiting* (a ``get_configuration`` before the server
configured, a ``get_command`` before any command is queued) are marked ``waits``.
Happenings that no call of this side causes (the server ending configuration, both
sides having opened every device, the last device delivering its close, an abort by
the other side) are ``SetEvent`` transitions applied to both views.

Where the spec contradicts itself, api.md's decisions are encoded and marked below;
the live set (``vdistream.vdi``) adds only what depends on more than the state:

* client ``OPEN_DEVICE`` in ACTIVE gives ``OPEN`` (decision 1; table said PROTOCOL);
* client ``GET_COMMAND`` in INITIALIZING waits for a command instead of failing
  (decision 2, spec §9.2);
* client ``COMPLETE_COMMAND`` in NORMALLY_TERMINATED is PROTOCOL as the table says,
  except that a command delivered before its device closed may still be completed
  (decision 8), which the live set checks;
* client ``CLOSE`` always reaches DNE; the live set raises ``VDOpenError`` afterwards
  when a device this object opened had not yet delivered its close (decision 3);
* server ``OPEN_DEVICE`` in ACTIVE gives ``OPEN`` (decision 1);
* server ``FREE_BUFFER`` and ``CLOSE_DEVICE`` after an abort succeed and do nothing
  (decision 5; table said ABORT);
* the three "Connected" cells the spec prints as NOERROR for ``FREE_BUFFER``,
  ``SEND_COMMAND`` and ``CLOSE_DEVICE`` are a copy error in the original (spec §9.6):
  they are PROTOCOL here, since no device or buffer exists before configuration;
* server ``CLOSE`` always reaches DNE; the live set raises ``VDProtocolError`` afterwards
  when devices were still open (decision 4).
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping

from vdistream.protocol.codes import Completion, HResult

__all__ = (
    "ClientCall",
    "ClientState",
    "DeviceState",
    "Outcome",
    "ServerCall",
    "ServerState",
    "SetAbortCause",
    "SetEvent",
    "client_event",
    "client_transition",
    "device_after_abort",
    "device_after_close",
    "device_after_completion",
    "device_refusal",
    "server_event",
    "server_transition",
)


class ClientState(enum.Enum):
    DNE = "does not exist"
    CONFIGURABLE = "configurable"
    INITIALIZING = "initializing"
    ACTIVE = "active"
    NORMALLY_TERMINATED = "normally terminated"
    ABORTED = "aborted"


class ServerState(enum.Enum):
    DNE = "does not exist"
    CONNECTED = "connected"
    CONFIGURABLE = "configurable"
    INITIALIZING = "initializing"
    ACTIVE = "active"
    NORMALLY_TERMINATED = "normally terminated"
    ABORTED = "abnormally terminated"


class ClientCall(enum.Enum):
    CREATE = "create"
    GET_CONFIGURATION = "get_configuration"
    OPEN_DEVICE = "open_device"
    GET_COMMAND = "get_command"
    COMPLETE_COMMAND = "complete_command"
    SIGNAL_ABORT = "signal_abort"
    CLOSE = "close"


class ServerCall(enum.Enum):
    OPEN = "open"
    GET_CONFIGURATION = "get_configuration"
    BEGIN_CONFIGURATION = "begin_configuration"
    REQUEST_BUFFERS = "request_buffers"
    QUERY_AVAILABLE_BUFFERS = "query_available_buffers"
    END_CONFIGURATION = "end_configuration"
    OPEN_DEVICE = "open_device"
    EXECUTE_COMPLETION_AGENT = "execute_completion_agent"
    ALLOCATE_BUFFER = "allocate_buffer"
    FREE_BUFFER = "free_buffer"
    SEND_COMMAND = "send_command"
    CLOSE_DEVICE = "close_device"
    SIGNAL_ABORT = "signal_abort"
    CLOSE = "close"


class SetEvent(enum.Enum):
    """Happenings that move a view of the set without a call of that side."""

    CONFIGURED = "configured"  # the server's end_configuration
    ACTIVATED = "activated"  # both sides opened every device
    TERMINATED = "terminated"  # every device closed (client: every close delivered)
    ABORTED = "aborted"  # either side aborted, or a watchdog did


class SetAbortCause(enum.Enum):
    """Why a set aborted; the set records it beside its human-readable reason."""

    CLIENT = "client"  # the client signalled abort, or closed the set before it ended
    SERVER = "server"  # the server signalled abort, or closed the set before it ended
    SERVER_TIMEOUT = "server-timeout"  # the server-timeout watchdog (decision 10)
    PROCESS_DEATH = "process-death"  # the other side's process died (out-of-process sets)


@dataclasses.dataclass(frozen=True, slots=True)
class Outcome:
    result: HResult
    state: ClientState | ServerState
    #: The live call waits (within its timeout) before it gives ``result``.
    waits: bool = False

    @property
    def ok(self) -> bool:
        return self.result is HResult.NOERROR


_P, _A, _OK = HResult.PROTOCOL, HResult.ABORT, HResult.NOERROR
_C = ClientState
_S = ServerState


def _client_table() -> dict[tuple[ClientCall, ClientState], tuple[HResult, ClientState, bool]]:
    t: dict[tuple[ClientCall, ClientState], tuple[HResult, ClientState, bool]] = {}
    for state in _C:
        for call in ClientCall:
            t[call, state] = (_A if state is _C.ABORTED else _P, state, False)
    t[ClientCall.CREATE, _C.DNE] = (_OK, _C.CONFIGURABLE, False)
    for state in _C:
        if state is not _C.DNE:
            t[ClientCall.CREATE, state] = (_P, state, False)
            t[ClientCall.SIGNAL_ABORT, state] = (_OK, _C.ABORTED, False)
            t[ClientCall.CLOSE, state] = (_OK, _C.DNE, False)
    t[ClientCall.GET_CONFIGURATION, _C.CONFIGURABLE] = (_OK, _C.INITIALIZING, True)
    for state in (_C.INITIALIZING, _C.ACTIVE, _C.NORMALLY_TERMINATED):
        t[ClientCall.GET_CONFIGURATION, state] = (_OK, state, False)
    t[ClientCall.OPEN_DEVICE, _C.INITIALIZING] = (_OK, _C.INITIALIZING, False)
    t[ClientCall.OPEN_DEVICE, _C.ACTIVE] = (HResult.OPEN, _C.ACTIVE, False)  # decision 1
    t[ClientCall.GET_COMMAND, _C.INITIALIZING] = (_OK, _C.INITIALIZING, True)  # decision 2
    t[ClientCall.GET_COMMAND, _C.ACTIVE] = (_OK, _C.ACTIVE, True)
    t[ClientCall.COMPLETE_COMMAND, _C.ACTIVE] = (_OK, _C.ACTIVE, False)
    return t


def _server_table() -> dict[tuple[ServerCall, ServerState], tuple[HResult, ServerState, bool]]:
    t: dict[tuple[ServerCall, ServerState], tuple[HResult, ServerState, bool]] = {}
    for state in _S:
        for call in ServerCall:
            t[call, state] = (_P, state, False)
    live = (_S.CONNECTED, _S.CONFIGURABLE, _S.INITIALIZING, _S.ACTIVE, _S.NORMALLY_TERMINATED)
    t[ServerCall.OPEN, _S.DNE] = (_OK, _S.CONNECTED, False)
    for state in live:
        t[ServerCall.GET_CONFIGURATION, state] = (_OK, state, False)
        t[ServerCall.SIGNAL_ABORT, state] = (_OK, _S.ABORTED, False)
    for state in (*live, _S.ABORTED):
        t[ServerCall.CLOSE, state] = (_OK, _S.DNE, False)
    t[ServerCall.SIGNAL_ABORT, _S.ABORTED] = (_OK, _S.ABORTED, False)
    t[ServerCall.BEGIN_CONFIGURATION, _S.CONNECTED] = (_OK, _S.CONFIGURABLE, False)
    for state in (_S.CONFIGURABLE, _S.INITIALIZING, _S.ACTIVE):
        t[ServerCall.REQUEST_BUFFERS, state] = (_OK, state, False)
        t[ServerCall.QUERY_AVAILABLE_BUFFERS, state] = (_OK, state, False)
    t[ServerCall.END_CONFIGURATION, _S.CONFIGURABLE] = (_OK, _S.INITIALIZING, False)
    t[ServerCall.OPEN_DEVICE, _S.INITIALIZING] = (_OK, _S.INITIALIZING, False)
    t[ServerCall.OPEN_DEVICE, _S.ACTIVE] = (HResult.OPEN, _S.ACTIVE, False)  # decision 1
    t[ServerCall.EXECUTE_COMPLETION_AGENT, _S.INITIALIZING] = (_OK, _S.INITIALIZING, True)
    for state in (_S.INITIALIZING, _S.ACTIVE, _S.NORMALLY_TERMINATED):
        t[ServerCall.ALLOCATE_BUFFER, state] = (_OK, state, True)
        t[ServerCall.FREE_BUFFER, state] = (_OK, state, False)
    t[ServerCall.SEND_COMMAND, _S.ACTIVE] = (_OK, _S.ACTIVE, False)
    t[ServerCall.CLOSE_DEVICE, _S.ACTIVE] = (_OK, _S.ACTIVE, False)
    t[ServerCall.CLOSE_DEVICE, _S.NORMALLY_TERMINATED] = (_OK, _S.NORMALLY_TERMINATED, False)
    for call in (
        ServerCall.GET_CONFIGURATION,
        ServerCall.OPEN_DEVICE,
        ServerCall.EXECUTE_COMPLETION_AGENT,
        ServerCall.ALLOCATE_BUFFER,
        ServerCall.SEND_COMMAND,
    ):
        t[call, _S.ABORTED] = (_A, _S.ABORTED, False)
    # decision 5: after an abort these two succeed and do nothing
    t[ServerCall.FREE_BUFFER, _S.ABORTED] = (_OK, _S.ABORTED, False)
    t[ServerCall.CLOSE_DEVICE, _S.ABORTED] = (_OK, _S.ABORTED, False)
    return t


CLIENT_TABLE: Mapping[tuple[ClientCall, ClientState], tuple[HResult, ClientState, bool]] = (
    _client_table()
)
SERVER_TABLE: Mapping[tuple[ServerCall, ServerState], tuple[HResult, ServerState, bool]] = (
    _server_table()
)


def client_transition(state: ClientState, call: ClientCall) -> Outcome:
    """The client table's cell for ``call`` made in ``state``."""
    return Outcome(*CLIENT_TABLE[call, state])


def server_transition(state: ServerState, call: ServerCall) -> Outcome:
    """The server table's cell for ``call`` made in ``state``."""
    return Outcome(*SERVER_TABLE[call, state])


_CLIENT_EVENTS: Mapping[tuple[SetEvent, ClientState], ClientState] = {
    (SetEvent.CONFIGURED, _C.CONFIGURABLE): _C.INITIALIZING,
    (SetEvent.ACTIVATED, _C.INITIALIZING): _C.ACTIVE,
    (SetEvent.TERMINATED, _C.ACTIVE): _C.NORMALLY_TERMINATED,
    **{
        (SetEvent.ABORTED, s): _C.ABORTED
        for s in (_C.CONFIGURABLE, _C.INITIALIZING, _C.ACTIVE, _C.NORMALLY_TERMINATED)
    },
}
_SERVER_EVENTS: Mapping[tuple[SetEvent, ServerState], ServerState] = {
    (SetEvent.CONFIGURED, _S.CONFIGURABLE): _S.INITIALIZING,
    (SetEvent.ACTIVATED, _S.INITIALIZING): _S.ACTIVE,
    (SetEvent.TERMINATED, _S.ACTIVE): _S.NORMALLY_TERMINATED,
    # every live state (all but DNE and ABORTED) aborts
    **{(SetEvent.ABORTED, s): _S.ABORTED for s in _S if s not in (_S.DNE, _S.ABORTED)},
}


def client_event(state: ClientState, event: SetEvent) -> ClientState:
    """The client's view after ``event``; events that do not apply leave it as it is."""
    return _CLIENT_EVENTS.get((event, state), state)


def server_event(state: ServerState, event: SetEvent) -> ServerState:
    """The server's view after ``event``; events that do not apply leave it as it is."""
    return _SERVER_EVENTS.get((event, state), state)


# --- the per-device I/O-error sub-state (spec §3.7) -------------------------------


class DeviceState(enum.Enum):
    ACTIVE = "active"
    ERRORED = "io-error"
    CLOSED = "closed"
    ABORTED = "aborted"


def device_after_completion(state: DeviceState, clear_error: bool, completion: int) -> DeviceState:
    """A command completed: any failure enters ERRORED; a successful CLEAR_ERROR leaves it."""
    if state not in (DeviceState.ACTIVE, DeviceState.ERRORED):
        return state
    if completion != Completion.SUCCESS:
        return DeviceState.ERRORED
    if clear_error:
        return DeviceState.ACTIVE
    return state


def device_after_close(state: DeviceState) -> DeviceState:
    return DeviceState.CLOSED if state is not DeviceState.ABORTED else state


def device_after_abort(state: DeviceState) -> DeviceState:
    return DeviceState.ABORTED if state is not DeviceState.CLOSED else state


def device_refusal(state: DeviceState, clear_error: bool) -> Completion | None:
    """The completion a command sent to a device in ``state`` is refused with, or None.

    ERRORED refuses everything but CLEAR_ERROR with IO_DEVICE; a closed device refuses
    with INVALID_HANDLE (the PROTOCOL mapping of SendCommand); an aborted one with
    OPERATION_ABORTED.
    """
    if state is DeviceState.ERRORED and not clear_error:
        return Completion.IO_DEVICE
    if state is DeviceState.CLOSED:
        return Completion.INVALID_HANDLE
    if state is DeviceState.ABORTED:
        return Completion.OPERATION_ABORTED
    return None
