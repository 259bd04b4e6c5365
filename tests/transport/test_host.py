"""``serve_set``: the client side serving one engine in another process, driven here by
a minimal engine written with raw ``SOCK_SEQPACKET`` sockets and ``wire`` records (the
engine's socket is the other process's in every way that matters: it only sees
records and the memfd it maps; the peer check runs as another uid in a real child).
"""

from __future__ import annotations

import array
import contextlib
import dataclasses
import grp
import mmap
import os
import shutil
import socket
import struct
import tempfile
import textwrap
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from vdistream.errors import VDAbortError, VDClosedError, VDTimeoutError
from vdistream.protocol import (
    CommandCode,
    Completion,
    Features,
    HResult,
    ServerState,
    SetAbortCause,
    VDConfig,
)
from vdistream.transport import host, wire
from vdistream.transport.host import HostResult, serve_set
from vdistream.transport.rendezvous import RuntimeDirectory
from vdistream.vdi import ClientVirtualDevice, ClientVirtualDeviceSet, Registry

pytestmark = pytest.mark.asyncio

CONNECTED, CONFIGURABLE, INITIALIZING, ACTIVE, TERMINATED, ABORTED = (
    wire.state_code(s)
    for s in (
        ServerState.CONNECTED,
        ServerState.CONFIGURABLE,
        ServerState.INITIALIZING,
        ServerState.ACTIVE,
        ServerState.NORMALLY_TERMINATED,
        ServerState.ABORTED,
    )
)
MTS = 65536


