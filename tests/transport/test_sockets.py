"""The pieces both ends of a connection share: records of one loop step gathered into
one message, and the descriptors a message carried."""

from __future__ import annotations

import os
import socket

import anyio.lowlevel
import pytest

from vdistream.transport import wire
from vdistream.transport.sockets import Gatherer, received_fds


@pytest.mark.asyncio
async def test_the_first_record_of_a_step_goes_at_once_the_rest_together() -> None:
    sent: list[bytes] = []
    gatherer = Gatherer(sent.append)
    gatherer.add(b"a")
    assert sent == [b"a"]  # at once: a lone record waits for nothing
    gatherer.add(b"b")
    gatherer.add(b"c")
    assert sent == [b"a"]
    await anyio.lowlevel.checkpoint()  # the step is done
    assert sent == [b"a", b"bc"]
    gatherer.add(b"d")  # a new step
    assert sent == [b"a", b"bc", b"d"]


@pytest.mark.asyncio
async def test_a_full_message_goes_and_the_step_keeps_gathering() -> None:
    sent: list[bytes] = []
    gatherer = Gatherer(sent.append)
    record = b"x" * 4096
    gatherer.add(b"first")
    for _ in range(wire.MAX_MESSAGE // len(record) + 1):
        gatherer.add(record)
    assert sent == [b"first", record * (wire.MAX_MESSAGE // len(record))]
    await anyio.lowlevel.checkpoint()
    assert sent[2:] == [record]
    assert all(len(message) <= wire.MAX_MESSAGE for message in sent)


@pytest.mark.asyncio
async def test_cleared_records_are_never_sent() -> None:
    sent: list[bytes] = []
    gatherer = Gatherer(sent.append)
    gatherer.add(b"a")
    gatherer.add(b"b")
    gatherer.clear()
    await anyio.lowlevel.checkpoint()
    assert sent == [b"a"]


def test_outside_a_running_loop_every_record_goes_at_once() -> None:
    sent: list[bytes] = []
    gatherer = Gatherer(sent.append)
    gatherer.add(b"a")
    gatherer.add(b"b")
    assert sent == [b"a", b"b"]


def test_received_fds_are_the_descriptors_sent() -> None:
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    read, write = os.pipe()
    try:
        socket.send_fds(left, [b"m"], [read, write])
        _data, ancillary, _flags, _ = right.recvmsg(16, socket.CMSG_SPACE(8))
        fds = received_fds(ancillary)
        assert len(fds) == 2
        os.write(fds[1], b"z")
        assert os.read(fds[0], 1) == b"z"  # the same pipe
        for fd in fds:
            os.close(fd)
        assert received_fds([]) == []
    finally:
        for fd in (read, write):
            os.close(fd)
        left.close()
        right.close()
