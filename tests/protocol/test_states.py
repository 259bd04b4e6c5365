"""The state tables of spec §1.6 and the device sub-state of §3.7, cell by cell.

The expected tables below are transcribed from ``/work/shared/spec/vdi.md`` §1.6, one
row per call and one column per state in the spec's own column order, so that each row
can be compared with the printed table line by line. Cells where ``api.md`` ("Decisions
where the spec is silent or contradicts itself") or spec §9 overrides the printed table
carry a comment naming the decision and what the spec table printed.

A cell is ``(result, next state, waits)``. "Next state" is the state the call itself
leads to; moves the spec attaches to "the last device" or "the server completes
configuration" are ``SetEvent`` transitions and are tested separately below. ``waits``
marks calls that the live set answers by waiting: a client ``get_configuration`` before
the server configured (spec: "(waits)"), a ``get_command`` (api.md: it blocks until a
command arrives, decision 2), a server ``allocate_buffer`` (api.md: "waits for a free
buffer") and ``ExecuteCompletionAgent`` (spec §1.7: "returns only when Close or
SignalAbort is invoked").
"""

from __future__ import annotations

from collections.abc import Mapping

import pytest

from vdistream.protocol import (
    ClientCall,
    ClientState,
    Completion,
    HResult,
    Outcome,
    ServerCall,
    ServerState,
    SetEvent,
    client_event,
    client_transition,
    server_event,
    server_transition,
)
from vdistream.protocol.states import (
    DeviceState,
    device_after_abort,
    device_after_close,
    device_after_completion,
    device_refusal,
)

OK = HResult.NOERROR
P = HResult.PROTOCOL
A = HResult.ABORT
OPEN = HResult.OPEN
W = True  # the call waits
N = False  # the call answers at once

Cell = tuple[HResult, ClientState | ServerState, bool]

# --- client view of the set (spec §1.6, "Client view of the set") ------------------

C_DNE = ClientState.DNE
C_CFG = ClientState.CONFIGURABLE
C_INI = ClientState.INITIALIZING
C_ACT = ClientState.ACTIVE
C_NT = ClientState.NORMALLY_TERMINATED
C_AB = ClientState.ABORTED

CLIENT_COLUMNS = (C_DNE, C_CFG, C_INI, C_ACT, C_NT, C_AB)

# fmt: off
CLIENT_TABLE: dict[ClientCall, tuple[Cell, Cell, Cell, Cell, Cell, Cell]] = {
    # columns: DNE, Configurable, Initializing, Active, NormallyTerminated, Abort
    ClientCall.CREATE: (
        (OK, C_CFG, N), (P, C_CFG, N), (P, C_INI, N), (P, C_ACT, N), (P, C_NT, N), (P, C_AB, N),
    ),
    ClientCall.GET_CONFIGURATION: (
        (P, C_DNE, N), (OK, C_INI, W), (OK, C_INI, N), (OK, C_ACT, N), (OK, C_NT, N), (A, C_AB, N),
    ),
    ClientCall.OPEN_DEVICE: (
        (P, C_DNE, N), (P, C_CFG, N), (OK, C_INI, N),
        (OPEN, C_ACT, N),  # api.md decision 1 / spec §9.1 (table: VD_E_PROTOCOL)
        (P, C_NT, N), (A, C_AB, N),
    ),
    ClientCall.GET_COMMAND: (
        (P, C_DNE, N), (P, C_CFG, N),
        (OK, C_INI, W),  # api.md decision 2 / spec §9.2 (table: VD_E_PROTOCOL)
        (OK, C_ACT, W), (P, C_NT, N), (A, C_AB, N),
    ),
    ClientCall.COMPLETE_COMMAND: (
        (P, C_DNE, N), (P, C_CFG, N), (P, C_INI, N), (OK, C_ACT, N), (P, C_NT, N), (A, C_AB, N),
    ),
    ClientCall.SIGNAL_ABORT: (
        (P, C_DNE, N), (OK, C_AB, N), (OK, C_AB, N), (OK, C_AB, N), (OK, C_AB, N), (OK, C_AB, N),
    ),
    ClientCall.CLOSE: (
        (P, C_DNE, N), (OK, C_DNE, N), (OK, C_DNE, N), (OK, C_DNE, N), (OK, C_DNE, N),
        (OK, C_DNE, N),
    ),
}

# --- server view of the set (spec §1.6, "Server view of the set") ------------------

S_DNE = ServerState.DNE
S_CON = ServerState.CONNECTED
S_CFG = ServerState.CONFIGURABLE
S_INI = ServerState.INITIALIZING
S_ACT = ServerState.ACTIVE
S_NT = ServerState.NORMALLY_TERMINATED
S_AB = ServerState.ABORTED

