"""The C example engine (``examples/c-engine``) against vdistream's own client side.

The engine is compiled with the system C compiler, exactly as its README says, and
run as a real process: it opens a set that ``serve_set`` publishes in a private
runtime directory, maps the set's memfd, and backs standard input up into it (or
restores the set's stream to standard output). The client side is a real
``ClientVirtualDeviceSet`` whose devices are pumped here, storing or serving each
device's bytes, so the tests see the engine's stream layout byte for byte: a 512-byte
header per device (the README's "stream layout"), then the device's chunks; and they
serve a restore streams that were tampered with (swapped, mixed, truncated). Records
carry only (segment, offset): every byte the client reads from a WRITE's buffer was
put in the shared mapping by the C process, in place.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path

import anyio
import anyio.abc
import pytest

from vdistream import ClientVirtualDevice, ClientVirtualDeviceSet, Features, Registry, VDConfig
from vdistream.errors import VDAbortError, VDClosedError
from vdistream.protocol import Command, CommandCode, Completion, HResult
from vdistream.transport import wire
from vdistream.transport.host import HostResult, serve_set
from vdistream.transport.rendezvous import RuntimeDirectory

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "c-engine"
SOURCE = EXAMPLE / "vdistream-engine.c"
CFLAGS = ("-O2", "-Wall", "-Wextra", "-Werror")
KiB = 1024
MiB = 1024 * KiB

#: The stream header at the start of every device's stream (README, "the stream
#: layout"): magic, version, header size, chunk, device index, device count, reserved,
#: stream id; the rest of its 512 bytes are zero.
STREAM_HEADER = struct.Struct("<8sIIIIII16s")
HEADER_BLOCK = 512


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The engine, built with the README's command (warnings are errors)."""
    cc = shutil.which("cc") or shutil.which("gcc")
    assert cc is not None, "a C compiler (cc) is needed to build examples/c-engine"
    binary = tmp_path_factory.mktemp("c-engine") / "vdistream-engine"
    built = subprocess.run(
        [cc, *CFLAGS, "-o", str(binary), str(SOURCE)], capture_output=True, text=True
    )
    assert built.returncode == 0, f"{cc} failed:\n{built.stderr}"
    return binary


