"""The stand-in libsqlvdi.so and its server library at the ctypes level (Contract A).

The client library must export exactly the research note's 12 symbols and behave as the VDI
spec says (sections 3-5, 8); both libraries are driven here directly, the server side often in
a child process so that buffers, pids and deaths are real.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from standin.sqlvdi import abi, peer
from standin.sqlvdi.abi import (
    ERROR_HANDLE_EOF,
    ERROR_SUCCESS,
    VD_E_ABORT,
    VD_E_BUSY,
    VD_E_CLOSE,
    VD_E_INVALID,
    VD_E_NOTOPEN,
    VD_E_NOTSUPPORTED,
    VD_E_OPEN,
    VD_E_PROTOCOL,
    VD_E_TIMEOUT,
    VDC_FLUSH,
    VDC_READ,
    VDC_WRITE,
    ClientLibrary,
    ClientSet,
    ServerLibrary,
    ServerSet,
    VDConfig,
)
from standin.sqlvdi.build import BuildError, Libraries, build

SHM = Path("/dev/shm")
SPAWN = multiprocessing.get_context("spawn")
NOBODY = 65534
WAIT = 5000  # ms: every blocking call in these tests is bounded

# sqlvdi-linux.md's table, verbatim: the client library exports these and nothing else.
CLIENT_SYMBOLS = {
    "_ZN22ClientVirtualDeviceSetC1Ev",
    "_ZN22ClientVirtualDeviceSetD1Ev",
    "_ZN22ClientVirtualDeviceSet6CreateEPcP8VDConfig",
    "_ZN22ClientVirtualDeviceSet16GetConfigurationElP8VDConfig",
    "_ZN22ClientVirtualDeviceSet10OpenDeviceEPcPP19ClientVirtualDevice",
    "_ZN22ClientVirtualDeviceSet5CloseEv",
    "_ZN22ClientVirtualDeviceSet11SignalAbortEv",
    "_ZN22ClientVirtualDeviceSet15OpenInSecondaryEPc",
    "_ZN22ClientVirtualDeviceSet15GetBufferHandleEPhPj",
    "_ZN22ClientVirtualDeviceSet15MapBufferHandleEiPPh",
    "_ZN19ClientVirtualDevice10GetCommandElPP11VDC_Command",
    "_ZN19ClientVirtualDevice15CompleteCommandEP11VDC_Commandiml",
}
SERVER_SYMBOLS = {
    "vdss_open",
    "vdss_client_config",
    "vdss_open_device",
    "vdss_configure",
    "vdss_buffer_base",
    "vdss_send",
    "vdss_wait",
    "vdss_close_device",
    "vdss_signal_abort",
    "vdss_client_alive",
    "vdss_close",
}


def segments() -> set[str]:
    """This module's segments (its set names start with "abi-"; other tests may run now)."""
    return {p.name for p in SHM.iterdir() if p.name.startswith("sqlvdi-standin.abi-")}


@pytest.fixture(autouse=True)
def no_debris() -> Iterator[None]:
    """Every test leaves /dev/shm as it found it."""
    before = segments()
    yield
    assert segments() - before == set()


@pytest.fixture
def client(sqlvdi_libs: Libraries) -> ClientLibrary:
    return ClientLibrary(sqlvdi_libs.client)


@pytest.fixture
def server(sqlvdi_libs: Libraries) -> ServerLibrary:
    return ServerLibrary(sqlvdi_libs.server)


@pytest.fixture
def name() -> str:
    return f"abi-{uuid.uuid4()}"


def exported(lib: Path) -> set[str]:
    out = subprocess.run(
        ["nm", "-D", "--defined-only", str(lib)], capture_output=True, text=True, check=True
    ).stdout
    return {line.split()[-1] for line in out.splitlines() if line.strip()}


def open_pair(
    client: ClientLibrary, server: ServerLibrary, name: str, devices: int = 1
) -> tuple[ClientSet, ServerSet]:
    """A configured set in this process: client created, server opened `devices` devices."""
    cs = client.new_set()
    assert cs.create(name, VDConfig(deviceCount=devices)) == 0
    rc, ss = server.open(name, WAIT)
    assert rc == 0
    assert ss is not None
    for i in range(devices):
        assert ss.open_device(name + (str(i) if i else "")) == (0, i)
    cfg = peer.final_config(ss.client_config(), 0x10000)
    assert ss.configure(cfg, peer.BLOCK * peer.DEPTH * devices) == 0
    rc, got = cs.get_configuration(WAIT)
    assert rc == 0
    assert bytes(got) == bytes(cfg)
    return cs, ss


