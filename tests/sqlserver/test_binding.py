"""The ctypes binding of ``libsqlvdi.so`` against the stand-in libraries (Contract A).

SQL Server's side is played by ``libsqlvdi_standin_server.so``, driven through ctypes in
a *child process* (multiprocessing, spawn) step by step over a pipe, so that the binding
meets another process through POSIX shared memory and semaphores as it does SQL Server.
"""

from __future__ import annotations

import copy
import ctypes
import hashlib
import itertools
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import pytest

from standin.sqlvdi.build import Libraries
from vdistream.errors import (
    ConfigError,
    VDAbortError,
    VDBusyError,
    VDClosedError,
    VDIError,
    VDInstanceNameError,
    VDInvalidError,
    VDMemoryError,
    VDNotOpenError,
    VDNotSupportedError,
    VDOpenError,
    VDProtocolError,
    VDSecurityError,
    VDTimeoutError,
    VDUnexpectedError,
)
from vdistream.protocol import (
    ClientState,
    CommandCode,
    Completion,
    Features,
    HResult,
    SetAbortCause,
    VDConfig,
)
from vdistream.sqlserver import library as lib
from vdistream.sqlserver.device_set import SqlVdiDevice, SqlVdiDeviceSet

aio = pytest.mark.asyncio
CHUNK = 65536
SHM = Path("/dev/shm")


def signed(value: int) -> int:
    return ctypes.c_int32(value & 0xFFFFFFFF).value


TIMEOUT, ABORT = signed(HResult.TIMEOUT), signed(HResult.ABORT)


# --- SQL Server's side: the stand-in server library in a child process ------------------


class _ServerLib:
    """``vdss_*`` through ctypes (Contract A); runs in the child process."""

    def __init__(self, path: str) -> None:
        c = ctypes
        self.so = so = c.CDLL(path)
        p = c.c_void_p
        cfg = c.c_char_p  # a VDConfig passed as its 44-byte image
        for name, args in {
            "vdss_open": (c.c_char_p, c.c_int, c.POINTER(p)),
            "vdss_client_config": (p, c.c_char_p),
            "vdss_open_device": (p, c.c_char_p, c.POINTER(c.c_int)),
            "vdss_configure": (p, cfg, c.c_uint64),
            "vdss_send": (
                p, c.c_int, c.c_int, c.c_int, c.c_int64, c.c_uint64, c.POINTER(c.c_uint32)
            ),
            "vdss_wait": (
                p, c.c_int, c.c_int, c.POINTER(c.c_uint32), c.POINTER(c.c_int),
                c.POINTER(c.c_uint32), c.POINTER(c.c_int64),
            ),
            "vdss_close_device": (p, c.c_int),
            "vdss_signal_abort": (p,),
            "vdss_client_alive": (p,),
            "vdss_close": (p,),
        }.items():  # fmt: skip
            function = getattr(so, name)
            function.argtypes, function.restype = args, c.c_int
        so.vdss_buffer_base.argtypes, so.vdss_buffer_base.restype = (p,), c.c_void_p
        self.set = p()

    def open(self, name: str, timeout_ms: int) -> int:
        return int(self.so.vdss_open(name.encode(), timeout_ms, ctypes.byref(self.set)))

    def client_config(self) -> bytes:
        out = ctypes.create_string_buffer(44)
        assert self.so.vdss_client_config(self.set, out) == 0
        return out.raw

    def open_device(self, name: str) -> tuple[int, int]:
        index = ctypes.c_int(-1)
        hr = self.so.vdss_open_device(self.set, name.encode(), ctypes.byref(index))
        return int(hr), index.value

    def configure(self, image: bytes, area: int) -> int:
        return int(self.so.vdss_configure(self.set, image, area))

    def put(self, offset: int, data: bytes) -> None:
        ctypes.memmove(self.so.vdss_buffer_base(self.set) + offset, data, len(data))

    def get(self, offset: int, size: int) -> bytes:
        return ctypes.string_at(self.so.vdss_buffer_base(self.set) + offset, size)

    def send(
        self, device: int, code: int, size: int, position: int, offset: int
    ) -> tuple[int, int]:
        tag = ctypes.c_uint32()
        hr = self.so.vdss_send(self.set, device, code, size, position, offset, ctypes.byref(tag))
        return int(hr), tag.value

    def wait(self, device: int, timeout_ms: int) -> tuple[int, int, int, int, int]:
        tag, completion, done, position = (
            ctypes.c_uint32(), ctypes.c_int(), ctypes.c_uint32(), ctypes.c_int64()
        )  # fmt: skip
        hr = self.so.vdss_wait(
            self.set, device, timeout_ms, ctypes.byref(tag), ctypes.byref(completion),
            ctypes.byref(done), ctypes.byref(position),
        )  # fmt: skip
        return int(hr), tag.value, completion.value, done.value, position.value

    def close_device(self, device: int) -> int:
        return int(self.so.vdss_close_device(self.set, device))

    def signal_abort(self) -> int:
        return int(self.so.vdss_signal_abort(self.set))

    def client_alive(self) -> int:
        return int(self.so.vdss_client_alive(self.set))

    def close(self) -> int:
        hr = int(self.so.vdss_close(self.set)) if self.set.value else 0
        self.set = ctypes.c_void_p()
        return hr


def _serve(path: str, conn: multiprocessing.connection.Connection) -> None:
    """The child: run every (method, args) it receives on the server library."""
    server = _ServerLib(path)
    while True:
        message = conn.recv()
        if message is None:
            server.close()
            conn.send(("ok", None))
            return
        method, args = message
        try:
            conn.send(("ok", getattr(server, method)(*args)))
        except Exception as exc:  # reported to the test, which fails on it
            conn.send(("error", repr(exc)))


