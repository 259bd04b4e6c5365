"""The records of the set transport, version 1: fixed layouts, encoded and decoded.

``docs/transport.md`` is the byte-by-byte description (the one a C or Rust engine
implements); this module is the same description as code, and nothing else: no
sockets, no state. A ``SOCK_SEQPACKET`` message carries one or more records back to
back (at most ``MAX_MESSAGE`` bytes; a message with file descriptors carries exactly
one record). A record is a 16-byte header then a body whose layout depends on the
type, all integers little-endian::

    off size field
    0   2    type      RecordType
    2   2    flags     0 (reserved; ignored when read)
    4   4    length    the whole record in bytes, header included
    8   4    id        request id chosen by the engine, echoed by REPLY/COMPLETION; 0 if none
    12  4    device    device index; NO_DEVICE (0xFFFFFFFF) when the record names none

``decode`` refuses anything that is not exactly a record of a known type (wrong
length, unknown type, bad UTF-8, out-of-range codes) with ``WireError``, a
``VDProtocolError`` whose message names the record type and what is wrong: a peer
that sends such a thing is not speaking this protocol, and the set is aborted.
"""

from __future__ import annotations

import dataclasses
import enum
import struct
from typing import ClassVar

from vdistream.errors import VDProtocolError
from vdistream.protocol import ServerState, SetAbortCause, VDConfig

__all__ = (
    "HEADER",
    "MAX_MESSAGE",
    "MAX_RECORD",
    "NO_DEVICE",
    "NO_SEGMENT",
    "VERSION",
    "AllocateBuffer",
    "BeginConfiguration",
    "Close",
    "CloseDevice",
    "CompletionRecord",
    "EndConfiguration",
    "FreeBuffer",
    "OpenDevice",
    "QueryAvailableBuffers",
    "Record",
    "RecordType",
    "Refused",
    "Reply",
    "RequestBuffers",
    "Segment",
    "SendCommand",
    "SignalAbort",
    "StateRecord",
    "Welcome",
    "WireError",
    "cause_code",
    "cause_from_code",
    "decode",
    "decode_message",
    "state_code",
    "state_from_code",
)

VERSION = 1
MAX_RECORD = 4096
MAX_MESSAGE = 65536  # records sent together: one wake-up of the peer for all of them
NO_DEVICE = 0xFFFFFFFF
NO_SEGMENT = 0xFFFFFFFF
HEADER = struct.Struct("<HHIII")  # type, flags, length, id, device
_CONFIG_SIZE = 44


class WireError(VDProtocolError):
    """A record that is not one of this protocol's (the peer is not speaking it)."""


class RecordType(enum.IntEnum):
    # client -> engine
    WELCOME = 0x0001
    REFUSED = 0x0002
    REPLY = 0x0003
    SEGMENT = 0x0004
    COMPLETION = 0x0005
    STATE = 0x0006
    # engine -> client
    BEGIN_CONFIGURATION = 0x0011
    REQUEST_BUFFERS = 0x0012
    END_CONFIGURATION = 0x0013
    QUERY_AVAILABLE_BUFFERS = 0x0014
    OPEN_DEVICE = 0x0015
    ALLOCATE_BUFFER = 0x0016
    FREE_BUFFER = 0x0017
    SEND_COMMAND = 0x0018
    CLOSE_DEVICE = 0x0019
    SIGNAL_ABORT = 0x001A
    CLOSE = 0x001B


# --- numeric codes of states and causes ------------------------------------------------

_STATES = (
    ServerState.DNE,
    ServerState.CONNECTED,
    ServerState.CONFIGURABLE,
    ServerState.INITIALIZING,
    ServerState.ACTIVE,
    ServerState.NORMALLY_TERMINATED,
    ServerState.ABORTED,
)
_CAUSES = (
    None,
    SetAbortCause.CLIENT,
    SetAbortCause.SERVER,
    SetAbortCause.SERVER_TIMEOUT,
    SetAbortCause.PROCESS_DEATH,
)


def state_code(state: ServerState) -> int:
    return _STATES.index(state)