def run_child(target: Any, *args: Any) -> tuple[Any, Any]:
    """Start a spawn child with a pipe as its last argument; (process, our end)."""
    ours, theirs = SPAWN.Pipe()
    process = SPAWN.Process(target=target, args=(*args, theirs), daemon=True)
    process.start()
    theirs.close()
    return process, ours


def receive(conn: Any, timeout: float = 10.0) -> Any:
    assert conn.poll(timeout), "child did not report"
    return conn.recv()


# ---- symbols, layouts, build ----------------------------------------------------------


def test_client_library_exports_exactly_the_research_note_symbols(sqlvdi_libs: Libraries) -> None:
    # The version script leaves nothing else: no toolchain symbol shows up in this build.
    assert exported(sqlvdi_libs.client) == CLIENT_SYMBOLS


def test_server_library_exports_exactly_the_vdss_api(sqlvdi_libs: Libraries) -> None:
    assert exported(sqlvdi_libs.server) == SERVER_SYMBOLS


def test_struct_layouts_match_the_header() -> None:
    assert ctypes.sizeof(VDConfig) == 44
    assert ctypes.sizeof(abi.VDCCommand) == 24
    assert abi.VDCCommand.buffer.offset == 16
    assert VD_E_TIMEOUT == -2139684861  # 0x80770003 as the Linux library's int


def test_build_is_idempotent_and_names_g_plus_plus_when_missing(
    sqlvdi_libs: Libraries, monkeypatch: pytest.MonkeyPatch
) -> None:
    stamps = (sqlvdi_libs.client.stat().st_mtime_ns, sqlvdi_libs.server.stat().st_mtime_ns)
    again = build(sqlvdi_libs.client.parent)
    assert again == sqlvdi_libs
    assert (again.client.stat().st_mtime_ns, again.server.stat().st_mtime_ns) == stamps
    assert not [p for p in again.client.parent.iterdir() if p.name.endswith(".tmp")]
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(BuildError, match="install the Debian package g\\+\\+"):
        build(sqlvdi_libs.client.parent)


# ---- round trips with the server in another process -------------------------------------


def test_backup_round_trip_out_of_order_completions_then_close(
    client: ClientLibrary, sqlvdi_libs: Libraries, name: str
) -> None:
    chunks = [bytes([i]) * peer.BLOCK for i in range(1, 9)] + [b"tail" * 100]
    process, conn = run_child(peer.serve_backup, str(sqlvdi_libs.server), name, chunks)
    cs = client.new_set()
    assert cs.create(name, VDConfig(deviceCount=1)) == 0
    rc, cfg = cs.get_configuration(WAIT)
    assert rc == 0
    assert (cfg.deviceCount, cfg.features, cfg.blockSize, cfg.maxTransferSize) == (
        1,
        0x10000,
        peer.BLOCK,
        peer.BLOCK,
    )
    rc, dev = cs.open_device(name)
    assert rc == 0
    assert dev is not None
    received: list[bytes] = []
    remaining = len(chunks)
    while remaining:
        # Hold every WRITE the server keeps outstanding, then complete them newest first.
        held = []
        for _ in range(min(peer.DEPTH, remaining)):
            rc, cmd = dev.get_command(WAIT)
            assert rc == 0
            assert cmd is not None
            assert cmd.commandCode == VDC_WRITE
            received.append(dev.data(cmd))
            held.append(cmd)
        assert dev.get_command(0)[0] == VD_E_TIMEOUT  # nothing beyond the server's depth
        for cmd in reversed(held):
            assert dev.complete(cmd, ERROR_SUCCESS, cmd.size) == 0
        remaining -= len(held)
    rc, cmd = dev.get_command(WAIT)
    assert cmd is not None
    assert cmd.commandCode == VDC_FLUSH
    assert dev.complete(cmd, ERROR_SUCCESS) == 0
    assert dev.get_command(WAIT)[0] == VD_E_CLOSE
    assert b"".join(received) == b"".join(chunks)
    report = receive(conn)
    assert sorted(t for t, _, _ in report["completed"]) == sorted(report["sent"])
    assert [t for t, _, _ in report["completed"]] != report["sent"]  # really out of order
    assert [n for _, _, n in sorted(report["completed"])] == [len(c) for c in chunks]
    assert report["flush"] == (0, ERROR_SUCCESS)
    assert (report["close_device"], report["close"]) == (0, 0)
    assert dev.get_command(0)[0] == VD_E_CLOSE  # stays closed
    assert cs.close() == 0
    process.join(10)
    assert process.exitcode == 0


