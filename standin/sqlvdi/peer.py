"""Peers in child processes for the ABI tests: each function is a ``multiprocessing`` (spawn)
target that plays one side of a set through ``standin.sqlvdi.abi`` and reports on a pipe.

Running the other side in another process is what makes the tests honest: the buffer area is
then mapped at different addresses, pids differ, and a peer can really die.
"""

from __future__ import annotations

import os
import signal
import time
from multiprocessing.connection import Connection
from typing import Any

from standin.sqlvdi.abi import (
    VDC_FLUSH,
    VDC_READ,
    VDC_WRITE,
    ClientLibrary,
    ServerLibrary,
    ServerSet,
    VDConfig,
)

__all__ = (
    "BLOCK",
    "client_as_user",
    "client_then_die",
    "create_and_vanish",
    "final_config",
    "serve_and_hang",
    "serve_backup",
    "serve_restore",
)

BLOCK = 65536  # transfer size and buffer slot size of the scripted server
DEPTH = 4  # outstanding commands the scripted server keeps per device
TIMEOUT_MS = 5000  # every wait is bounded


def final_config(client: VDConfig, features: int) -> VDConfig:
    """The final configuration a server publishes (spec 2.1: outputs filled in)."""
    cfg = VDConfig.from_buffer_copy(bytes(client))
    cfg.features |= features
    cfg.blockSize, cfg.maxIODepth, cfg.maxTransferSize = BLOCK, DEPTH, BLOCK
    cfg.bufferAreaSize = BLOCK * DEPTH * cfg.deviceCount
    return cfg


def _open_one_device(lib: ServerLibrary, name: str, features: int) -> ServerSet:
    rc, ss = lib.open(name, TIMEOUT_MS)
    if ss is None:
        raise RuntimeError(f"vdss_open({name}) -> {rc}")
    rc, index = ss.open_device(name)
    cfg = final_config(ss.client_config(), features)
    if rc != 0 or index != 0 or ss.configure(cfg, BLOCK * DEPTH) != 0:
        raise RuntimeError(f"opening device {name} -> {rc}")
    return ss


def serve_backup(server_path: str, name: str, chunks: list[bytes], conn: Connection) -> None:
    """BACKUP to one device: WRITE every chunk (DEPTH outstanding), FLUSH, close the device.

    Reports the bytes each WRITE carried, the tags in send and completion order, and the
    results of the final calls.
    """
    lib = ServerLibrary(server_path)
    ss = _open_one_device(lib, name, 0x10000)  # VDF_WriteMedia
    buf = ss.buffer(BLOCK * DEPTH)
    free = list(range(DEPTH))
    outstanding: dict[int, int] = {}
    sent: list[int] = []
    completed: list[tuple[int, int, int]] = []
    pending = list(chunks)
    while pending or outstanding:
        while pending and free:
            slot, chunk = free.pop(0), pending.pop(0)
            buf[slot * BLOCK : slot * BLOCK + len(chunk)] = chunk
            rc, tag = ss.send(0, VDC_WRITE, len(chunk), 0, slot * BLOCK)
            if rc != 0:
                raise RuntimeError(f"vdss_send -> {rc}")
            outstanding[tag] = slot
            sent.append(tag)
        rc, tag, code, nbytes, _ = ss.wait(0, TIMEOUT_MS)
        if rc != 0:
            raise RuntimeError(f"vdss_wait -> {rc}")
        completed.append((tag, code, nbytes))
        free.append(outstanding.pop(tag))
    ss.send(0, VDC_FLUSH)
    flush = ss.wait(0, TIMEOUT_MS)
    report: dict[str, Any] = {
        "sent": sent,
        "completed": completed,
        "flush": flush[0:3:2],
        "close_device": ss.close_device(0),
        "close": ss.close(),
    }
    conn.send(report)


def serve_restore(server_path: str, name: str, conn: Connection) -> None:
    """RESTORE from one device: READ blocks until a completion is not success (EOF)."""
    lib = ServerLibrary(server_path)
    ss = _open_one_device(lib, name, 0x20000)  # VDF_ReadMedia
    buf = ss.buffer(BLOCK * DEPTH)
    data = bytearray()
    codes: list[int] = []
    while True:
        rc, _ = ss.send(0, VDC_READ, BLOCK, 0, BLOCK)  # slot 1: not at offset 0 on purpose
        rc, _, code, nbytes, _ = ss.wait(0, TIMEOUT_MS)
        if rc != 0:
            raise RuntimeError(f"vdss_wait -> {rc}")
        data += buf[BLOCK : BLOCK + nbytes]
        codes.append(code)
        if code != 0:
            break
    conn.send({"data": bytes(data), "codes": codes, "close_device": ss.close_device(0)})
    conn.send({"close": ss.close()})


def serve_and_hang(server_path: str, name: str, conn: Connection) -> None:
    """Open the set, hand the client one WRITE, then wait to be killed."""
    lib = ServerLibrary(server_path)
    ss = _open_one_device(lib, name, 0x10000)
    rc, _ = ss.send(0, VDC_WRITE, BLOCK, 0, 0)
    conn.send(("sent", rc))
    time.sleep(30)  # bounded: the test kills this process long before


def client_then_die(client_path: str, name: str, conn: Connection) -> None:
    """Create the set, open its device, then die by SIGKILL (no Close)."""
    lib = ClientLibrary(client_path)
    cs = lib.new_set()
    rc_create = cs.create(name, VDConfig(deviceCount=1))
    rc_config, _ = cs.get_configuration(TIMEOUT_MS)
    rc_open, _ = cs.open_device(name)
    conn.send((rc_create, rc_config, rc_open))
    os.kill(os.getpid(), signal.SIGKILL)


def create_and_vanish(client_path: str, names: list[str]) -> None:
    """Create sets and exit without Close: their segments become debris."""
    lib = ClientLibrary(client_path)
    results = [lib.new_set().create(name, VDConfig(deviceCount=1)) for name in names]
    os._exit(0 if results == [0] * len(names) else 3)


def client_as_user(
    client_path: str, name: str, uid: int, stderr_path: str, conn: Connection
) -> None:
    """The client as an unprivileged user: Create, GetConfiguration, OpenDevice, Close.

    The library is loaded before dropping privileges (the test's build directory is
    private); the library's stderr goes to ``stderr_path``.
    """
    lib = ClientLibrary(client_path)
    fd = os.open(stderr_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 2)
    os.close(fd)
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)
    os.umask(0o007)  # group access kept, as the sample's fix (umask 0) intends
    cs = lib.new_set()
    rc_create = cs.create(name, VDConfig(deviceCount=1))
    rc_config, _ = cs.get_configuration(TIMEOUT_MS)
    rc_open, dev = cs.open_device(name)
    rc_get = dev.get_command(0)[0] if dev is not None else None
    rc_close = cs.close()
    conn.send(
        {
            "create": rc_create,
            "config": rc_config,
            "open": rc_open,
            "get": rc_get,
            "close": rc_close,
        }
    )
