"""The engine side of a set, run in a child process (``tests/transport/agent.py``) and
driven from the test process as if it were local.

``AgentProcess`` starts the child and holds the control socket. ``World`` is what a
test of the behaviour suite works in: a private ``Registry``, and an engine side that
is either the in-process ``ServerVirtualDeviceSet`` (``World.inproc()``) or a
``RemoteSetProxy`` (``World.xproc(agent)``): an object with the engine side's API
(``vdistream.transport.engine.RemoteServerVirtualDeviceSet``: awaitable where that is
awaitable) whose every call runs in the agent. ``open`` on a proxy publishes the
client set of that name (``serve_set`` in a background task group of the test
process) and the agent's engine connects to it: the test's client set, the host and
the engine side then talk over a real socket and share the buffer area's pages.

Buffers: ``allocate_buffer`` returns a view of the same pages the engine maps (the
agent passes each segment's memfd over the control socket and this module maps it), so
the test writes a buffer and the engine process sees it; a buffer (or a slice of one)
sent back to the engine names its (memfd, offset). ``World.address`` is the address a
view has in the *engine's* process (alignment is the engine's business).

``World.sync()`` is the barrier that makes one test body hold in both worlds: across
processes it returns once the test's tasks and the agent's all wait and no record is
in flight either way, so whatever one side did has reached the other; in-process it
returns at once without even yielding to the event loop, so the in-process runs stay
exactly as strict as before.

The background task group (the host tasks and the control socket's reader) lives in one
task of its own, started by ``World.xproc`` and ended by ``World.close``: pytest runs a
fixture's setup and teardown in other tasks than the test, so no task group can span
them directly.
"""

from __future__ import annotations

import array
import asyncio
import builtins
import contextlib
import ctypes
import itertools
import mmap
import os
import pickle
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import anyio
import anyio.abc

from tests.transport.agent import all_tasks_waiting
from vdistream import errors as vd_errors
from vdistream.protocol import CommandResult
from vdistream.vdi import Registry, ServerVirtualDeviceSet

__all__ = (
    "AgentProcess",
    "RemoteDeviceProxy",
    "RemotePendingProxy",
    "RemoteSetProxy",
    "World",
    "rebuild_error",
    "settle",
)

ROOT = Path(__file__).resolve().parents[2]
_MAX_MESSAGE = 1 << 20
_CALL_TIMEOUT = 10.0  # no call of the agent takes this long unless it is stuck


async def settle(value: Any) -> Any:
    """``await value`` if it is awaitable, else ``value``: the same test body calls an
    in-process engine side (synchronous) and a remote one (awaitable). Does not yield to
    the event loop when there is nothing to await."""
    if isinstance(value, Awaitable):
        return await value
    return value


def rebuild_error(name: str, text: str, attrs: dict[str, Any]) -> BaseException:
    """The exception the agent raised, as the same class with the same text."""
    cls: Any = getattr(vd_errors, name, None)
    if cls is None:
        from vdistream.transport import wire

        cls = getattr(wire, name, None)
    if cls is None:
        cls = getattr(builtins, name, None)
    if not (isinstance(cls, type) and issubclass(cls, BaseException)):
        return RuntimeError(f"{name}: {text}")
    if issubclass(cls, vd_errors.VDIError):
        exc = cls.__new__(cls)
        Exception.__init__(exc, text)
        for key, value in attrs.items():
            setattr(exc, key, value)
        return exc
    return cls(text)


class AgentProcess:
    """A child running ``tests/transport/agent.py engine FD``; ``sock`` is our end."""

    def __init__(self, *, user: int | None = None) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        command = [sys.executable, "-m", "tests.transport.agent", "engine", str(theirs.fileno())]
        env = dict(os.environ)
        if user is not None:
            # /root (the venv's interpreter) is closed to other users: run the system
            # interpreter on the venv's packages, as that user.
            site = next((ROOT / ".venv" / "lib").glob("python3*/site-packages"))
            command[0] = "/usr/bin/python3"
            command = [
                "setpriv",
                f"--reuid={user}",
                f"--regid={user}",
                "--clear-groups",
                *command,
            ]
            env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{site}"
            env["PYTHONDONTWRITEBYTECODE"] = "1"
        self.process = subprocess.Popen(command, cwd=ROOT, pass_fds=[theirs.fileno()], env=env)
        theirs.close()
        ours.setblocking(False)
        self.sock = ours
        self.connection = Connection(ours)

    @property
    def pid(self) -> int:
        return self.process.pid

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.process.kill()
        self.process.wait(5)

    def stop(self) -> None:
        """Close our end (the agent stops on EOF); kill it if it does not."""
        self.sock.close()
        try:
            self.process.wait(5)
        except subprocess.TimeoutExpired:
            self.kill()