SERVER_COLUMNS = (S_DNE, S_CON, S_CFG, S_INI, S_ACT, S_NT, S_AB)

SERVER_TABLE: dict[ServerCall, tuple[Cell, Cell, Cell, Cell, Cell, Cell, Cell]] = {
    # columns: DNE, Connected, Configurable, Initializing, Active, NormallyTerm., AbnormallyTerm.
    ServerCall.OPEN: (
        (OK, S_CON, N), (P, S_CON, N), (P, S_CFG, N), (P, S_INI, N), (P, S_ACT, N),
        (P, S_NT, N), (P, S_AB, N),
    ),
    ServerCall.GET_CONFIGURATION: (
        (P, S_DNE, N), (OK, S_CON, N), (OK, S_CFG, N), (OK, S_INI, N), (OK, S_ACT, N),
        (OK, S_NT, N), (A, S_AB, N),
    ),
    ServerCall.BEGIN_CONFIGURATION: (
        (P, S_DNE, N), (OK, S_CFG, N), (P, S_CFG, N), (P, S_INI, N), (P, S_ACT, N),
        (P, S_NT, N), (P, S_AB, N),
    ),
    ServerCall.REQUEST_BUFFERS: (
        (P, S_DNE, N), (P, S_CON, N), (OK, S_CFG, N), (OK, S_INI, N), (OK, S_ACT, N),
        (P, S_NT, N), (P, S_AB, N),
    ),
    ServerCall.QUERY_AVAILABLE_BUFFERS: (
        (P, S_DNE, N), (P, S_CON, N), (OK, S_CFG, N), (OK, S_INI, N), (OK, S_ACT, N),
        (P, S_NT, N), (P, S_AB, N),
    ),
    ServerCall.END_CONFIGURATION: (
        (P, S_DNE, N), (P, S_CON, N), (OK, S_INI, N), (P, S_INI, N), (P, S_ACT, N),
        (P, S_NT, N), (P, S_AB, N),
    ),
    ServerCall.OPEN_DEVICE: (
        (P, S_DNE, N), (P, S_CON, N), (P, S_CFG, N), (OK, S_INI, N),
        (OPEN, S_ACT, N),  # api.md decision 1 (table: VD_E_PROTOCOL)
        (P, S_NT, N), (A, S_AB, N),
    ),
    ServerCall.EXECUTE_COMPLETION_AGENT: (
        (P, S_DNE, N), (P, S_CON, N), (P, S_CFG, N), (OK, S_INI, W), (P, S_ACT, N),
        (P, S_NT, N), (A, S_AB, N),
    ),
    ServerCall.ALLOCATE_BUFFER: (
        (P, S_DNE, N), (P, S_CON, N), (P, S_CFG, N), (OK, S_INI, W), (OK, S_ACT, W),
        (OK, S_NT, W), (A, S_AB, N),
    ),
    ServerCall.FREE_BUFFER: (
        (P, S_DNE, N),
        (P, S_CON, N),  # spec §9.6 copy error (table: NOERROR(*))
        (P, S_CFG, N), (OK, S_INI, N), (OK, S_ACT, N), (OK, S_NT, N),
        (OK, S_AB, N),  # api.md decision 5 (table: VD_E_ABORT)
    ),
    ServerCall.SEND_COMMAND: (
        (P, S_DNE, N),
        (P, S_CON, N),  # spec §9.6 copy error (table: NOERROR(*))
        (P, S_CFG, N), (P, S_INI, N), (OK, S_ACT, N), (P, S_NT, N), (A, S_AB, N),
    ),
    ServerCall.CLOSE_DEVICE: (
        (P, S_DNE, N),
        (P, S_CON, N),  # spec §9.6 copy error (table: NOERROR ->Terminated(*))
        (P, S_CFG, N), (P, S_INI, N), (OK, S_ACT, N), (OK, S_NT, N),
        (OK, S_AB, N),  # api.md decision 5 (table: VD_E_ABORT)
    ),
    ServerCall.SIGNAL_ABORT: (
        (P, S_DNE, N), (OK, S_AB, N), (OK, S_AB, N), (OK, S_AB, N), (OK, S_AB, N),
        (OK, S_AB, N), (OK, S_AB, N),
    ),
    ServerCall.CLOSE: (
        (P, S_DNE, N), (OK, S_DNE, N), (OK, S_DNE, N), (OK, S_DNE, N), (OK, S_DNE, N),
        (OK, S_DNE, N), (OK, S_DNE, N),
    ),
}
# fmt: on


