"""The engine side of a set served over a socket (``RemoteServerVirtualDeviceSet``):
the client set and its host (``serve_set``) run in this process, the engine side talks
to them over a real ``SOCK_SEQPACKET`` socket and maps the area's memfds."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import shutil
import struct
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from vdistream.engines.base import device_names
from vdistream.errors import (
    VDAbortError,
    VDClosedError,
    VDInvalidError,
    VDMemoryError,
    VDProtocolError,
    VDTimeoutError,
)
from vdistream.protocol import (
    CommandCode,
    CommandResult,
    Completion,
    Features,
    ServerState,
    SetAbortCause,
    VDConfig,
)
from vdistream.transport import wire
from vdistream.transport.engine import (
    RemotePendingCommand,
    RemoteRegistry,
    RemoteServerVirtualDevice,
    RemoteServerVirtualDeviceSet,
)
from vdistream.transport.host import serve_set
from vdistream.transport.rendezvous import RuntimeDirectory
from vdistream.vdi import (
    ClientVirtualDevice,
    ClientVirtualDeviceSet,
    Registry,
    ServerVirtualDeviceSet,
)

pytestmark = pytest.mark.asyncio

BLOCK = 4096
SIZE = 65536
_names = itertools.count()


@pytest.fixture
def directory() -> Iterator[RuntimeDirectory]:
    path = Path(tempfile.mkdtemp(prefix="vde-", dir="/tmp"))  # short: sun_path
    try:
        yield RuntimeDirectory(path / "rt")
    finally:
        shutil.rmtree(path, ignore_errors=True)


@dataclasses.dataclass
class Served:
    """A client set published by ``serve_set`` (in a task of the test)."""

    name: str
    client: ClientVirtualDeviceSet
    outcome: list[Any]
    host_done: anyio.Event


@contextlib.asynccontextmanager
async def served(
    directory: RuntimeDirectory, devices: int = 1, **config: int
) -> AsyncIterator[Served]:
    local = Registry()
    name = f"eng-{next(_names)}"
    client = ClientVirtualDeviceSet(registry=local)
    client.create(name, VDConfig(device_count=devices, **config))
    served = Served(name, client, [], anyio.Event())

    async def host(*, task_status: Any) -> None:
        try:
            served.outcome.append(
                await serve_set(
                    name,
                    registry=local,
                    directory=directory,
                    connect_timeout=5.0,
                    task_status=task_status,
                )
            )
        except Exception as exc:
            served.outcome.append(exc)
        finally:
            served.host_done.set()

    try:
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                await tg.start(host)
                yield served
                with anyio.move_on_after(2):
                    await served.host_done.wait()
                tg.cancel_scope.cancel()
    finally:
        if client.state is not client.state.DNE:
            with contextlib.suppress(Exception):
                client.close()


@contextlib.asynccontextmanager
async def engine(
    directory: RuntimeDirectory, name: str
) -> AsyncIterator[RemoteServerVirtualDeviceSet]:
    async with RemoteServerVirtualDeviceSet(directory=directory) as sds:
        await sds.open(None, name)
        yield sds


async def activate(
    sds: RemoteServerVirtualDeviceSet, served: Served, *, buffers: int = 2, size: int = SIZE
) -> tuple[list[RemoteServerVirtualDevice], list[ClientVirtualDevice]]:
    """Configure, open every device on both sides, wait until active."""
    await sds.begin_configuration(Features.WRITE_MEDIA | Features.READ_MEDIA, BLOCK, 0, SIZE)
    await sds.request_buffers(size, 0, buffers)
    await sds.end_configuration()
    config = await served.client.get_configuration(2)
    names = device_names(served.name, config.device_count)
    ours = [await sds.open_device(n) for n in names]
    theirs = [served.client.open_device(n) for n in names]
    await sds.wait_active(2)
    return ours, theirs


# --- opening and configuring -------------------------------------------------------


async def test_open_an_unpublished_name_is_invalid_and_names_it(
    directory: RuntimeDirectory,
) -> None:
    async with RemoteServerVirtualDeviceSet(directory=directory) as sds:
        with pytest.raises(VDInvalidError, match="no virtual device set named 'nobody'"):
            await sds.open(None, "nobody")
        assert sds.state is ServerState.DNE


async def test_open_outside_async_with_is_a_protocol_error(directory: RuntimeDirectory) -> None:
    sds = RemoteServerVirtualDeviceSet(directory=directory)
    with pytest.raises(VDProtocolError, match="inside `async with`"):
        await sds.open(None, "x")


async def test_a_whole_session_mirrors_the_states_and_shares_the_pages(
    directory: RuntimeDirectory,
) -> None:
    async with served(directory, 2, features=Features.REQUEST_COMPLETE) as s:
        async with engine(directory, s.name) as sds:
            assert sds.state is ServerState.CONNECTED
            assert sds.name == s.name
            assert sds.get_configuration() == VDConfig(
                device_count=2, features=Features.REQUEST_COMPLETE
            )
            await sds.begin_configuration(Features.WRITE_MEDIA, BLOCK, 0, SIZE)
            assert sds.state is ServerState.CONFIGURABLE
            await sds.request_buffers(SIZE, 0, 3)
            assert await sds.query_available_buffers(SIZE) == 0  # not mapped yet
            await sds.end_configuration()
            assert sds.state is ServerState.INITIALIZING
            final = await s.client.get_configuration(1)
            assert sds.configuration == final
            assert final.features & Features.COMPLETE_ENABLED
            assert await sds.query_available_buffers(SIZE) == 3
            names = device_names(s.name, 2)
            ours = [await sds.open_device(n) for n in names]
            assert [d.name for d in ours] == names
            theirs = [s.client.open_device(n) for n in names]
            await sds.wait_active(1)
            assert sds.state is ServerState.ACTIVE

            # WRITE: the engine fills its view, the client reads the same pages.
            buffer = await sds.allocate_buffer(SIZE)
            assert sds.is_shared_buffer(buffer)
            assert not sds.is_shared_buffer(memoryview(bytearray(10)))
            buffer[:5] = b"hello"
            pending = ours[1].send_command(CommandCode.WRITE, 5, 0, buffer)
            command = await theirs[1].get_command(1)
            assert command.code is CommandCode.WRITE
            assert command.buffer is not None
            assert bytes(command.buffer) == b"hello"
            theirs[1].complete_command(command, Completion.SUCCESS, 5, 77)
            assert await pending == CommandResult(Completion.SUCCESS, 5, 77)
            # READ: the client writes into the buffer, the engine sees it, no copy.
            pending = ours[0].send_command(CommandCode.READ, 3, 0, buffer[100:103])
            command = await theirs[0].get_command(1)
            assert command.buffer is not None
            command.buffer[:] = b"xyz"
            theirs[0].complete_command(command, Completion.SUCCESS, 3)
            assert (await pending.wait(1)).bytes_transferred == 3
            assert bytes(buffer[100:103]) == b"xyz"
            sds.free_buffer(buffer)
            assert await sds.query_available_buffers(SIZE) == 3

            for device in ours:
                await device.close_device()
            assert sds.state is ServerState.NORMALLY_TERMINATED
            for device in theirs:
                with pytest.raises(VDClosedError):
                    await device.get_command(1)
            await sds.close()
            assert sds.state is ServerState.DNE
            assert sds.name is None
        s.client.close()
    (outcome,) = s.outcome
    assert not isinstance(outcome, Exception), outcome


async def test_the_clients_refusal_of_a_configuration_comes_back_as_its_error(
    directory: RuntimeDirectory,
) -> None:
    async with served(directory) as s, engine(directory, s.name) as sds:
        with pytest.raises(VDInvalidError, match=r"block_size=3 is not a power of two") as info:
            await sds.begin_configuration(Features.WRITE_MEDIA, 3, 0, SIZE)
        assert info.value.set_name == s.name
        assert sds.state is ServerState.CONNECTED  # a refused call moves nothing
        with pytest.raises(VDProtocolError, match="end_configuration is not allowed now"):
            await sds.end_configuration()
        sds.signal_abort()


# --- what the engine side checks itself ----------------------------------------------


async def _inprocess_errors() -> list[str]:
    """The same mistakes made on an in-process set: their messages."""
    local = Registry()
    client = ClientVirtualDeviceSet(registry=local)
    client.create("inproc", VDConfig(device_count=1))
    sds = ServerVirtualDeviceSet(registry=local)
    sds.open(None, "inproc")
    sds.begin_configuration(Features.WRITE_MEDIA, BLOCK, 0, SIZE)
    sds.request_buffers(SIZE, 0, 1)
    sds.end_configuration()
    await client.get_configuration(1)
    device = sds.open_device("inproc")
    client.open_device("inproc")
    return await _mistakes(sds, device, finish=lambda: (sds.signal_abort(), sds.close()))


async def _mistakes(sds: Any, device: Any, finish: Any) -> list[str]:
    messages = []
    buffer = await sds.allocate_buffer(SIZE)
    calls = [
        lambda: device.send_command(99),
        lambda: device.send_command(CommandCode.WRITE, 10, 0, memoryview(bytearray(10))),
        lambda: device.send_command(CommandCode.WRITE, SIZE + 1, 0, buffer),
        lambda: device.send_command(CommandCode.READ, 10, 0, buffer.toreadonly()),
        lambda: sds.free_buffer(memoryview(bytearray(10))),
    ]
    for call in calls:
        with pytest.raises(VDInvalidError) as info:
            call()
        messages.append(str(info.value).split(" (set")[0])
    pending = device.send_command(CommandCode.WRITE, 10, 0, buffer)
    with pytest.raises(VDInvalidError) as info:
        sds.free_buffer(buffer[5:])
    messages.append(str(info.value).split(" (set")[0])
    assert not pending.done()
    for what in (lambda: sds.allocate_buffer(SIZE + 1), lambda: sds.allocate_buffer(0)):
        with pytest.raises((VDMemoryError, VDInvalidError)) as caught:
            await what()
        messages.append(type(caught.value).__name__)
    result = finish()
    if hasattr(result, "__await__"):
        await result
    return messages


async def test_local_checks_raise_what_the_in_process_set_raises(
    directory: RuntimeDirectory,
) -> None:
    expected = await _inprocess_errors()
    async with served(directory) as s, engine(directory, s.name) as sds:
        (device,), _ = await activate(sds, s, buffers=1)

        async def finish() -> None:
            sds.signal_abort()

        assert await _mistakes(sds, device, finish) == expected
    assert expected[0] == "VD_E_INVALID: send_command: unknown command code 99"


async def test_a_command_before_activation_or_after_close_device_is_refused_at_once(
    directory: RuntimeDirectory,
) -> None:
    async with served(directory) as s, engine(directory, s.name) as sds:
        await sds.begin_configuration(Features.WRITE_MEDIA, BLOCK, 0, SIZE)
        await sds.request_buffers(SIZE, 0, 1)
        await sds.end_configuration()
        await s.client.get_configuration(1)
        device = await sds.open_device(s.name)
        early = device.send_command(CommandCode.FLUSH)
        assert early.done()
        assert early.result().completion == Completion.INVALID_HANDLE
        client_device = s.client.open_device(s.name)
        await sds.wait_active(1)
        await device.close_device()
        late = device.send_command(CommandCode.FLUSH)
        assert late.result().completion == Completion.INVALID_HANDLE
        with pytest.raises(VDClosedError, match="already closed"):
            await device.close_device()
        with pytest.raises(VDClosedError):
            await client_device.get_command(1)
        await sds.close()


# --- aborts, waits and abandoned requests ------------------------------------------------


async def test_signal_abort_is_local_at_once_then_reaches_the_client(
    directory: RuntimeDirectory,
) -> None:
    async with served(directory) as s, engine(directory, s.name) as sds:
        (device,), (client_device,) = await activate(sds, s)
        buffer = await sds.allocate_buffer(SIZE)
        pending = device.send_command(CommandCode.WRITE, SIZE, 0, buffer)
        command = await client_device.get_command(1)
        sds.signal_abort()
        # No await in between: this side is aborted already.
        assert sds.state is ServerState.ABORTED
        assert sds.aborted_by is SetAbortCause.SERVER
        assert pending.result().completion == Completion.OPERATION_ABORTED
        assert device.send_command(CommandCode.FLUSH).result().completion == (
            Completion.OPERATION_ABORTED
        )
        with pytest.raises(VDAbortError, match="the server signalled abort"):
            await sds.allocate_buffer(SIZE)
        with pytest.raises(VDAbortError):
            await sds.wait_active(1)
        sds.free_buffer(buffer)  # decision 5: nothing to do
        await device.close_device()  # likewise
        with anyio.fail_after(1):
            with pytest.raises(VDAbortError):
                await client_device.get_command(None)
        assert s.client.aborted_by is SetAbortCause.SERVER
        assert command.buffer is not None  # the client's buffer stays valid until its close
        assert len(command.buffer) == SIZE
        await sds.close()


async def test_the_clients_abort_completes_every_outstanding_command(
    directory: RuntimeDirectory,
) -> None:
    async with served(directory, 2) as s, engine(directory, s.name) as sds:
        ours, theirs = await activate(sds, s, buffers=4)
        buffers = [await sds.allocate_buffer(SIZE) for _ in range(3)]
        sent = [
            ours[i % 2].send_command(CommandCode.WRITE, 10, 0, b) for i, b in enumerate(buffers)
        ]
        await theirs[0].get_command(1)  # one taken by the client, two still queued there
        waiting: list[BaseException] = []

        async def allocate() -> None:
            try:
                await sds.allocate_buffer(SIZE)
                await sds.allocate_buffer(SIZE)  # none left: waits
            except VDAbortError as exc:
                waiting.append(exc)

        async with anyio.create_task_group() as tg:
            tg.start_soon(allocate)
            await anyio.sleep(0.05)
            s.client.signal_abort()
            with anyio.fail_after(1):
                results = [await p for p in sent]
        assert [r.completion for r in results] == [Completion.OPERATION_ABORTED] * 3
        assert sds.state is ServerState.ABORTED
        assert sds.aborted_by is SetAbortCause.CLIENT
        assert sds.abort_reason == "the client signalled abort"
        (error,) = waiting
        assert isinstance(error, VDAbortError)
        assert "the client signalled abort" in str(error)
        await sds.close()


async def test_a_wait_for_a_result_is_bounded_and_leaves_the_command_outstanding(
    directory: RuntimeDirectory,
) -> None:
    async with served(directory) as s, engine(directory, s.name) as sds:
        (device,), (client_device,) = await activate(sds, s)
        pending = device.send_command(CommandCode.FLUSH)
        assert isinstance(pending, RemotePendingCommand)
        with pytest.raises(VDTimeoutError, match="command result: timed out"):
            await pending.wait(0.05)
        with pytest.raises(RuntimeError, match="has not completed"):
            pending.result()
        command = await client_device.get_command(1)
        client_device.complete_command(command, Completion.SUCCESS)
        assert (await pending.wait(1)).completion == Completion.SUCCESS
        await device.close_device()
        await sds.close()


async def test_an_allocation_nobody_waits_for_any_more_is_given_back(
    directory: RuntimeDirectory,
) -> None:
    async with served(directory) as s, engine(directory, s.name) as sds:
        await activate(sds, s, buffers=1)
        first = await sds.allocate_buffer(SIZE)
        with anyio.move_on_after(0.1) as scope:
            await sds.allocate_buffer(SIZE)  # the only buffer is out: waits, then cancelled
        assert scope.cancelled_caught
        sds.free_buffer(first)  # the client now answers the cancelled request...
        with anyio.fail_after(1):
            again = await sds.allocate_buffer(SIZE)  # ...and its buffer came back
        assert len(again) == SIZE
        sds.signal_abort()


async def test_leaving_async_with_on_an_error_aborts_and_closes(
    directory: RuntimeDirectory,
) -> None:
    async with served(directory) as s:
        sds = RemoteServerVirtualDeviceSet(directory=directory)

        async def fail() -> None:
            async with sds:
                await sds.open(None, s.name)
                await activate(sds, s)
                raise RuntimeError("engine bug")

        with pytest.raises(RuntimeError, match="engine bug"):
            await fail()
        assert sds.state is ServerState.DNE
        assert s.client.aborted_by is SetAbortCause.SERVER
    (outcome,) = s.outcome
    assert isinstance(outcome, VDAbortError), outcome


async def test_close_before_every_device_closed_aborts_releases_and_raises(
    directory: RuntimeDirectory,
) -> None:
    async with served(directory) as s, engine(directory, s.name) as sds:
        await activate(sds, s)
        buffer = await sds.allocate_buffer(SIZE)
        with pytest.raises(VDProtocolError, match="devices were still open"):
            await sds.close()
        assert sds.state is ServerState.DNE
        with pytest.raises(ValueError, match="released"):
            buffer[0]
        with anyio.fail_after(1), pytest.raises(VDAbortError):
            await s.client.get_configuration(None)  # wakes at the abort, at the latest
        assert s.client.abort_reason == "the server closed the set before every device was closed"


async def test_the_remote_registry_hands_out_remote_sets(directory: RuntimeDirectory) -> None:
    registry = RemoteRegistry(directory)
    sds = registry.server_set()
    assert isinstance(sds, RemoteServerVirtualDeviceSet)
    assert sds.state is ServerState.DNE
    with pytest.raises(VDProtocolError, match="no set is open"):
        sds.signal_abort()


async def test_a_second_engine_is_refused_with_the_clients_reason(
    directory: RuntimeDirectory,
) -> None:
    async with served(directory) as s, engine(directory, s.name) as first:
        async with RemoteServerVirtualDeviceSet(directory=directory) as second:
            with pytest.raises(VDInvalidError, match=r"refused: .* is already served"):
                await second.open(None, s.name)
            assert second.state is ServerState.DNE
        assert first.state is ServerState.CONNECTED
        first.signal_abort()


async def test_buffers_requested_after_configuration_come_in_a_new_segment(
    directory: RuntimeDirectory,
) -> None:
    async with served(directory) as s, engine(directory, s.name) as sds:
        (device,), (client_device,) = await activate(sds, s, buffers=1)
        await sds.request_buffers(2 * SIZE, 0, 1)  # the client maps one more segment
        assert await sds.query_available_buffers(2 * SIZE) == 1
        big = await sds.allocate_buffer(2 * SIZE)
        big[-3:] = b"end"
        pending = device.send_command(CommandCode.WRITE, 2 * SIZE, 0, big)
        command = await client_device.get_command(1)
        assert command.buffer is not None
        assert bytes(command.buffer[-3:]) == b"end"
        client_device.complete_command(command, Completion.SUCCESS, 2 * SIZE)
        assert (await pending).bytes_transferred == 2 * SIZE
        sds.free_buffer(big)
        await device.close_device()
        await sds.close()


# --- a client that breaks the protocol ---------------------------------------------------


@contextlib.asynccontextmanager
async def fake_client(directory: RuntimeDirectory, name: str) -> AsyncIterator[list[Any]]:
    """A published name whose first connection is handed to the test (one item list)."""
    publication = directory.publish(None, name)
    accepted: list[Any] = []

    async def accept() -> None:
        await anyio.wait_readable(publication.socket)
        conn, _ = publication.socket.accept()
        conn.setblocking(True)
        accepted.append(conn)

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(accept)
            yield accepted
            tg.cancel_scope.cancel()
    finally:
        for conn in accepted:
            conn.close()
        publication.close()


def _welcome(name: str, version: int = wire.VERSION) -> bytes:
    return wire.Welcome(version, 1, VDConfig(device_count=1), name).encode()


async def test_a_malformed_record_from_the_client_aborts_and_tells_it(
    directory: RuntimeDirectory,
) -> None:
    async with fake_client(directory, "bad") as accepted:
        async with RemoteServerVirtualDeviceSet(directory=directory) as sds:
            async with anyio.create_task_group() as tg:
                tg.start_soon(sds.open, None, "bad")
                while not accepted:  # noqa: ASYNC110 - the fake's accept
                    await anyio.sleep(0.005)
                (conn,) = accepted
                conn.send(_welcome("bad"))
            assert sds.state is ServerState.CONNECTED
            conn.send(struct.pack("<HHIII", 0x99, 0, 16, 0, 0))  # an unknown record type
            with anyio.fail_after(1), pytest.raises(VDAbortError, match="protocol violation"):
                await sds.wait_active(None)
            assert sds.aborted_by is SetAbortCause.SERVER
            conn.setblocking(False)
            with anyio.fail_after(1):
                assert await _receive(conn) == wire.SignalAbort()
            await sds.close()  # the connection is gone: close just releases
        assert sds.state is ServerState.DNE


async def test_a_client_of_another_protocol_version_is_refused_at_open(
    directory: RuntimeDirectory,
) -> None:
    sds = RemoteServerVirtualDeviceSet(directory=directory)
    async with fake_client(directory, "v2") as accepted, sds, anyio.create_task_group() as tg:

        async def welcome() -> None:
            while not accepted:  # noqa: ASYNC110 - the fake's accept
                await anyio.sleep(0.005)
            accepted[0].send(_welcome("v2", version=2))

        tg.start_soon(welcome)
        with pytest.raises(VDProtocolError, match="speaks version 2"):
            await sds.open(None, "v2")
    assert sds.state is ServerState.DNE


async def test_a_client_that_never_welcomes_times_the_open_out(
    directory: RuntimeDirectory,
) -> None:
    sds = RemoteServerVirtualDeviceSet(directory=directory)
    async with fake_client(directory, "mute"), sds:
        with pytest.raises(VDTimeoutError, match=r"no welcome within 0\.1 s"):
            await sds.open(None, "mute", timeout=0.1)
        assert sds.state is ServerState.DNE


async def test_the_clients_server_timeout_watchdog_aborts_the_engine_too(
    directory: RuntimeDirectory,
) -> None:
    async with served(directory, server_timeout_ms=50) as s, engine(directory, s.name) as sds:
        (device,), (client_device,) = await activate(sds, s)
        pending = device.send_command(CommandCode.FLUSH)
        await client_device.get_command(1)  # taken, never completed
        with anyio.fail_after(2), pytest.raises(VDAbortError, match="server timeout"):
            await client_device.get_command(None)  # the client's wait runs its watchdog
        with anyio.fail_after(1):
            result = await pending
        assert result.completion == Completion.OPERATION_ABORTED
        assert sds.aborted_by is SetAbortCause.SERVER_TIMEOUT
        assert sds.abort_reason is not None
        assert sds.abort_reason.startswith("server timeout")
        await sds.close()


_unread: dict[int, list[Any]] = {}  # per socket: the rest of the last message


async def _receive(conn: Any) -> Any:
    """The next record from ``conn`` (a message may carry several)."""
    waiting = _unread.setdefault(conn.fileno(), [])
    while not waiting:
        try:
            waiting.extend(wire.decode_message(conn.recv(wire.MAX_MESSAGE)))
        except BlockingIOError:
            await anyio.wait_readable(conn)
    return waiting.pop(0)


async def test_records_the_socket_cannot_take_go_out_later_in_order(
    directory: RuntimeDirectory,
) -> None:
    """A client that does not read: sends never block, the writer task flushes later."""
    count = 20000  # about 1 MB of records: more than the socket takes
    sds = RemoteServerVirtualDeviceSet(directory=directory)
    async with fake_client(directory, "slow") as accepted, sds:
        async with anyio.create_task_group() as tg:

            async def configure() -> None:
                while not accepted:  # noqa: ASYNC110 - the fake's accept
                    await anyio.sleep(0.005)
                conn = accepted[0]
                conn.setblocking(False)
                conn.send(_welcome("slow"))
                states = [ServerState.CONFIGURABLE] * 2 + [ServerState.INITIALIZING] * 2
                for state in states:
                    record = await _receive(conn)
                    final = isinstance(record, wire.EndConfiguration)
                    data = VDConfig(device_count=1).pack() if final else b""
                    conn.send(wire.Reply(record.id, 0, wire.state_code(state), data=data).encode())
                conn.send(wire.StateRecord(wire.state_code(ServerState.ACTIVE)).encode())

            tg.start_soon(configure)
            await sds.open(None, "slow")
            await sds.begin_configuration(Features.WRITE_MEDIA, BLOCK, 0, SIZE)
            await sds.request_buffers(SIZE, 0, 1)
            await sds.end_configuration()
            device = await sds.open_device("slow")
            await sds.wait_active(1)
        conn = accepted[0]
        sent = [device.send_command(CommandCode.FLUSH, 0, i) for i in range(count)]
        await anyio.lowlevel.checkpoint()  # the gathered records go out after this step
        assert sds._conn is not None
        assert sds._conn.outbox  # the socket is full: the rest waits for the writer
        records = [await _receive(conn) for _ in range(count)]
        assert [r.position for r in records] == list(range(count))  # in the order sent
        assert len({r.id for r in records}) == count
        for record in reversed(records):
            while True:
                try:
                    conn.send(wire.CompletionRecord(record.id, 0, 0, 0, record.position).encode())
                    break
                except BlockingIOError:
                    await anyio.wait_writable(conn)
        with anyio.fail_after(2):
            results = [await p for p in sent]
        assert [r.position for r in results] == list(range(count))
        sds.signal_abort()
        conn.close()  # no CLOSE reply to wait for: close() just releases
