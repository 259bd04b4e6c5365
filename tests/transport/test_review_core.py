"""Review of the transport core: cases found missing in the host and the engine side
(each test failed before its fix)."""

from __future__ import annotations

import array
import fcntl
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from tests.transport.test_engine import (
    _receive,
    _welcome,
    activate,
    directory,
    fake_client,
)
from tests.transport.test_engine import engine as remote_engine
from tests.transport.test_engine import served as served_set
from tests.transport.test_host import MTS, RawEngine, _close_device, active, serving
from vdistream.errors import VDAbortError, VDClosedError, VDIError, VDSecurityError
from vdistream.protocol import (
    CommandCode,
    Completion,
    Features,
    HResult,
    ServerState,
    SetAbortCause,
    VDConfig,
)
from vdistream.transport import engine as engine_module
from vdistream.transport import host, wire
from vdistream.transport.engine import RemoteServerVirtualDeviceSet
from vdistream.transport.host import HostResult
from vdistream.transport.rendezvous import RuntimeDirectory
from vdistream.vdi import Registry
from vdistream.vdi.buffers import MAX_BUFFERS

pytestmark = pytest.mark.asyncio
__all__ = ("directory",)  # the fixture, shared with test_engine


@pytest.fixture
def rundir() -> Iterator[Path]:
    top = Path(tempfile.mkdtemp(prefix="vdr", dir="/tmp"))
    yield top / "run"
    shutil.rmtree(top, ignore_errors=True)


async def test_an_engine_that_hangs_up_right_after_its_last_close_device(rundir: Path) -> None:
    """The engine closes every device and exits without reading what we sent it: the
    kernel then reports ECONNRESET to us before the records it sent last. They must
    still be read: the set ended normally (no abort after NORMALLY_TERMINATED)."""
    async with serving(rundir) as served:
        engine, devices = await active(served)
        engine.send(wire.QueryAvailableBuffers(500, 65536, 0))
        await anyio.wait_readable(engine.sock)  # its reply waits, unread, at the engine
        engine.send(_close_device(0)(501))
        engine.send(_close_device(1)(502))
        engine.close()  # in the same step: serve_set has read neither CLOSE_DEVICE
        result = await served.result()
        assert isinstance(result, HostResult), result
        assert served.client.aborted_by is None
        for device in devices:
            with pytest.raises(VDClosedError):
                await device.get_command(1)
        served.client.close()


# --- the engine side against a fake client --------------------------------------------


async def _configure(
    accepted: list[Any], name: str, segment: tuple[int, int] | None = None
) -> socket.socket:
    """The fake client's side of open, begin_configuration and end_configuration; its
    connection, non-blocking. ``segment`` (fd, length) is sent as SEGMENT 0 before the
    reply to END_CONFIGURATION; without it the area is empty."""
    while not accepted:  # noqa: ASYNC110 - the fake's accept
        await anyio.sleep(0.005)
    conn: socket.socket = accepted[0]
    conn.setblocking(False)
    conn.send(_welcome(name))
    for state in (ServerState.CONFIGURABLE, ServerState.INITIALIZING):
        record = await _receive(conn)
        data = b""
        if state is ServerState.INITIALIZING:
            data = VDConfig(device_count=1).pack()
            if segment is not None:
                fds = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [segment[0]]))]
                conn.sendmsg([wire.Segment(0, segment[1]).encode()], fds)
        conn.send(wire.Reply(record.id, 0, wire.state_code(state), data=data).encode())
    return conn


async def _opened(
    sds: RemoteServerVirtualDeviceSet,
    accepted: list[Any],
    name: str,
    segment: tuple[int, int] | None = None,
) -> Any:
    """The fake's connection once the engine configured the set; or the error the
    engine's configuration ended with."""
    conn: list[socket.socket] = []

    async def fake() -> None:
        conn.append(await _configure(accepted, name, segment))

    async with anyio.create_task_group() as tg:
        tg.start_soon(fake)
        await sds.open(None, name)
        try:
            await sds.begin_configuration(Features.WRITE_MEDIA, 4096, 0, 65536)
            await sds.end_configuration()
        except VDIError as exc:
            tg.cancel_scope.cancel()
            return exc
    return conn[0]


