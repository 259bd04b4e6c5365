"""A child process that runs engine-side sets for the tests: the far end of ``remote_proxy``.

Run as ``python -m tests.transport.agent engine FD``: ``FD`` is one end of an
``AF_UNIX``/``SOCK_SEQPACKET`` socketpair (passed with ``pass_fds``). The test process
sends requests over it; the agent executes them on ``RemoteServerVirtualDeviceSet``
objects (the engine side of ``vdistream.transport``) and answers. One message = one
pickled tuple (both ends are this test suite; pickle is not a wire format here).

Requests (test -> agent), each with a request id ``rid``:

* ``("new", rid, directory)``: a ``RemoteServerVirtualDeviceSet`` on
  ``RuntimeDirectory(directory)``, entered (``async with``) by a task of its own; the
  answer is its handle once entered.
* ``("call", rid, handle, method, args, kwargs)``: call a method. A result that is
  awaitable is awaited in a task of its own, so a call that waits (``allocate_buffer``)
  does not hold up the next one; calls *start* in the order they were sent.
  ``send_command`` answers with the pending command at once (done or not);
  ``free_buffer`` answers whether the engine released its view (not after an abort).
* ``("cancel", 0, rid)``: cancel the awaited call ``rid`` (the test was cancelled
  while waiting for it); no answer.
* ``("get", rid, handle, attribute)``: read a property.
* ``("drop", rid, handle)``: leave the set's ``async with`` (it closes the set).
* ``("sync", rid)``: answer once every task of the agent waits and no record is in
  flight on any socket of the agent other than this one, in either direction (the
  barrier of ``remote_proxy.World.sync``); the answer says whether anything moved.
* ``("reset", rid)``: drop every set and forget every handle (between tests).

Answers (agent -> test): ``("ok", rid, value)`` or ``("err", rid, class name, text,
attributes)``; and, unasked, ``("done", handle, value)`` / ``("failed", handle, class
name, text, attributes)`` once a pending command has its result. Values are encoded:
``("h", handle, kind, info)`` for objects that stay here (devices, pending commands)
and ``("buf", key, offset, nbytes, address)`` for a view of the buffer area, where
``key`` names the memfd behind it; the first answer naming a new key carries that
memfd (``SCM_RIGHTS``), which the test maps: both processes then see the same pages.
A test sends buffers back as ``("buf", key, offset, nbytes)`` and any other bytes as
``("bytes", data)``.

``python -m tests.transport.agent client DIRECTORY NAME DEVICES`` is the other role: a
client process that creates the set ``NAME``, publishes it with ``serve_set`` and
pumps its devices (the first command of each device is completed, the later ones are
held): the test kills it mid-backup. It prints ``ready`` once published.
"""

from __future__ import annotations

import array
import asyncio
import ctypes
import fcntl
import inspect
import os
import pickle
import socket
import stat
import sys
import termios
import time
from collections.abc import Awaitable
from typing import Any

import anyio
import anyio.abc

__all__ = ("all_tasks_waiting", "main")

_MAX_MESSAGE = 1 << 20
_SIOCOUTQ = termios.TIOCOUTQ


async def all_tasks_waiting(limit: float = 2.0) -> None:
    """Return once every other task of this event loop waits on something (asyncio).

    ``anyio.wait_all_tasks_blocked`` does the same but sleeps 0.1 s whenever a task is
    runnable: the barrier would cost 0.1 s a step. Gives up after ``limit`` seconds (a
    task that never waits, e.g. one that polls with ``sleep(0)``)."""
    this = asyncio.current_task()
    deadline = time.monotonic() + limit
    while True:
        await asyncio.sleep(0)
        busy = False
        for task in asyncio.all_tasks():
            waiter = getattr(task, "_fut_waiter", None)
            if task is not this and (waiter is None or waiter.done()):
                busy = True
                break
        if not busy or time.monotonic() > deadline:
            return


def _address(view: memoryview) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(view))


def error_info(exc: BaseException) -> tuple[str, str, dict[str, Any]]:
    """What the test needs to raise the same error: class name, text, attributes."""
    attrs = {
        k: getattr(exc, k) for k in ("hresult", "set_name", "device", "state") if hasattr(exc, k)
    }
    try:
        pickle.dumps(attrs)
    except Exception:  # an unpicklable state object: keep its name
        attrs = {k: getattr(v, "name", str(v)) for k, v in attrs.items()}
    return type(exc).__name__, str(exc), attrs