def state_from_code(code: int) -> ServerState:
    if not 0 <= code < len(_STATES):
        raise WireError(f"unknown server state code {code}")
    return _STATES[code]


def cause_code(cause: SetAbortCause | None) -> int:
    return _CAUSES.index(cause)


def cause_from_code(code: int) -> SetAbortCause | None:
    if not 0 <= code < len(_CAUSES):
        raise WireError(f"unknown abort cause code {code}")
    return _CAUSES[code]


# --- records ---------------------------------------------------------------------------


def _text(data: bytes | memoryview, what: str, kind: RecordType) -> str:
    try:
        return bytes(data).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise WireError(f"{kind.name} record: {what} is not UTF-8 ({exc.reason})") from None


class _Record:
    """Header handling shared by every record: subclasses give TYPE, BODY and fields."""

    TYPE: ClassVar[RecordType]
    BODY: ClassVar[struct.Struct] = struct.Struct("<")
    HAS_TAIL: ClassVar[bool] = False  # a variable part after the fixed body

    def header_fields(self) -> tuple[int, int]:
        """(id, device) of the header."""
        return 0, NO_DEVICE

    def body_fields(self) -> tuple[int, ...]:
        return ()

    def tail(self) -> bytes:
        return b""

    def encode(self) -> bytes:
        ident, device = self.header_fields()
        body = self.BODY.pack(*self.body_fields())
        tail = self.tail()
        length = HEADER.size + len(body) + len(tail)
        if length > MAX_RECORD:
            raise ValueError(f"{self.TYPE.name} record of {length} bytes exceeds {MAX_RECORD}")
        return HEADER.pack(self.TYPE, 0, length, ident, device) + body + tail


@dataclasses.dataclass(frozen=True, slots=True)
class Welcome(_Record):
    """Client -> engine, first record: the protocol version and the client's config."""

    TYPE: ClassVar[RecordType] = RecordType.WELCOME
    BODY: ClassVar[struct.Struct] = struct.Struct("<II")  # version, pid; then the config
    HAS_TAIL: ClassVar[bool] = True

    version: int
    client_pid: int
    config: VDConfig
    name: str
    job: str = ""

    def body_fields(self) -> tuple[int, ...]:
        return (self.version, self.client_pid)

    def tail(self) -> bytes:
        name, job = self.name.encode(), self.job.encode()
        return (
            self.config.pack()
            + struct.pack("<H", len(name))
            + name
            + struct.pack("<H", len(job))
            + job
        )


@dataclasses.dataclass(frozen=True, slots=True)
class Refused(_Record):
    """Client -> engine: the connection is refused (then closed)."""

    TYPE: ClassVar[RecordType] = RecordType.REFUSED
    BODY: ClassVar[struct.Struct] = struct.Struct("<I")
    HAS_TAIL: ClassVar[bool] = True

    hresult: int
    message: str

    def body_fields(self) -> tuple[int, ...]:
        return (self.hresult,)

    def tail(self) -> bytes:
        return self.message.encode()


@dataclasses.dataclass(frozen=True, slots=True)
class Reply(_Record):
    """Client -> engine: the answer to request ``id``.

    ``tail`` is the error message when ``hresult`` is not 0, else per request (the
    final VDConfig after END_CONFIGURATION, empty otherwise)."""

    TYPE: ClassVar[RecordType] = RecordType.REPLY
    BODY: ClassVar[struct.Struct] = struct.Struct("<IIQQ")
    HAS_TAIL: ClassVar[bool] = True

    id: int
    hresult: int
    state: int
    value0: int = 0
    value1: int = 0
    data: bytes = b""

    def header_fields(self) -> tuple[int, int]:
        return self.id, NO_DEVICE

    def body_fields(self) -> tuple[int, ...]:
        return (self.hresult, self.state, self.value0, self.value1)

    def tail(self) -> bytes:
        return self.data

    @property
    def message(self) -> str:
        return self.data.decode("utf-8", "replace")


