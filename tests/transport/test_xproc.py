"""Sets across processes, the cases the behaviour suite cannot express: the death of
either process mid-backup (kill -9), a peer of another uid, 64 devices on one set.

The behaviour suite itself (``tests/vdi``) runs a second time across processes (its
``xproc`` cases); here each test builds what it needs from real processes: the engine
side in ``tests/transport/agent.py engine`` (driven through ``remote_proxy``), or a
client process ``agent.py client`` that publishes a set and pumps it.
"""

from __future__ import annotations

import contextlib
import gc
import os
import signal
import stat
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from tests.transport.remote_proxy import ROOT, AgentProcess, World
from vdistream import (
    ClientState,
    ClientVirtualDeviceSet,
    CommandCode,
    Completion,
    Features,
    Registry,
    ServerState,
    VDAbortError,
    VDClosedError,
    VDConfig,
    VDInvalidError,
    VDSecurityError,
)
from vdistream.protocol import CommandResult, SetAbortCause
from vdistream.transport.engine import RemoteServerVirtualDeviceSet
from vdistream.transport.host import serve_set
from vdistream.transport.rendezvous import RuntimeDirectory

pytestmark = pytest.mark.asyncio
BLOCK = 65536
NOBODY = 65534


def descriptors(kind: str) -> set[tuple[int, int]]:
    """(device, inode) of every descriptor of this process whose link starts with
    ``kind`` (``/memfd:`` or ``socket:``)."""
    found = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
            st = os.stat(f"/proc/self/fd/{name}")
        except OSError:
            continue
        if target.startswith(kind):
            found.add((st.st_dev, st.st_ino))
    return found


def memfds() -> set[tuple[int, int]]:
    return descriptors("/memfd:")


def sockets() -> set[tuple[int, int]]:
    return descriptors("socket:")


def names(name: str, count: int) -> list[str]:
    return [name] + [f"{name}{i}" for i in range(1, count)]


@pytest.fixture
def rundir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="vd", dir="/tmp"))  # short: sun_path is 107 bytes
    yield path
    for child in sorted(path.rglob("*"), reverse=True):
        with contextlib.suppress(OSError):
            child.unlink() if not child.is_dir() else child.rmdir()
    with contextlib.suppress(OSError):
        path.rmdir()


@pytest.fixture
def killable() -> Iterator[list[AgentProcess]]:
    """Agents a test kills (its own, not the module's)."""
    agents: list[AgentProcess] = []
    yield agents
    for agent in agents:
        agent.kill()
        agent.sock.close()


async def test_engine_killed_mid_backup(killable: list[AgentProcess]) -> None:
    """kill -9 of the engine's process while a command is outstanding and a pump waits:
    the client's waits end with VDAbortError (cause PROCESS_DEATH) within a second,
    the host ends with the same abort, nothing stays published, no memfd or socket
    leaks."""
    before, sockets_before = memfds(), sockets()
    agent = AgentProcess()
    killable.append(agent)
    world = await World.xproc_on(agent)
    assert world.directory is not None
    try:
        client = ClientVirtualDeviceSet(registry=world.registry)
        client.create("victim", VDConfig(device_count=2))
        engine = world.server_set()
        await engine.open(None, "victim")
        await engine.begin_configuration(Features.WRITE_MEDIA, 4096, 0, BLOCK)
        await engine.request_buffers(BLOCK, 0, 4)
        await engine.end_configuration()
        await client.get_configuration(5)
        cdevs = [client.open_device(n) for n in names("victim", 2)]
        sdevs = [await engine.open_device(n) for n in names("victim", 2)]
        await engine.wait_active(5)
        assert (world.directory / "victim.sock").exists()

        first = await engine.allocate_buffer(BLOCK)
        first[:] = b"a" * BLOCK
        done = sdevs[0].send_command(CommandCode.WRITE, BLOCK, 0, first)
        command = await cdevs[0].get_command(5)
        assert command.buffer is not None
        assert bytes(command.buffer[:4]) == b"aaaa"  # the engine's bytes, in place
        cdevs[0].complete_command(command, Completion.SUCCESS, BLOCK)
        assert (await done).completion == Completion.SUCCESS
        second = await engine.allocate_buffer(BLOCK)
        sdevs[0].send_command(CommandCode.WRITE, BLOCK, BLOCK, second)
        held = await cdevs[0].get_command(5)  # outstanding: the engine dies before its completion

        ended: list[float] = []

        async def pump() -> None:
            with pytest.raises(VDAbortError) as info:
                await cdevs[1].get_command(None)
            ended.append(time.monotonic())
            assert "disconnected" in str(info.value)

        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                tg.start_soon(pump)
                await anyio.sleep(0.05)
                killed = time.monotonic()
                os.kill(agent.pid, signal.SIGKILL)
        assert ended[0] - killed < 1.0
        assert client.state is ClientState.ABORTED
        assert client.aborted_by is SetAbortCause.PROCESS_DEATH
        assert f"pid {agent.pid}" in (client.abort_reason or "")
        with pytest.raises(VDAbortError):
            cdevs[0].complete_command(held, Completion.SUCCESS, BLOCK)
        assert world.host_ended is not None
        with anyio.fail_after(5):
            await world.host_ended.wait()
        assert isinstance(world.host_errors[0], VDAbortError)
        client.close()
    finally:
        await world.close()
    agent.process.wait(5)
    assert agent.process.returncode == -signal.SIGKILL
    # nothing published, nothing leaked
    assert not (world.directory / "victim.sock").exists()
    assert not (world.directory / "victim.lock").exists()
    agent.sock.close()  # the control socket: the test's own
    gc.collect()
    assert memfds() <= before
    assert sockets() <= sockets_before