def test_restore_round_trip_short_read_ends_with_handle_eof(
    client: ClientLibrary, sqlvdi_libs: Libraries, name: str
) -> None:
    stream = os.urandom(3 * peer.BLOCK + 1234)
    process, conn = run_child(peer.serve_restore, str(sqlvdi_libs.server), name)
    cs = client.new_set()
    assert cs.create(name, VDConfig(deviceCount=1)) == 0
    rc, cfg = cs.get_configuration(WAIT)
    assert rc == 0
    assert cfg.features & 0x20000  # VDF_ReadMedia
    rc, dev = cs.open_device(name)
    assert dev is not None
    offset = 0
    while (got := dev.get_command(WAIT))[0] == 0:
        cmd = got[1]
        assert cmd is not None
        assert cmd.commandCode == VDC_READ
        piece = stream[offset : offset + cmd.size]
        offset += len(piece)
        dev.fill(cmd, piece)
        code = ERROR_SUCCESS if len(piece) == cmd.size else ERROR_HANDLE_EOF
        assert dev.complete(cmd, code, len(piece)) == 0
    assert got[0] == VD_E_CLOSE
    report = receive(conn)
    assert report["data"] == stream
    assert report["codes"] == [0, 0, 0, ERROR_HANDLE_EOF]
    assert report["close_device"] == 0
    assert cs.close() == 0
    assert receive(conn) == {"close": 0}
    process.join(10)
    assert process.exitcode == 0


# ---- Create, GetConfiguration, OpenDevice -----------------------------------------------


def test_create_validates_configuration_and_name(
    client: ClientLibrary, server: ServerLibrary, name: str
) -> None:
    cs = client.new_set()
    for bad in (
        VDConfig(deviceCount=0),
        VDConfig(deviceCount=65),
        VDConfig(deviceCount=1, features=0x4),  # an unassigned bit
        VDConfig(deviceCount=1, alignment=3),
        VDConfig(deviceCount=1, alignment=1 << 17),
    ):
        assert cs.create(name, bad) == VD_E_NOTSUPPORTED
    for bad_name in ("", "a/b", "x" * 200, "set.buffers"):
        assert cs.create(bad_name, VDConfig(deviceCount=1)) == VD_E_INVALID
    assert cs.create(name, VDConfig(deviceCount=64)) == 0
    assert cs.create(name, VDConfig(deviceCount=1)) == VD_E_PROTOCOL  # once per object
    other = client.new_set()
    assert other.create(name, VDConfig(deviceCount=1)) == VD_E_BUSY  # a live set's name
    assert other.close() == VD_E_PROTOCOL  # nothing created
    assert server.open(f"{name}-absent", 30)[0] == VD_E_NOTOPEN
    assert cs.close() == 0
    assert cs.close() == VD_E_PROTOCOL  # safe to call once


def test_get_configuration_polls_and_times_out(client: ClientLibrary, name: str) -> None:
    cs = client.new_set()
    assert cs.get_configuration(0)[0] == VD_E_PROTOCOL  # no set yet
    assert cs.create(name, VDConfig(deviceCount=1)) == 0
    assert cs.get_configuration(0)[0] == VD_E_TIMEOUT
    start = time.monotonic()
    assert cs.get_configuration(120)[0] == VD_E_TIMEOUT
    assert 0.1 <= time.monotonic() - start < 1.0
    assert cs.open_device(name)[0] == VD_E_PROTOCOL  # not configured yet
    assert cs.close() == 0


