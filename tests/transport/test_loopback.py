"""Engines over a real socket: the client set served with ``serve_set`` in this
process, the engine side a ``RemoteServerVirtualDeviceSet`` (through a
``RemoteRegistry``) in this process too; the records cross a real ``SOCK_SEQPACKET``
socket and the buffer area is mapped twice from its memfds. ``test_engine_process.py``
puts the engine in a process of its own."""

from __future__ import annotations

import os
import random
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from tests.engines.fake_client import BLOCK, CHUNK, OPTIONS, Fail, FakeClient
from vdistream.engines import (
    BytesConsumer,
    CommandFailedError,
    EngineAbortedError,
    EngineResult,
    StripedBackup,
    StripedRestore,
)
from vdistream.engines.base import Engine
from vdistream.engines.faults import Action, FailPoint, Phase
from vdistream.errors import VDAbortError
from vdistream.protocol import CommandCode, Completion, Features
from vdistream.transport.engine import RemoteRegistry
from vdistream.transport.host import HostResult, serve_set
from vdistream.transport.rendezvous import RuntimeDirectory
from vdistream.vdi import Registry

pytestmark = pytest.mark.asyncio


@pytest.fixture
def directory() -> Iterator[RuntimeDirectory]:
    # Short: a socket path must fit in sun_path (107 bytes).
    path = Path(tempfile.mkdtemp(prefix="vdl-", dir="/tmp"))
    try:
        yield RuntimeDirectory(path / "rt")
    finally:
        shutil.rmtree(path, ignore_errors=True)


async def run_remote(
    engine: Engine,
    client: FakeClient,
    local: Registry,
    directory: RuntimeDirectory,
    *,
    limit: float = 10.0,
) -> tuple[EngineResult | Exception, HostResult | Exception]:
    """The client and its host in one task each, the engine over a RemoteRegistry;
    what the engine and the host ended with (results or errors)."""
    outcome: dict[str, Any] = {}

    async def host(*, task_status: Any) -> None:
        try:
            outcome["host"] = await serve_set(
                client.name,
                registry=local,
                directory=directory,
                connect_timeout=5.0,
                task_status=task_status,
            )
        except Exception as exc:
            outcome["host"] = exc

    with anyio.fail_after(limit):
        async with anyio.create_task_group() as tg:
            tg.start_soon(client.run)
            await tg.start(host)
            try:
                outcome["engine"] = await engine.run(
                    client.name, registry=RemoteRegistry(directory)
                )
            except Exception as exc:
                outcome["engine"] = exc
    return outcome["engine"], outcome["host"]