class _Answer:
    def __init__(self) -> None:
        # Created by an awaiting caller only: a synchronous call may run outside any
        # event loop (the stateful test calls the engine side between loop runs).
        self.event: anyio.Event | None = None
        self.done = False
        self.value: Any = None
        self.error: BaseException | None = None


class _Segment:
    """One memfd of a buffer area, mapped here."""

    def __init__(self, fd: int) -> None:
        self.length = os.fstat(fd).st_size
        self.map = mmap.mmap(fd, self.length, mmap.MAP_SHARED)
        self.view = memoryview(self.map)
        anchor = ctypes.c_char.from_buffer(self.map)
        self.base = ctypes.addressof(anchor)
        del anchor
        self.engine_base = 0  # the address of offset 0 in the engine's process


class Connection:
    """The control socket: request ids, answers, events, the memfds of buffer areas."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.ids = itertools.count(1)
        self.answers: dict[int, _Answer] = {}
        self.pendings: dict[int, RemotePendingProxy] = {}
        self.segments: dict[Any, _Segment] = {}
        self.lost: BaseException | None = None

    # --- receiving ---------------------------------------------------------------------

    def _receive_one(self) -> bool:
        """Read and dispatch one message if there is one; False when there is none."""
        try:
            data, ancdata, _, _ = self.sock.recvmsg(_MAX_MESSAGE, socket.CMSG_SPACE(16 * 4))
        except BlockingIOError:
            return False
        fds: list[int] = []
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                usable = len(payload) - len(payload) % 4
                fds.extend(array.array("i", payload[:usable]))
        if not data:
            self.lost = ConnectionError("the agent process is gone")
            for answer in self.answers.values():
                answer.error, answer.done = self.lost, True
                if answer.event is not None:
                    answer.event.set()
            return False
        self._dispatch(pickle.loads(data), fds)
        return True

    def _dispatch(self, message: tuple[Any, ...], fds: list[int]) -> None:
        kind = message[0]
        if kind in ("ok", "err"):
            answer = self.answers.pop(message[1], None)
            if kind == "ok":
                value = message[2]
                if fds:
                    assert isinstance(value, tuple), value
                    assert value[0] == "buf", value
                    for fd in fds:
                        self.segments[value[1]] = _Segment(fd)
                        os.close(fd)
                if isinstance(value, tuple) and value and value[0] == "buf":
                    _, key, offset, _, address = value
                    self.segments[key].engine_base = address - offset
                if answer is not None:
                    answer.value = value
            elif answer is not None:
                answer.error = rebuild_error(*message[2:])
            if answer is not None:
                answer.done = True
                if answer.event is not None:
                    answer.event.set()
        elif kind in ("done", "failed"):
            pending = self.pendings.pop(message[1], None)
            if pending is not None:
                if kind == "done":
                    pending._finish(message[2])
                else:
                    pending._fail(rebuild_error(*message[2:]))
        else:
            raise RuntimeError(f"unknown message from the agent: {message!r}")

    async def reader(self) -> None:
        """Dispatch answers and events as they come (runs in the background group)."""
        while self.lost is None:
            await anyio.wait_readable(self.sock)
            while self._receive_one():
                pass

    # --- sending ------------------------------------------------------------------------

    def _send(self, message: tuple[Any, ...]) -> int:
        if self.lost is not None:
            raise self.lost
        rid = next(self.ids)
        self.answers[rid] = _Answer()
        data = pickle.dumps((message[0], rid, *message[1:]))
        self.sock.setblocking(True)
        try:
            self.sock.settimeout(_CALL_TIMEOUT)
            self.sock.send(data)
        finally:
            self.sock.setblocking(False)
        return rid

    def call_sync(self, *message: Any) -> Any:
        """Send a request and block until its answer: only for calls the agent answers
        without waiting for this process (the engine side's synchronous calls)."""
        rid = self._send(message)
        answer = self.answers[rid]
        deadline = time.monotonic() + _CALL_TIMEOUT
        while not answer.done:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"the agent did not answer {message[:3]!r}")
            readable, _, _ = select.select([self.sock], [], [], left)
            if readable:
                self._receive_one()
        return self._outcome(answer)

    async def call(self, *message: Any) -> Any:
        rid = self._send(message)
        answer = self.answers[rid]
        answer.event = anyio.Event()
        try:
            if not answer.done:
                await answer.event.wait()
        except BaseException:
            if not answer.done and self.lost is None:
                # Cancelled here: cancel the agent's call too (it would go on waiting).
                self.answers.pop(rid, None)
                with contextlib.suppress(OSError):
                    self.sock.send(pickle.dumps(("cancel", 0, rid)))
            raise
        return self._outcome(answer)

    @staticmethod
    def _outcome(answer: _Answer) -> Any:
        if answer.error is not None:
            raise answer.error
        return answer.value

    # --- buffers ----------------------------------------------------------------------

    def unmap(self) -> None:
        """Unmap every segment no view keeps alive (an mmap holds a dup of its memfd:
        a mapping left behind is a descriptor left behind)."""
        for key, segment in list(self.segments.items()):
            segment.view.release()
            try:
                segment.map.close()
            except BufferError:
                continue  # a view the test still holds: unmapped when it goes
            del self.segments[key]

    def view(self, value: tuple[Any, ...]) -> memoryview:
        _, key, offset, nbytes, _ = value
        return self.segments[key].view[offset : offset + nbytes]

    def locate(self, view: memoryview) -> tuple[Any, int, _Segment] | None:
        """(memfd key, offset, segment) of a view of one of our segments, else None.
        A released view raises ValueError, as the in-process engine side does."""
        if view.readonly or view.nbytes == 0:
            return None
        address = ctypes.addressof(ctypes.c_char.from_buffer(view))
        for key, segment in self.segments.items():
            if segment.base <= address < segment.base + segment.length:
                return key, address - segment.base, segment
        return None

    def encode(self, value: Any) -> Any:
        if isinstance(value, (RemoteDeviceProxy, RemotePendingProxy)):
            return ("h", value._handle)
        if isinstance(value, memoryview):
            found = self.locate(value)
            if found is None:
                return ("bytes", bytes(value))
            return ("buf", found[0], found[1], value.nbytes)
        return value