def test_open_device_by_the_names_the_server_opened(
    client: ClientLibrary, server: ServerLibrary, name: str
) -> None:
    cs = client.new_set()
    assert cs.create(name, VDConfig(deviceCount=2)) == 0
    _, ss = server.open(name, WAIT)
    assert ss is not None
    assert ss.open_device(name) == (0, 0)
    assert ss.open_device(name)[0] == VD_E_INVALID  # duplicate clause
    assert ss.open_device(name + "1") == (0, 1)
    assert ss.open_device(name + "2")[0] == VD_E_INVALID  # more than deviceCount
    assert ss.configure(peer.final_config(ss.client_config(), 0x10000), 1 << 20) == 0
    assert ss.open_device(name + "3")[0] == VD_E_PROTOCOL  # after configuration
    assert cs.get_configuration(WAIT)[0] == 0
    assert cs.open_device("nope")[0] == VD_E_INVALID
    rc0, dev0 = cs.open_device(name)
    rc1, dev1 = cs.open_device(name + "1")
    assert (rc0, rc1) == (0, 0)
    assert dev0 is not None
    assert dev1 is not None
    assert dev0.address != dev1.address
    assert cs.open_device(name)[0] == VD_E_OPEN
    assert (ss.close_device(0), ss.close_device(1)) == (0, 0)
    assert dev0.get_command(0)[0] == VD_E_CLOSE
    assert dev1.get_command(0)[0] == VD_E_CLOSE
    assert ss.close() == 0
    assert cs.close() == 0


# ---- commands, completions, buffer handles ----------------------------------------------


def test_complete_command_only_for_an_outstanding_command(
    client: ClientLibrary, server: ServerLibrary, name: str
) -> None:
    cs, ss = open_pair(client, server, name)
    _, dev = cs.open_device(name)
    assert dev is not None
    assert dev.get_command(0)[0] == VD_E_TIMEOUT  # poll on an empty queue
    buf = ss.buffer(peer.BLOCK)
    buf[0:5] = b"hello"
    rc, tag = ss.send(0, VDC_WRITE, 5, 0, 0)
    assert rc == 0
    assert ss.send(0, VDC_WRITE, 16, 0, peer.BLOCK * peer.DEPTH)[0] == VD_E_INVALID  # outside
    rc, cmd = dev.get_command(WAIT)
    assert cmd is not None
    assert (cmd.commandCode, cmd.size, dev.data(cmd)) == (VDC_WRITE, 5, b"hello")
    assert ss.wait(0, 0)[0] == VD_E_TIMEOUT
    assert dev.complete(abi.VDCCommand(), 0, 0) == VD_E_INVALID  # not the library's command
    assert dev.complete(cmd, ERROR_SUCCESS, 5, 77) == 0
    assert dev.complete(cmd, ERROR_SUCCESS, 5) == VD_E_INVALID  # twice
    assert cmd.commandCode == VDC_WRITE  # still readable after completion, as the sample does
    assert ss.wait(0, WAIT) == (0, tag, ERROR_SUCCESS, 5, 77)
    assert ss.close_device(0) == 0
    assert ss.close() == 0
    assert cs.close() == 0


def test_a_full_ring_is_busy(client: ClientLibrary, server: ServerLibrary, name: str) -> None:
    cs, ss = open_pair(client, server, name)
    results = [ss.send(0, VDC_FLUSH)[0] for _ in range(129)]
    assert results == [0] * 128 + [VD_E_BUSY]
    assert ss.close_device(0) == 0
    assert ss.close() == 0
    assert cs.close() == 0