class Server:
    """The test's handle on the child playing SQL Server; every call is bounded."""

    def __init__(self, libs: Libraries) -> None:
        context = multiprocessing.get_context("spawn")
        self.conn, child = context.Pipe()
        self.process = context.Process(target=_serve, args=(str(libs.server), child), daemon=True)
        self.process.start()
        child.close()
        self._lock = threading.Lock()

    def call(self, method: str, *args: Any) -> Any:
        with self._lock:
            self.conn.send((method, args))
            if not self.conn.poll(30):
                raise TimeoutError(f"server {method}{args!r}: no answer in 30 s")
            status, value = self.conn.recv()
        assert status == "ok", f"server {method}: {value}"
        return value

    async def acall(self, method: str, *args: Any) -> Any:
        return await anyio.to_thread.run_sync(self.call, method, *args)

    def kill(self) -> None:
        self.process.kill()
        self.process.join(10)

    def stop(self) -> None:
        if self.process.is_alive():
            try:
                self.conn.send(None)
                self.conn.poll(10) and self.conn.recv()
            except (BrokenPipeError, EOFError, OSError):
                pass
        self.process.join(10)
        if self.process.is_alive():
            self.kill()
        self.conn.close()

    # --- the SQL Server sequence ---------------------------------------------------------

    async def attach(
        self, name: str, devices: list[str], media: Features, max_transfer: int = CHUNK
    ) -> VDConfig:
        """Open the set the client created, open its devices, configure it."""
        assert await self.acall("open", name, 10_000) == 0
        asked = VDConfig.unpack(await self.acall("client_config"))
        for index, device in enumerate(devices):
            assert await self.acall("open_device", device) == (0, index)
        final = asked.replace(
            features=asked.features | media,
            block_size=512,
            max_io_depth=4,
            max_transfer_size=max_transfer,
            buffer_area_size=max_transfer * 4 * len(devices),
        )
        assert await self.acall("configure", final.pack(), final.buffer_area_size) == 0
        return final


@pytest.fixture
def server(sqlvdi_libs: Libraries, set_name: str) -> Iterator[Server]:
    server = Server(sqlvdi_libs)
    try:
        yield server
    finally:
        server.stop()


_names = itertools.count()


def _segments(prefix: str) -> list[str]:
    return sorted(p.name for p in SHM.glob(f"sqlvdi-standin.{prefix}*"))


@pytest.fixture
def set_name() -> Iterator[str]:
    """A set name of this test; no shared memory of it may be left behind once both
    sides closed (``vds`` and ``server`` depend on it, so they are torn down first)."""
    name = f"h3-{os.getpid()}-{next(_names)}"
    yield name
    assert _segments(name) == [], "shared memory left in /dev/shm"


@pytest.fixture
def vds(sqlvdi_libs: Libraries, set_name: str) -> Iterator[SqlVdiDeviceSet]:
    vds = SqlVdiDeviceSet(lib.load(sqlvdi_libs.client), slice_ms=100)
    try:
        yield vds
    finally:
        if vds.state is not ClientState.DNE:
            if vds.state is not ClientState.ABORTED:
                vds.signal_abort()
            try:
                vds.close()
            except VDIError:
                pass


class Entered:
    """The library, with an event set as a worker thread enters ``GetCommand`` (so a test
    knows a wait is inside the library without polling; the binding's first, non-waiting
    poll runs on the event loop's thread and does not count)."""

    def __init__(self, library: lib.SqlVdi) -> None:
        self.library = copy.copy(library)
        self.event = threading.Event()
        real = library.get_command

        def get_command(*args: Any) -> int:
            if threading.current_thread() is not threading.main_thread():
                self.event.set()
            return real(*args)

        self.library.get_command = get_command

    async def wait(self) -> None:
        assert await anyio.to_thread.run_sync(self.event.wait, 5), "no call entered GetCommand"


@pytest.fixture
def entered(vds: SqlVdiDeviceSet) -> Entered:
    spy = Entered(vds.library)
    vds._library = spy.library  # before create: every call of the set goes through it
    return spy


async def _started(
    vds: SqlVdiDeviceSet,
    server: Server,
    name: str,
    devices: int = 1,
    *,
    media: Features = Features.WRITE_MEDIA,
) -> tuple[VDConfig, list[SqlVdiDevice]]:
    """Create, let the server attach, configure, open every device (as the Job does)."""
    vds.create(name, VDConfig(device_count=devices, features=Features.LIKE_PIPE))
    assert vds.state is ClientState.CONFIGURABLE
    names = [name] + [f"{name}{i}" for i in range(1, devices)]
    async with anyio.create_task_group() as tg:
        tg.start_soon(server.attach, name, names, media)
        config = await vds.get_configuration(10)
    assert vds.state is ClientState.INITIALIZING
    opened = [vds.open_device(n) for n in names]
    assert vds.state is ClientState.ACTIVE
    return config, opened


def _pattern(seed: int, size: int) -> bytes:
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(f"{seed}:{counter}".encode()).digest()
        counter += 1
    return bytes(out[:size])


# --- the library: path, loading, symbols, structs, HRESULTs ---------------------------------


def test_structs_have_the_headers_layout() -> None:
    config = VDConfig(
        device_count=3, features=0x2000, prefix_zone_size=4, alignment=8, server_timeout_ms=9,
        block_size=512, max_io_depth=4, max_transfer_size=CHUNK, buffer_area_size=123,
    )  # fmt: skip
    struct = lib.VDConfigStruct.from_config(config)
    assert ctypes.sizeof(struct) == 44
    assert bytes(struct) == config.pack()
    assert struct.to_config() == config
    assert struct.bufferAreaSize == 123
    assert struct.maxTransferSize == CHUNK
    assert ctypes.sizeof(lib.VDCCommand) == 24
    assert lib.VDCCommand.buffer.offset == 16
    assert lib.VDCCommand.position.offset == 8