@pytest.fixture
def rundir() -> Iterator[Path]:
    """A short private runtime directory: socket paths must fit in sun_path (107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="vdce-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@dataclasses.dataclass
class Ran:
    returncode: int
    stdout: bytes
    stderr: str


async def run_engine(
    engine: Path, args: Sequence[str], stdin: bytes = b"", env: dict[str, str] | None = None
) -> Ran:
    """Run the engine to its end, feeding ``stdin`` and collecting both outputs. An
    engine that exits early (it failed) may leave input unread: that is not an error."""
    out = bytearray()
    err = bytearray()
    async with await anyio.open_process([str(engine), *args], env=env) as process:
        assert process.stdin is not None
        assert process.stdout is not None
        assert process.stderr is not None

        async def feed() -> None:
            assert process.stdin
            try:
                for at in range(0, len(stdin), 256 * KiB):
                    await process.stdin.send(stdin[at : at + 256 * KiB])
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                pass
            finally:
                await process.stdin.aclose()

        async def drain(stream: anyio.abc.ByteReceiveStream, into: bytearray) -> None:
            async for data in stream:
                into += data

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(feed)
                tg.start_soon(drain, process.stdout, out)
                tg.start_soon(drain, process.stderr, err)
            returncode = await process.wait()
    return Ran(returncode, bytes(out), err.decode())


def device_names(name: str, count: int) -> list[str]:
    return [name] + [f"{name}{i}" for i in range(1, count)]


#: Serves device ``index`` of the client set until its close.
Pump = Callable[[ClientVirtualDeviceSet, int, ClientVirtualDevice], Awaitable[None]]


async def serve(
    engine: Path,
    rundir: Path,
    name: str,
    config: VDConfig | int,
    pump: Pump,
    args: Sequence[str],
    stdin: bytes = b"",
    *,
    instance: str | None = None,
    local_name: str | None = None,
) -> tuple[HostResult | BaseException, Ran]:
    """Create the client set ``local_name or name``, publish it as ``name`` with
    ``serve_set``, run the engine with ``args`` (the mode, then options) against it and
    ``pump`` every device until its close. Returns what ``serve_set`` returned (or
    raised) and how the engine ran."""
    registry = Registry()
    client = ClientVirtualDeviceSet(registry=registry)
    if isinstance(config, int):
        config = VDConfig(device_count=config)
    devices = config.device_count
    local = local_name or name
    client.create_ex(instance, local, config)
    folder = rundir / instance.lower() if instance else rundir
    outcome: list[HostResult | BaseException] = []
    ran: list[Ran] = []

    async def host(*, task_status: anyio.abc.TaskStatus[Path] = anyio.TASK_STATUS_IGNORED) -> None:
        try:
            outcome.append(
                await serve_set(
                    name,
                    registry=registry,
                    set_name=local,
                    instance=instance,
                    directory=RuntimeDirectory(rundir),
                    connect_timeout=10,
                    task_status=task_status,
                )
            )
        except VDAbortError as exc:
            outcome.append(exc)

    async def engine_side() -> None:
        mode, *options = args
        if instance:
            options += ["--instance", instance.upper()]
        ran.append(await run_engine(engine, [mode, name, "--dir", str(rundir), *options], stdin))

    async def client_side() -> None:
        try:
            await client.get_configuration(timeout=10)
            opened = [client.open_device(n) for n in device_names(local, devices)]
            async with anyio.create_task_group() as pumps:
                for index, device in enumerate(opened):
                    pumps.start_soon(guarded, index, device)
        except VDAbortError:
            pass  # the engine or the client aborted: the tests check who and why

    async def guarded(index: int, device: ClientVirtualDevice) -> None:
        try:
            await pump(client, index, device)
        except VDAbortError:
            pass

    try:
        with anyio.fail_after(15):
            async with anyio.create_task_group() as tg:
                socket_path = await tg.start(host)
                assert socket_path == folder / f"{name}.sock"
                tg.start_soon(engine_side)
                tg.start_soon(client_side)
    finally:
        client.close()
    assert not (folder / f"{name}.sock").exists(), "the set's name is still published"
    return outcome[0], ran[0]


async def next_command(device: ClientVirtualDevice) -> Command | None:
    """The device's next command, or None at its close (or the set's abort)."""
    try:
        return await device.get_command(timeout=10)
    except (VDClosedError, VDAbortError):
        return None


def storing_pump(stores: list[bytearray], abort_after: int | None = None) -> Pump:
    """WRITEs append to the device's store; FLUSH and COMPLETE succeed. With
    ``abort_after``, the client aborts the set when that many WRITEs arrived."""
    writes = [0]

    async def pump(client: ClientVirtualDeviceSet, index: int, device: ClientVirtualDevice) -> None:
        while (command := await next_command(device)) is not None:
            if command.code is CommandCode.WRITE:
                assert command.buffer is not None
                assert command.position == len(stores[index]), "WRITE position"
                stores[index] += command.buffer
                writes[0] += 1
                if abort_after is not None and writes[0] >= abort_after:
                    client.signal_abort()  # the client's abort, mid-stream
                    return
                device.complete_command(command, Completion.SUCCESS, command.size)
            elif command.code in (CommandCode.FLUSH, CommandCode.COMPLETE):
                device.complete_command(command, Completion.SUCCESS)
            else:
                device.complete_command(command, Completion.NOT_SUPPORTED)

    return pump


def serving_pump(streams: Sequence[bytes], eager_eof: bool = False) -> Pump:
    """READs get the device's stream in order (HANDLE_EOF with the tail at its end, as
    vdistream's pump does; with ``eager_eof`` also a full READ that reaches the end, as
    a server that knows its stream's length may); CLEAR_ERROR succeeds."""

    async def pump(client: ClientVirtualDeviceSet, index: int, device: ClientVirtualDevice) -> None:
        at = 0
        while (command := await next_command(device)) is not None:
            if command.code is CommandCode.READ:
                assert command.buffer is not None
                data = streams[index][at : at + command.size]
                command.buffer[: len(data)] = data
                at += len(data)
                full = len(data) == command.size and not (eager_eof and at == len(streams[index]))
                done = Completion.SUCCESS if full else Completion.HANDLE_EOF
                device.complete_command(command, done, len(data))
            elif command.code is CommandCode.CLEAR_ERROR:
                device.complete_command(command, Completion.SUCCESS)
            else:
                device.complete_command(command, Completion.NOT_SUPPORTED)

    return pump


def striped(data: bytes, devices: int, chunk: int) -> list[bytes]:
    """The README's layout after the headers: chunk k on device k mod N."""
    chunks = [data[at : at + chunk] for at in range(0, len(data), chunk)]
    return [b"".join(chunks[i::devices]) for i in range(devices)]