def test_buffer_handles_map_across_processes_of_the_set(
    client: ClientLibrary, server: ServerLibrary, name: str
) -> None:
    cs, ss = open_pair(client, server, name)
    _, dev = cs.open_device(name)
    assert dev is not None
    ss.buffer(peer.BLOCK * 2)[peer.BLOCK : peer.BLOCK + 4] = b"data"
    ss.send(0, VDC_WRITE, 4, 0, peer.BLOCK)
    _, cmd = dev.get_command(WAIT)
    assert cmd is not None
    rc, handle = cs.get_buffer_handle(cmd.buffer)
    assert rc == 0
    assert cs.map_buffer_handle(handle) == (0, cmd.buffer)
    assert cs.get_buffer_handle(cmd.buffer + 1)[0] == VD_E_INVALID
    assert cs.map_buffer_handle(handle ^ 1)[0] == VD_E_INVALID
    secondary = client.new_set()
    assert secondary.open_in_secondary(name) == 0  # its own mapping of the buffer area
    rc, mapped = secondary.map_buffer_handle(handle)
    assert rc == 0
    assert mapped is not None
    assert mapped != cmd.buffer
    assert ctypes.string_at(mapped, 4) == b"data"
    assert dev.complete(cmd, ERROR_SUCCESS, 4) == 0
    assert cs.map_buffer_handle(handle)[0] == VD_E_INVALID  # no longer outstanding
    assert secondary.close() == 0
    assert client.new_set().open_in_secondary(f"{name}-absent") == VD_E_PROTOCOL
    assert ss.wait(0, WAIT)[0] == 0
    assert ss.close_device(0) == 0
    assert ss.close() == 0
    assert cs.close() == 0


# ---- abort ------------------------------------------------------------------------------


@pytest.mark.parametrize("side", ["client", "server"])
def test_signal_abort_wakes_every_waiter_on_both_sides(
    client: ClientLibrary, server: ServerLibrary, name: str, side: str
) -> None:
    cs, ss = open_pair(client, server, name, devices=2)
    _, dev0 = cs.open_device(name)
    _, dev1 = cs.open_device(name + "1")
    assert dev0 is not None
    assert dev1 is not None
    ss.send(0, VDC_WRITE, 8, 0, 0)
    _, held = dev0.get_command(WAIT)
    assert held is not None
    results: dict[str, int] = {}

    def waiter(key: str, call: Any) -> None:
        results[key] = call()

    threads = [
        threading.Thread(target=waiter, args=("get", lambda: dev1.get_command(-1)[0])),
        threading.Thread(target=waiter, args=("wait0", lambda: ss.wait(0, -1)[0])),
        threading.Thread(target=waiter, args=("wait1", lambda: ss.wait(1, -1)[0])),
    ]
    for t in threads:
        t.start()
    # No event marks a thread as parked inside the C wait; give them a moment, the
    # assertions hold either way (an early caller sees the abort flag at once).
    time.sleep(0.05)
    started = time.monotonic()
    assert (cs.signal_abort() if side == "client" else ss.signal_abort()) == 0
    for t in threads:
        t.join(2)
    assert time.monotonic() - started < 1.0
    assert results == {"get": VD_E_ABORT, "wait0": VD_E_ABORT, "wait1": VD_E_ABORT}
    assert dev0.complete(held, ERROR_SUCCESS, 8) == VD_E_ABORT  # ignored after abort
    assert cs.get_configuration(0)[0] == VD_E_ABORT
    assert ss.send(0, VDC_FLUSH)[0] == VD_E_ABORT
    assert ss.close_device(0) == VD_E_ABORT
    assert cs.signal_abort() == 0  # idempotent
    assert ss.close() == 0
    assert cs.close() == 0  # after abort Close releases without complaint


def test_close_with_open_devices_aborts_then_returns_open(
    client: ClientLibrary, server: ServerLibrary, name: str
) -> None:
    cs, ss = open_pair(client, server, name)
    assert cs.open_device(name)[0] == 0
    assert cs.close() == VD_E_OPEN
    assert ss.wait(0, WAIT)[0] == VD_E_ABORT
    assert ss.close() == 0


def test_server_close_with_open_devices_aborts_the_client(
    client: ClientLibrary, server: ServerLibrary, name: str
) -> None:
    cs, ss = open_pair(client, server, name)
    _, dev = cs.open_device(name)
    assert dev is not None
    assert ss.close() == VD_E_PROTOCOL
    assert dev.get_command(WAIT)[0] == VD_E_ABORT
    assert cs.close() == 0


# ---- process death, permissions, debris --------------------------------------------------