async def test_client_killed_mid_backup(rundir: Path) -> None:
    """kill -9 of the client's process (which publishes and pumps the set) while a
    command is outstanding and the engine waits for a buffer: every wait of the engine
    side ends within a second (OPERATION_ABORTED, VDAbortError), cause PROCESS_DEATH;
    the dead client's name is not published any more and can be taken over."""
    before, sockets_before = memfds(), sockets()
    process = await anyio.open_process(
        [sys.executable, "-m", "tests.transport.agent", "client", str(rundir), "orphan", "2"],
        cwd=ROOT,
        stderr=None,
    )
    try:
        assert process.stdout is not None
        with anyio.fail_after(10):
            line = await process.stdout.receive()
        assert line == b"ready\n"
        directory = RuntimeDirectory(rundir)
        async with RemoteServerVirtualDeviceSet(directory=directory) as engine:
            await engine.open(None, "orphan")
            assert engine.get_configuration().device_count == 2
            await engine.begin_configuration(Features.WRITE_MEDIA, 4096, 0, BLOCK)
            await engine.request_buffers(BLOCK, 0, 2)
            await engine.end_configuration()
            devices = [await engine.open_device(n) for n in names("orphan", 2)]
            await engine.wait_active(5)
            buffers = [await engine.allocate_buffer(BLOCK) for _ in range(2)]
            for i, buffer in enumerate(buffers):
                buffer[:] = bytes([i + 1]) * BLOCK
            with anyio.fail_after(5):
                first = await devices[0].send_command(CommandCode.WRITE, BLOCK, 0, buffers[0])
            assert first.completion == Completion.SUCCESS  # the child's pump took it
            # the child completes only its first command per device: this one stays out
            outstanding = devices[0].send_command(CommandCode.WRITE, BLOCK, BLOCK, buffers[1])
            await anyio.sleep(0.1)
            assert not outstanding.done()
            ended: dict[str, float] = {}
            results: list[CommandResult] = []

            async def allocate() -> None:  # waits: both buffers are in use
                await engine.allocate_buffer(BLOCK)

            async def expect_abort(label: str) -> None:
                with pytest.raises(VDAbortError):
                    await allocate()
                ended[label] = time.monotonic()

            async def wait_outstanding() -> None:
                results.append(await outstanding)
                ended["command"] = time.monotonic()

            with anyio.fail_after(5):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(expect_abort, "allocate")
                    tg.start_soon(wait_outstanding)
                    await anyio.sleep(0.05)
                    killed = time.monotonic()
                    process.send_signal(signal.SIGKILL)
            assert ended["allocate"] - killed < 1.0
            assert ended["command"] - killed < 1.0
            assert results[0].completion == Completion.OPERATION_ABORTED
            assert engine.state is ServerState.ABORTED
            assert engine.aborted_by is SetAbortCause.PROCESS_DEATH
            await engine.close()
    finally:
        if process.returncode is None:
            process.kill()
        with anyio.fail_after(5):
            await process.wait()
        await process.aclose()
    # Ended (by the SIGKILL above). Its exact status is not asserted: in a long run
    # asyncio's child watcher has once found the pid already reaped and reported 255.
    assert process.returncode is not None
    # The dead client left its files, but nothing is published under the name...
    with pytest.raises(VDInvalidError, match="no virtual device set named 'orphan'"):
        directory.connect(None, "orphan").close()
    # ...and the next publisher takes the stale name over.
    publication = directory.publish(None, "orphan")
    publication.close()
    assert not (rundir / "orphan.sock").exists()
    gc.collect()
    assert memfds() <= before
    assert sockets() <= sockets_before


@pytest.fixture
def nobody() -> Iterator[AgentProcess]:
    agent = AgentProcess(user=NOBODY)
    yield agent
    agent.stop()