class _Mapping:
    """One line of /proc/self/maps that maps a file."""

    def __init__(self, start: int, end: int, offset: int, dev: int, inode: int) -> None:
        self.start, self.end, self.offset, self.dev, self.inode = start, end, offset, dev, inode


class Agent:
    """Executes the test's requests; see the module docstring."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.objects: dict[int, Any] = {}
        self.next_handle = 1
        self.stops: dict[int, anyio.Event] = {}
        self.finished: dict[int, anyio.Event] = {}
        self.sent_keys: set[tuple[int, int]] = set()
        # key -> [(file offset, nbytes, view)] of the buffers the engine handed out
        self.buffers: dict[tuple[int, int], list[tuple[int, int, memoryview]]] = {}
        self.mappings: list[_Mapping] = []
        self.tg: anyio.abc.TaskGroup | None = None
        self.calls: dict[int, anyio.CancelScope] = {}  # awaited calls, by request id

    # --- transport to the test -------------------------------------------------------

    def send(self, message: tuple[Any, ...], fds: list[int] | None = None) -> None:
        data = pickle.dumps(message)
        ancillary = []
        if fds:
            ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
        # The test process reads all the time; a full buffer only means "wait a little".
        while True:
            try:
                self.sock.sendmsg([data], ancillary)
                return
            except BlockingIOError:
                self.sock.setblocking(True)
                try:
                    self.sock.sendmsg([data], ancillary)
                    return
                finally:
                    self.sock.setblocking(False)

    def reply_error(self, rid: int, exc: BaseException) -> None:
        self.send(("err", rid, *error_info(exc)))

    # --- handles and values ------------------------------------------------------------

    def register(self, obj: object) -> int:
        handle = self.next_handle
        self.next_handle += 1
        self.objects[handle] = obj
        return handle

    def _mapping_of(self, address: int) -> _Mapping:
        for mapping in self.mappings:
            if mapping.start <= address < mapping.end:
                return mapping
        self.mappings = []
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split()
                if len(fields) < 6 or not fields[5].startswith("/memfd:"):
                    continue
                start, end = (int(x, 16) for x in fields[0].split("-"))
                major, minor = (int(x, 16) for x in fields[3].split(":"))
                device = os.makedev(major, minor)
                offset, inode = int(fields[2], 16), int(fields[4])
                self.mappings.append(_Mapping(start, end, offset, device, inode))
        for mapping in self.mappings:
            if mapping.start <= address < mapping.end:
                return mapping
        raise RuntimeError(f"agent: address 0x{address:x} is in no memfd mapping")

    def _memfd(self, mapping: _Mapping) -> int:
        """A new fd of the memfd behind ``mapping`` (the engine's own, duplicated, when it
        kept it open; otherwise opened through /proc/self/map_files, which root may)."""
        for name in os.listdir("/proc/self/fd"):
            fd = int(name)
            try:
                st = os.fstat(fd)
            except OSError:
                continue
            if st.st_ino == mapping.inode and st.st_dev == mapping.dev and stat.S_ISREG(st.st_mode):
                return os.dup(fd)
        return os.open(f"/proc/self/map_files/{mapping.start:x}-{mapping.end:x}", os.O_RDWR)

    def encode_buffer(self, view: memoryview, fds: list[int]) -> tuple[Any, ...]:
        address = _address(view)
        mapping = self._mapping_of(address)
        key = (mapping.dev, mapping.inode)
        offset = address - mapping.start + mapping.offset
        if key not in self.sent_keys:
            fds.append(self._memfd(mapping))
            self.sent_keys.add(key)
        self.buffers.setdefault(key, []).append((offset, view.nbytes, view))
        return ("buf", key, offset, view.nbytes, address)

    def decode(self, value: Any) -> Any:
        if isinstance(value, tuple) and value and value[0] == "h":
            return self.objects[value[1]]
        if isinstance(value, tuple) and value and value[0] == "buf":
            _, key, offset, nbytes = value
            for start, size, view in self.buffers.get(key, []):
                if start <= offset and offset + nbytes <= start + size:
                    if (start, size) == (offset, nbytes):
                        return view
                    return view[offset - start : offset - start + nbytes]
            # Not (or no longer) a buffer the engine handed out: the engine refuses it.
            return memoryview(bytearray(nbytes))
        if isinstance(value, tuple) and value and value[0] == "bytes":
            return memoryview(bytearray(value[1]))
        return value

    def encode(self, value: Any, fds: list[int]) -> Any:
        from vdistream.transport.engine import RemotePendingCommand, RemoteServerVirtualDevice

        if isinstance(value, memoryview):
            return self.encode_buffer(value, fds)
        if isinstance(value, RemoteServerVirtualDevice):
            return ("h", self.register(value), "device", value.name)
        if isinstance(value, RemotePendingCommand):
            handle = self.register(value)
            info = (value.code, value.size, value.position, value.serial)
            if value.done():
                return ("h", handle, "pending", (*info, value.result()))
            assert self.tg is not None
            self.tg.start_soon(self.watch, handle, value)
            return ("h", handle, "pending", (*info, None))
        return value

    def forget_if_released(self, encoded: Any) -> bool:
        """After ``free_buffer``: whether the engine released the buffer's view (it keeps
        it after an abort); a released one is forgotten."""
        if not (isinstance(encoded, tuple) and encoded and encoded[0] == "buf"):
            return False
        _, key, offset, nbytes = encoded
        entries = self.buffers.get(key, [])
        for entry in entries:
            if entry[:2] == (offset, nbytes):
                try:
                    _ = entry[2].nbytes
                except ValueError:
                    entries.remove(entry)
                    return True
                return False
        return False

    async def watch(self, handle: int, pending: Any) -> None:
        try:
            result = await pending
        except Exception as exc:  # the test re-raises it
            self.send(("failed", handle, *error_info(exc)))
        else:
            self.send(("done", handle, result))

    # --- requests -------------------------------------------------------------------------

    async def hold(self, rid: int, directory: str) -> None:
        """Own one engine-side set's ``async with`` until the test drops it."""
        from vdistream.transport.engine import RemoteServerVirtualDeviceSet
        from vdistream.transport.rendezvous import RuntimeDirectory

        stop, finished = anyio.Event(), anyio.Event()
        handle = 0
        try:
            async with RemoteServerVirtualDeviceSet(directory=RuntimeDirectory(directory)) as rs:
                handle = self.register(rs)
                self.stops[handle] = stop
                self.finished[handle] = finished
                self.send(("ok", rid, ("h", handle, "set", None)))
                await stop.wait()
        except Exception as exc:  # reported; the agent goes on
            if not handle:
                self.reply_error(rid, exc)
        finally:
            finished.set()

    async def finish(self, rid: int, awaitable: Awaitable[Any]) -> None:
        with anyio.CancelScope() as scope:
            self.calls[rid] = scope
            try:
                value = await awaitable
            except Exception as exc:  # the test re-raises it
                self.reply_error(rid, exc)
                return
            finally:
                self.calls.pop(rid, None)
        if scope.cancelled_caught:
            return  # the test gave up on it (and forgot the request id)
        fds: list[int] = []
        try:
            message = ("ok", rid, self.encode(value, fds))
            self.send(message, fds)
        finally:
            for fd in fds:
                os.close(fd)

    def idle(self) -> bool:
        """No record in flight on any socket of this process but the control one."""
        for name in os.listdir("/proc/self/fd"):
            fd = int(name)
            if fd == self.sock.fileno():
                continue
            try:
                if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                    continue
                for request in (termios.FIONREAD, _SIOCOUTQ):
                    out = array.array("i", [0])
                    fcntl.ioctl(fd, request, out, True)
                    if out[0]:
                        return False
            except OSError:
                continue
        return True

    async def sync(self, rid: int) -> None:
        moved = False
        with anyio.move_on_after(5):
            while True:
                await all_tasks_waiting()
                if self.idle():
                    break
                moved = True
                await anyio.sleep(0.0002)
        self.send(("ok", rid, moved))

    async def reset(self, rid: int) -> None:
        for handle, stop in list(self.stops.items()):
            stop.set()
            with anyio.move_on_after(2):
                await self.finished[handle].wait()
        self.stops.clear()
        self.finished.clear()
        self.objects.clear()
        self.buffers.clear()
        self.sent_keys.clear()
        self.mappings.clear()
        self.send(("ok", rid, None))

    def handle(self, message: tuple[Any, ...]) -> None:
        kind, rid = message[0], message[1]
        assert self.tg is not None
        if kind == "new":
            self.tg.start_soon(self.hold, rid, message[2])
        elif kind == "sync":
            self.tg.start_soon(self.sync, rid)
        elif kind == "reset":
            self.tg.start_soon(self.reset, rid)
        elif kind == "cancel":
            scope = self.calls.get(message[2])
            if scope is not None:
                scope.cancel()
        elif kind == "drop":
            stop = self.stops.pop(message[2], None)
            if stop is not None:
                stop.set()
            self.send(("ok", rid, None))
        elif kind == "get":
            try:
                value = getattr(self.objects[message[2]], message[3])
            except Exception as exc:
                self.reply_error(rid, exc)
            else:
                self.send(("ok", rid, value))
        elif kind == "call":
            _, _, handle, method, args, kwargs = message
            try:
                target = getattr(self.objects[handle], method)
                result = target(
                    *(self.decode(a) for a in args),
                    **{k: self.decode(v) for k, v in kwargs.items()},
                )
            except Exception as exc:
                self.reply_error(rid, exc)
                return
            if method == "free_buffer":
                result = self.forget_if_released(args[0])
            if inspect.isawaitable(result) and method != "send_command":
                self.tg.start_soon(self.finish, rid, result)
                return
            fds: list[int] = []
            try:
                self.send(("ok", rid, self.encode(result, fds)), fds)
            finally:
                for fd in fds:
                    os.close(fd)
        else:
            raise RuntimeError(f"agent: unknown request {kind!r}")

    async def run(self) -> None:
        async with anyio.create_task_group() as tg:
            self.tg = tg
            while True:
                await anyio.wait_readable(self.sock)
                try:
                    data = self.sock.recv(_MAX_MESSAGE)
                except BlockingIOError:
                    continue
                except ConnectionResetError:
                    data = b""
                if not data:  # the test process closed its end (or died): stop
                    tg.cancel_scope.cancel()
                    return
                self.handle(pickle.loads(data))