def payload(size: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(size)


@pytest.mark.parametrize(("devices", "features"), [(1, 0), (3, 0), (4, Features.RANDOM_ACCESS)])
async def test_striped_backup_then_restore_across_the_socket_matches_in_process(
    directory: RuntimeDirectory, devices: int, features: int
) -> None:
    data = payload(7 * CHUNK + 1234)
    local = Registry()
    client = FakeClient(local, devices, features=features)
    result, hosted = await run_remote(StripedBackup(data, OPTIONS), client, local, directory)
    assert isinstance(result, EngineResult), result
    assert isinstance(hosted, HostResult), hosted
    assert hosted.engine_pid == os.getpid()
    assert client.closed == [True] * devices
    assert not client.aborted
    assert result.logical_bytes == len(data)
    assert sum(d.bytes for d in result.devices) == sum(len(s) for s in client.streams)
    # The same backup in-process writes the same streams (the backup id aside).
    inproc_registry = Registry()
    inproc = FakeClient(inproc_registry, devices, features=features)
    engine = StripedBackup(data, OPTIONS, backup_id=uuid.UUID(result.backup_id))
    async with anyio.create_task_group() as tg:
        tg.start_soon(inproc.run)
        await engine.run(inproc.name, registry=inproc_registry)
    assert inproc.streams == client.streams
    assert [d.commands for d in result.devices] == [
        {code: n for code, n in d.commands.items()} for d in hosted.devices
    ]

    # And back: a restore across the socket gives the data again.
    local = Registry()
    reader = FakeClient(local, devices, features=features, streams=client.streams)
    target = BytesConsumer()
    restored, hosted = await run_remote(StripedRestore(target, OPTIONS), reader, local, directory)
    assert isinstance(restored, EngineResult), restored
    assert isinstance(hosted, HostResult), hosted
    assert target.getvalue() == data
    assert all(CommandCode.CLEAR_ERROR in codes for codes in reader.codes)


async def test_out_of_order_completions_and_a_small_pool(directory: RuntimeDirectory) -> None:
    data = payload(20 * CHUNK)
    local = Registry()
    client = FakeClient(local, 2, batch=3, delay=0.01)
    options = OPTIONS.__class__(block_size=BLOCK, max_transfer_size=CHUNK, buffer_count=6)
    result, hosted = await run_remote(StripedBackup(data, options), client, local, directory)
    assert isinstance(result, EngineResult), result
    assert isinstance(hosted, HostResult), hosted
    assert max(client.max_held) > 1  # several commands outstanding per device


async def test_a_failed_write_fails_the_engine_with_the_clients_code(
    directory: RuntimeDirectory,
) -> None:
    local = Registry()
    client = FakeClient(local, 2, fail=Fail(1, CommandCode.WRITE, Completion.DISK_FULL, nth=1))
    result, hosted = await run_remote(
        StripedBackup(payload(6 * CHUNK), OPTIONS), client, local, directory
    )
    assert isinstance(result, CommandFailedError), result
    assert result.completion == Completion.DISK_FULL
    assert result.device == f"{client.name}1"
    assert isinstance(hosted, VDAbortError), hosted
    assert client.aborted


async def test_the_clients_abort_reaches_the_engine_with_its_reason(
    directory: RuntimeDirectory,
) -> None:
    local = Registry()
    client = FakeClient(local, 2, abort_after=5)
    result, hosted = await run_remote(
        StripedBackup(payload(30 * CHUNK), OPTIONS), client, local, directory
    )
    assert isinstance(result, EngineAbortedError), result
    assert result.reason == "the client signalled abort"
    assert isinstance(hosted, VDAbortError)


@pytest.mark.parametrize("action", [Action.SIGNAL_ABORT, Action.RAISE])
async def test_an_engine_fault_mid_stream_aborts_the_clients_set(
    directory: RuntimeDirectory, action: Action
) -> None:
    local = Registry()
    client = FakeClient(local, 2)
    point = FailPoint(Phase.MID_STREAM, action, after_commands=4)
    engine = StripedBackup(payload(30 * CHUNK), OPTIONS, fail_at=point)
    result, hosted = await run_remote(engine, client, local, directory)
    assert type(result).__name__ == "InjectedFaultError", result
    assert isinstance(hosted, VDAbortError), hosted
    assert client.aborted
    assert client.vds.state.name == "DNE"


async def test_cancelling_the_engine_aborts_the_clients_set(
    directory: RuntimeDirectory,
) -> None:
    local = Registry()
    client = FakeClient(local, 1, delay=0.05)
    hosted: list[Any] = []

    async def host(*, task_status: Any) -> None:
        try:
            hosted.append(
                await serve_set(
                    client.name, registry=local, directory=directory, task_status=task_status
                )
            )
        except Exception as exc:
            hosted.append(exc)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(client.run)
            await tg.start(host)
            with anyio.move_on_after(0.3):
                await StripedBackup(payload(100 * CHUNK), OPTIONS).run(
                    client.name, registry=RemoteRegistry(directory)
                )
    (error,) = hosted
    assert isinstance(error, VDAbortError), error
    assert client.aborted
    assert "signalled abort" in str(error) or "closed the set" in str(error)


async def test_64_devices(directory: RuntimeDirectory) -> None:
    data = payload(70 * BLOCK * 4)
    options = OPTIONS.__class__(block_size=BLOCK, max_transfer_size=CHUNK, buffer_count=80)
    local = Registry()
    client = FakeClient(local, 64)
    result, hosted = await run_remote(StripedBackup(data, options), client, local, directory)
    assert isinstance(result, EngineResult), result
    assert isinstance(hosted, HostResult), hosted
    assert len(hosted.devices) == 64
    assert client.closed == [True] * 64
    local = Registry()
    reader = FakeClient(local, 64, streams=client.streams)
    target = BytesConsumer()
    restored, hosted = await run_remote(StripedRestore(target, options), reader, local, directory)
    assert isinstance(restored, EngineResult), restored
    assert target.getvalue() == data