def test_the_twelve_symbols_of_the_research_note() -> None:
    symbols = {symbol for symbol, *_ in lib.SYMBOLS.values()}
    assert len(symbols) == 12
    assert "_ZN19ClientVirtualDevice15CompleteCommandEP11VDC_Commandiml" in symbols
    assert "_ZN22ClientVirtualDeviceSet16GetConfigurationElP8VDConfig" in symbols


def test_every_symbol_is_bound_with_its_signature(sqlvdi_libs: Libraries) -> None:
    library = lib.load(sqlvdi_libs.client)
    assert lib.load(sqlvdi_libs.client) is library  # cached per path
    complete = library.complete_command
    assert complete.argtypes[0] is ctypes.POINTER(lib.DeviceObject)  # type: ignore[attr-defined]
    assert complete.argtypes[3:] == (ctypes.c_ulong, ctypes.c_int64)  # type: ignore[attr-defined]
    assert library.get_command.argtypes[1] is ctypes.c_long  # type: ignore[attr-defined]
    assert library.construct.restype is None  # type: ignore[attr-defined]
    assert library.create.restype is ctypes.c_int  # type: ignore[attr-defined]


def test_library_path_precedence(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(lib.ENV_VAR, raising=False)
    assert lib.library_path() == Path("/opt/mssql/lib/libsqlvdi.so")
    monkeypatch.setenv(lib.ENV_VAR, "/env/libsqlvdi.so")
    assert lib.library_path() == Path("/env/libsqlvdi.so")
    assert lib.library_path("/setting/libsqlvdi.so") == Path("/setting/libsqlvdi.so")


def test_missing_library_names_the_path_and_the_variable(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "libsqlvdi.so"
    with pytest.raises(lib.SqlVdiLibraryError) as caught:
        lib.load(missing)
    text = str(caught.value)
    assert str(missing) in text
    assert "VDISTREAM_SQLVDI" in text
    assert "'sqlvdi' setting" in text
    assert not isinstance(caught.value, ConfigError)  # not a usage error: exit 1, not 2
    with pytest.raises(lib.SqlVdiLibraryError, match="nowhere"):
        SqlVdiDeviceSet(lib.load(missing))


def test_missing_library_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(lib.ENV_VAR, str(tmp_path / "gone.so"))
    vds = SqlVdiDeviceSet()
    with pytest.raises(lib.SqlVdiLibraryError, match=r"gone\.so"):
        vds.create("x", VDConfig())
    assert vds.state is ClientState.DNE


def test_unloadable_library_gives_the_loaders_reason(tmp_path: Path) -> None:
    bogus = tmp_path / "libsqlvdi.so"
    bogus.write_bytes(b"not an ELF file at all")
    with pytest.raises(lib.SqlVdiLibraryError) as caught:
        lib.load(bogus)
    assert str(bogus) in str(caught.value)
    assert "invalid ELF header" in str(caught.value) or "too short" in str(caught.value)


def test_a_missing_symbol_is_named(tmp_path: Path) -> None:
    """A library of the wrong shape: every member but GetCommand, as ``extern "C"``
    functions that carry the mangled names."""
    cxx = shutil.which("g++")
    if cxx is None:
        pytest.skip("g++ is needed to build the incomplete library")
    missing = "_ZN19ClientVirtualDevice10GetCommandElPP11VDC_Command"
    source = tmp_path / "partial.cpp"
    source.write_text(
        "".join(
            f'extern "C" int {symbol}(void) {{ return 0; }}\n'
            for symbol, *_ in lib.SYMBOLS.values()
            if symbol != missing
        )
    )
    so = tmp_path / "libsqlvdi.so"
    subprocess.run([cxx, "-shared", "-fPIC", "-o", str(so), str(source)], check=True)
    with pytest.raises(lib.SqlVdiLibraryError) as caught:
        lib.load(so)
    assert missing in str(caught.value)
    assert "ClientVirtualDevice::GetCommand" in str(caught.value)
    assert str(so) in str(caught.value)


@pytest.mark.parametrize(
    ("hresult", "cls"),
    [
        (HResult.NOTOPEN, VDNotOpenError),
        (HResult.TIMEOUT, VDTimeoutError),
        (HResult.ABORT, VDAbortError),
        (HResult.SECURITY, VDSecurityError),
        (HResult.INVALID, VDInvalidError),
        (HResult.INSTANCE_NAME, VDInstanceNameError),
        (HResult.NOTSUPPORTED, VDNotSupportedError),
        (HResult.MEMORY, VDMemoryError),
        (HResult.UNEXPECTED, VDUnexpectedError),
        (HResult.PROTOCOL, VDProtocolError),
        (HResult.OPEN, VDOpenError),
        (HResult.CLOSE, VDClosedError),
        (HResult.BUSY, VDBusyError),
    ],
)
def test_hresults_map_to_the_error_tree(hresult: HResult, cls: type[VDIError]) -> None:
    value = signed(hresult)
    assert value < 0  # as the Linux library returns it
    with pytest.raises(cls) as caught:
        lib.check(value, "get_command", set_name="s1", device="s1_2")
    assert type(caught.value) is cls
    assert caught.value.hresult == int(hresult)
    text = str(caught.value)
    assert "get_command" in text
    assert "'s1'" in text
    assert "'s1_2'" in text
    assert f"VD_E_{hresult.name}" in text or hresult is HResult.BUSY


def test_check_passes_noerror_and_keeps_unknown_hresults() -> None:
    lib.check(0, "close", set_name="s")
    with pytest.raises(VDIError) as caught:
        lib.check(signed(0x80070005), "create", set_name="s")
    assert type(caught.value) is VDIError
    assert "0x80070005" in str(caught.value)
    assert signed(0x80770003) == -2139684861


# --- sets over shared memory with another process ------------------------------------------


@aio
async def test_backup_round_trip(vds: SqlVdiDeviceSet, server: Server, set_name: str) -> None:
    """WRITE, FLUSH and close on two devices: the bytes SQL Server wrote arrive intact,
    each device ends with VDClosedError and the set terminates normally."""
    config, devices = await _started(vds, server, set_name, 2)
    assert config.features & Features.WRITE_MEDIA
    assert config.max_transfer_size == CHUNK
    data = [_pattern(d, CHUNK * 3 + 4096) for d in range(2)]
    received = [bytearray(), bytearray()]
    flushes = [0, 0]

    async def pump(index: int, device: SqlVdiDevice) -> None:
        while True:
            try:
                command = await device.get_command(10)
            except VDClosedError:
                return
            if command.code is CommandCode.WRITE:
                assert command.buffer is not None
                assert command.buffer.readonly
                received[index] += command.buffer
                device.complete_command(command, Completion.SUCCESS, command.size)
            else:
                assert command.code is CommandCode.FLUSH
                assert command.buffer is None
                flushes[index] += 1
                device.complete_command(command, Completion.SUCCESS)

    async def sql_server(index: int) -> None:
        offset = index * CHUNK * 4
        stream = data[index]
        for at in range(0, len(stream), CHUNK):
            piece = stream[at : at + CHUNK]
            await server.acall("put", offset, piece)
            assert (await server.acall("send", index, 2, len(piece), at, offset))[0] == 0
            hr, _, completion, done, _ = await server.acall("wait", index, 10_000)
            assert (hr, completion, done) == (0, 0, len(piece))
        assert (await server.acall("send", index, 12, 0, 0, 0))[0] == 0
        assert (await server.acall("wait", index, 10_000))[:3][0::2] == (0, 0)
        assert await server.acall("close_device", index) == 0

    async with anyio.create_task_group() as tg:
        for index, device in enumerate(devices):
            tg.start_soon(pump, index, device)
            tg.start_soon(sql_server, index)
    assert [bytes(r) for r in received] == data
    assert flushes == [1, 1]
    assert vds.state is ClientState.NORMALLY_TERMINATED
    with pytest.raises(VDClosedError):
        await devices[0].get_command(0)
    assert vds.statistics().outstanding == (0, 0)
    assert vds.aborted_by is None
    vds.close()
    assert vds.state is ClientState.DNE
    assert await server.acall("close") == 0


@aio
async def test_restore_reads_until_handle_eof(
    vds: SqlVdiDeviceSet, server: Server, set_name: str
) -> None:
    _, (device,) = await _started(vds, server, set_name, media=Features.READ_MEDIA)
    stream = _pattern(7, CHUNK * 2 + 1000)
    served = 0
    got = bytearray()

    async def client() -> None:
        nonlocal served
        while True:
            try:
                command = await device.get_command(10)
            except VDClosedError:
                return
            assert command.code is CommandCode.READ
            assert command.buffer is not None
            assert not command.buffer.readonly
            piece = stream[served : served + command.size]
            command.buffer[: len(piece)] = piece
            served += len(piece)
            end = Completion.SUCCESS if len(piece) == command.size else Completion.HANDLE_EOF
            device.complete_command(command, end, len(piece))

    async def sql_server() -> None:
        while True:
            assert (await server.acall("send", 0, 1, CHUNK, 0, CHUNK))[0] == 0
            hr, _, completion, done, _ = await server.acall("wait", 0, 10_000)
            assert hr == 0
            got.extend(await server.acall("get", CHUNK, done))
            if completion == Completion.HANDLE_EOF:
                break
            assert (completion, done) == (0, CHUNK)
        assert await server.acall("close_device", 0) == 0

    async with anyio.create_task_group() as tg:
        tg.start_soon(client)
        tg.start_soon(sql_server)
    assert bytes(got) == stream
    assert vds.state is ClientState.NORMALLY_TERMINATED
    vds.signal_abort()  # as a job does when its storage fails after the end: no error
    assert vds.state is ClientState.ABORTED
    vds.close()


@aio
async def test_out_of_order_completion_with_several_outstanding(
    vds: SqlVdiDeviceSet, server: Server, set_name: str
) -> None:
    _, (device,) = await _started(vds, server, set_name)
    tags = []
    for i in range(4):
        await server.acall("put", i * CHUNK, bytes([i]) * CHUNK)
        hr, tag = await server.acall("send", 0, 2, CHUNK - i * 512, i * 1000, i * CHUNK)
        assert hr == 0
        tags.append(tag)
    commands = [await device.get_command(10) for _ in range(4)]
    assert [c.position for c in commands] == [0, 1000, 2000, 3000]
    assert len({c.serial for c in commands}) == 4
    for i, command in enumerate(commands):
        assert command.buffer is not None
        assert bytes(command.buffer) == bytes([i]) * command.size
    assert vds.statistics().outstanding == (4,)
    assert vds.statistics().buffers_in_use == 4
    for i in (2, 0, 3, 1):
        device.complete_command(commands[i], Completion.SUCCESS, commands[i].size - 7 * i)
    results = {}
    for _ in range(4):
        hr, tag, completion, done, _ = await server.acall("wait", 0, 10_000)
        assert (hr, completion) == (0, 0)
        results[tag] = done
    assert results == {tags[i]: CHUNK - i * 512 - 7 * i for i in range(4)}
    assert vds.statistics().outstanding == (0,)


@aio
async def test_an_unknown_command_is_refused_as_not_supported(
    vds: SqlVdiDeviceSet, server: Server, set_name: str
) -> None:
    _, (device,) = await _started(vds, server, set_name)
    hr, unknown = await server.acall("send", 0, 99, 0, 0, 0)
    assert hr == 0
    await server.acall("send", 0, 12, 0, 0, 0)
    command = await device.get_command(10)
    assert command.code is CommandCode.FLUSH  # 99 never reached the caller
    hr, tag, completion, *_ = await server.acall("wait", 0, 10_000)
    assert (hr, tag, completion) == (0, unknown, Completion.NOT_SUPPORTED)
    device.complete_command(command, Completion.SUCCESS)


@aio
async def test_a_buffer_view_dies_with_its_command(
    vds: SqlVdiDeviceSet, server: Server, set_name: str
) -> None:
    _, (device,) = await _started(vds, server, set_name)
    await server.acall("put", 0, b"\xab" * CHUNK)
    await server.acall("send", 0, 2, CHUNK, 0, 0)
    command = await device.get_command(10)
    view = command.buffer
    assert view is not None
    assert view[0] == 0xAB
    with pytest.raises(TypeError):
        view[0] = 1  # a WRITE's buffer is SQL Server's data: read-only
    handle = vds.get_buffer_handle(view)
    mapped = vds.map_buffer_handle(handle)
    assert bytes(mapped) == bytes(view)
    device.complete_command(command, Completion.SUCCESS, CHUNK)
    for dead in (view, mapped):
        with pytest.raises(ValueError, match="released"):
            dead[0]
    with pytest.raises(VDInvalidError):
        device.complete_command(command, Completion.SUCCESS, CHUNK)  # completed twice
    with pytest.raises(VDInvalidError):
        vds.get_buffer_handle(memoryview(b"foreign"))


@aio
async def test_signal_abort_reaches_sql_server(
    vds: SqlVdiDeviceSet, server: Server, set_name: str
) -> None:
    _, (device,) = await _started(vds, server, set_name)
    await server.acall("send", 0, 2, 512, 0, 0)
    command = await device.get_command(10)
    vds.signal_abort()
    vds.signal_abort()  # idempotent
    assert vds.state is ClientState.ABORTED
    assert vds.aborted_by is SetAbortCause.CLIENT
    assert (await server.acall("wait", 0, 5000))[0] == ABORT
    with pytest.raises(VDAbortError):
        device.complete_command(command, Completion.SUCCESS, 512)
    with pytest.raises(ValueError, match="released"):
        bytes(command.buffer)  # type: ignore[arg-type]
    with pytest.raises(VDAbortError):
        await device.get_command(1)
    vds.close()
    assert vds.state is ClientState.DNE


@aio
async def test_sql_server_aborts(vds: SqlVdiDeviceSet, server: Server, set_name: str) -> None:
    _, (device,) = await _started(vds, server, set_name)
    async with anyio.create_task_group() as tg:

        async def abort_soon() -> None:
            await server.acall("signal_abort")

        tg.start_soon(abort_soon)
        with anyio.fail_after(5), pytest.raises(VDAbortError) as caught:
            await device.get_command(None)
    assert vds.aborted_by is SetAbortCause.SERVER
    assert vds.state is ClientState.ABORTED
    assert "SQL Server aborted the set" in (vds.abort_reason or "")
    assert set_name in str(caught.value)
    vds.signal_abort()  # the job's abort path: nothing more to do
    assert vds.aborted_by is SetAbortCause.SERVER
    vds.close()


@aio
async def test_cancelling_get_command_is_prompt_and_leaves_no_thread(
    vds: SqlVdiDeviceSet, server: Server, set_name: str, entered: Entered
) -> None:
    _, (device,) = await _started(vds, server, set_name)
    with anyio.CancelScope() as scope:
        cancelled_at: list[float] = []

        async def cancel_when_waiting() -> None:
            await entered.wait()
            cancelled_at.append(time.monotonic())
            scope.cancel()

        async with anyio.create_task_group() as tg:
            tg.start_soon(cancel_when_waiting)
            await device.get_command(None)
    elapsed = time.monotonic() - cancelled_at[0]
    assert scope.cancelled_caught
    assert elapsed < 0.3, f"cancellation took {elapsed:.3f} s"
    assert vds.calls_in_progress == 0  # the slice returned: no thread left inside
    assert vds.state is ClientState.ACTIVE  # cancelling a wait does not touch the set
    # the set is still usable: a command sent now is delivered
    await server.acall("send", 0, 12, 0, 0, 0)
    command = await device.get_command(10)
    assert command.code is CommandCode.FLUSH
    device.complete_command(command, Completion.SUCCESS)


@aio
async def test_get_command_times_out_without_harm(
    vds: SqlVdiDeviceSet, server: Server, set_name: str
) -> None:
    _, (device,) = await _started(vds, server, set_name)
    started = time.monotonic()
    with pytest.raises(VDTimeoutError, match="get_command"):
        await device.get_command(0.25)
    assert 0.2 <= time.monotonic() - started < 1.0
    with pytest.raises(VDTimeoutError):
        await device.get_command(0)  # polls
    assert vds.state is ClientState.ACTIVE


@aio
async def test_sql_server_killed(
    vds: SqlVdiDeviceSet, server: Server, set_name: str, entered: Entered
) -> None:
    _, (device,) = await _started(vds, server, set_name)
    failed_at: list[float] = []

    async def waiting() -> None:
        with pytest.raises(VDAbortError):
            await device.get_command(None)
        failed_at.append(time.monotonic())

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(waiting)
            await entered.wait()
            os.kill(server.process.pid, signal.SIGKILL)
            killed = time.monotonic()
    assert failed_at[0] - killed < 1.0
    assert vds.aborted_by is SetAbortCause.SERVER
    await anyio.to_thread.run_sync(server.process.join, 5)
    vds.close()  # removes the control segment; the buffers' creator is gone too
    other = SqlVdiDeviceSet(vds.library)
    other.create(f"{set_name}-sweep", VDConfig())  # Create sweeps the dead set's debris
    other.signal_abort()
    other.close()


@aio
async def test_close_during_a_call_aborts_instead(
    vds: SqlVdiDeviceSet, server: Server, set_name: str, entered: Entered
) -> None:
    _, (device,) = await _started(vds, server, set_name)
    async with anyio.create_task_group() as tg:

        async def waiting() -> None:
            with pytest.raises(VDAbortError):
                await device.get_command(None)

        tg.start_soon(waiting)
        await entered.wait()
        with pytest.raises(VDProtocolError, match="in progress"):
            vds.close()
        assert vds.state is ClientState.ABORTED
    assert vds.calls_in_progress == 0
    assert (await server.acall("wait", 0, 2000))[0] == ABORT  # the library's SignalAbort ran
    vds.close()
    with pytest.raises(VDProtocolError, match="closed"):
        await device.get_command(0)


@aio
async def test_close_before_the_end_aborts_and_reports_open_devices(
    vds: SqlVdiDeviceSet, server: Server, set_name: str
) -> None:
    _, _ = await _started(vds, server, set_name, 2)
    with pytest.raises(VDOpenError, match="devices were still open"):
        vds.close()
    assert vds.state is ClientState.DNE
    assert (await server.acall("wait", 0, 5000))[0] == ABORT


@aio
async def test_get_configuration_timeout_and_cancel(vds: SqlVdiDeviceSet, set_name: str) -> None:
    vds.create(set_name, VDConfig())
    with pytest.raises(VDTimeoutError, match="get_configuration"):
        await vds.get_configuration(0.2)
    assert vds.state is ClientState.CONFIGURABLE
    with anyio.move_on_after(0.15) as scope:
        started = time.monotonic()
        await vds.get_configuration(None)
    assert scope.cancelled_caught
    assert time.monotonic() - started < 0.4
    assert vds.calls_in_progress == 0
    with pytest.raises(VDProtocolError):
        vds.open_device(set_name)  # before the configuration
    vds.close()  # never configured: closing aborts it
    assert vds.aborted_by is SetAbortCause.CLIENT


@aio
async def test_create_applies_the_umask_and_restores_it(
    sqlvdi_libs: Libraries, set_name: str
) -> None:
    previous = os.umask(0o022)
    try:
        for umask, mode in ((0o007, 0o660), (None, 0o640)):
            vds = SqlVdiDeviceSet(lib.load(sqlvdi_libs.client), umask=umask)
            vds.create(set_name, VDConfig())
            assert os.umask(0o022) == 0o022  # restored at once
            segment = SHM / f"sqlvdi-standin.{set_name}"
            assert stat.S_IMODE(segment.stat().st_mode) == mode
            vds.close()
    finally:
        os.umask(previous)


@aio
async def test_create_refuses_twice_and_bad_config(vds: SqlVdiDeviceSet, set_name: str) -> None:
    with pytest.raises(VDNotSupportedError, match="device_count"):
        vds.create(set_name, VDConfig(device_count=0))
    with pytest.raises(VDProtocolError):
        vds.signal_abort()
    vds.create(set_name, VDConfig())
    with pytest.raises(VDProtocolError, match="already open"):
        vds.create(set_name, VDConfig())
    vds.close()
    with pytest.raises(VDProtocolError):
        vds.close()


@aio
async def test_buffer_memory_that_cannot_be_opened_is_explained(
    vds: SqlVdiDeviceSet, server: Server, set_name: str
) -> None:
    """What a permissions problem looks like: the client cannot open SQL Server's buffer
    memory, OpenDevice returns VD_E_ABORT, and the message says what to fix."""
    vds.create(set_name, VDConfig())
    async with anyio.create_task_group() as tg:
        tg.start_soon(server.attach, set_name, [set_name], Features.WRITE_MEDIA)
        await vds.get_configuration(10)
    (SHM / f"sqlvdi-standin.{set_name}.buffers").unlink()  # as if mssql's mode denied it
    with pytest.raises(VDAbortError) as caught:
        vds.open_device(set_name)
    text = str(caught.value)
    assert "usermod -aG" in text
    assert "umask" in text
    assert set_name in text
    assert vds.aborted_by is SetAbortCause.SERVER
    assert (await server.acall("wait", 0, 5000))[0] == ABORT
    vds.close()


# --- the device pumps run unchanged over SQL Server's devices ------------------------------


class _Job:
    """The job as a pump sees it (``vdistream.pump.DeviceJob``): commit once ended."""

    def __init__(self) -> None:
        self.failed: list[object] = []

    def device_ended(self) -> None:
        pass

    def device_failed(self, error: object) -> None:
        self.failed.append(error)

    async def decision(self) -> bool:
        return not self.failed


def _pump(device: SqlVdiDevice, storage: Any, *, backup: bool) -> Any:
    from vdistream.log import get_logger
    from vdistream.pipeline.chain import PipelineConfig
    from vdistream.pipeline.spec import CompressionSpec
    from vdistream.progress import DeviceProgress
    from vdistream.pump import Pump

    return Pump(
        device=device,
        progress=DeviceProgress(device.name),
        job=_Job(),
        index=0,
        storage=storage,
        key="stream-0",
        backup=backup,
        pipeline=PipelineConfig(compression=CompressionSpec("zstd")),
        context=b"h3",
        limiter=anyio.CapacityLimiter(2),
        log=get_logger("test"),
    )


@aio
async def test_the_pump_backs_up_and_restores_through_the_binding(
    sqlvdi_libs: Libraries, server: Server, set_name: str
) -> None:
    from vdistream.pump import PumpEnd
    from vdistream.storage import MemoryStorage

    storage = MemoryStorage()
    stream = _pattern(3, CHUNK * 5 + 512)
    library = lib.load(sqlvdi_libs.client)

    async def sql_server_backup() -> None:
        for at in range(0, len(stream), CHUNK):
            piece = stream[at : at + CHUNK]
            await server.acall("put", 0, piece)
            await server.acall("send", 0, 2, len(piece), at, 0)
            assert (await server.acall("wait", 0, 10_000))[:4:2] == (0, 0)
        await server.acall("send", 0, 12, 0, 0, 0)
        assert (await server.acall("wait", 0, 10_000))[0] == 0
        await server.acall("close_device", 0)

    async with SqlVdiDeviceSet(library) as vds:
        _, (device,) = await _started(vds, server, set_name)
        pump = _pump(device, storage, backup=True)
        async with anyio.create_task_group() as tg:
            tg.start_soon(sql_server_backup)
            outcome = await pump.run()
        assert (outcome.end, outcome.committed, outcome.bytes) == (
            PumpEnd.CLOSED,
            True,
            len(stream),
        )
        # compressed: the zstd frame's own checksum covers the logical stream, so it gets
        # no SHA-256 of its own; the stored stream's digest is the manifest's
        assert outcome.sha256 is None
        stored_sha256 = outcome.stored_sha256
    assert await server.acall("close") == 0
    assert storage.store.objects["stream-0"].startswith(b"\x28\xb5\x2f\xfd")  # a zstd frame
    assert stored_sha256 == hashlib.sha256(storage.store.objects["stream-0"]).hexdigest()

    got = bytearray()

    async def sql_server_restore() -> None:
        while True:
            await server.acall("send", 0, 1, CHUNK, 0, 0)
            hr, _, completion, done, _ = await server.acall("wait", 0, 10_000)
            assert hr == 0
            got.extend(await server.acall("get", 0, done))
            if completion == Completion.HANDLE_EOF:
                break
        await server.acall("close_device", 0)

    restore_name = f"{set_name}-r"
    async with SqlVdiDeviceSet(library) as vds:
        _, (device,) = await _started(vds, server, restore_name, media=Features.READ_MEDIA)
        pump = _pump(device, storage, backup=False)
        async with anyio.create_task_group() as tg:
            tg.start_soon(sql_server_restore)
            outcome = await pump.run()
        assert outcome.end is PumpEnd.CLOSED
    assert bytes(got) == stream
    assert await server.acall("close") == 0
    assert _segments(restore_name) == []


# --- review fixes: the end of a set, released views, device counts, OpenDevice's abort ----


class _PausedClose:
    """The library, with a worker thread that saw ``VD_E_CLOSE`` held before it returns,
    so the test can act between the library's answer and the task's resumption."""

    def __init__(self, library: lib.SqlVdi) -> None:
        self.library = copy.copy(library)
        self.entered, self.closed, self.go_on = (threading.Event() for _ in range(3))
        real = library.get_command
        close = signed(HResult.CLOSE)

        def get_command(*args: Any) -> int:
            worker = threading.current_thread() is not threading.main_thread()
            if worker:
                self.entered.set()
            hr = int(real(*args))
            if hr == close and worker:
                self.closed.set()
                self.go_on.wait(5)
            return hr

        self.library.get_command = get_command


@aio
async def test_a_close_seen_after_an_abort_leaves_the_set_aborted(
    vds: SqlVdiDeviceSet, server: Server, set_name: str
) -> None:
    """The last device's VD_E_CLOSE returns in a worker thread; before its task resumes,
    the job aborts the set. The set stays ABORTED and the device reports the abort, which
    the pump turns into the job's abort (no RuntimeError from an illegal transition)."""
    spy = _PausedClose(vds.library)
    vds._library = spy.library
    _, (device,) = await _started(vds, server, set_name)
    caught: list[BaseException] = []

    async def pump() -> None:
        try:
            await device.get_command(None)
        except Exception as exc:  # the test asserts on its type below
            caught.append(exc)

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(pump)
            assert await anyio.to_thread.run_sync(spy.entered.wait, 5)
            assert await server.acall("close_device", 0) == 0
            assert await anyio.to_thread.run_sync(spy.closed.wait, 5)
            vds.signal_abort()  # e.g. Job.abort() from the user, or the stall watchdog
            spy.go_on.set()
    assert len(caught) == 1
    assert type(caught[0]) is VDAbortError, repr(caught[0])
    assert vds.state is ClientState.ABORTED
    assert vds.aborted_by is SetAbortCause.CLIENT
    with pytest.raises(VDAbortError):
        await device.get_command(0)  # an aborted set answers every call with its abort
    vds.close()
    assert vds.state is ClientState.DNE


@aio
async def test_the_set_terminates_only_when_its_last_device_closed(
    vds: SqlVdiDeviceSet, server: Server, set_name: str
) -> None:
    _, devices = await _started(vds, server, set_name, 2)
    assert await server.acall("close_device", 0) == 0
    with pytest.raises(VDClosedError):
        await devices[0].get_command(5)
    assert vds.state is ClientState.ACTIVE  # device 1 still serves
    with pytest.raises(VDClosedError):
        await devices[0].get_command(0)  # a closed device stays closed
    assert vds.state is ClientState.ACTIVE
    assert await server.acall("close_device", 1) == 0
    with pytest.raises(VDClosedError):
        await devices[1].get_command(5)
    assert vds.state is ClientState.NORMALLY_TERMINATED
    vds.close()


@aio
async def test_close_releases_the_views_of_commands_still_held(
    vds: SqlVdiDeviceSet, server: Server, set_name: str
) -> None:
    _, (device,) = await _started(vds, server, set_name)
    await server.acall("put", 0, b"\x5a" * 512)
    await server.acall("send", 0, 2, 512, 0, 0)
    command = await device.get_command(10)
    assert command.buffer is not None
    assert command.buffer[0] == 0x5A
    with pytest.raises(VDOpenError, match="devices were still open"):
        vds.close()  # the memory is unmapped: the view must be dead, not dangling
    with pytest.raises(ValueError, match="released"):
        command.buffer[0]


@aio
async def test_a_view_still_exported_at_completion_aborts_the_set(
    vds: SqlVdiDeviceSet, server: Server, set_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A buffer something still reads (an export of the view, here a PickleBuffer) cannot
    go back to SQL Server for reuse: the set is aborted, and completing fails as after any
    abort."""
    import logging
    import pickle

    caplog.set_level(logging.WARNING, logger="vdistream.sqlserver.device_set")
    _, (device,) = await _started(vds, server, set_name)
    await server.acall("send", 0, 1, 512, 0, 0)
    command = await device.get_command(10)
    assert command.buffer is not None
    exported = pickle.PickleBuffer(command.buffer)
    with pytest.raises(VDAbortError):
        device.complete_command(command, Completion.SUCCESS, 512)
    assert vds.state is ClientState.ABORTED
    assert vds.aborted_by is SetAbortCause.CLIENT
    assert "still exported" in (vds.abort_reason or "")
    assert (await server.acall("wait", 0, 2000))[0] == ABORT  # SQL Server was told
    assert [r.msg for r in caplog.records if r.name == "vdistream.sqlserver.device_set"] == [
        "buffer_still_exported"
    ]
    exported.release()
    vds.close()


@aio
async def test_the_final_configurations_device_count_governs_the_set(
    vds: SqlVdiDeviceSet, server: Server, set_name: str
) -> None:
    """The client asked for 2 devices, SQL Server configured 1 (what the job opens): the
    set is ACTIVE once that one is open and terminates when it closes."""
    vds.create(set_name, VDConfig(device_count=2, features=Features.LIKE_PIPE))

    async def attach() -> None:
        assert await server.acall("open", set_name, 10_000) == 0
        asked = VDConfig.unpack(await server.acall("client_config"))
        assert await server.acall("open_device", set_name) == (0, 0)
        final = asked.replace(
            device_count=1,
            features=asked.features | Features.WRITE_MEDIA,
            block_size=512,
            max_io_depth=4,
            max_transfer_size=CHUNK,
            buffer_area_size=CHUNK * 4,
        )
        assert await server.acall("configure", final.pack(), final.buffer_area_size) == 0

    async with anyio.create_task_group() as tg:
        tg.start_soon(attach)
        config = await vds.get_configuration(10)
    assert config.device_count == 1
    device = vds.open_device(set_name)
    assert vds.state is ClientState.ACTIVE
    assert vds.statistics().outstanding == (0,)
    assert await server.acall("close_device", 0) == 0
    with pytest.raises(VDClosedError):
        await device.get_command(5)
    assert vds.state is ClientState.NORMALLY_TERMINATED
    vds.close()


@aio
async def test_sql_server_aborting_at_open_device_is_not_blamed_on_permissions(
    vds: SqlVdiDeviceSet, server: Server, set_name: str
) -> None:
    """SQL Server aborts the set between configuring it and our OpenDevice when its
    statement failed: the message says so, and gives the permissions fix only as a
    condition on SQL Server's own error (this machine's accounts show no problem)."""
    vds.create(set_name, VDConfig())
    async with anyio.create_task_group() as tg:
        tg.start_soon(server.attach, set_name, [set_name], Features.WRITE_MEDIA)
        await vds.get_configuration(10)
    assert await server.acall("signal_abort") == 0
    with pytest.raises(VDAbortError) as caught:
        vds.open_device(set_name)
    text = str(caught.value)
    assert "\n" not in text
    assert "SQL Server aborted the set as it was being opened" in text
    assert "if SQL Server's error says it could not open the shared memory" in text
    assert "could not open each other's shared memory" not in text
    assert "usermod -aG" in text
    assert vds.aborted_by is SetAbortCause.SERVER
    vds.close()


@aio
async def test_open_device_abort_names_the_permission_problem_found(
    vds: SqlVdiDeviceSet, server: Server, set_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vdistream.sqlserver import permissions

    who = permissions.Accounts(
        "backup",
        1001,
        "backup",
        frozenset({"backup"}),
        permissions.MssqlAccount(999, "mssql", frozenset({"mssql", "backup"})),
    )
    monkeypatch.setattr(permissions.Accounts, "current", classmethod(lambda cls: who))
    vds.create(set_name, VDConfig())
    async with anyio.create_task_group() as tg:
        tg.start_soon(server.attach, set_name, [set_name], Features.WRITE_MEDIA)
        await vds.get_configuration(10)
    (SHM / f"sqlvdi-standin.{set_name}.buffers").unlink()  # as if mssql's mode denied it
    with pytest.raises(VDAbortError) as caught:
        vds.open_device(set_name)
    text = str(caught.value)
    assert "\n" not in text
    assert "SQL Server aborted the set as it was being opened" in text
    assert "user backup is not in group mssql" in text
    assert "sudo usermod -aG mssql backup" in text
    assert "if SQL Server's error says" not in text  # the cause is known, not conditional
    vds.close()


def test_the_set_object_has_room_beyond_one_pointer() -> None:
    """The real class may hold more than its one documented pointer: the binding gives
    the constructor 64 zeroed bytes."""
    assert ctypes.sizeof(lib.SetObject) == 64
    assert bytes(lib.SetObject()) == bytes(64)


def test_a_relative_path_loads_that_file_not_the_loaders_search(
    sqlvdi_libs: Libraries, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "libsqlvdi.so").symlink_to(sqlvdi_libs.client)
    monkeypatch.chdir(tmp_path)
    library = lib.load("libsqlvdi.so")  # a bare name would make dlopen search its path
    assert Path(library.cdll._name).is_absolute()
    assert Path(library.cdll._name) == tmp_path / "libsqlvdi.so"