async def _engine(fd: int) -> None:
    sock = socket.socket(fileno=fd)
    sock.setblocking(False)
    await Agent(sock).run()


async def _client(directory: str, name: str, devices: int) -> None:
    """A client process: publish ``name`` and pump its devices (see the docstring)."""
    from vdistream import ClientVirtualDeviceSet, Registry, VDConfig
    from vdistream.errors import VDIError
    from vdistream.transport.host import serve_set
    from vdistream.transport.rendezvous import RuntimeDirectory

    registry = Registry()
    client = ClientVirtualDeviceSet(registry=registry)
    client.create(name, VDConfig(device_count=devices))
    names = [name] + [f"{name}{i}" for i in range(1, devices)]

    async def pump(device_name: str) -> None:
        device = client.open_device(device_name)
        first = True
        while True:
            command = await device.get_command(None)
            if first:
                device.complete_command(command, 0, command.size)
                first = False
            # later commands are held: the test kills this process while they wait

    async with anyio.create_task_group() as tg:
        directory_ = RuntimeDirectory(directory)

        async def host(*, task_status: anyio.abc.TaskStatus[Any]) -> None:
            await serve_set(
                name,
                registry=registry,
                directory=directory_,
                connect_timeout=30,
                task_status=task_status,
            )

        await tg.start(host)
        sys.stdout.write("ready\n")
        sys.stdout.flush()
        try:
            await client.get_configuration(30)
        except VDIError:
            return
        for device_name in names:
            tg.start_soon(pump, device_name)


def main(argv: list[str]) -> None:
    if argv[0] == "engine":
        anyio.run(_engine, int(argv[1]))
    elif argv[0] == "client":
        anyio.run(_client, argv[1], argv[2], int(argv[3]))
    else:
        raise SystemExit(f"usage: agent engine FD | agent client DIR NAME DEVICES, not {argv}")


if __name__ == "__main__":
    main(sys.argv[1:])