def check_streams(stores: Sequence[bytes | bytearray], data: bytes, chunk: int) -> bytes:
    """Every device's stream is its header (magic, version 1, its index, the device
    count, the chunk size, one stream id for all) then its chunks; returns the id."""
    devices = len(stores)
    ids: set[bytes] = set()
    for index, store in enumerate(stores):
        header = bytes(store[:HEADER_BLOCK])
        magic, version, size, chunk_size, device, count, reserved, stream_id = (
            STREAM_HEADER.unpack_from(header)
        )
        assert (magic, version, size, chunk_size) == (b"VDCENG01", 1, HEADER_BLOCK, chunk)
        assert (device, count, reserved) == (index, devices, 0)
        assert header[STREAM_HEADER.size :] == bytes(HEADER_BLOCK - STREAM_HEADER.size)
        ids.add(stream_id)
    assert len(ids) == 1, "one stream id on every device"
    assert [bytes(s[HEADER_BLOCK:]) for s in stores] == striped(data, devices, chunk)
    return ids.pop()


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("config", "size", "chunk", "depth"),
    [
        (VDConfig(device_count=1), 3 * MiB + 12345, 64 * KiB, 3),
        (VDConfig(device_count=2, features=Features.REQUEST_COMPLETE), 2 * MiB, 64 * KiB, 2),
        (
            VDConfig(
                device_count=4, features=Features.LIKE_DISK, alignment=4096, prefix_zone_size=512
            ),
            4 * MiB + 1,
            128 * KiB,
            4,
        ),
        (VDConfig(device_count=64), 8 * MiB + 3, 64 * KiB, 2),
    ],
    ids=["1-device", "2-devices-exact-complete", "4-devices-disk-aligned-prefixed", "64-devices"],
)
async def test_backup_then_restore_through_a_real_set(
    engine: Path, rundir: Path, config: VDConfig, size: int, chunk: int, depth: int
) -> None:
    """Backup: every device holds exactly its chunks, at the positions the WRITEs gave,
    then FLUSH (and COMPLETE when granted); restore: the same bytes come back out."""
    devices = config.device_count
    data = os.urandom(size)
    options = ["--chunk", str(chunk), "--depth", str(depth)]
    stores = [bytearray() for _ in range(devices)]
    result, ran = await serve(
        engine, rundir, "cdb", config, storing_pump(stores), ["backup", *options], data
    )
    assert ran.returncode == 0, ran.stderr
    assert isinstance(result, HostResult), result
    check_streams(stores, data, chunk)
    assert [d.bytes for d in result.devices] == [len(s) for s in stores]
    assert result.engine_pid > 0
    complete = 1 if config.features & Features.REQUEST_COMPLETE else 0
    assert bool(result.features & Features.COMPLETE_ENABLED) == bool(complete)
    for device, store in zip(result.devices, stores, strict=True):
        chunks = -(-(len(store) - HEADER_BLOCK) // chunk)
        assert device.commands.get(CommandCode.WRITE, 0) == 1 + chunks  # the header's own
        assert device.commands.get(CommandCode.FLUSH, 0) == 1
        assert device.commands.get(CommandCode.COMPLETE, 0) == complete

    result, ran = await serve(
        engine,
        rundir,
        "cdb",
        config,
        serving_pump([bytes(s) for s in stores]),
        ["restore", *options],
    )
    assert ran.returncode == 0, ran.stderr
    assert isinstance(result, HostResult), result
    assert len(ran.stdout) == size
    assert hashlib.sha256(ran.stdout).hexdigest() == hashlib.sha256(data).hexdigest()


async def vdistream(
    args: Sequence[str], engine_run: Callable[[anyio.abc.Process], Awaitable[object]]
) -> Ran:
    """Run the vdistream CLI with ``args`` (an ``external:NAME`` job and its
    ``--runtime-dir``) and, once its set is published, ``engine_run(cli)``; returns how
    the CLI ran."""
    runtime = Path(args[args.index("--runtime-dir") + 1])
    name = next(a for a in args if a.startswith("external:")).removeprefix("external:")
    published = anyio.Path(runtime / f"{name}.sock")
    out = bytearray()
    err = bytearray()

    async def drain(stream: anyio.abc.ByteReceiveStream | None, into: bytearray) -> None:
        assert stream is not None
        async for data in stream:
            into += data

    with anyio.fail_after(20):
        async with (
            await anyio.open_process(
                [sys.executable, "-m", "vdistream", *args], stdin=subprocess.DEVNULL
            ) as cli,
            anyio.create_task_group() as tg,
        ):
            tg.start_soon(drain, cli.stdout, out)
            tg.start_soon(drain, cli.stderr, err)
            for _ in range(500):  # until the set is published (or the CLI gave up)
                if await published.is_socket() or cli.returncode is not None:
                    break
                await anyio.sleep(0.02)
            if await published.is_socket():
                await engine_run(cli)
            returncode = await cli.wait()
    return Ran(returncode, bytes(out), err.decode())


@pytest.mark.asyncio
async def test_vdistream_backup_and_restore_of_external_with_the_c_engine(
    engine: Path, rundir: Path, tmp_path: Path
) -> None:
    """The README's example: ``vdistream backup external:NAME`` waits for the C engine,
    stores what it writes; ``vdistream restore BACKUP external:NAME`` serves it back."""
    data = os.urandom(3 * MiB + 777)
    dest = (tmp_path / "dest").as_uri()
    common = ["--runtime-dir", str(rundir), "--wait", "10"]
    engine_args = ["--dir", str(rundir), "--chunk", "65536"]
    ran: list[Ran] = []

    async def backup_engine(cli: anyio.abc.Process) -> Ran:
        ran.append(await run_engine(engine, ["backup", "cli1", *engine_args], data))
        assert ran[-1].returncode == 0, ran[-1].stderr
        return ran[-1]

    cli = await vdistream(
        ["backup", "external:cli1", dest, "--devices", "3", "--id", "b1", *common], backup_engine
    )
    assert cli.returncode == 0, cli.stderr
    assert "backed up 3146505 bytes over 3 device(s) in 65536-byte chunks" in ran[-1].stderr

    async def restore_engine(cli: anyio.abc.Process) -> Ran:
        ran.append(await run_engine(engine, ["restore", "cli1", *engine_args]))
        assert ran[-1].returncode == 0, ran[-1].stderr
        return ran[-1]

    cli = await vdistream(["restore", f"{dest}/b1", "external:cli1", *common], restore_engine)
    assert cli.returncode == 0, cli.stderr
    assert hashlib.sha256(ran[-1].stdout).hexdigest() == hashlib.sha256(data).hexdigest()
    assert "restored 3146505 bytes from 3 device(s) in 65536-byte chunks" in ran[-1].stderr
    stream_ids = [r.stderr.split("(stream id ")[1][:32] for r in ran]
    assert stream_ids[0] == stream_ids[1]


@pytest.mark.asyncio
async def test_an_engine_stopped_mid_backup_fails_the_vdistream_job(
    engine: Path, rundir: Path, tmp_path: Path
) -> None:
    """SIGTERM while the engine waits for more input: it signals abort and closes; the
    CLI's job fails with the engine's abort and stores no backup."""
    dest = tmp_path / "dest"
    ran: list[Ran] = []

    async def stopped_engine(cli: anyio.abc.Process) -> None:
        args = [str(engine), "backup", "cli2", "--dir", str(rundir), "--chunk", "65536"]
        async with await anyio.open_process(args) as process:
            assert process.stdin is not None
            assert process.stderr is not None
            with anyio.fail_after(10):
                # 1 MiB through a 64 KiB pipe: the engine has read (and sent) most of it
                await process.stdin.send(os.urandom(MiB))
                process.terminate()
                err = b""
                async for data in process.stderr:
                    err += data
                ran.append(Ran(await process.wait(), b"", err.decode()))

    job = ["backup", "external:cli2", dest.as_uri(), "--devices", "2", "--id", "b2"]
    cli = await vdistream([*job, "--runtime-dir", str(rundir), "--wait", "10"], stopped_engine)
    assert ran[0].returncode == 1
    assert ran[0].stderr == "vdistream-engine: set 'cli2': interrupted by signal 15 (Terminated)\n"
    assert cli.returncode != 0
    assert "the engine in the other process aborted it" in cli.stderr, cli.stderr
    assert not (dest / "b2" / "manifest.json").exists()


@pytest.mark.asyncio
async def test_the_client_dying_mid_backup_fails_the_engine(
    engine: Path, rundir: Path, tmp_path: Path
) -> None:
    """kill -9 of ``vdistream backup external:NAME`` while the engine waits for input:
    the engine sees the connection drop at once and fails, naming the set."""
    ran: list[Ran] = []

    async def engine_of_a_dying_client(cli: anyio.abc.Process) -> None:
        args = [str(engine), "backup", "cli3", "--dir", str(rundir), "--chunk", "65536"]
        async with await anyio.open_process(args) as process:
            assert process.stdin is not None
            assert process.stderr is not None
            with anyio.fail_after(10):
                await process.stdin.send(os.urandom(MiB))  # the set is active, data flows
                cli.kill()
                err = b""
                async for data in process.stderr:
                    err += data
                ran.append(Ran(await process.wait(), b"", err.decode()))

    job = ["backup", "external:cli3", (tmp_path / "dest").as_uri(), "--devices", "2"]
    cli = await vdistream([*job, "--runtime-dir", str(rundir)], engine_of_a_dying_client)
    assert cli.returncode == -9
    assert ran[0].returncode == 1
    assert ran[0].stderr.startswith(
        "vdistream-engine: set 'cli3': lost the connection to the client ("
    ), ran[0].stderr
    assert ran[0].stderr.count("\n") == 1


@pytest.mark.asyncio
async def test_a_named_instance_and_another_local_name(engine: Path, rundir: Path) -> None:
    """``--instance`` finds DIR/<instance, lower-cased>/NAME.sock; the engine's device
    names (NAME, NAME1) reach the client as its own set's (local, local1)."""
    data = os.urandom(MiB + 5)
    stores = [bytearray(), bytearray()]
    result, ran = await serve(
        engine,
        rundir,
        "pub",
        2,
        storing_pump(stores),
        ["backup", "--chunk", "65536"],
        data,
        instance="Inst",
        local_name="local",
    )
    assert ran.returncode == 0, ran.stderr
    assert isinstance(result, HostResult), result
    assert [d.name for d in result.devices] == ["local", "local1"]
    check_streams(stores, data, 65536)


@pytest.mark.asyncio
async def test_an_empty_input_backs_up_and_restores_nothing(engine: Path, rundir: Path) -> None:
    """An empty input still writes every device's header; its restore writes nothing."""
    stores = [bytearray(), bytearray()]
    result, ran = await serve(engine, rundir, "empty", 2, storing_pump(stores), ["backup"])
    assert ran.returncode == 0, ran.stderr
    assert isinstance(result, HostResult), result
    check_streams(stores, b"", 256 * KiB)
    streams = [bytes(s) for s in stores]
    for eager_eof in (False, True):  # the header's READ completes with SUCCESS, HANDLE_EOF
        pump = serving_pump(streams, eager_eof)
        result, ran = await serve(engine, rundir, "empty", 2, pump, ["restore"])
        assert (ran.returncode, ran.stdout) == (0, b""), ran.stderr
        assert isinstance(result, HostResult), result


async def backup(
    engine: Path, rundir: Path, name: str, devices: int, data: bytes, depth: int = 3
) -> list[bytes]:
    """Back ``data`` up with the engine over ``devices`` devices in 64 KiB chunks;
    returns each device's stream, checked."""
    stores = [bytearray() for _ in range(devices)]
    options = ["--chunk", str(64 * KiB), "--depth", str(depth)]
    result, ran = await serve(
        engine, rundir, name, devices, storing_pump(stores), ["backup", *options], data
    )
    assert ran.returncode == 0, ran.stderr
    assert isinstance(result, HostResult), result
    check_streams(stores, data, 64 * KiB)
    return [bytes(s) for s in stores]


async def restore(
    engine: Path,
    rundir: Path,
    name: str,
    streams: Sequence[bytes],
    *options: str,
    eager_eof: bool = False,
) -> tuple[HostResult | BaseException, Ran]:
    pump = serving_pump(streams, eager_eof)
    return await serve(engine, rundir, name, len(streams), pump, ["restore", *options])


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("options", "size", "eager_eof"),
    [
        ([], MiB + 4321, False),
        (["--chunk", "512"], MiB + 4321, False),
        (["--chunk", str(4 * MiB)], MiB + 4321, True),
        (["--depth", "1"], MiB, True),  # ends on a full chunk, completed with HANDLE_EOF
    ],
)
async def test_a_restore_takes_the_chunk_size_from_the_headers(
    engine: Path, rundir: Path, options: list[str], size: int, eager_eof: bool
) -> None:
    """``--chunk`` is the backup's: a restore with another one (or none) reads the
    backup's 64 KiB chunks, as its headers say."""
    data = os.urandom(size)
    streams = await backup(engine, rundir, "rchunk", 3, data)
    result, ran = await restore(engine, rundir, "rchunk", streams, *options, eager_eof=eager_eof)
    assert ran.returncode == 0, ran.stderr
    assert isinstance(result, HostResult), result
    assert ran.stdout == data
    assert f"restored {size} bytes from 3 device(s) in 65536-byte chunks" in ran.stderr
    for device in result.devices:  # the header's READ, then 64 KiB READs
        assert device.commands.get(CommandCode.READ, 0) >= 1 + MiB // (3 * 64 * KiB)