class RawEngine:
    """The engine's end of the socket: records in, records out, SEGMENTs mapped."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.segments: dict[int, mmap.mmap] = {}
        self.ids = iter(range(1, 1 << 31))
        self.seen: list[Any] = []  # records received while waiting for something else
        self.pending: list[Any] = []  # the rest of the last message

    def close(self) -> None:
        for mapping in self.segments.values():
            mapping.close()
        self.sock.close()

    def send(self, record: Any) -> None:
        self.sock.send(record.encode())

    async def recv(self, timeout: float = 1.0) -> Any:
        """The next record (None at EOF); SEGMENTs are mapped as they come. A message
        may carry several records: the later ones wait in ``pending``."""
        if self.pending:
            return self.pending.pop(0)
        with anyio.fail_after(timeout):
            while True:
                try:
                    data, anc, _, _ = self.sock.recvmsg(wire.MAX_MESSAGE, socket.CMSG_SPACE(4))
                except BlockingIOError:
                    await anyio.wait_readable(self.sock)
                    continue
                if not data:
                    return None
                records = wire.decode_message(data)
                record = records[0]
                if isinstance(record, wire.Segment):
                    assert len(anc) == 1
                    assert len(records) == 1  # a SEGMENT and its fd travel alone
                    fd = array.array("i", anc[0][2])[0]
                    try:
                        self.segments[record.index] = mmap.mmap(fd, record.length)
                    finally:
                        os.close(fd)
                else:
                    assert not anc
                self.pending.extend(records[1:])
                return record

    async def next(self, kind: type, timeout: float = 1.0) -> Any:
        """The next record of ``kind``; others are kept in ``seen``."""
        for i, record in enumerate(self.seen):
            if isinstance(record, kind):
                return self.seen.pop(i)
        while True:
            record = await self.recv(timeout)
            assert record is not None, f"EOF while waiting for {kind.__name__}"
            if isinstance(record, kind):
                return record
            self.seen.append(record)

    async def request(self, make: Any, *args: Any, ok: bool = True) -> wire.Reply:
        ident = next(self.ids)
        self.send(make(ident, *args))
        reply = await self.next(wire.Reply)
        assert reply.id == ident
        if ok:
            assert reply.hresult == 0, reply.message
        return reply

    async def configure(self, buffers: int = 4, size: int = MTS) -> VDConfig:
        await self.request(wire.BeginConfiguration, Features.WRITE_MEDIA, 512, 0, MTS)
        await self.request(wire.RequestBuffers, size, 0, buffers)
        reply = await self.request(wire.EndConfiguration)
        assert reply.state == INITIALIZING
        return VDConfig.unpack(reply.data)

    async def allocate(self, size: int = MTS) -> tuple[int, int]:
        reply = await self.request(wire.AllocateBuffer, size, 0)
        return reply.value0, reply.value1

    def view(self, segment: int, offset: int, size: int) -> memoryview:
        return memoryview(self.segments[segment])[offset : offset + size]


@dataclasses.dataclass
class Served:
    """A published set, its client, and (once connected) its raw engine."""

    registry: Registry
    client: ClientVirtualDeviceSet
    directory: RuntimeDirectory
    path: Path
    outcome: list[HostResult | BaseException]
    done: anyio.Event
    scope: anyio.CancelScope

    def engine(self) -> RawEngine:
        return RawEngine(self.directory.connect(None, "pub"))

    async def result(self, timeout: float = 1.5) -> HostResult | BaseException:
        with anyio.fail_after(timeout):
            await self.done.wait()
        return self.outcome[0]


@pytest.fixture
def rundir() -> Iterator[Path]:
    top = Path(tempfile.mkdtemp(prefix="vdh", dir="/tmp"))
    os.chmod(top, 0o711)  # another uid may pass through (the peer-check test)
    yield top / "run"
    shutil.rmtree(top, ignore_errors=True)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@contextlib.asynccontextmanager
async def serving(rundir: Path, server_timeout_ms: int = 0) -> AsyncIterator[Served]:
    """A set "local" of 2 devices served as "pub" (a context manager, not a fixture: the
    task group must be entered and left by the test's own task)."""
    registry = Registry()
    client = ClientVirtualDeviceSet(registry=registry)
    client.create("local", VDConfig(device_count=2, server_timeout_ms=server_timeout_ms))
    directory = RuntimeDirectory(rundir, group="backup")
    outcome: list[HostResult | BaseException] = []
    done = anyio.Event()

    async def run(*, task_status: anyio.abc.TaskStatus[Path]) -> None:
        try:
            outcome.append(
                await serve_set(
                    "pub",
                    registry=registry,
                    set_name="local",
                    directory=directory,
                    connect_timeout=3,
                    job="job-7",
                    task_status=task_status,
                )
            )
        except Exception as exc:
            outcome.append(exc)
        finally:
            done.set()

    async with anyio.create_task_group() as tg:
        path = await tg.start(run)
        yield Served(registry, client, directory, path, outcome, done, tg.cancel_scope)
        tg.cancel_scope.cancel()
    if client.state.name != "DNE":
        try:
            client.close()
        except Exception:
            pass
    assert not path.exists(), "serve_set left its socket published"


async def active(served: Served) -> tuple[RawEngine, list[ClientVirtualDevice]]:
    engine = served.engine()
    welcome = await engine.next(wire.Welcome)
    assert (welcome.version, welcome.client_pid, welcome.name, welcome.job) == (
        1,
        os.getpid(),
        "pub",
        "job-7",
    )
    assert welcome.config.device_count == 2
    await engine.configure()
    final = await served.client.get_configuration(1)
    assert final.max_transfer_size == MTS
    assert (await engine.request(wire.OpenDevice, "pub")).value0 == 0
    assert (await engine.request(wire.OpenDevice, "pub1")).value0 == 1
    devices = [served.client.open_device("local"), served.client.open_device("local1")]
    state = await engine.next(wire.StateRecord)
    assert (state.state, state.cause, state.reason) == (ACTIVE, 0, "")
    return engine, devices


async def test_a_whole_session_across_the_socket(rundir: Path) -> None:
    async with serving(rundir) as served:
        assert served.path == served.directory.path / "pub.sock"
        engine, (dev0, dev1) = await active(served)
        try:
            segment, offset = await engine.allocate()
            engine.view(segment, offset, 1000)[:] = bytes(range(200)) * 5
            engine.send(wire.SendCommand(100, 0, CommandCode.WRITE, 1000, 0, segment, offset))
            engine.send(wire.SendCommand(101, 1, CommandCode.FLUSH))
            command = await dev0.get_command(1)
            assert command.code is CommandCode.WRITE
            assert command.buffer is not None
            assert bytes(command.buffer) == bytes(range(200)) * 5  # the engine's pages
            flush = await dev1.get_command(1)
            dev1.complete_command(flush, Completion.SUCCESS)  # completions in any order
            dev0.complete_command(command, Completion.SUCCESS, 1000, 0)
            first = await engine.next(wire.CompletionRecord)
            second = await engine.next(wire.CompletionRecord)
            assert (first.id, first.device, first.completion) == (101, 1, 0)
            assert (second.id, second.device, second.bytes_transferred) == (100, 0, 1000)
            # a command naming a byte inside the buffer: READ fills the engine's pages
            engine.send(wire.SendCommand(102, 0, CommandCode.READ, 10, 0, segment, offset + 100))
            read = await dev0.get_command(1)
            assert read.buffer is not None
            assert len(read.buffer) == 10
            read.buffer[:] = b"0123456789"
            dev0.complete_command(read, Completion.SUCCESS, 10)
            assert (await engine.next(wire.CompletionRecord)).id == 102
            assert bytes(engine.view(segment, offset + 100, 10)) == b"0123456789"
            engine.send(wire.FreeBuffer(segment, offset))
            await engine.request(_close_device(0))
            await engine.request(_close_device(1))
            for dev in (dev0, dev1):
                with pytest.raises(VDClosedError):
                    await dev.get_command(1)
            reply = await engine.request(wire.Close)
            assert reply.state == wire.state_code(ServerState.DNE)
            assert await engine.recv() is None  # the client hangs up after CLOSE
            result = await served.result()
            assert isinstance(result, HostResult), result
            assert (result.engine_pid, result.engine_uid) == (os.getpid(), os.geteuid())
            assert result.features & Features.WRITE_MEDIA
            assert [(d.index, d.name, d.bytes) for d in result.devices] == [
                (0, "local", 1010),
                (1, "local1", 0),
            ]
            assert dict(result.devices[0].commands) == {CommandCode.WRITE: 1, CommandCode.READ: 1}
            assert dict(result.devices[1].commands) == {CommandCode.FLUSH: 1}
            served.client.close()
        finally:
            engine.close()


def _close_device(device: int) -> Any:
    return lambda ident: wire.CloseDevice(ident, device)


async def test_engine_death_aborts_the_set_within_a_second(rundir: Path) -> None:
    async with serving(rundir) as served:
        before = open_fds()
        engine, (dev0, _) = await active(served)
        segment, offset = await engine.allocate()
        engine.send(wire.SendCommand(50, 0, CommandCode.WRITE, 512, 0, segment, offset))
        command = await dev0.get_command(1)
        engine.close()  # the engine process is gone (the kernel closes its socket)
        started = time.monotonic()
        with pytest.raises(VDAbortError) as caught:
            await dev0.get_command(1)
        assert time.monotonic() - started < 1.0
        assert served.client.aborted_by is SetAbortCause.PROCESS_DEATH
        assert "disconnected before it closed the set" in str(caught.value)
        result = await served.result()
        assert isinstance(result, VDAbortError)
        assert "disconnected" in str(result)
        # the client keeps the buffer of the command it holds until it closes
        assert command.buffer is not None
        assert len(command.buffer) == 512
        served.client.close()
        assert open_fds() <= before  # memfd and sockets all closed


async def test_eof_after_every_device_closed_is_a_normal_end(rundir: Path) -> None:
    async with serving(rundir) as served:
        engine, devices = await active(served)
        await engine.request(_close_device(0))
        await engine.request(_close_device(1))
        engine.close()
        result = await served.result()
        assert isinstance(result, HostResult), result
        for dev in devices:
            with pytest.raises(VDClosedError):
                await dev.get_command(1)
        assert served.client.aborted_by is None
        served.client.close()


async def test_an_engine_that_never_says_close_after_the_end_is_hung_up_on(
    rundir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every device closed, every command completed, then silence: the engine has
    CLOSE_GRACE to say CLOSE; then the client hangs up and the set ended normally (a
    hung engine must not hold the job). The grace starts only once nothing is
    outstanding: a FLUSH the client holds keeps the connection open."""
    monkeypatch.setattr(host, "CLOSE_GRACE", 0.3)
    async with serving(rundir) as served:
        engine, devices = await active(served)
        try:
            engine.send(wire.SendCommand(50, 0, CommandCode.FLUSH))
            await engine.request(_close_device(0))
            await engine.request(_close_device(1))
            command = await devices[0].get_command(1)
            await anyio.sleep(0.5)  # past the grace: but a command is still outstanding
            assert not served.done.is_set()
            devices[0].complete_command(command, 0)
            assert (await engine.next(wire.CompletionRecord)).id == 50
            started = anyio.current_time()
            result = await served.result(2)
            assert isinstance(result, HostResult), result
            assert 0.2 < anyio.current_time() - started < 1.5
            assert await engine.recv() is None  # hung up on
            for dev in devices:
                with pytest.raises(VDClosedError):
                    await dev.get_command(1)
            assert served.client.aborted_by is None
            served.client.close()
        finally:
            engine.close()


async def test_a_client_abort_reaches_the_engine_as_state(rundir: Path) -> None:
    async with serving(rundir) as served:
        engine, (dev0, _) = await active(served)
        try:
            engine.send(wire.SendCommand(9, 0, CommandCode.FLUSH))
            await dev0.get_command(1)
            served.client.signal_abort()
            state = await engine.next(wire.StateRecord)
            assert (state.state, state.cause) == (ABORTED, wire.cause_code(SetAbortCause.CLIENT))
            assert state.reason == "the client signalled abort"
            aborted = await engine.next(wire.CompletionRecord)
            assert (aborted.id, aborted.completion) == (9, Completion.OPERATION_ABORTED)
            # after an abort: requests answer ABORT, CLOSE is answered, then the hang-up
            reply = await engine.request(wire.AllocateBuffer, MTS, 0, ok=False)
            assert reply.hresult == HResult.ABORT
            await engine.request(wire.Close)
            assert await engine.recv() is None
            result = await served.result()
            assert isinstance(result, VDAbortError)
            assert "the client signalled abort" in str(result)
        finally:
            engine.close()


async def test_an_engine_abort_aborts_the_set(rundir: Path) -> None:
    async with serving(rundir) as served:
        engine, (dev0, _) = await active(served)
        try:
            engine.send(wire.SignalAbort())
            state = await engine.next(wire.StateRecord)
            assert (state.state, state.cause) == (ABORTED, wire.cause_code(SetAbortCause.SERVER))
            with pytest.raises(VDAbortError):
                await dev0.get_command(1)
            engine.close()  # the engine may just disconnect after an abort
            assert isinstance(await served.result(), VDAbortError)
            assert served.client.aborted_by is SetAbortCause.SERVER
        finally:
            engine.close()


async def test_a_protocol_violation_aborts_naming_it(rundir: Path) -> None:
    async with serving(rundir) as served:
        engine, (dev0, _) = await active(served)
        try:
            engine.sock.send(struct.pack("<HHIII", 0x99, 0, 16, 0, 0))
            state = await engine.next(wire.StateRecord)
            assert state.state == ABORTED
            assert "protocol violation by the engine: unknown record type 0x0099" in state.reason
            assert await engine.recv() is None
            with pytest.raises(VDAbortError, match="protocol violation"):
                await dev0.get_command(1)
            assert isinstance(await served.result(), VDAbortError)
        finally:
            engine.close()


async def test_a_reply_overtakes_an_allocation_that_waits(rundir: Path) -> None:
    async with serving(rundir) as served:
        engine, _ = await active(served)
        try:
            held = [await engine.allocate() for _ in range(4)]  # every buffer of the area
            engine.send(wire.AllocateBuffer(70, MTS, 0))  # waits for a free buffer
            engine.send(wire.QueryAvailableBuffers(71, MTS, 0))
            query = await engine.next(wire.Reply)  # not held behind the allocation
            assert (query.id, query.hresult, query.value0) == (71, 0, 0)
            with pytest.raises(TimeoutError):
                await engine.recv(0.2)  # the allocation still waits
            engine.send(wire.FreeBuffer(*held[2]))
            allocated = await engine.next(wire.Reply)
            assert (allocated.id, allocated.hresult) == (70, 0)
            assert (allocated.value0, allocated.value1) == held[2]
            # a reused id is a violation: 80 is still waiting for a buffer
            engine.send(wire.AllocateBuffer(80, MTS, 0))
            engine.send(wire.QueryAvailableBuffers(80, MTS, 0))
            state = await engine.next(wire.StateRecord)
            assert "request id 80 is 0 or already in use" in state.reason
        finally:
            engine.close()
        assert isinstance(await served.result(), VDAbortError)


async def test_errors_come_back_as_replies_without_context(rundir: Path) -> None:
    async with serving(rundir) as served:
        engine = served.engine()
        try:
            await engine.next(wire.Welcome)
            reply = await engine.request(wire.OpenDevice, "pub", ok=False)
            assert reply.hresult == HResult.PROTOCOL
            assert reply.state == CONNECTED
            assert reply.message == "open_device is not allowed now"
            reply = await engine.request(wire.BeginConfiguration, 0, 500, 0, MTS, ok=False)
            assert reply.hresult == HResult.INVALID
            assert reply.message.startswith("begin_configuration: features 0x0 must be")
            await engine.configure()
            reply = await engine.request(wire.AllocateBuffer, 2 * MTS, 0, ok=False)
            assert reply.hresult == HResult.MEMORY
            # a command on a device never opened is refused, not fatal
            engine.send(wire.SendCommand(5, 7, CommandCode.FLUSH))
            refused = await engine.next(wire.CompletionRecord)
            assert (refused.id, refused.completion) == (5, Completion.INVALID_HANDLE)
            # CLOSE before the devices closed: the set is aborted, the reply says so
            reply = await engine.request(wire.Close, ok=False)
            assert reply.hresult == HResult.PROTOCOL
            assert (await engine.next(wire.StateRecord)).state == ABORTED
        finally:
            engine.close()
        assert isinstance(await served.result(), VDAbortError)


async def test_a_second_engine_is_refused(rundir: Path) -> None:
    async with serving(rundir) as served:
        engine = served.engine()
        other = served.engine()
        try:
            await engine.next(wire.Welcome)
            refused = await other.next(wire.Refused)
            assert refused.hresult == HResult.INVALID
            assert "already served" in refused.message
            assert await other.recv() is None
        finally:
            other.close()
            engine.close()
        assert isinstance(await served.result(), VDAbortError)


_FOREIGN = textwrap.dedent(
    """
    import socket, struct, sys
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.connect(sys.argv[1])
    data = s.recv(4096)
    kind, _, length, _, _ = struct.unpack_from("<HHIII", data)
    (hresult,) = struct.unpack_from("<I", data, 16)
    print(kind, hex(hresult), data[20:].decode(), s.recv(10) == b"")
    """
)


async def test_a_peer_of_another_uid_is_refused_and_does_not_count(rundir: Path) -> None:
    async with serving(rundir) as served:
        # nobody reaches the socket through the group's permissions (a supplementary group),
        # but SO_PEERCRED says uid 65534 / gid 65534: neither ours nor the group
        gid = grp.getgrnam("backup").gr_gid
        command = [
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            f"--groups={gid}",
            "/usr/bin/python3",
            "-c",
            _FOREIGN,
            str(served.path),
        ]
        done = await anyio.run_process(command, check=False)
        assert done.returncode == 0, done.stderr
        kind, hresult, *text = done.stdout.decode().split()
        assert (int(kind), int(hresult, 16)) == (wire.RecordType.REFUSED, HResult.SECURITY)
        assert " ".join(text) == "uid 65534 may not open the set 'pub' True"
        engine, _ = await active(served)  # the set still waits for its engine
        engine.close()


async def test_connect_timeout(rundir: Path) -> None:
    registry = Registry()
    directory = RuntimeDirectory(rundir)
    started = time.monotonic()
    with pytest.raises(VDTimeoutError) as caught:
        await serve_set("lonely", registry=registry, directory=directory, connect_timeout=0.2)
    assert 0.2 <= time.monotonic() - started < 1.0
    assert "no engine opened the set 'lonely'" in str(caught.value)
    assert str(rundir / "lonely.sock") in str(caught.value)
    assert not (rundir / "lonely.sock").exists()
    assert not (rundir / "lonely.lock").exists()


async def test_no_local_set_refuses_the_engine(rundir: Path) -> None:
    directory = RuntimeDirectory(rundir)
    async with anyio.create_task_group() as tg:
        failure: list[BaseException] = []

        async def run(*, task_status: anyio.abc.TaskStatus[Path]) -> None:
            try:
                await serve_set(
                    "ghost", registry=Registry(), directory=directory, task_status=task_status
                )
            except Exception as exc:
                failure.append(exc)

        await tg.start(run)
        engine = RawEngine(directory.connect(None, "ghost"))
        refused = await engine.next(wire.Refused)
        engine.close()
        assert refused.hresult == HResult.INVALID
        assert "no virtual device set of this name exists" in refused.message
    assert "no virtual device set of this name exists" in str(failure[0])


async def test_cancelling_serve_set_aborts_and_unpublishes(rundir: Path) -> None:
    async with serving(rundir) as served:
        engine, (dev0, _) = await active(served)
        try:
            served.scope.cancel()
            state = await engine.next(wire.StateRecord)
            assert (state.state, state.cause) == (ABORTED, wire.cause_code(SetAbortCause.CLIENT))
            assert await engine.recv() is None
            with pytest.raises(VDAbortError):
                await dev0.get_command(0)
            assert not served.path.exists()
        finally:
            engine.close()


async def test_an_engine_that_never_closes_the_aborted_set_is_hung_up_on(rundir: Path) -> None:
    async with serving(rundir) as served:
        engine, _ = await active(served)
        try:
            served.client.signal_abort()
            started = time.monotonic()
            assert (await engine.next(wire.StateRecord)).state == ABORTED
            assert await engine.recv(2.0) is None  # no CLOSE from us: the grace passes
            assert 0.9 < time.monotonic() - started < 1.5
            assert isinstance(await served.result(), VDAbortError)
        finally:
            engine.close()


async def test_buffers_requested_after_configuration_come_as_a_new_segment(rundir: Path) -> None:
    async with serving(rundir) as served:
        engine, (dev0, _) = await active(served)
        try:
            assert sorted(engine.segments) == [0]
            reply = await engine.request(wire.RequestBuffers, 4096, 0, 1)
            assert reply.state == ACTIVE
            assert sorted(engine.segments) == [0, 1]  # the SEGMENT came before the reply
            for _ in range(4):
                await engine.allocate()
            segment, offset = await engine.allocate(4096)
            assert segment == 1
            engine.view(segment, offset, 4)[:] = b"new!"
            engine.send(wire.SendCommand(1, 0, CommandCode.WRITE, 4, 0, segment, offset))
            command = await dev0.get_command(1)
            assert bytes(command.buffer or b"") == b"new!"
        finally:
            engine.close()
        assert isinstance(await served.result(), VDAbortError)


async def test_the_watchdog_fires_with_nobody_waiting_on_this_side(rundir: Path) -> None:
    async with serving(rundir, server_timeout_ms=50) as served:
        engine, (dev0, _) = await active(served)
        try:
            engine.send(wire.SendCommand(3, 0, CommandCode.FLUSH))
            await dev0.get_command(1)  # taken, never completed, and no pump waits
            started = time.monotonic()
            state = await engine.next(wire.StateRecord)
            assert time.monotonic() - started < 0.5
            assert (state.state, state.cause) == (
                ABORTED,
                wire.cause_code(SetAbortCause.SERVER_TIMEOUT),
            )
            assert "server timeout" in state.reason
            aborted = await engine.next(wire.CompletionRecord)
            assert (aborted.id, aborted.completion) == (3, Completion.OPERATION_ABORTED)
            await engine.request(wire.Close)
            assert served.client.aborted_by is SetAbortCause.SERVER_TIMEOUT
        finally:
            engine.close()
        assert isinstance(await served.result(), VDAbortError)


async def test_an_engine_that_never_reads_is_aborted_not_buffered(
    rundir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(host, "MAX_QUEUED_RECORDS", 50)
    async with serving(rundir) as served:
        engine, (dev0, _) = await active(served)
        try:
            with anyio.fail_after(1.5):
                for ident in range(1, 100000):
                    if served.done.is_set():
                        break
                    record = wire.QueryAvailableBuffers(ident, MTS, 0).encode()
                    while True:
                        try:
                            engine.sock.send(record)
                            break
                        except BlockingIOError:
                            await anyio.wait_writable(engine.sock)
                        except OSError:
                            break
                    if ident % 64 == 0:
                        await anyio.lowlevel.checkpoint()
            result = await served.result()
            assert isinstance(result, VDAbortError)
            assert "left more than 50 messages unread" in str(result)
            assert served.client.aborted_by is SetAbortCause.SERVER
            with pytest.raises(VDAbortError):
                await dev0.get_command(0)
        finally:
            engine.close()