def _cells(
    table: Mapping[ClientCall, tuple[Cell, ...]] | Mapping[ServerCall, tuple[Cell, ...]],
    columns: tuple[ClientState, ...] | tuple[ServerState, ...],
) -> list[object]:
    return [
        pytest.param(state, call, cell, id=f"{call.name}-in-{state.name}")
        for call, row in table.items()
        for state, cell in zip(columns, row, strict=True)
    ]


# --- the tables cover every call and state -------------------------------------------


def test_client_states_are_the_six_of_the_spec() -> None:
    assert [s.name for s in ClientState] == [
        "DNE",
        "CONFIGURABLE",
        "INITIALIZING",
        "ACTIVE",
        "NORMALLY_TERMINATED",
        "ABORTED",
    ]


def test_client_calls_are_the_seven_rows_of_the_spec() -> None:
    assert set(ClientCall) == set(CLIENT_TABLE)
    assert len(ClientCall) == 7


def test_server_states_are_the_seven_of_the_spec() -> None:
    assert [s.name for s in ServerState] == [
        "DNE",
        "CONNECTED",
        "CONFIGURABLE",
        "INITIALIZING",
        "ACTIVE",
        "NORMALLY_TERMINATED",
        "ABORTED",
    ]


def test_server_calls_are_the_fourteen_rows_of_the_spec() -> None:
    assert set(ServerCall) == set(SERVER_TABLE)
    assert len(ServerCall) == 14


# --- every cell ----------------------------------------------------------------------


@pytest.mark.parametrize(("state", "call", "cell"), _cells(CLIENT_TABLE, CLIENT_COLUMNS))
def test_client_cell(state: ClientState, call: ClientCall, cell: Cell) -> None:
    result, new_state, waits = cell
    outcome = client_transition(state, call)
    assert isinstance(outcome, Outcome)
    assert outcome.result is result
    assert outcome.state is new_state
    assert outcome.waits is waits
    assert outcome.ok is (result is HResult.NOERROR)


@pytest.mark.parametrize(("state", "call", "cell"), _cells(SERVER_TABLE, SERVER_COLUMNS))
def test_server_cell(state: ServerState, call: ServerCall, cell: Cell) -> None:
    result, new_state, waits = cell
    outcome = server_transition(state, call)
    assert isinstance(outcome, Outcome)
    assert outcome.result is result
    assert outcome.state is new_state
    assert outcome.waits is waits
    assert outcome.ok is (result is HResult.NOERROR)


# --- paths through the tables (spec §1.3, §1.6 diagrams) ----------------------------


def _client_next(state: ClientState, call: ClientCall) -> ClientState:
    outcome = client_transition(state, call)
    assert outcome.result is OK, call
    assert isinstance(outcome.state, ClientState)
    return outcome.state


def _server_next(state: ServerState, call: ServerCall) -> ServerState:
    outcome = server_transition(state, call)
    assert outcome.result is OK, call
    assert isinstance(outcome.state, ServerState)
    return outcome.state


def test_client_normal_path_through_calls_and_events() -> None:
    state = _client_next(C_DNE, ClientCall.CREATE)
    assert state is C_CFG
    state = client_event(state, SetEvent.CONFIGURED)
    assert state is C_INI
    state = _client_next(state, ClientCall.OPEN_DEVICE)
    assert state is C_INI
    state = client_event(state, SetEvent.ACTIVATED)
    assert state is C_ACT
    state = _client_next(state, ClientCall.GET_COMMAND)
    state = _client_next(state, ClientCall.COMPLETE_COMMAND)
    assert state is C_ACT
    state = client_event(state, SetEvent.TERMINATED)
    assert state is C_NT
    state = _client_next(state, ClientCall.CLOSE)
    assert state is C_DNE
    # after close the object can create again (spec §4.2 CreateEx)
    assert client_transition(state, ClientCall.CREATE).result is OK


def test_server_normal_path_through_calls_and_events() -> None:
    state = S_DNE
    for call, expected in (
        (ServerCall.OPEN, S_CON),
        (ServerCall.BEGIN_CONFIGURATION, S_CFG),
        (ServerCall.REQUEST_BUFFERS, S_CFG),
        (ServerCall.END_CONFIGURATION, S_INI),
        (ServerCall.OPEN_DEVICE, S_INI),
    ):
        state = _server_next(state, call)
        assert state is expected, call
    state = server_event(state, SetEvent.ACTIVATED)
    assert state is S_ACT
    assert server_transition(state, ServerCall.SEND_COMMAND).result is OK
    assert server_transition(state, ServerCall.CLOSE_DEVICE).state is S_ACT
    state = server_event(state, SetEvent.TERMINATED)
    assert state is S_NT
    assert server_transition(state, ServerCall.CLOSE) == Outcome(OK, S_DNE)