class RemotePendingProxy:
    """A command sent by the remote engine side: ``done``/``result`` as the test process
    last heard (``World.sync`` brings them up to date), ``await`` for the result."""

    def __init__(self, connection: Connection, handle: int, info: tuple[Any, ...]) -> None:
        self._connection = connection
        self._handle = handle
        self.code, self.size, self.position, self.serial, result = info
        self._result: CommandResult | None = result
        self._error: BaseException | None = None
        if result is None:
            connection.pendings[handle] = self

    def __repr__(self) -> str:
        return f"<RemotePendingProxy #{self.serial} {self.code!r} {self._result}>"

    def _finish(self, result: CommandResult) -> None:
        self._result = result

    def _fail(self, error: BaseException) -> None:
        self._error = error

    def done(self) -> bool:
        return self._result is not None

    def result(self) -> CommandResult:
        if self._result is None:
            raise RuntimeError(f"command #{self.serial} has not completed yet")
        return self._result

    async def wait(self, timeout: float | None = None) -> CommandResult:
        if self._error is not None:
            raise self._error
        if self._result is None:
            # The agent's own wait: same timeout, same error.
            result = await self._connection.call("call", self._handle, "wait", (timeout,), {})
            if self._result is None:
                self._finish(result)
        assert self._result is not None
        return self._result

    def __await__(self) -> Any:
        return self.wait().__await__()


class RemoteDeviceProxy:
    def __init__(self, owner: RemoteSetProxy, handle: int, name: str) -> None:
        self._owner = owner
        self._handle = handle
        self.name = name

    def send_command(
        self, code: int, size: int = 0, position: int = 0, buffer: memoryview | None = None
    ) -> RemotePendingProxy:
        connection = self._owner._connection
        arguments = (code, size, position, connection.encode(buffer))
        value = connection.call_sync("call", self._handle, "send_command", arguments, {})
        _, handle, _, info = value
        return RemotePendingProxy(connection, handle, info)

    async def close_device(self) -> None:
        await self._owner._connection.call("call", self._handle, "close_device", (), {})