def test_server_death_aborts_the_client_within_a_second(
    client: ClientLibrary, sqlvdi_libs: Libraries, name: str
) -> None:
    process, conn = run_child(peer.serve_and_hang, str(sqlvdi_libs.server), name)
    cs = client.new_set()
    assert cs.create(name, VDConfig(deviceCount=1)) == 0
    assert cs.get_configuration(WAIT)[0] == 0
    _, dev = cs.open_device(name)
    assert dev is not None
    assert receive(conn) == ("sent", 0)
    rc, cmd = dev.get_command(WAIT)
    assert rc == 0
    assert cmd is not None
    os.kill(process.pid, signal.SIGKILL)  # not reaped yet: a zombie must count as dead
    started = time.monotonic()
    assert dev.get_command(WAIT)[0] == VD_E_ABORT
    assert time.monotonic() - started < 1.0
    assert dev.complete(cmd, ERROR_SUCCESS, cmd.size) == VD_E_ABORT
    process.join(10)
    assert cs.close() == 0  # also removes the dead server's buffer area


def test_client_death_aborts_the_server(
    server: ServerLibrary, sqlvdi_libs: Libraries, name: str
) -> None:
    process, conn = run_child(peer.client_then_die, str(sqlvdi_libs.client), name)
    _, ss = server.open(name, WAIT)
    assert ss is not None
    assert ss.open_device(name) == (0, 0)
    assert ss.configure(peer.final_config(ss.client_config(), 0x10000), 1 << 20) == 0
    assert ss.send(0, VDC_WRITE, 16, 0, 0)[0] == 0
    assert receive(conn) == (0, 0, 0)
    started = time.monotonic()
    assert ss.wait(0, WAIT)[0] == VD_E_ABORT
    assert time.monotonic() - started < 1.0
    assert not ss.client_alive()
    process.join(10)
    assert process.exitcode == -signal.SIGKILL
    assert ss.close() == 0  # removes the dead client's segment too


def test_unreadable_buffer_area_fails_open_device_with_abort_and_the_log_line(
    server: ServerLibrary, sqlvdi_libs: Libraries, name: str, tmp_path: Path
) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to run the client as another user")
    stderr = tmp_path / "client-stderr"
    process, conn = run_child(
        peer.client_as_user, str(sqlvdi_libs.client), name, NOBODY, str(stderr)
    )
    rc, ss = server.open(name, WAIT)
    assert rc == 0
    assert ss is not None
    assert (SHM / f"sqlvdi-standin.{name}").stat().st_uid == NOBODY
    assert ss.open_device(name) == (0, 0)
    old = os.umask(0o077)  # the buffer area becomes root's alone: nobody may open it
    try:
        assert ss.configure(peer.final_config(ss.client_config(), 0x10000), 1 << 20) == 0
    finally:
        os.umask(old)
    assert ss.wait(0, WAIT)[0] == VD_E_ABORT
    report = receive(conn)
    assert report == {"create": 0, "config": 0, "open": VD_E_ABORT, "get": None, "close": 0}
    process.join(10)
    assert process.exitcode == 0
    assert stderr.read_text() == (
        f"SQLVDI: Host_{name}_SQLVDIMemoryName_0: Open(hBufferMemory): error 13\n"
    )
    assert ss.close() == 0


def test_create_removes_segments_of_dead_sets(
    client: ClientLibrary, server: ServerLibrary, sqlvdi_libs: Libraries, name: str
) -> None:
    stale = f"{name}-stale"
    process = SPAWN.Process(
        target=peer.create_and_vanish, args=(str(sqlvdi_libs.client), [name, stale])
    )
    process.start()
    process.join(10)
    assert process.exitcode == 0
    assert {f"sqlvdi-standin.{name}", f"sqlvdi-standin.{stale}"} <= segments()
    assert server.open(name, 60)[0] == VD_E_NOTOPEN  # a dead client's set is not served
    cs = client.new_set()
    assert cs.create(name, VDConfig(deviceCount=1)) == 0  # same name: the debris is replaced
    assert f"sqlvdi-standin.{stale}" not in segments()  # other dead sets are swept too
    rc, ss = server.open(name, WAIT)
    assert rc == 0
    assert ss is not None
    assert ss.close() == 0  # before configuration: the set is aborted
    assert cs.get_configuration(0)[0] == VD_E_ABORT
    assert cs.close() == 0