@dataclasses.dataclass(frozen=True, slots=True)
class Segment(_Record):
    """Client -> engine: one segment of the buffer area; carries its memfd."""

    TYPE: ClassVar[RecordType] = RecordType.SEGMENT
    BODY: ClassVar[struct.Struct] = struct.Struct("<IIQ")

    index: int
    length: int

    def body_fields(self) -> tuple[int, ...]:
        return (self.index, 0, self.length)


@dataclasses.dataclass(frozen=True, slots=True)
class CompletionRecord(_Record):
    """Client -> engine: command ``id`` on ``device`` completed."""

    TYPE: ClassVar[RecordType] = RecordType.COMPLETION
    BODY: ClassVar[struct.Struct] = struct.Struct("<IIq")

    id: int
    device: int
    completion: int
    bytes_transferred: int = 0
    position: int = 0

    def header_fields(self) -> tuple[int, int]:
        return self.id, self.device

    def body_fields(self) -> tuple[int, ...]:
        return (self.completion, self.bytes_transferred, self.position)


@dataclasses.dataclass(frozen=True, slots=True)
class StateRecord(_Record):
    """Client -> engine: the server state changed from the client's side."""

    TYPE: ClassVar[RecordType] = RecordType.STATE
    BODY: ClassVar[struct.Struct] = struct.Struct("<II")
    HAS_TAIL: ClassVar[bool] = True

    state: int
    cause: int = 0
    reason: str = ""

    def body_fields(self) -> tuple[int, ...]:
        return (self.state, self.cause)

    def tail(self) -> bytes:
        return self.reason.encode()


@dataclasses.dataclass(frozen=True, slots=True)
class BeginConfiguration(_Record):
    TYPE: ClassVar[RecordType] = RecordType.BEGIN_CONFIGURATION
    BODY: ClassVar[struct.Struct] = struct.Struct("<IIIIqI")

    id: int
    features: int
    block_size: int
    alignment: int
    max_transfer_size: int
    timeout_ms: int = -1
    honour_complete: int = 1

    def header_fields(self) -> tuple[int, int]:
        return self.id, NO_DEVICE

    def body_fields(self) -> tuple[int, ...]:
        return (
            self.features,
            self.block_size,
            self.alignment,
            self.max_transfer_size,
            self.timeout_ms,
            self.honour_complete,
        )


@dataclasses.dataclass(frozen=True, slots=True)
class RequestBuffers(_Record):
    TYPE: ClassVar[RecordType] = RecordType.REQUEST_BUFFERS
    BODY: ClassVar[struct.Struct] = struct.Struct("<III")

    id: int
    size: int
    alignment: int
    count: int

    def header_fields(self) -> tuple[int, int]:
        return self.id, NO_DEVICE

    def body_fields(self) -> tuple[int, ...]:
        return (self.size, self.alignment, self.count)


@dataclasses.dataclass(frozen=True, slots=True)
class EndConfiguration(_Record):
    TYPE: ClassVar[RecordType] = RecordType.END_CONFIGURATION

    id: int

    def header_fields(self) -> tuple[int, int]:
        return self.id, NO_DEVICE


@dataclasses.dataclass(frozen=True, slots=True)
class QueryAvailableBuffers(_Record):
    TYPE: ClassVar[RecordType] = RecordType.QUERY_AVAILABLE_BUFFERS
    BODY: ClassVar[struct.Struct] = struct.Struct("<II")

    id: int
    size: int
    alignment: int

    def header_fields(self) -> tuple[int, int]:
        return self.id, NO_DEVICE

    def body_fields(self) -> tuple[int, ...]:
        return (self.size, self.alignment)


@dataclasses.dataclass(frozen=True, slots=True)
class OpenDevice(_Record):
    TYPE: ClassVar[RecordType] = RecordType.OPEN_DEVICE
    HAS_TAIL: ClassVar[bool] = True

    id: int
    name: str

    def header_fields(self) -> tuple[int, int]:
        return self.id, NO_DEVICE

    def tail(self) -> bytes:
        return self.name.encode()