async def failed_restore(
    engine: Path, rundir: Path, name: str, streams: Sequence[bytes], *options: str
) -> Ran:
    """A restore that must fail: the engine aborts the set, says why in one line."""
    result, ran = await restore(engine, rundir, name, streams, *options)
    assert isinstance(result, VDAbortError), result
    assert ran.returncode == 1
    assert ran.stderr.count("\n") == 1, ran.stderr
    return ran


@pytest.mark.asyncio
async def test_a_restore_of_swapped_devices_fails(engine: Path, rundir: Path) -> None:
    """Device 0 holds device 1's stream and the other way round: no data comes out."""
    streams = await backup(engine, rundir, "swap", 2, os.urandom(MiB))
    ran = await failed_restore(engine, rundir, "swap", streams[::-1])
    assert ran.stdout == b""
    assert ran.stderr == (
        "vdistream-engine: set 'swap' device 'swap': the device holds the stream of the "
        "backup's device 1, not of device 0 (devices swapped or renamed?)\n"
    )


@pytest.mark.asyncio
async def test_a_restore_of_another_backups_stream_fails(engine: Path, rundir: Path) -> None:
    """Device 1 holds device 1 of another backup (same layout, another stream id)."""
    data = os.urandom(MiB)
    first = await backup(engine, rundir, "mix", 3, data)
    second = await backup(engine, rundir, "mix", 3, data)
    assert first[1][HEADER_BLOCK:] == second[1][HEADER_BLOCK:]  # the very same data
    ran = await failed_restore(engine, rundir, "mix", [first[0], second[1], first[2]])
    assert ran.stdout == b""
    ids = [STREAM_HEADER.unpack_from(s)[-1].hex() for s in (second[1], first[0])]
    assert ran.stderr == (
        "vdistream-engine: set 'mix' device 'mix1': the device holds another backup's stream "
        f"(stream id {ids[0]}, device 'mix' has stream id {ids[1]})\n"
    )


