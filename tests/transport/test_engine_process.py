"""The engine side in another process, for real: a ``StripedBackup`` / ``StripedRestore``
run by ``python -c`` over a ``RemoteRegistry`` against a client set this test serves,
and the death (kill -9) of either process mid-backup."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import anyio.lowlevel
import pytest
from anyio.streams.buffered import BufferedByteReceiveStream

from tests.engines.fake_client import FakeClient
from vdistream.errors import VDAbortError
from vdistream.protocol import CommandCode, Completion, Features, ServerState, SetAbortCause
from vdistream.transport.engine import RemoteServerVirtualDeviceSet
from vdistream.transport.host import HostResult, serve_set
from vdistream.transport.rendezvous import RuntimeDirectory
from vdistream.vdi import Registry

pytestmark = pytest.mark.asyncio

ROOT = Path(__file__).resolve().parents[2]
BLOCK = 4096
CHUNK = 65536

#: The engine process: argv = directory, set name, "backup" SOURCE | "restore" TARGET.
ENGINE = textwrap.dedent(
    """
    import functools, json, sys
    import anyio
    from vdistream.engines import StripedBackup, StripedRestore, StripingOptions
    from vdistream.transport.engine import RemoteRegistry
    from vdistream.transport.rendezvous import RuntimeDirectory

    directory, name, mode, path = sys.argv[1:5]
    options = StripingOptions(block_size=4096, max_transfer_size=65536)
    if mode == "backup":
        engine = StripedBackup(path, options)
    else:
        engine = StripedRestore(path, options)
    run = functools.partial(engine.run, name, registry=RemoteRegistry(RuntimeDirectory(directory)))
    print("ready", flush=True)
    try:
        result = anyio.run(run)
    except Exception as exc:
        print(json.dumps({"error": type(exc).__name__, "message": str(exc)}), flush=True)
        sys.exit(1)
    print(json.dumps({"bytes": result.logical_bytes, "backup_id": result.backup_id}), flush=True)
    """
)

#: The client process: argv = directory, set name; serves a 1-device set whose client
#: takes the commands slowly, prints each one, and never finishes on its own.
CLIENT = textwrap.dedent(
    """
    import sys
    import anyio
    from vdistream.protocol import Completion, VDConfig
    from vdistream.transport.host import serve_set
    from vdistream.transport.rendezvous import RuntimeDirectory
    from vdistream.vdi import ClientVirtualDeviceSet, Registry

    directory, name = sys.argv[1:3]

    async def main():
        local = Registry()
        client = ClientVirtualDeviceSet(registry=local)
        client.create(name, VDConfig(device_count=1))
        async with anyio.create_task_group() as tg:
            tg.start_soon(
                lambda: serve_set(name, registry=local, directory=RuntimeDirectory(directory))
            )
            await client.get_configuration(10)
            device = client.open_device(name)
            while True:
                command = await device.get_command(10)
                print("command", command.code.name, flush=True)
                if command.code.name != "WRITE":
                    device.complete_command(command, Completion.SUCCESS)

    anyio.run(main)
    """
)


@pytest.fixture
def directory() -> Iterator[RuntimeDirectory]:
    path = Path(tempfile.mkdtemp(prefix="vdp-", dir="/tmp"))  # short: sun_path
    try:
        yield RuntimeDirectory(path / "rt")
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


async def _serve(client: FakeClient, local: Registry, directory: RuntimeDirectory) -> Any:
    try:
        return await serve_set(client.name, registry=local, directory=directory, connect_timeout=10)
    except Exception as exc:
        return exc


def _memfd_maps() -> set[str]:
    """The memfd mappings of this process (``/proc/self/maps``: range and inode)."""
    with open("/proc/self/maps") as maps:
        return {
            f"{fields[0]} {fields[4]}"
            for fields in (line.split() for line in maps)
            if len(fields) >= 6 and fields[5].startswith("/memfd:")
        }


def _memfds() -> set[str]:
    """The memfds this process holds open (``memfd:NAME (deleted)`` and the inode)."""
    found = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("/memfd:"):
            found.add(f"{target} {os.stat(f'/proc/self/fd/{fd}').st_ino}")
    return found


async def test_a_striped_backup_and_restore_in_another_process(
    directory: RuntimeDirectory, tmp_path: Path
) -> None:
    data = random.Random(7).randbytes(9 * CHUNK + 321)
    source = tmp_path / "source"
    source.write_bytes(data)
    local = Registry()
    client = FakeClient(local, 3, features=Features.RANDOM_ACCESS)
    hosted: list[Any] = []

    async def host() -> None:
        hosted.append(await _serve(client, local, directory))

    with anyio.fail_after(15):
        async with anyio.create_task_group() as tg:
            tg.start_soon(client.run)
            tg.start_soon(host)
            await anyio.lowlevel.checkpoint()  # published before the engine starts looking
            done = await anyio.run_process(
                [sys.executable, "-c", ENGINE, str(directory.path), client.name, "backup", source],
                env=_env(),
                check=False,
            )
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout.decode().splitlines()[-1])
    assert report["bytes"] == len(data)
    (result,) = hosted
    assert isinstance(result, HostResult), result
    assert result.engine_pid != os.getpid()
    assert client.closed == [True] * 3
    assert not client.aborted
    assert sum(len(s) for s in client.streams) == sum(d.bytes for d in result.devices)
    assert not (directory.path / f"{client.name}.sock").exists()  # the name is free again

    # And back, into a file the engine process writes.
    target = tmp_path / "target"
    local = Registry()
    reader = FakeClient(local, 3, features=Features.RANDOM_ACCESS, streams=client.streams)
    hosted.clear()
    client = reader
    with anyio.fail_after(15):
        async with anyio.create_task_group() as tg:
            tg.start_soon(reader.run)
            tg.start_soon(host)
            await anyio.lowlevel.checkpoint()
            done = await anyio.run_process(
                [sys.executable, "-c", ENGINE, str(directory.path), reader.name, "restore", target],
                env=_env(),
                check=False,
            )
    assert done.returncode == 0, done.stdout + done.stderr
    assert target.read_bytes() == data
    assert isinstance(hosted[0], HostResult), hosted


async def test_kill_9_of_the_engine_mid_backup_aborts_the_client_within_a_second(
    directory: RuntimeDirectory, tmp_path: Path
) -> None:
    source = tmp_path / "source"
    source.write_bytes(bytes(64 * CHUNK))
    before = _memfds()
    local = Registry()
    client = FakeClient(local, 2, delay=0.02)
    hosted: list[Any] = []

    async def host() -> None:
        hosted.append(await _serve(client, local, directory))

    with anyio.fail_after(15):
        async with anyio.create_task_group() as tg:
            tg.start_soon(client.run)
            tg.start_soon(host)
            await anyio.lowlevel.checkpoint()
            process = await anyio.open_process(
                [sys.executable, "-c", ENGINE, str(directory.path), client.name, "backup", source],
                env=_env(),
            )
            async with process:
                while sum(len(s) for s in client.seen) < 4:  # noqa: ASYNC110 - the client's count
                    await anyio.sleep(0.01)
                process.send_signal(signal.SIGKILL)
                killed = time.monotonic()
                await process.wait()
            with anyio.fail_after(1):
                while not hosted:  # noqa: ASYNC110 - serve_set's outcome
                    await anyio.sleep(0.005)
            assert time.monotonic() - killed < 1.0
    (error,) = hosted
    assert isinstance(error, VDAbortError), error
    assert str(process.pid) in str(error)  # the reason names the engine that died
    assert client.aborted
    assert client.vds.state is client.vds.state.DNE
    assert not (directory.path / f"{client.name}.sock").exists()
    assert not (directory.path / f"{client.name}.lock").exists()
    assert _memfds() <= before


async def test_kill_9_of_the_client_mid_backup_aborts_the_engine_within_a_second(
    directory: RuntimeDirectory,
) -> None:
    name = "victim"
    before, mapped_before = _memfds(), _memfd_maps()
    with anyio.fail_after(15):
        process = await anyio.open_process(
            [sys.executable, "-c", CLIENT, str(directory.path), name], env=_env()
        )
        async with process:
            assert process.stdout is not None
            lines = BufferedByteReceiveStream(process.stdout)
            sds = RemoteServerVirtualDeviceSet(directory=directory)
            async with sds:
                while True:  # until the client process published the set
                    try:
                        await sds.open(None, name)
                        break
                    except Exception:
                        await anyio.sleep(0.02)
                await sds.begin_configuration(Features.WRITE_MEDIA, BLOCK, 0, CHUNK)
                await sds.request_buffers(CHUNK, 0, 2)
                await sds.end_configuration()
                (device,) = [await sds.open_device(name)]
                await sds.wait_active(5)
                buffer = await sds.allocate_buffer(CHUNK)
                buffer[:4] = b"data"
                write = device.send_command(CommandCode.WRITE, CHUNK, 0, buffer)
                assert await lines.receive_until(b"\n", 100) == b"command WRITE"
                assert _memfd_maps() - mapped_before  # the area is mapped here
                process.send_signal(signal.SIGKILL)
                killed = time.monotonic()
                with anyio.fail_after(1):
                    result = await write
                    with pytest.raises(VDAbortError, match="the client process died"):
                        await sds.allocate_buffer(CHUNK)
                assert time.monotonic() - killed < 1.0
                assert result.completion == Completion.OPERATION_ABORTED
                assert sds.state is ServerState.ABORTED
                assert sds.aborted_by is SetAbortCause.PROCESS_DEATH
                await sds.close()
            await process.wait()
    assert sds.state is ServerState.DNE
    assert _memfds() <= before
    assert _memfd_maps() <= mapped_before  # unmapped at close