def _memfd(length: int, seals: int) -> int:
    fd = os.memfd_create("review", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, length)
    if seals:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    return fd


_SEALED = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL


@pytest.mark.parametrize(
    ("file_length", "seals", "complaint"),
    [
        (65536, 0, "not a memfd sealed against resizing"),  # could shrink under us
        (4096, _SEALED, "fewer than the 65536 to map"),  # pages past the end
    ],
)
async def test_a_segment_that_could_fault_the_engine_is_refused(
    directory: RuntimeDirectory, file_length: int, seals: int, complaint: str
) -> None:
    """Touching a mapped page past the end of its file kills the process (SIGBUS): a
    SEGMENT longer than its memfd, or a memfd the client could still shrink, is a
    violation, not a mapping."""
    fd = _memfd(file_length, seals)
    try:
        async with (
            fake_client(directory, "seg") as accepted,
            RemoteServerVirtualDeviceSet(directory=directory) as sds,
        ):
            error = await _opened(sds, accepted, "seg", (fd, 65536))
            assert isinstance(error, VDAbortError), error
            assert complaint in (sds.abort_reason or "")
            assert sds.aborted_by is SetAbortCause.SERVER
            await sds.close()
    finally:
        os.close(fd)


async def test_a_segment_descriptor_is_never_inheritable(
    directory: RuntimeDirectory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The memfd arrives close-on-exec (MSG_CMSG_CLOEXEC): a child the engine starts
    meanwhile from another thread must not inherit it."""
    flags: list[int] = []
    real = engine_module.map_aligned

    def spy(fd: int, length: int) -> Any:
        flags.append(fcntl.fcntl(fd, fcntl.F_GETFD))
        return real(fd, length)

    monkeypatch.setattr(engine_module, "map_aligned", spy)
    fd = _memfd(65536, _SEALED)
    try:
        async with (
            fake_client(directory, "cloexec") as accepted,
            RemoteServerVirtualDeviceSet(directory=directory) as sds,
        ):
            conn = await _opened(sds, accepted, "cloexec", (fd, 65536))
            assert sds.aborted_by is None
            assert len(flags) == 1
            assert flags[0] & fcntl.FD_CLOEXEC
            sds.signal_abort()
            conn.close()  # the fake answers no CLOSE
    finally:
        os.close(fd)


async def test_a_reply_the_engine_cannot_apply_ends_its_waiter_at_once(
    directory: RuntimeDirectory,
) -> None:
    """A REPLY to ALLOCATE_BUFFER naming a segment never sent is a violation: the set
    aborts, and the allocate_buffer that waited for that reply (with no timeout of its
    own) must end with the abort, not wait forever."""
    async with (
        fake_client(directory, "badalloc") as accepted,
        RemoteServerVirtualDeviceSet(directory=directory) as sds,
    ):
        conn = await _opened(sds, accepted, "badalloc")
        async with anyio.create_task_group() as tg:

            async def answer() -> None:
                record = await _receive(conn)
                assert isinstance(record, wire.AllocateBuffer)
                state = wire.state_code(ServerState.INITIALIZING)
                conn.send(wire.Reply(record.id, 0, state, 7, 0).encode())

            tg.start_soon(answer)
            with anyio.fail_after(2), pytest.raises(VDAbortError, match="outside the buffer"):
                await sds.allocate_buffer(65536)
        assert sds.aborted_by is SetAbortCause.SERVER
        await sds.close()


async def test_the_clients_last_state_is_read_though_it_hung_up_on_unread_records(
    directory: RuntimeDirectory,
) -> None:
    """The client aborts (STATE with its reason) and hangs up while records of ours wait
    unread in its socket: the kernel reports ECONNRESET before the STATE, which must
    still be read (the abort is the client's, not a death)."""
    async with (
        fake_client(directory, "hangup") as accepted,
        RemoteServerVirtualDeviceSet(directory=directory) as sds,
    ):
        conn = await _opened(sds, accepted, "hangup")
        sds._send(sds._conn, wire.QueryAvailableBuffers(99, 1, 0))  # left unread
        await anyio.wait_readable(conn)
        aborted = wire.state_code(ServerState.ABORTED)
        cause = wire.cause_code(SetAbortCause.CLIENT)
        conn.send(wire.StateRecord(aborted, cause, "the client's own reason").encode())
        conn.close()
        with anyio.fail_after(1), pytest.raises(VDAbortError):
            await sds.wait_active(None)
        assert sds.abort_reason == "the client's own reason"
        assert sds.aborted_by is SetAbortCause.CLIENT
        await sds.close()


# --- the host's sending -----------------------------------------------------------------


def _bare_host(conn: socket.socket) -> host._Host:
    """A ``_Host`` with only a connection (what its sending uses)."""
    nowhere = RuntimeDirectory("/nonexistent")
    bare = host._Host("pub", "local", Registry(), None, nowhere, "", None)  # type: ignore[arg-type]
    bare.conn = conn
    return bare


def _fill(sock: socket.socket) -> None:
    while True:
        try:
            sock.send(b"x" * 1000)
        except BlockingIOError:
            return


def _drain(sock: socket.socket) -> list[bytes]:
    messages = []
    while True:
        try:
            messages.append(sock.recv(wire.MAX_MESSAGE))
        except BlockingIOError:
            return messages


async def test_records_gathered_while_the_writer_empties_the_queue_are_kept() -> None:
    """A step sends three records while the socket is full: the first is queued for the
    writer, the other two gathered for the step's message. When the writer's turn
    comes before that message is flushed (it was woken first), emptying the queue must
    not drop the gathered records (the engine would wait for them forever)."""
    ours, engine = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with ours, engine:
        ours.setblocking(False)
        engine.setblocking(False)
        bare = _bare_host(ours)
        _fill(ours)
        records = [wire.CompletionRecord(i, 0, 0).encode() for i in (1, 2, 3)]
        for record in records:
            bare.send(record)
        assert len(bare.outgoing) == 1
        _drain(engine)  # the engine reads: the writer is woken
        await bare.write_queued()  # its turn, before the step's flush
        await anyio.lowlevel.checkpoint()  # the step's flush
        received = [r for m in _drain(engine) for r in wire.decode_message(m)]
        assert [r.encode() for r in received] == records


async def test_a_huge_buffer_count_is_refused_before_anything_is_laid_out(rundir: Path) -> None:
    """REQUEST_BUFFERS with count 2**32 - 1 would lay out (one Python object each) more
    buffers than the client process has memory and time for, blocking its loop: every
    count beyond MAX_BUFFERS is VD_E_MEMORY, during configuration and after."""
    async with serving(rundir) as served:
        engine = RawEngine(served.directory.connect(None, "pub"))
        try:
            await engine.next(wire.Welcome)
            await engine.request(wire.BeginConfiguration, Features.WRITE_MEDIA, 512, 0, 65536)
            await engine.request(wire.RequestBuffers, 4096, 0, MAX_BUFFERS - 1)
            for count in (2, 0xFFFFFFFF):
                reply = await engine.request(wire.RequestBuffers, 4096, 0, count, ok=False)
                assert reply.hresult == HResult.MEMORY
                assert f"at most {MAX_BUFFERS}" in reply.message
            await engine.request(wire.RequestBuffers, 1, 0, 1)  # exactly MAX_BUFFERS
            await engine.request(wire.EndConfiguration)
            reply = await engine.request(wire.RequestBuffers, 4096, 0, 0xFFFFFFFF, ok=False)
            assert reply.hresult == HResult.MEMORY
        finally:
            engine.close()
        assert isinstance(await served.result(), VDAbortError)


async def _send_all(engine: RawEngine, records: list[bytes]) -> None:
    for record in records:
        while True:
            try:
                engine.sock.send(record)
                break
            except BlockingIOError:
                await anyio.wait_writable(engine.sock)


async def test_allocations_that_wait_cost_no_time_per_request_already_waiting(
    rundir: Path,
) -> None:
    """Every request's id is checked against those unanswered: 20000 ALLOCATE_BUFFERs
    waiting for a free buffer took 6 s of the client's loop (a scan of them all per
    request); a dict makes it 0.2 s."""
    async with serving(rundir) as served:
        engine, _ = await active(served)
        try:
            started = time.monotonic()
            await _send_all(
                engine, [wire.AllocateBuffer(1000 + i, 65536, 0).encode() for i in range(20000)]
            )
            engine.send(wire.QueryAvailableBuffers(999, 65536, 0))
            while (await engine.next(wire.Reply, timeout=10)).id != 999:
                pass
            assert time.monotonic() - started < 2.0
        finally:
            engine.close()
        assert isinstance(await served.result(), VDAbortError)


async def test_an_engine_that_asks_for_buffers_without_end_is_a_violation(
    rundir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(host, "MAX_UNANSWERED", 50)
    async with serving(rundir) as served:
        engine, _ = await active(served)
        try:
            await _send_all(
                engine, [wire.AllocateBuffer(100 + i, 65536, 0).encode() for i in range(60)]
            )
            state = await engine.next(wire.StateRecord)
            assert state.state == wire.state_code(ServerState.ABORTED)
            assert "more than 50 requests wait for a reply" in state.reason
        finally:
            engine.close()
        assert isinstance(await served.result(), VDAbortError)


# --- a hostile engine: checked sound, kept as tests --------------------------------------


async def test_a_command_never_reaches_past_its_buffer(rundir: Path) -> None:
    async with serving(rundir) as served:
        engine, (dev0, _) = await active(served)
        try:
            segment, offset = await engine.allocate()
            refusals = [
                (segment, offset + 100, MTS - 99),  # from inside, one byte too many
                (segment, offset + MTS, 1),  # just past the buffer (a prefix or gap)
                (segment, 1 << 40, 1),  # far past the segment
                (7, offset, 1),  # no such segment
            ]
            for ident, (seg, off, size) in enumerate(refusals, 10):
                engine.send(wire.SendCommand(ident, 0, CommandCode.WRITE, size, 0, seg, off))
                done = await engine.next(wire.CompletionRecord)
                assert (done.id, done.completion) == (ident, Completion.INVALID_HANDLE)
            engine.send(
                wire.SendCommand(20, 0, CommandCode.WRITE, MTS - 100, 0, segment, offset + 100)
            )
            command = await dev0.get_command(1)
            assert command.buffer is not None
            assert len(command.buffer) == MTS - 100
            assert served.client.aborted_by is None
        finally:
            engine.close()
        assert isinstance(await served.result(), VDAbortError)


async def test_freeing_a_buffer_an_outstanding_command_uses_frees_nothing(
    rundir: Path,
) -> None:
    """FREE_BUFFER of a buffer under an outstanding command: the set aborts (the docs'
    rule), the buffer is not handed out again, and the client keeps it until it closes."""
    async with serving(rundir) as served:
        engine, (dev0, _) = await active(served)
        try:
            segment, offset = await engine.allocate()
            engine.view(segment, offset, 4)[:] = b"data"
            engine.send(wire.SendCommand(5, 0, CommandCode.WRITE, 4, 0, segment, offset))
            command = await dev0.get_command(1)
            engine.send(wire.FreeBuffer(segment, offset))
            state = await engine.next(wire.StateRecord)
            assert state.state == wire.state_code(ServerState.ABORTED)
            assert "free_buffer" in state.reason
            assert bytes(command.buffer or b"") == b"data"  # still the client's
            slots = [s for s in served.client._core.area._slots if s.in_use]  # type: ignore[union-attr]
            assert len(slots) == 1  # not given back
        finally:
            engine.close()
        assert isinstance(await served.result(), VDAbortError)


async def test_a_command_outstanding_when_the_set_closes_does_not_wait_forever(
    directory: RuntimeDirectory,
) -> None:
    """The engine closes its device and the set while the client still holds a command:
    no completion can cross the closed connection any more, so the command completes
    (OPERATION_ABORTED) instead of leaving its waiter waiting forever."""
    async with served_set(directory) as s, remote_engine(directory, s.name) as sds:
        (device,), (client_device,) = await activate(sds, s)
        pending = device.send_command(CommandCode.FLUSH)
        await client_device.get_command(1)  # held by the client, never completed
        await device.close_device()
        assert sds.state is ServerState.NORMALLY_TERMINATED
        await sds.close()
        with anyio.fail_after(1):
            result = await pending
        assert result.completion == Completion.OPERATION_ABORTED


async def test_many_connections_at_once_are_refused_and_leave_no_descriptor(
    rundir: Path,
) -> None:
    async with serving(rundir) as served:
        engine, _ = await active(served)
        try:
            before = len(os.listdir("/proc/self/fd"))
            others: list[RawEngine] = []
            for _ in range(3):  # more than the backlog (16) in all, a burst at a time
                burst = []
                for _ in range(12):
                    try:
                        burst.append(RawEngine(served.directory.connect(None, "pub")))
                    except VDIError:
                        break  # the backlog is full: refused by the kernel
                for other in burst:
                    refused = await other.next(wire.Refused)
                    assert "already served" in refused.message
                    assert await other.recv() is None
                    other.close()
                others.extend(burst)
            assert len(others) >= 30
            await engine.request(wire.QueryAvailableBuffers, 65536, 0)  # still served
            assert len(os.listdir("/proc/self/fd")) == before
        finally:
            engine.close()
        assert isinstance(await served.result(), VDAbortError)


# --- rendezvous: the connecting side ---------------------------------------------------


def _listen(path: Path) -> socket.socket:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(os.fsencode(path))
    listener.listen(1)
    return listener


async def test_an_engine_opens_no_set_someone_else_could_have_published(rundir: Path) -> None:
    """``/tmp/vdistream-<uid>``, the fallback runtime directory, may have been made by
    another user before we ever published: a set found there is not ours, and an engine
    that opened it would hand its data (a backup fed from stdin) to a stranger. The
    publisher refuses such a directory; the engine must too."""
    top = rundir.parent / "tmp"
    top.mkdir(mode=0o755)
    os.chmod(top, 0o1777)  # like /tmp
    planted = top / "vdistream-0"
    planted.mkdir(mode=0o755)
    with _listen(planted / "nightly.sock"):
        os.chown(planted, 65534, 65534)  # a stranger's, in a place anyone may write to
        with pytest.raises(VDSecurityError, match="belongs to uid 65534"):
            RuntimeDirectory(planted).connect(None, "nightly")
        os.chmod(top, 0o755)  # a daemon user's directory in a protected place: trusted
        RuntimeDirectory(planted).connect(None, "nightly").close()
        os.chown(planted, 0, 0)
        os.chmod(planted, 0o777)  # ours, but anyone may have published in it
        with pytest.raises(VDSecurityError, match="writable by others"):
            RuntimeDirectory(planted).connect(None, "nightly")


async def test_a_position_the_record_cannot_carry_does_not_lose_the_completion(
    rundir: Path,
) -> None:
    async with serving(rundir) as served:
        engine, (dev0, _) = await active(served)
        try:
            engine.send(wire.SendCommand(8, 0, CommandCode.GET_POSITION))
            command = await dev0.get_command(1)
            dev0.complete_command(command, Completion.SUCCESS, 0, 1 << 64)  # not an i64
            done = await engine.next(wire.CompletionRecord)
            assert (done.id, done.completion, done.position) == (8, 0, (1 << 63) - 1)
        finally:
            engine.close()
        assert isinstance(await served.result(), VDAbortError)