@pytest.mark.asyncio
async def test_a_restore_with_another_device_count_fails(engine: Path, rundir: Path) -> None:
    streams = await backup(engine, rundir, "count", 3, os.urandom(MiB))
    ran = await failed_restore(engine, rundir, "count", streams[:2])
    assert ran.stdout == b""
    assert ran.stderr == (
        "vdistream-engine: set 'count' device 'count': the backup was written over 3 "
        "device(s), the set has 2: restore with the backup's device count\n"
    )


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("stream", "message"),
    [
        (
            b"",
            "no stream header: the device's stream has 0 bytes, less than the 512-byte header "
            "(an empty or truncated device, or not a stream vdistream-engine wrote)",
        ),
        (
            bytes(range(256)) * 1024,
            'no stream header: the stream does not start with "VDCENG01" (not a stream '
            "vdistream-engine wrote, or one from before stream headers)",
        ),
        (
            STREAM_HEADER.pack(b"VDCENG01", 2, 512, 65536, 1, 2, 0, bytes(16)).ljust(512, b"\0"),
            "the stream header is format version 2, this engine reads version 1",
        ),
        (
            STREAM_HEADER.pack(b"VDCENG01", 1, 512, 1000, 1, 2, 0, bytes(16)).ljust(512, b"\0"),
            "bad stream header (header size 512, chunk size 1000, device 1 of 2)",
        ),
    ],
    ids=["empty", "raw", "version", "chunk"],
)
async def test_a_device_without_a_good_header_fails(
    engine: Path, rundir: Path, stream: bytes, message: str
) -> None:
    """Device 1's header is missing or bad: the engine names it and writes nothing."""
    streams = await backup(engine, rundir, "hdr", 2, os.urandom(MiB))
    ran = await failed_restore(engine, rundir, "hdr", [streams[0], stream])
    assert ran.stdout == b""
    assert ran.stderr == f"vdistream-engine: set 'hdr' device 'hdr1': {message}\n"


