"""``serve_set`` with a real engine process (``RemoteServerVirtualDeviceSet``): bytes
written in the other process reach the client through the shared memfd, and kill -9
of that process aborts the set here within a second, leaking no fd and leaving
nothing published."""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
from anyio.streams.buffered import BufferedByteReceiveStream

from vdistream.errors import VDAbortError, VDClosedError
from vdistream.protocol import CommandCode, Completion, SetAbortCause, VDConfig
from vdistream.transport.host import HostResult, serve_set
from vdistream.transport.rendezvous import RuntimeDirectory
from vdistream.vdi import ClientVirtualDeviceSet, Registry

pytestmark = pytest.mark.asyncio

_ENGINE = textwrap.dedent(
    """
    import sys
    import anyio
    from vdistream.protocol import CommandCode, Features
    from vdistream.transport.engine import RemoteServerVirtualDeviceSet
    from vdistream.transport.rendezvous import RuntimeDirectory

    async def main(folder, mode):
        server = RemoteServerVirtualDeviceSet(directory=RuntimeDirectory(folder))
        async with server:
            await server.open(None, "pub")
            await server.begin_configuration(Features.WRITE_MEDIA, 512, 0, 65536)
            await server.request_buffers(65536, 0, 2)
            await server.end_configuration()
            device = await server.open_device("pub")
            await server.wait_active(5)
            buffer = await server.allocate_buffer(65536)
            buffer[:11] = b"from engine"
            result = await device.send_command(CommandCode.WRITE, 11, 0, buffer)
            print("completed", result.completion, result.bytes_transferred, flush=True)
            if mode == "hang":
                device.send_command(CommandCode.FLUSH)
                print("hanging", flush=True)
                await anyio.sleep(60)
            server.free_buffer(buffer)
            await device.close_device()
            await server.close()
        print("closed", flush=True)

    anyio.run(main, sys.argv[1], sys.argv[2])
    """
)


@pytest.fixture
def rundir() -> Iterator[Path]:
    top = Path(tempfile.mkdtemp(prefix="vdp", dir="/tmp"))
    yield top / "run"
    shutil.rmtree(top, ignore_errors=True)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def serve_one(rundir: Path, mode: str) -> None:
    before = open_fds()
    registry = Registry()
    client = ClientVirtualDeviceSet(registry=registry)
    client.create("local", VDConfig(device_count=1))
    directory = RuntimeDirectory(rundir)
    outcome: list[HostResult | BaseException] = []

    async def run(*, task_status: anyio.abc.TaskStatus[Path]) -> None:
        try:
            outcome.append(
                await serve_set(
                    "pub",
                    registry=registry,
                    set_name="local",
                    directory=directory,
                    connect_timeout=5,
                    task_status=task_status,
                )
            )
        except Exception as exc:
            outcome.append(exc)

    async with anyio.create_task_group() as tg:
        path = await tg.start(run)
        async with await anyio.open_process(
            [sys.executable, "-c", _ENGINE, str(rundir), mode], stderr=None
        ) as child:
            assert child.stdout is not None
            lines = BufferedByteReceiveStream(child.stdout)
            await client.get_configuration(5)
            device = client.open_device("local")
            command = await device.get_command(5)
            assert command.code is CommandCode.WRITE
            assert command.buffer is not None
            assert bytes(command.buffer) == b"from engine"  # the engine's pages
            device.complete_command(command, Completion.SUCCESS, 11)
            with anyio.fail_after(5):
                text = (await lines.receive_until(b"\n", 1000)).decode()
            assert text.startswith("completed 0 11"), text
            if mode == "hang":
                flush = await device.get_command(5)
                assert flush.code is CommandCode.FLUSH
                with anyio.fail_after(5):
                    await lines.receive_until(b"\n", 1000)
                child.send_signal(signal.SIGKILL)
                started = time.monotonic()
                with pytest.raises(VDAbortError, match="disconnected before it closed"):
                    await device.get_command(5)
                assert time.monotonic() - started < 1.0
                assert client.aborted_by is SetAbortCause.PROCESS_DEATH
            else:
                with pytest.raises(VDClosedError):
                    await device.get_command(5)
            await child.wait()
    client.close()
    if mode == "hang":
        assert isinstance(outcome[0], VDAbortError)
    else:
        assert isinstance(outcome[0], HostResult), outcome[0]
        assert outcome[0].devices[0].bytes == 11
    assert not path.exists()
    assert not path.with_suffix(".lock").exists()
    assert open_fds() == before


async def test_an_engine_process_backs_up_through_the_shared_pages(rundir: Path) -> None:
    await serve_one(rundir, "normal")


async def test_kill_9_of_the_engine_process_aborts_within_a_second(rundir: Path) -> None:
    await serve_one(rundir, "hang")
