"""The transport's records: every one round-trips, and malformed bytes are refused with a
``WireError`` that names the record and the fault. Offsets are checked against the
byte-by-byte table of docs/transport.md, so the document and the code cannot drift."""

from __future__ import annotations

import struct

import pytest

from vdistream.errors import VDProtocolError
from vdistream.protocol import ServerState, SetAbortCause, VDConfig
from vdistream.transport import wire

RECORDS = [
    wire.Welcome(1, 42, VDConfig(device_count=3, server_timeout_ms=500), "db", "20261206"),
    wire.Refused(0x80770006, "the set is already served"),
    wire.Reply(5, 0, 4, 1, 2, b"tail"),
    wire.Segment(1, 1 << 33),
    wire.CompletionRecord(7, 2, 995, 10, -5),
    wire.StateRecord(6, 4, "the client process died"),
    wire.BeginConfiguration(1, 1, 512, 0, 65536, -1, 1),
    wire.RequestBuffers(2, 65536, 4096, 4),
    wire.EndConfiguration(3),
    wire.QueryAvailableBuffers(4, 10, 0),
    wire.OpenDevice(5, "dev1 é"),
    wire.AllocateBuffer(6, 65536, 0),
    wire.FreeBuffer(0, 1 << 40),
    wire.SendCommand(9, 1, 2, 65536, -1, 0, 8192),
    wire.SendCommand(10, 0, 12),
    wire.CloseDevice(11, 63),
    wire.SignalAbort(),
    wire.Close(12),
]


@pytest.mark.parametrize("record", RECORDS, ids=lambda r: type(r).__name__)
def test_every_record_round_trips(record: wire.Record) -> None:
    data = record.encode()
    kind, flags, length, _ident, _device = wire.HEADER.unpack_from(data)
    assert (kind, flags, length) == (record.TYPE, 0, len(data))
    assert wire.decode(data) == record
    assert wire.decode(bytearray(data)) == record


def test_offsets_are_the_documented_ones() -> None:
    send = wire.SendCommand(0x01020304, 3, 2, 65536, -7, 1, 0x1122334455).encode()
    assert struct.unpack_from("<HHIII", send) == (0x18, 0, 48, 0x01020304, 3)
    assert struct.unpack_from("<I", send, 16) == (2,)
    assert struct.unpack_from("<I", send, 20) == (65536,)
    assert struct.unpack_from("<q", send, 24) == (-7,)
    assert struct.unpack_from("<I", send, 32) == (1,)
    assert struct.unpack_from("<Q", send, 40) == (0x1122334455,)
    reply = wire.Reply(9, 0x80770004, 6, 3, 4, b"why").encode()
    assert struct.unpack_from("<IIQQ", reply, 16) == (0x80770004, 6, 3, 4)
    assert reply[40:] == b"why"
    welcome = wire.Welcome(1, 77, VDConfig(device_count=5), "n", "j").encode()
    assert struct.unpack_from("<II", welcome, 16) == (1, 77)
    assert VDConfig.unpack(welcome[24:68]).device_count == 5
    assert struct.unpack_from("<H", welcome, 68) == (1,)
    assert welcome[70:71] == b"n"
    completion = wire.CompletionRecord(8, 2, 38, 100, 12).encode()
    assert struct.unpack_from("<IIq", completion, 16) == (38, 100, 12)
    begin = wire.BeginConfiguration(1, 3, 512, 4096, 65536, 250, 0).encode()
    assert struct.unpack_from("<IIIIqI", begin, 16) == (3, 512, 4096, 65536, 250, 0)


@pytest.mark.parametrize(
    ("data", "says"),
    [
        (b"", "shorter than its 16-byte header"),
        (struct.pack("<HHIII", 0x7777, 0, 16, 0, 0), "unknown record type 0x7777"),
        (struct.pack("<HHIII", 0x1B, 0, 20, 1, 0), "CLOSE record says 20 bytes but is 16"),
        (wire.Close(1).encode() + b"x", "CLOSE record says 16 bytes but is 17"),
        (struct.pack("<HHIII", 0x18, 0, 20, 1, 0) + b"\0" * 4, "SEND_COMMAND record is 20 bytes"),
        (struct.pack("<HHIII", 0x06, 0, 24, 0, 0) + struct.pack("<II", 9, 0), "state code 9"),
        (struct.pack("<HHIII", 0x06, 0, 24, 0, 0) + struct.pack("<II", 6, 8), "cause code 8"),
        (struct.pack("<HHIII", 0x15, 0, 18, 1, 0) + b"\xff\xfe", "device name is not UTF-8"),
        (wire.Welcome(1, 1, VDConfig(), "n", "j").encode()[:-1] + b"", "WELCOME record says"),
    ],
)
def test_malformed_records_are_refused(data: bytes, says: str) -> None:
    with pytest.raises(wire.WireError, match=says) as caught:
        wire.decode(data)
    assert isinstance(caught.value, VDProtocolError)


def test_truncated_welcome_names_the_field() -> None:
    data = bytearray(wire.Welcome(1, 1, VDConfig(), "name", "").encode())
    struct.pack_into("<H", data, 68, 200)  # a name longer than the record
    with pytest.raises(wire.WireError, match="ends inside the set name"):
        wire.decode(data)


def test_codes_of_states_and_causes() -> None:
    assert [wire.state_code(s) for s in ServerState] == list(range(7))
    for state in ServerState:
        assert wire.state_from_code(wire.state_code(state)) is state
    assert wire.cause_code(None) == 0
    for cause in SetAbortCause:
        assert wire.cause_from_code(wire.cause_code(cause)) is cause


def test_a_record_over_the_limit_is_not_encoded() -> None:
    with pytest.raises(ValueError, match="exceeds 4096"):
        wire.OpenDevice(1, "x" * 5000).encode()


def test_a_message_carries_records_back_to_back() -> None:
    records = [wire.CompletionRecord(i, 0, 0, 512) for i in range(1, 6)] + [
        wire.StateRecord(6, 1, "the client signalled abort")
    ]
    message = b"".join(r.encode() for r in records)
    assert wire.decode_message(message) == records
    assert wire.decode_message(records[0].encode()) == records[:1]


@pytest.mark.parametrize(
    ("data", "says"),
    [
        (b"", "ends 0 bytes into a record header"),
        (wire.Close(1).encode() + b"\x1b\x00", "ends 2 bytes into a record header"),
        (wire.Close(1).encode() + struct.pack("<HHIII", 0x1B, 0, 40, 2, 0), "says 40 bytes"),
        (struct.pack("<HHIII", 0x1B, 0, 8, 2, 0), "says 8 bytes"),
        (struct.pack("<HHIII", 0x1B, 0, 5000, 2, 0), "says 5000 bytes"),
        (wire.Close(1).encode() + struct.pack("<HHIII", 0x7777, 0, 16, 0, 0), "0x7777"),
    ],
)
def test_a_malformed_message_is_refused(data: bytes, says: str) -> None:
    with pytest.raises(wire.WireError, match=says):
        wire.decode_message(data)