@pytest.mark.asyncio
@pytest.mark.parametrize("cut", [64 * KiB, 64 * KiB + 1000, 0], ids=["chunk", "mid-chunk", "all"])
async def test_a_truncated_device_fails(engine: Path, rundir: Path, cut: int) -> None:
    """Device 1's stream stops after ``cut`` bytes of data (of its 6 chunks) while the
    other devices have more: the engine fails naming it, and writes out only the
    chunks before the end (never the truncated tail)."""
    data = os.urandom(17 * 64 * KiB)  # 17 chunks over 3 devices: device 1 has 6
    streams = await backup(engine, rundir, "trunc", 3, data, depth=1)
    streams[1] = streams[1][: HEADER_BLOCK + cut]
    ran = await failed_restore(engine, rundir, "trunc", streams, "--depth", "1")
    end = 1 + 3 * (cut // (64 * KiB))  # the chunk the device ends in
    assert ran.stdout == data[: end * 64 * KiB]
    assert ran.stderr == (
        f"vdistream-engine: set 'trunc' device 'trunc1': the device's stream is truncated: it "
        f"ends in chunk {end} ({cut % (64 * KiB)} of 65536 bytes) but device 'trunc2' still "
        f"has chunk {end + 1}\n"
    )


@pytest.mark.asyncio
async def test_the_client_aborting_mid_stream_fails_the_engine(engine: Path, rundir: Path) -> None:
    stores = [bytearray() for _ in range(2)]
    result, ran = await serve(
        engine,
        rundir,
        "cab",
        2,
        storing_pump(stores, abort_after=3),
        ["backup", "--chunk", "65536"],
        os.urandom(8 * MiB),
    )
    assert isinstance(result, VDAbortError), result
    assert ran.returncode == 1
    lines = ran.stderr.strip().splitlines()
    assert len(lines) == 1, ran.stderr
    assert "set 'cab'" in lines[0]
    assert "aborted (cause: client)" in lines[0]
    assert "the client signalled abort" in lines[0]


@pytest.mark.asyncio
async def test_a_second_engine_is_refused(engine: Path, rundir: Path) -> None:
    """While one engine has the set, another one that connects gets REFUSED."""
    stores = [bytearray()]
    second: list[Ran] = []
    store = storing_pump(stores)

    async def pump(client: ClientVirtualDeviceSet, index: int, device: ClientVirtualDevice) -> None:
        # the first engine is attached (it configured the set): try a second one
        second.append(await run_engine(engine, ["restore", "cref", "--dir", str(rundir)]))
        await store(client, index, device)

    data = os.urandom(MiB)
    result, ran = await serve(engine, rundir, "cref", 1, pump, ["backup"], data)
    assert ran.returncode == 0, ran.stderr
    assert isinstance(result, HostResult), result
    check_streams(stores, data, 256 * KiB)
    assert second[0].returncode == 1
    assert second[0].stderr.startswith(
        "vdistream-engine: set 'cref': the client refused the connection: VD_E_"
    ), second[0].stderr
    assert second[0].stderr.count("\n") == 1


@pytest.mark.asyncio
async def test_a_read_that_fails_names_the_device(engine: Path, rundir: Path) -> None:
    """A failed completion ends the engine: it aborts the set and names the device."""
    data = os.urandom(MiB)
    streams = await backup(engine, rundir, "cfail", 2, data)
    serve_streams = serving_pump(streams)

    async def failing(
        client: ClientVirtualDeviceSet, index: int, device: ClientVirtualDevice
    ) -> None:
        if index == 0:
            return await serve_streams(client, index, device)
        reads = 0
        while (command := await next_command(device)) is not None:
            reads += 1
            if reads == 1:  # its header
                assert command.buffer is not None
                command.buffer[:] = streams[1][:HEADER_BLOCK]
                device.complete_command(command, Completion.SUCCESS, command.size)
            else:
                device.complete_command(command, Completion.DISK_FULL)

    result, ran = await serve(engine, rundir, "cfail", 2, failing, ["restore"])
    assert isinstance(result, VDAbortError), result
    assert ran.returncode == 1
    assert ran.stdout == data[: 64 * KiB], "chunk 0 (device 0) came before the failure"
    assert ran.stderr.count("\n") == 1, ran.stderr
    assert (
        "set 'cfail' device 'cfail1': READ of 65536 bytes failed with completion 112 (DISK_FULL)"
        in ran.stderr
    )


def misbehaving_client(listener: socket.socket, answer: bytes | None) -> list[wire.Record]:
    """A client side that WELCOMEs one engine, answers its first request (expected to
    be BEGIN_CONFIGURATION) with ``answer`` (None: never) and returns every record the
    engine sent up to its CLOSE."""
    listener.settimeout(10)
    conn, _ = listener.accept()
    with conn:
        conn.settimeout(10)
        welcome = wire.Welcome(wire.VERSION, os.getpid(), VDConfig(device_count=1), "odd", "")
        conn.send(welcome.encode())
        got = [wire.decode(conn.recv(wire.MAX_RECORD))]
        if answer is not None:
            conn.send(answer)
        while not isinstance(got[-1], wire.Close):
            got.append(wire.decode(conn.recv(wire.MAX_RECORD)))
        return got


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("answer", "message"),
    [
        (
            wire.HEADER.pack(0x77, 0, wire.HEADER.size, 0, wire.NO_DEVICE),
            "protocol violation by the client: unknown record type 0x0077",
        ),
        (
            wire.Reply(1, HResult.INVALID, 1, 0, 0, b"block_size=512 is wrong").encode(),
            "BEGIN_CONFIGURATION failed: VD_E_INVALID (0x80770006): block_size=512 is wrong",
        ),
        (None, "no answer from the client within 1000 ms while waiting for BEGIN_CONFIGURATION"),
    ],
    ids=["unknown-record", "error-reply", "silence"],
)
async def test_a_misbehaving_client_is_aborted(
    engine: Path, rundir: Path, answer: bytes | None, message: str
) -> None:
    """The engine checks what it receives: on a protocol violation, an error REPLY or
    no answer within --timeout it sends SIGNAL_ABORT, then CLOSE, and fails."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as listener:
        listener.bind(str(rundir / "odd.sock"))
        listener.listen(1)
        async with anyio.create_task_group() as tg:
            sent: list[list[wire.Record]] = []

            async def client() -> None:
                sent.append(await anyio.to_thread.run_sync(misbehaving_client, listener, answer))

            tg.start_soon(client)
            ran = await run_engine(
                engine, ["backup", "odd", "--dir", str(rundir), "--timeout", "1"]
            )
    assert ran.returncode == 1
    assert ran.stderr == f"vdistream-engine: set 'odd': {message}\n"
    kinds = [type(record) for record in sent[0]]
    assert kinds == [wire.BeginConfiguration, wire.SignalAbort, wire.Close]


@pytest.mark.asyncio
@pytest.mark.parametrize("how", ["--dir", "VDISTREAM_RUNTIME_DIR", "XDG_RUNTIME_DIR"])
async def test_an_unpublished_set_is_a_clear_error(engine: Path, rundir: Path, how: str) -> None:
    env = {
        k: v for k, v in os.environ.items() if k not in ("VDISTREAM_RUNTIME_DIR", "XDG_RUNTIME_DIR")
    }
    args = ["restore", "ghost"]
    where = rundir
    if how == "--dir":
        args += ["--dir", str(rundir)]
    elif how == "VDISTREAM_RUNTIME_DIR":
        env[how] = str(rundir)
    else:
        env[how] = str(rundir)
        where = rundir / "vdistream"
    ran = await run_engine(engine, args, env=env)
    assert ran.returncode == 1
    assert ran.stdout == b""
    expected = f"set 'ghost': no virtual device set named 'ghost' is published in {where} ("
    assert ran.stderr.startswith(f"vdistream-engine: {expected}"), ran.stderr
    assert ran.stderr.count("\n") == 1


@pytest.mark.asyncio
async def test_bad_usage_exits_2(engine: Path) -> None:
    for args in (["backup"], ["copy", "x"], ["backup", "x", "--chunk", "1000"], ["backup", ".x"]):
        ran = await run_engine(engine, args)
        assert ran.returncode == 2, args
        assert "usage: vdistream-engine backup|restore NAME" in ran.stderr


def test_the_makefile_builds_it(tmp_path: Path) -> None:
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    for name in ("Makefile", "vdistream-engine.c"):
        shutil.copy(EXAMPLE / name, tmp_path / name)
    built = subprocess.run(["make", "-C", str(tmp_path)], capture_output=True, text=True)
    assert built.returncode == 0, built.stderr
    assert os.access(tmp_path / "vdistream-engine", os.X_OK)


def test_it_is_plain_c99() -> None:
    """One C99 file, libc and Linux headers only (``_GNU_SOURCE`` for SOCK_CLOEXEC and
    MSG_CMSG_CLOEXEC): it builds with -std=c99 -pedantic-errors, includes no header of
    its own and links nothing but libc."""
    cc = shutil.which("cc") or shutil.which("gcc")
    assert cc is not None
    flags = ["-std=c99", "-pedantic-errors", "-Wall", "-Wextra", "-Werror", "-fsyntax-only"]
    checked = subprocess.run([cc, *flags, str(SOURCE)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr
    includes = [line for line in SOURCE.read_text().splitlines() if line.startswith("#include")]
    assert includes
    assert all(line.startswith("#include <") for line in includes), includes
    assert "-l" not in (EXAMPLE / "Makefile").read_text()