@dataclasses.dataclass(frozen=True, slots=True)
class AllocateBuffer(_Record):
    TYPE: ClassVar[RecordType] = RecordType.ALLOCATE_BUFFER
    BODY: ClassVar[struct.Struct] = struct.Struct("<II")

    id: int
    size: int
    alignment: int

    def header_fields(self) -> tuple[int, int]:
        return self.id, NO_DEVICE

    def body_fields(self) -> tuple[int, ...]:
        return (self.size, self.alignment)


@dataclasses.dataclass(frozen=True, slots=True)
class FreeBuffer(_Record):
    TYPE: ClassVar[RecordType] = RecordType.FREE_BUFFER
    BODY: ClassVar[struct.Struct] = struct.Struct("<IIQ")

    segment: int
    offset: int

    def body_fields(self) -> tuple[int, ...]:
        return (self.segment, 0, self.offset)


@dataclasses.dataclass(frozen=True, slots=True)
class SendCommand(_Record):
    """Engine -> client: command ``id`` on ``device``; ``segment`` is NO_SEGMENT when the
    command carries no buffer."""

    TYPE: ClassVar[RecordType] = RecordType.SEND_COMMAND
    BODY: ClassVar[struct.Struct] = struct.Struct("<IIqIIQ")

    id: int
    device: int
    code: int
    size: int = 0
    position: int = 0
    segment: int = NO_SEGMENT
    offset: int = 0

    def header_fields(self) -> tuple[int, int]:
        return self.id, self.device

    def body_fields(self) -> tuple[int, ...]:
        return (self.code, self.size, self.position, self.segment, 0, self.offset)


@dataclasses.dataclass(frozen=True, slots=True)
class CloseDevice(_Record):
    TYPE: ClassVar[RecordType] = RecordType.CLOSE_DEVICE

    id: int
    device: int

    def header_fields(self) -> tuple[int, int]:
        return self.id, self.device


@dataclasses.dataclass(frozen=True, slots=True)
class SignalAbort(_Record):
    TYPE: ClassVar[RecordType] = RecordType.SIGNAL_ABORT


@dataclasses.dataclass(frozen=True, slots=True)
class Close(_Record):
    TYPE: ClassVar[RecordType] = RecordType.CLOSE

    id: int

    def header_fields(self) -> tuple[int, int]:
        return self.id, NO_DEVICE


Record = (
    Welcome
    | Refused
    | Reply
    | Segment
    | CompletionRecord
    | StateRecord
    | BeginConfiguration
    | RequestBuffers
    | EndConfiguration
    | QueryAvailableBuffers
    | OpenDevice
    | AllocateBuffer
    | FreeBuffer
    | SendCommand
    | CloseDevice
    | SignalAbort
    | Close
)

_CLASSES: dict[RecordType, type[_Record]] = {
    cls.TYPE: cls
    for cls in (
        Welcome,
        Refused,
        Reply,
        Segment,
        CompletionRecord,
        StateRecord,
        BeginConfiguration,
        RequestBuffers,
        EndConfiguration,
        QueryAvailableBuffers,
        OpenDevice,
        AllocateBuffer,
        FreeBuffer,
        SendCommand,
        CloseDevice,
        SignalAbort,
        Close,
    )
}


def decode(data: bytes | bytearray | memoryview) -> Record:
    """The record ``data`` holds (exactly one, nothing more); ``WireError`` otherwise."""
    view = memoryview(data)
    if len(view) < HEADER.size:
        raise WireError(f"a record of {len(view)} bytes is shorter than its 16-byte header")
    raw_type, _flags, length, ident, device = HEADER.unpack_from(view)
    try:
        kind = RecordType(raw_type)
    except ValueError:
        raise WireError(f"unknown record type 0x{raw_type:04x}") from None
    if length != len(view):
        raise WireError(f"{kind.name} record says {length} bytes but is {len(view)}")
    cls = _CLASSES[kind]
    fixed = HEADER.size + cls.BODY.size
    if len(view) < fixed or (not cls.HAS_TAIL and len(view) != fixed):
        raise WireError(
            f"{kind.name} record is {len(view)} bytes; its layout needs "
            f"{fixed}{' or more' if cls.HAS_TAIL else ''}"
        )
    body = cls.BODY.unpack_from(view, HEADER.size)
    tail = view[fixed:]
    return _build(kind, ident, device, body, tail)