class RemoteSetProxy:
    """The remote engine side's API, run in the agent (see the module docstring)."""

    def __init__(self, world: World) -> None:
        assert world.connection is not None
        self._world = world
        self._connection = world.connection
        _, self._handle, _, _ = self._connection.call_sync("new", str(world.directory))
        # views handed out by allocate_buffer, by (memfd key, offset): released by
        # free_buffer and close as the engine side releases its own
        self._views: dict[tuple[Any, int], memoryview] = {}
        world.proxies.append(self)

    def _get(self, name: str) -> Any:
        return self._connection.call_sync("get", self._handle, name)

    def _sync_call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        encode = self._connection.encode
        return self._connection.call_sync(
            "call",
            self._handle,
            method,
            tuple(encode(a) for a in args),
            {k: encode(v) for k, v in kwargs.items()},
        )

    async def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        encode = self._connection.encode
        return await self._connection.call(
            "call",
            self._handle,
            method,
            tuple(encode(a) for a in args),
            {k: encode(v) for k, v in kwargs.items()},
        )

    state = property(lambda self: self._get("state"))
    name = property(lambda self: self._get("name"))
    abort_reason = property(lambda self: self._get("abort_reason"))
    aborted_by = property(lambda self: self._get("aborted_by"))
    configuration = property(lambda self: self._get("configuration"))

    async def open(self, instance: str | None, name: str, timeout: float | None = 10.0) -> None:
        await self._world.publish(instance, name)
        await self._call("open", instance, name, timeout)

    def get_configuration(self) -> Any:
        return self._sync_call("get_configuration")

    async def begin_configuration(self, *args: Any, **kwargs: Any) -> None:
        await self._call("begin_configuration", *args, **kwargs)

    async def request_buffers(self, size: int, alignment: int, count: int) -> None:
        await self._call("request_buffers", size, alignment, count)

    async def query_available_buffers(self, size: int, alignment: int = 0) -> int:
        return int(await self._call("query_available_buffers", size, alignment))

    async def end_configuration(self) -> None:
        await self._call("end_configuration")

    async def open_device(self, name: str) -> RemoteDeviceProxy:
        _, handle, _, device_name = await self._call("open_device", name)
        return RemoteDeviceProxy(self, handle, device_name)

    async def wait_active(self, timeout: float | None = None) -> None:
        await self._call("wait_active", timeout)

    async def allocate_buffer(self, size: int, alignment: int = 0) -> memoryview:
        value = await self._call("allocate_buffer", size, alignment)
        view = self._connection.view(value)
        self._views[(value[1], value[2])] = view
        return view

    def free_buffer(self, buffer: memoryview) -> None:
        found = self._connection.locate(buffer) if isinstance(buffer, memoryview) else None
        # The agent answers whether the engine released its view (it does not after an
        # abort: then close does); ours follows.
        if self._sync_call("free_buffer", buffer) and found is not None:
            view = self._views.pop((found[0], found[1]), None)
            if view is not None:
                view.release()

    def is_shared_buffer(self, buffer: object) -> bool:
        return bool(self._sync_call("is_shared_buffer", buffer))

    def signal_abort(self) -> None:
        self._sync_call("signal_abort")

    async def close(self) -> None:
        try:
            await self._call("close")
        finally:
            self.release_views()

    def release_views(self) -> None:
        for view in self._views.values():
            view.release()
        self._views.clear()


class _Status:
    """A task status that remembers whether the host started (an error before that is
    ``start()``'s to raise; one after it is the set's end)."""

    def __init__(self, inner: anyio.abc.TaskStatus[Path]) -> None:
        self._inner = inner
        self.done = False

    def started(self, value: Any = None) -> None:
        self.done = True
        self._inner.started(value)