# --- SetEvent transitions (spec §1.6 diagrams) ----------------------------------------
#
# CONFIGURED: the server completed configuration (Configurable -> Initializing).
# ACTIVATED:  all devices open (Initializing -> Active).
# TERMINATED: all devices closed (Active -> NormallyTerminated).
# ABORTED:    SignalAbort by either side: every state in which the tables take
#             SignalAbort to Abort goes there; DNE has no set, Abort stays Abort.
# An event that does not apply leaves the state as it is.

# fmt: off
CLIENT_EVENTS: dict[SetEvent, tuple[ClientState, ...]] = {
    #                      DNE    Configurable Initializing Active NormallyTerm. Abort
    SetEvent.CONFIGURED: (C_DNE, C_INI,       C_INI,       C_ACT, C_NT,         C_AB),
    SetEvent.ACTIVATED:  (C_DNE, C_CFG,       C_ACT,       C_ACT, C_NT,         C_AB),
    SetEvent.TERMINATED: (C_DNE, C_CFG,       C_INI,       C_NT,  C_NT,         C_AB),
    SetEvent.ABORTED:    (C_DNE, C_AB,        C_AB,        C_AB,  C_AB,         C_AB),
}

SERVER_EVENTS: dict[SetEvent, tuple[ServerState, ...]] = {
    #                      DNE    Connected Configurable Initializing Active NormallyT. AbnormallyT.
    SetEvent.CONFIGURED: (S_DNE, S_CON,    S_INI,       S_INI,       S_ACT, S_NT,      S_AB),
    SetEvent.ACTIVATED:  (S_DNE, S_CON,    S_CFG,       S_ACT,       S_ACT, S_NT,      S_AB),
    SetEvent.TERMINATED: (S_DNE, S_CON,    S_CFG,       S_INI,       S_NT,  S_NT,      S_AB),
    SetEvent.ABORTED:    (S_DNE, S_AB,     S_AB,        S_AB,        S_AB,  S_AB,      S_AB),
}
# fmt: on


def test_set_events_are_the_four_happenings() -> None:
    assert set(SetEvent) == set(CLIENT_EVENTS) == set(SERVER_EVENTS)


@pytest.mark.parametrize(
    ("state", "event", "expected"),
    [
        pytest.param(state, event, expected, id=f"{event.name}-in-{state.name}")
        for event, row in CLIENT_EVENTS.items()
        for state, expected in zip(CLIENT_COLUMNS, row, strict=True)
    ],
)
def test_client_event(state: ClientState, event: SetEvent, expected: ClientState) -> None:
    assert client_event(state, event) is expected


@pytest.mark.parametrize(
    ("state", "event", "expected"),
    [
        pytest.param(state, event, expected, id=f"{event.name}-in-{state.name}")
        for event, row in SERVER_EVENTS.items()
        for state, expected in zip(SERVER_COLUMNS, row, strict=True)
    ],
)
def test_server_event(state: ServerState, event: SetEvent, expected: ServerState) -> None:
    assert server_event(state, event) is expected


# --- per-device I/O-error sub-state (spec §1.6 last table, §3.7) ---------------------


def test_device_states() -> None:
    assert {s.name for s in DeviceState} == {"ACTIVE", "ERRORED", "CLOSED", "ABORTED"}


D_ACT = DeviceState.ACTIVE
D_ERR = DeviceState.ERRORED
D_CLO = DeviceState.CLOSED
D_AB = DeviceState.ABORTED

FAILURES = (
    Completion.HANDLE_EOF,
    Completion.NOT_SUPPORTED,
    Completion.DISK_FULL,
    Completion.OPERATION_ABORTED,
    Completion.END_OF_MEDIA,
    Completion.FILEMARK_DETECTED,
    Completion.NO_DATA_DETECTED,
    Completion.IO_DEVICE,
    87,  # any other Win32 code (ERROR_INVALID_PARAMETER) is a failure too
)


@pytest.mark.parametrize("completion", FAILURES)
@pytest.mark.parametrize("clear_error", [False, True])
def test_failed_completion_on_active_device_enters_io_error(
    completion: int, clear_error: bool
) -> None:
    # §3.7.1: "When the client completes any command with a non-success code, that
    # device enters the IO-ERROR state."
    assert device_after_completion(D_ACT, clear_error, completion) is D_ERR


@pytest.mark.parametrize("completion", FAILURES)
@pytest.mark.parametrize("clear_error", [False, True])
def test_failed_completion_on_errored_device_stays_errored(
    completion: int, clear_error: bool
) -> None:
    assert device_after_completion(D_ERR, clear_error, completion) is D_ERR


