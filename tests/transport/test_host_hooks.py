"""The in-process set's hooks the host is built on: ``Registry.server_set()``, the
server set as a context manager, the buffer area's memfds and positions, a pending
command's done callback, the state listener, and an abort with a cause."""

from __future__ import annotations

import mmap
import os

import pytest

from vdistream.errors import VDAbortError, VDClosedError, VDInvalidError, VDProtocolError
from vdistream.protocol import (
    CommandCode,
    CommandResult,
    Completion,
    Features,
    ServerState,
    SetAbortCause,
    VDConfig,
)
from vdistream.vdi import (
    ClientVirtualDevice,
    ClientVirtualDeviceSet,
    PendingCommand,
    Registry,
    ServerVirtualDevice,
    ServerVirtualDeviceSet,
)

pytestmark = pytest.mark.asyncio
MTS = 65536


async def pair(
    registry: Registry, devices: int = 1
) -> tuple[
    ClientVirtualDeviceSet,
    ServerVirtualDeviceSet,
    list[ClientVirtualDevice],
    list[ServerVirtualDevice],
]:
    client = ClientVirtualDeviceSet(registry=registry)
    client.create("s", VDConfig(device_count=devices))
    server = registry.server_set()
    server.open(None, "s")
    server.begin_configuration(Features.WRITE_MEDIA, 512, 0, MTS)
    server.request_buffers(MTS, 0, 2)
    server.end_configuration()
    names = ["s"] + [f"s{i}" for i in range(1, devices)]
    cdevs = [client.open_device(n) for n in names]
    sdevs = [server.open_device(n) for n in names]
    return client, server, cdevs, sdevs


def fd_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


async def test_registry_server_set_opens_sets_of_that_registry() -> None:
    registry = Registry()
    server = registry.server_set()
    assert isinstance(server, ServerVirtualDeviceSet)
    ClientVirtualDeviceSet(registry=registry).create("mine", VDConfig())
    server.open(None, "mine")
    assert server.state is ServerState.CONNECTED
    with pytest.raises(VDInvalidError):
        Registry().server_set().open(None, "mine")


async def test_server_set_context_manager_aborts_on_an_exception_and_closes() -> None:
    registry = Registry()
    client, server, cdevs, _ = await pair(registry)
    with pytest.raises(RuntimeError, match="engine failed"):
        async with server:
            raise RuntimeError("engine failed")
    assert server.state is ServerState.DNE
    assert client.aborted_by is SetAbortCause.SERVER
    with pytest.raises(VDAbortError):
        await cdevs[0].get_command(0)
    client.close()
    # without an exception it closes, with close()'s own error when devices are open
    client2, server2, _, _ = await pair(Registry())
    with pytest.raises(VDProtocolError, match="devices were still open"):
        async with server2:
            pass
    client2.close()
    client3, server3, cdevs3, sdevs3 = await pair(Registry())
    async with server3:
        sdevs3[0].close_device()
    assert server3.state is ServerState.DNE
    assert client3.aborted_by is None
    with pytest.raises(VDClosedError):
        await cdevs3[0].get_command(0)
    client3.close()


async def test_segments_keep_their_memfds_until_the_set_is_released() -> None:
    registry = Registry()
    client, server, cdevs, sdevs = await pair(registry)
    files = server.segment_files()
    assert [(f.index, f.length > 2 * MTS) for f in files] == [(0, True)]
    fd = files[0].fd
    assert fd_open(fd)
    # another mapping of the memfd sees the server's bytes (what the engine does)
    other = mmap.mmap(fd, files[0].length)
    buffer = await server.allocate_buffer(MTS)
    segment, offset = server.buffer_position(buffer)
    assert segment == 0
    buffer[:5] = b"hello"
    assert other[offset : offset + 5] == b"hello"
    assert server.buffer_start(0, offset) == (0, offset)
    assert server.buffer_start(0, offset + 100) == (0, offset)
    assert server.buffer_start(0, files[0].length - 1) is None  # the slack past the slots
    assert server.buffer_start(1, offset) is None
    with pytest.raises(VDInvalidError, match="not a buffer of this set"):
        server.buffer_position(memoryview(bytearray(10)))
    # a later request_buffers adds segment 1 with its own memfd
    server.request_buffers(4096, 0, 1)
    assert [f.index for f in server.segment_files()] == [0, 1]
    # the memfd is sealed: the other process cannot shrink the area under us
    with pytest.raises(OSError):
        os.ftruncate(fd, 4096)
    other.close()
    server.free_buffer(buffer)
    sdevs[0].close_device()
    server.close()
    assert fd_open(fd)  # the client still has the area
    with pytest.raises(Exception, match=r"VD_E_CLOSE"):
        await cdevs[0].get_command(0)
    client.close()
    assert not fd_open(fd)


async def test_done_callbacks_run_on_completion_abort_and_at_once() -> None:
    registry = Registry()
    client, server, cdevs, sdevs = await pair(registry, devices=1)
    seen: list[tuple[int, CommandResult]] = []

    def record(pending: PendingCommand) -> None:
        seen.append((pending.serial, pending.result()))

    flush = sdevs[0].send_command(CommandCode.FLUSH)
    flush.add_done_callback(record)
    flush.add_done_callback(lambda p: seen.append((-1, p.result())))
    assert seen == []
    command = await cdevs[0].get_command(0)
    cdevs[0].complete_command(command, Completion.SUCCESS, 0, 7)
    assert seen == [(flush.serial, CommandResult(0, 0, 7)), (-1, CommandResult(0, 0, 7))]
    flush.add_done_callback(record)  # already done: called before it returns
    assert len(seen) == 3
    # a failing callback does not break the set's bookkeeping
    pending = sdevs[0].send_command(CommandCode.FLUSH)
    pending.add_done_callback(lambda p: 1 / 0)  # type: ignore[func-returns-value]
    pending.add_done_callback(record)
    await cdevs[0].get_command(0)
    events: list[str] = []
    server.add_state_listener(lambda state: events.append(f"state {state.name}"))
    pending.add_done_callback(lambda p: events.append(f"done {p.result().completion}"))
    client.signal_abort()
    assert seen[-1] == (pending.serial, CommandResult(Completion.OPERATION_ABORTED))
    # the listener hears of the abort before the outstanding commands complete
    assert events == ["state ABORTED", f"done {Completion.OPERATION_ABORTED}"]
    server.close()
    client.close()


async def test_state_listener_hears_activation_and_stops_at_close() -> None:
    registry = Registry()
    client = ClientVirtualDeviceSet(registry=registry)
    client.create("s", VDConfig(device_count=1))
    server = registry.server_set()
    server.open(None, "s")
    states: list[ServerState] = []
    server.add_state_listener(states.append)
    server.begin_configuration(Features.WRITE_MEDIA, 512, 0, MTS)
    server.request_buffers(MTS, 0, 1)
    server.end_configuration()
    server.open_device("s")
    client.open_device("s")  # the client's call activates the set: the listener hears
    assert states == [ServerState.INITIALIZING, ServerState.ACTIVE]
    server.signal_abort(cause=SetAbortCause.PROCESS_DEATH, reason="the engine died")
    assert states[-1] is ServerState.ABORTED
    assert client.aborted_by is SetAbortCause.PROCESS_DEATH
    assert client.abort_reason == "the engine died"
    server.close()
    client.close()
    assert states == [ServerState.INITIALIZING, ServerState.ACTIVE, ServerState.ABORTED]