def _build(
    kind: RecordType, ident: int, device: int, body: tuple[int, ...], tail: memoryview
) -> Record:
    match kind:
        case RecordType.WELCOME:
            return _welcome(body, tail)
        case RecordType.REFUSED:
            return Refused(body[0], _text(tail, "the message", kind))
        case RecordType.REPLY:
            return Reply(ident, body[0], body[1], body[2], body[3], bytes(tail))
        case RecordType.SEGMENT:
            return Segment(body[0], body[2])
        case RecordType.COMPLETION:
            return CompletionRecord(ident, device, *body)
        case RecordType.STATE:
            state_from_code(body[0])
            cause_from_code(body[1])
            return StateRecord(body[0], body[1], _text(tail, "the reason", kind))
        case RecordType.BEGIN_CONFIGURATION:
            return BeginConfiguration(ident, *body)
        case RecordType.REQUEST_BUFFERS:
            return RequestBuffers(ident, *body)
        case RecordType.END_CONFIGURATION:
            return EndConfiguration(ident)
        case RecordType.QUERY_AVAILABLE_BUFFERS:
            return QueryAvailableBuffers(ident, *body)
        case RecordType.OPEN_DEVICE:
            return OpenDevice(ident, _text(tail, "the device name", kind))
        case RecordType.ALLOCATE_BUFFER:
            return AllocateBuffer(ident, *body)
        case RecordType.FREE_BUFFER:
            return FreeBuffer(body[0], body[2])
        case RecordType.SEND_COMMAND:
            code, size, position, segment, _reserved, offset = body
            return SendCommand(ident, device, code, size, position, segment, offset)
        case RecordType.CLOSE_DEVICE:
            return CloseDevice(ident, device)
        case RecordType.SIGNAL_ABORT:
            return SignalAbort()
        case RecordType.CLOSE:
            return Close(ident)
    raise AssertionError(kind)  # pragma: no cover - every RecordType is matched


def _welcome(body: tuple[int, ...], tail: memoryview) -> Welcome:
    kind = RecordType.WELCOME
    if len(tail) < _CONFIG_SIZE + 2:
        raise WireError("WELCOME record is too short for its configuration")
    config = VDConfig.unpack(tail[:_CONFIG_SIZE])
    at = _CONFIG_SIZE
    strings: list[str] = []
    for what in ("the set name", "the job label"):
        if len(tail) < at + 2:
            raise WireError(f"WELCOME record ends before {what}'s length")
        (size,) = struct.unpack_from("<H", tail, at)
        at += 2
        if len(tail) < at + size:
            raise WireError(f"WELCOME record ends inside {what}")
        strings.append(_text(tail[at : at + size], what, kind))
        at += size
    if at != len(tail):
        raise WireError(f"WELCOME record has {len(tail) - at} bytes after the job label")
    return Welcome(body[0], body[1], config, strings[0], strings[1])


def decode_message(data: bytes | bytearray | memoryview) -> list[Record]:
    """The records of one message, in order (one or more, back to back); ``WireError``
    if any is malformed or the message does not end where a record does."""
    view = memoryview(data)
    records: list[Record] = []
    at = 0
    while at < len(view) or not records:
        if len(view) - at < HEADER.size:
            raise WireError(
                f"a message of {len(view)} bytes ends {len(view) - at} bytes into a record header"
            )
        (length,) = struct.unpack_from("<I", view, at + 4)
        if length < HEADER.size or length > MAX_RECORD or at + length > len(view):
            raw_type = struct.unpack_from("<H", view, at)[0]
            raise WireError(
                f"record 0x{raw_type:04x} at byte {at} of a {len(view)}-byte message says "
                f"{length} bytes (a record is 16 to {MAX_RECORD} bytes inside its message)"
            )
        records.append(decode(view[at : at + length]))
        at += length
    return records