@pytest.mark.parametrize(
    ("state", "clear_error", "expected"),
    [
        (D_ACT, False, D_ACT),  # plain success keeps an active device active
        (D_ACT, True, D_ACT),
        (D_ERR, True, D_ACT),  # §3.7.4: ClearError completed with success -> Active
        (D_ERR, False, D_ERR),  # §3.7.3: an outstanding command completing is not a clear
    ],
)
def test_successful_completion(
    state: DeviceState, clear_error: bool, expected: DeviceState
) -> None:
    assert device_after_completion(state, clear_error, Completion.SUCCESS) is expected
    assert device_after_completion(state, clear_error, 0) is expected


@pytest.mark.parametrize("state", [D_CLO, D_AB])
@pytest.mark.parametrize("clear_error", [False, True])
@pytest.mark.parametrize("completion", [0, 38, 995, 1117])
def test_completion_on_closed_or_aborted_device_changes_nothing(
    state: DeviceState, clear_error: bool, completion: int
) -> None:
    # No edge leaves Closed or Aborted in the §1.6 diagram; api.md decision 8 lets a
    # command delivered before the close still be completed.
    assert device_after_completion(state, clear_error, completion) is state


@pytest.mark.parametrize(
    ("state", "expected"),
    [
        (D_ACT, D_CLO),  # Active -CloseDevice-> Closed
        (D_ERR, D_CLO),  # Errored -CloseDevice-> Closed (§3.7.5)
        (D_CLO, D_CLO),
        (D_AB, D_AB),  # api.md decision 5: close_device after an abort does nothing
    ],
)
def test_device_after_close(state: DeviceState, expected: DeviceState) -> None:
    assert device_after_close(state) is expected


@pytest.mark.parametrize(
    ("state", "expected"),
    [
        (D_ACT, D_AB),  # Active -SignalAbort-> Aborted
        (D_ERR, D_AB),  # Errored -SignalAbort-> Aborted (§3.7.5)
        (D_AB, D_AB),
        (D_CLO, D_CLO),  # no edge leaves Closed
    ],
)
def test_device_after_abort(state: DeviceState, expected: DeviceState) -> None:
    assert device_after_abort(state) is expected


@pytest.mark.parametrize(
    ("state", "clear_error", "expected"),
    [
        (D_ACT, False, None),
        (D_ACT, True, None),
        # §3.7.2: in IO-ERROR "the server side rejects new commands at once with
        # ERROR_IO_DEVICE (1117) ... the only command SQL can send is VDC_ClearError"
        (D_ERR, False, 1117),
        (D_ERR, True, None),
        # §1.7 SendCommand: VD_E_PROTOCOL (device not active) -> ERROR_INVALID_HANDLE (6)
        (D_CLO, False, 6),
        (D_CLO, True, 6),
        # §1.7 SendCommand: VD_E_ABORT -> ERROR_OPERATION_ABORTED (995)
        (D_AB, False, 995),
        (D_AB, True, 995),
    ],
)
def test_device_refusal(state: DeviceState, clear_error: bool, expected: int | None) -> None:
    refusal = device_refusal(state, clear_error)
    if expected is None:
        assert refusal is None
    else:
        assert refusal == expected
        assert isinstance(refusal, Completion)


def test_send_command_refusal_mapping_of_spec_1_7() -> None:
    # IO_ERROR -> ERROR_IO_DEVICE, PROTOCOL -> ERROR_INVALID_HANDLE,
    # ABORT -> ERROR_OPERATION_ABORTED
    assert device_refusal(D_ERR, False) is Completion.IO_DEVICE
    assert int(Completion.IO_DEVICE) == 1117
    assert device_refusal(D_CLO, False) is Completion.INVALID_HANDLE
    assert int(Completion.INVALID_HANDLE) == 6
    assert device_refusal(D_AB, False) is Completion.OPERATION_ABORTED
    assert int(Completion.OPERATION_ABORTED) == 995


def test_io_error_round_trip() -> None:
    # §3.7: error -> refused sends -> ClearError accepted -> success -> active again
    state = device_after_completion(D_ACT, False, Completion.HANDLE_EOF)
    assert state is D_ERR
    assert device_refusal(state, False) is Completion.IO_DEVICE
    assert device_refusal(state, True) is None
    state = device_after_completion(state, False, Completion.SUCCESS)  # outstanding one
    assert state is D_ERR
    state = device_after_completion(state, True, Completion.SUCCESS)
    assert state is D_ACT
    assert device_refusal(state, False) is None