async def test_peer_of_another_uid_is_refused(rundir: Path, nobody: AgentProcess) -> None:
    """An engine running as nobody is refused: by the socket's mode by default, and by
    the peer check (SO_PEERCRED) when the files would let it in. A refused peer does not
    count: the set still takes the right engine afterwards."""
    directory = RuntimeDirectory(rundir)
    registry = Registry()
    name = "guarded"
    client = ClientVirtualDeviceSet(registry=registry)
    client.create(name, VDConfig(device_count=1))
    outsider = await World.xproc_on(nobody)  # only for its control socket's reader
    connection = nobody.connection

    async def nobody_opens() -> BaseException:
        _, handle, _, _ = connection.call_sync("new", str(rundir))
        try:
            # awaited: the refusal needs this process's host to run meanwhile
            await connection.call("call", handle, "open", (None, name, 5), {})
        except Exception as exc:  # the refusal is the point
            return exc
        finally:
            connection.call_sync("drop", handle)
        raise AssertionError("nobody opened the set")

    result: list[object] = []
    try:
        async with anyio.create_task_group() as tg:

            async def host(*, task_status: anyio.abc.TaskStatus[Path]) -> None:
                result.append(
                    await serve_set(
                        name,
                        registry=registry,
                        directory=directory,
                        connect_timeout=10,
                        task_status=task_status,
                    )
                )

            path = await tg.start(host)
            assert stat.S_IMODE(path.stat().st_mode) == 0o600
            # 1. the default modes keep another user out before any peer check
            refusal = await nobody_opens()
            assert isinstance(refusal, VDSecurityError), refusal
            # 2. files open to everyone: the peer check still refuses uid 65534
            os.chmod(rundir, 0o755)
            os.chmod(path, 0o777)
            refusal = await nobody_opens()
            assert isinstance(refusal, VDSecurityError), refusal
            assert f"uid {NOBODY} may not open" in str(refusal)
            # 3. the refused peers did not count: our own engine is served
            async with RemoteServerVirtualDeviceSet(directory=directory) as engine:
                await engine.open(None, name)
                await engine.begin_configuration(Features.WRITE_MEDIA, 4096, 0, BLOCK)
                await engine.request_buffers(BLOCK, 0, 1)
                await engine.end_configuration()
                await client.get_configuration(5)
                cdev = client.open_device(name)
                sdev = await engine.open_device(name)
                await sdev.close_device()
                with pytest.raises(VDClosedError):
                    await cdev.get_command(5)
                await engine.close()
    finally:
        client.close()
        await outsider.close()
    (served,) = result
    assert served.engine_uid == os.getuid()  # type: ignore[attr-defined]


async def test_64_devices_through_one_set(xproc_world: World, xproc_agent: AgentProcess) -> None:
    """The most devices a set has, each with its own stream, in both directions, the
    engine side in the agent process."""
    world = xproc_world
    count = 64
    client = ClientVirtualDeviceSet(registry=world.registry)
    client.create("wide", VDConfig(device_count=count))
    engine = world.server_set()
    await engine.open(None, "wide")
    await engine.begin_configuration(Features.WRITE_MEDIA | Features.READ_MEDIA, 4096, 0, BLOCK)
    await engine.request_buffers(BLOCK, 0, count)
    await engine.end_configuration()
    assert (await client.get_configuration(5)).device_count == count
    cdevs = [client.open_device(n) for n in names("wide", count)]
    sdevs = [await engine.open_device(n) for n in names("wide", count)]
    await engine.wait_active(5)
    buffers = [await engine.allocate_buffer(BLOCK) for _ in range(count)]
    for i, buffer in enumerate(buffers):
        buffer[:] = i.to_bytes(2, "little") * (BLOCK // 2)
    writes = [
        sdev.send_command(CommandCode.WRITE, BLOCK, 0, buffer)
        for sdev, buffer in zip(sdevs, buffers, strict=True)
    ]
    with anyio.fail_after(10):
        for i, cdev in enumerate(cdevs):
            command = await cdev.get_command(5)
            assert command.buffer is not None
            assert bytes(command.buffer) == i.to_bytes(2, "little") * (BLOCK // 2)
            cdev.complete_command(command, Completion.SUCCESS, BLOCK)
        assert [(await w).bytes_transferred for w in writes] == [BLOCK] * count
        reads = [
            sdev.send_command(CommandCode.READ, BLOCK, 0, buffer)
            for sdev, buffer in zip(sdevs, buffers, strict=True)
        ]
        for i, cdev in enumerate(reversed(cdevs)):  # completed in another order
            command = await cdev.get_command(5)
            assert command.buffer is not None
            command.buffer[:] = bytes([i]) * BLOCK
            cdev.complete_command(command, Completion.SUCCESS, BLOCK)
        assert [(await r).completion for r in reads] == [Completion.SUCCESS] * count
    # the client's bytes are in the engine's buffers (the same pages)
    for i, buffer in enumerate(reversed(buffers)):
        assert bytes(buffer[:8]) == bytes([i]) * 8
    for sdev in sdevs:
        await sdev.close_device()
    for cdev in cdevs:
        with pytest.raises(VDClosedError):
            await cdev.get_command(5)
    await engine.close()
    assert client.state is ClientState.NORMALLY_TERMINATED
    client.close()
    assert world.host_ended is not None
    with anyio.fail_after(5):
        await world.host_ended.wait()
    (result,) = world.host_results
    assert (result.engine_pid, result.engine_uid) == (xproc_agent.pid, os.getuid())
    assert [d.bytes for d in result.devices] == [2 * BLOCK] * count
    assert all(d.commands[CommandCode.WRITE] == 1 for d in result.devices)
    assert all(d.commands[CommandCode.READ] == 1 for d in result.devices)