class _Background:
    """One task running a task group that outlives the fixture's setup task."""

    def __init__(self) -> None:
        self.tg: anyio.abc.TaskGroup | None = None
        self.failures: list[BaseException] = []
        self._stop = anyio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        ready = anyio.Event()
        self._task = asyncio.get_running_loop().create_task(self._main(ready))
        await ready.wait()

    async def _main(self, ready: anyio.Event) -> None:
        async with anyio.create_task_group() as tg:
            self.tg = tg
            ready.set()
            await self._stop.wait()
            tg.cancel_scope.cancel()

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task


class World:
    """A test's registry and engine side, in-process or in the agent (module docstring)."""

    def __init__(self, xproc: bool, connection: Connection | None = None) -> None:
        self.xproc = xproc
        self.registry = Registry()
        self.connection = connection
        self.directory = Path(tempfile.mkdtemp(prefix="vd", dir="/tmp")) if xproc else None
        self.background = _Background()
        self.host_errors: list[BaseException] = []
        self.host_results: list[Any] = []
        self.published: set[tuple[str, str]] = set()
        self.proxies: list[RemoteSetProxy] = []
        self.host_ended: anyio.Event | None = None  # set when a host returns or raises

    @classmethod
    def inproc(cls) -> World:
        return cls(False)

    @classmethod
    async def xproc_on(cls, agent: AgentProcess) -> World:
        world = cls(True, agent.connection)
        world.host_ended = anyio.Event()
        await world.background.start()
        assert world.background.tg is not None
        world.background.tg.start_soon(agent.connection.reader)
        return world

    def server_set(self) -> Any:
        """A new engine side: ``ServerVirtualDeviceSet`` or ``RemoteSetProxy``."""
        if not self.xproc:
            return ServerVirtualDeviceSet(registry=self.registry)
        return RemoteSetProxy(self)

    async def sync(self) -> None:
        """The barrier (module docstring). In-process: nothing, not even a yield."""
        if not self.xproc:
            return
        assert self.connection is not None
        with anyio.fail_after(5, reason="the two processes never became quiet"):
            while True:
                await all_tasks_waiting()
                moved = await self.connection.call("sync")
                await all_tasks_waiting()
                if not moved:
                    return

    def address(self, view: memoryview) -> int:
        """The address of a view's first byte in the engine's process."""
        local = ctypes.addressof(ctypes.c_char.from_buffer(view))
        if self.connection is not None:
            found = self.connection.locate(view)
            if found is not None:
                return found[2].engine_base + found[1]
        return local

    async def publish(self, instance: str | None, name: str) -> None:
        """Serve the client set ``name`` (if there is one) to the engine that opens it."""
        from vdistream.transport.host import serve_set
        from vdistream.transport.rendezvous import RuntimeDirectory

        if self.registry.lookup(instance, name) is None:
            return  # nothing to publish: the engine's open fails as it should
        key = ((instance or "").casefold(), name)
        if key in self.published:
            return  # already served (a second engine gets REFUSED)
        directory = RuntimeDirectory(self.directory)

        async def host(*, task_status: anyio.abc.TaskStatus[Path]) -> None:
            status = _Status(task_status)
            try:
                result = await serve_set(
                    name,
                    registry=self.registry,
                    instance=instance,
                    directory=directory,
                    connect_timeout=10,
                    task_status=status,
                )
            except vd_errors.VDIError as exc:
                if not status.done:
                    raise  # publish refused: start() raises it in publish()
                self.host_errors.append(exc)  # an aborted set: what many tests do
            except Exception as exc:  # a host bug: fails the test at close
                self.background.failures.append(exc)
            else:
                self.host_results.append(result)
            finally:
                if self.host_ended is not None:
                    self.host_ended.set()

        assert self.background.tg is not None
        try:
            await self.background.tg.start(host)
        except vd_errors.VDInvalidError:
            return  # the name is published already: the engine's open says what it says
        self.published.add(key)

    async def close(self) -> None:
        """Drop every engine-side set in the agent, end the hosts, remove the directory."""
        if not self.xproc:
            return
        assert self.connection is not None
        try:
            if self.connection.lost is None:
                with anyio.fail_after(10):
                    await self.connection.call("reset")
        finally:
            with anyio.fail_after(10):
                await self.background.stop()
            for proxy in self.proxies:
                proxy.release_views()
            self.connection.unmap()
            if self.directory is not None:
                shutil.rmtree(self.directory, ignore_errors=True)
        if self.background.failures:
            raise self.background.failures[0]
