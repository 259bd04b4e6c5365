"""The client side of a SQL Server virtual device set, through ``libsqlvdi.so``.

:class:`SqlVdiDeviceSet` and :class:`SqlVdiDevice` offer exactly the client calls of
``vdistream.vdi.ClientVirtualDeviceSet`` that the job and its pumps use
(``vdistream.coordinator``, ``vdistream.pump.ClientDevice``), so both run unchanged over
SQL Server's sets.

How the blocking calls stay cancellable: ``GetConfiguration`` and ``GetCommand`` run in
worker threads (``anyio.to_thread.run_sync``), one short slice (``slice_ms``) at a time;
a slice that times out (``VD_E_TIMEOUT``) is simply followed by the next until the
caller's own timeout passes. Cancellation is therefore delivered within one slice, and no
thread is ever abandoned inside the library: the awaiting task waits for its slice to
return. The threads come from a limiter of this set (``device_count + 2`` tokens), never
from ``vdistream.threads``' pool, because they spend their time waiting. Each
``get_command`` first polls once (timeout 0) on the event loop's thread, which does not
wait: a command already queued is taken without a thread hop.

``close()`` is refused while any thread is inside a call on the set (it would free what
the thread uses): the set is aborted instead, so the threads return within a slice.

Buffers: a command's ``buffer`` is a zero-copy ``memoryview`` of SQL Server's shared
memory, valid until ``complete_command``, which releases every view it handed out for
that command *before* the buffer goes back (a view used afterwards raises
``ValueError``). A slice taken of such a view (``view[a:b]``, ``memoryview(view)``) shares
its memory but not its release: it must not be kept past the completion either. A view
still exported at the completion (``view.release()`` raises ``BufferError``: something
such as a ``PickleBuffer`` still reads it) aborts the set instead of handing the memory
back for SQL Server to reuse (event ``buffer_still_exported``; ``VDAbortError``).

State (``ClientState``, spec §1.6) moves only along ``_TRANSITIONS``: DNE -> CONFIGURABLE
(create) -> INITIALIZING (get_configuration) -> ACTIVE (every device opened) ->
NORMALLY_TERMINATED (every device delivered VD_E_CLOSE); ABORTED from any live state;
DNE again on close. "Every device" counts the final configuration's ``device_count`` (the
devices SQL Server opened, which the job opens), not the count the client asked for. A
``VD_E_CLOSE`` observed once the set aborted leaves it ABORTED and raises
``VDAbortError``, as every call on an aborted set does.
"""

from __future__ import annotations

import ctypes
import dataclasses
import math
import os
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

import anyio
import anyio.lowlevel
import anyio.to_thread

from vdistream.errors import (
    VDAbortError,
    VDClosedError,
    VDIError,
    VDInvalidError,
    VDNotSupportedError,
    VDOpenError,
    VDProtocolError,
    VDTimeoutError,
)
from vdistream.log import get_logger
from vdistream.protocol import (
    ClientState,
    Command,
    CommandCode,
    Completion,
    HResult,
    SetAbortCause,
    VDConfig,
)
from vdistream.sqlserver import library as lib
from vdistream.sqlserver.permissions import explain_open_abort
from vdistream.vdi.core import SetStatistics

if TYPE_CHECKING:
    from types import TracebackType

    from vdistream.vdi.contract import ClientDevice, ClientSet

__all__ = ("SqlVdiDevice", "SqlVdiDeviceSet")

T = TypeVar("T")

_log = get_logger(__name__)

_U32 = 0xFFFFFFFF
_DATA = frozenset({CommandCode.READ, CommandCode.WRITE})

_S = ClientState
_TRANSITIONS: dict[ClientState, frozenset[ClientState]] = {
    _S.DNE: frozenset({_S.CONFIGURABLE}),
    _S.CONFIGURABLE: frozenset({_S.INITIALIZING, _S.ABORTED, _S.DNE}),
    _S.INITIALIZING: frozenset({_S.ACTIVE, _S.ABORTED, _S.DNE}),
    _S.ACTIVE: frozenset({_S.NORMALLY_TERMINATED, _S.ABORTED, _S.DNE}),
    _S.NORMALLY_TERMINATED: frozenset({_S.ABORTED, _S.DNE}),
    _S.ABORTED: frozenset({_S.DNE}),
}


def _signed32(value: int) -> int:
    """An HRESULT or code as the library's ``int`` (``0x80770004`` -> ``-2139684860``)."""
    return ctypes.c_int32(value & _U32).value


_TIMEOUT = _signed32(HResult.TIMEOUT)
_ABORT = _signed32(HResult.ABORT)
_CLOSE = _signed32(HResult.CLOSE)
_OPEN = _signed32(HResult.OPEN)


class _Live:
    """One created set: what its devices check they still belong to."""

    def __init__(self, obj: lib.SetObject, name: str, device_count: int) -> None:
        self.obj = obj
        self.this = ctypes.pointer(obj)
        self.name = name
        self.device_count = device_count  # the client's; the final configuration's once known
        self.limiter = anyio.CapacityLimiter(device_count + 2)

    def configured(self, final: VDConfig) -> None:
        """SQL Server's count governs from here: the devices it opened are the set's."""
        if final.device_count > 0:
            self.device_count = final.device_count
            self.limiter.total_tokens = final.device_count + 2


@dataclasses.dataclass(eq=False)
class _Delivered:
    """A command the client holds: the library's pointer and the views handed out."""

    pointer: ctypes._Pointer[lib.VDCCommand]
    command: Command
    address: int  # of its buffer; 0 when it has none
    views: list[memoryview] = dataclasses.field(default_factory=list)

    def release(self) -> bool:
        """Release the views; ``False`` when one is still exported (``BufferError``:
        something holds a buffer of it, and may still read the memory)."""
        released = True
        # the views derived from a base first, the base last
        for view in reversed(self.views):
            try:
                view.release()
            except BufferError:
                released = False
        self.views.clear()
        return released


def _views(address: int, size: int, writable: bool) -> list[memoryview]:
    """Zero-copy views of ``size`` bytes at ``address``: [base, bytes view(, read-only)]."""
    base = memoryview((ctypes.c_ubyte * size).from_address(address))
    views = [base, base.cast("B")]
    if not writable:
        views.append(views[-1].toreadonly())
    return views


class SqlVdiDeviceSet:
    """A client virtual device set of SQL Server, over ``libsqlvdi.so``.

    ``library`` defaults to ``vdistream.sqlserver.library.load()`` (the ``VDISTREAM_SQLVDI``
    path, else ``/opt/mssql/lib/libsqlvdi.so``), loaded at the first ``create``.

    ``umask``: the shared memory ``Create`` makes must be group-writable for SQL Server
    (user ``mssql``) to open it, so ``create`` sets this umask around the library call
    and restores the previous one afterwards (``None``: leave the umask alone). The umask
    is process-wide: files other threads create during that call get it too (only group
    bits differ from the usual 022, and only for a few milliseconds).

    ``slice_ms``: the longest single wait inside the library; cancellation of a waiting
    call takes effect within it.
    """

    def __init__(
        self, library: lib.SqlVdi | None = None, *, umask: int | None = 0o007, slice_ms: int = 100
    ) -> None:
        if slice_ms <= 0:
            raise ValueError(f"slice_ms must be positive, not {slice_ms}")
        self._library = library
        self._umask = umask
        self._slice_ms = slice_ms
        self._state = ClientState.DNE
        self._live: _Live | None = None
        self._lock = threading.Lock()  # guards _live and _in_flight across worker threads
        self._in_flight = 0
        self._devices: list[SqlVdiDevice] = []
        self._final: VDConfig | None = None
        self._aborted_by: SetAbortCause | None = None
        self._abort_reason: str | None = None

    def __repr__(self) -> str:
        return f"<SqlVdiDeviceSet {self.name!r} {self._state.name}>"

    # --- what the job reads ----------------------------------------------------------

    @property
    def library(self) -> lib.SqlVdi:
        if self._library is None:
            self._library = lib.load()
        return self._library

    @property
    def state(self) -> ClientState:
        return self._state

    @property
    def name(self) -> str | None:
        return self._live.name if self._live is not None else None

    @property
    def aborted_by(self) -> SetAbortCause | None:
        """``CLIENT`` when we signalled abort first, ``SERVER`` when the library reported
        ``VD_E_ABORT`` first (SQL Server aborted, timed out, or its process ended)."""
        return self._aborted_by

    @property
    def abort_reason(self) -> str | None:
        return self._abort_reason

    @property
    def calls_in_progress(self) -> int:
        """Worker threads inside a library call on this set now."""
        with self._lock:
            return self._in_flight

    def statistics(self) -> SetStatistics:
        """Commands the client holds per device (SQL Server's queue is not visible);
        buffers: the area's as the final configuration gives them, in use = held."""
        live = self._require("statistics")
        held = [len(d._delivered) for d in self._devices]
        held += [0] * (live.device_count - len(held))
        final = self._final
        total = 0
        if final is not None and final.max_transfer_size:
            total = final.buffer_area_size // final.max_transfer_size
        in_use = sum(
            1 for d in self._devices for e in d._delivered.values() if e.command.buffer is not None
        )
        return SetStatistics(buffers_total=total, buffers_in_use=in_use, outstanding=tuple(held))

    # --- state -----------------------------------------------------------------------

    def _move(self, to: ClientState) -> None:
        if to is self._state:
            return
        if to not in _TRANSITIONS[self._state]:
            raise RuntimeError(f"SQL Server VDI set {self.name!r}: {self._state.name} -> {to.name}")
        self._state = to

    def _aborted(self) -> bool:
        """Read afresh after an ``await`` (mypy keeps ``_state`` narrowed across it)."""
        return self._state is ClientState.ABORTED

    def _require(self, call: str) -> _Live:
        if self._live is None:
            raise VDProtocolError(f"{call}: no set is open on this object", state="DNE")
        return self._live

    def _error(self, cls: type[VDIError], message: str, device: str | None = None) -> VDIError:
        return cls(message, set_name=self.name, device=device, state=self._state.name)

    def _abort_error(self, call: str, device: str | None = None) -> VDIError:
        return self._error(
            VDAbortError, f"{call}: the set was aborted ({self._abort_reason})", device
        )

    def _record_abort(self, cause: SetAbortCause, reason: str) -> None:
        if self._aborted_by is None:
            self._aborted_by, self._abort_reason = cause, reason
        if self._state is not ClientState.ABORTED and self._state is not ClientState.DNE:
            self._move(ClientState.ABORTED)

    def _failure(self, hr: int, call: str, device: str | None = None) -> VDIError:
        """The error of a failed library call; ``VD_E_ABORT`` records the abort first."""
        if hr == _ABORT:
            self._record_abort(
                SetAbortCause.SERVER,
                f"SQL Server aborted the set (VD_E_ABORT from {call}"
                + (f" on device {device!r}" if device else "")
                + "): the statement failed, SQL Server timed out, or its process ended",
            )
            return self._abort_error(call, device)
        return lib.error(hr, call, set_name=self.name, device=device, state=self._state.name)

    # --- calls into the library ----------------------------------------------------------

    def _guarded(self, live: _Live, call: str, function: Callable[..., T], *args: object) -> T:
        """``function(*args)`` counted in flight, refused once ``live`` was closed."""
        with self._lock:
            if self._live is not live:
                raise VDProtocolError(f"{call}: the set was closed", set_name=live.name)
            self._in_flight += 1
        try:
            return function(*args)
        finally:
            with self._lock:
                self._in_flight -= 1

    async def _in_thread(
        self, live: _Live, call: str, function: Callable[..., T], *args: object
    ) -> T:
        return await anyio.to_thread.run_sync(
            self._guarded, live, call, function, *args, limiter=live.limiter
        )

    def _slice(self, deadline: float | None) -> int:
        if deadline is None:
            return self._slice_ms
        left = max(0.0, deadline - time.monotonic())
        return min(self._slice_ms, math.ceil(left * 1000))

    # --- creation and configuration --------------------------------------------------

    def create(self, name: str, config: VDConfig) -> None:
        """Create the set ``name`` for SQL Server to open (spec Create)."""
        if self._live is not None:
            raise self._error(VDProtocolError, "create: a set is already open on this object")
        if not isinstance(name, str) or not name or "\0" in name or "\\" in name:
            raise VDInvalidError(f"create: the set name must be a non-empty string: {name!r}")
        if not isinstance(config, VDConfig):
            raise VDNotSupportedError(f"config must be a VDConfig, not {type(config).__name__}")
        problems = config.client_problems()
        if problems:
            raise VDNotSupportedError("; ".join(problems), set_name=name, state="DNE")
        library = self.library
        obj = lib.SetObject()
        library.construct(ctypes.byref(obj))
        struct = lib.VDConfigStruct.from_config(config)
        previous = os.umask(self._umask) if self._umask is not None else None
        try:
            hr = library.create(ctypes.byref(obj), name.encode(), ctypes.byref(struct))
        finally:
            if previous is not None:
                os.umask(previous)
        if hr != 0:
            library.destruct(ctypes.byref(obj))
            raise lib.error(hr, "create", set_name=name, state="DNE")
        self._live = _Live(obj, name, config.device_count)
        self._devices = []
        self._final = None
        self._aborted_by = self._abort_reason = None
        self._move(ClientState.CONFIGURABLE)

    async def get_configuration(self, timeout: float | None = None) -> VDConfig:
        """The final configuration, once SQL Server configured the set; ``timeout`` in
        seconds (``None`` or negative: as long as the set lives)."""
        live = self._require("get_configuration")
        await anyio.lowlevel.checkpoint_if_cancelled()
        deadline = None if timeout is None or timeout < 0 else time.monotonic() + timeout
        struct = lib.VDConfigStruct()
        while True:
            if self._state is ClientState.ABORTED:
                raise self._abort_error("get_configuration")
            if self._final is not None:
                return self._final
            hr = await self._in_thread(
                live,
                "get_configuration",
                self.library.get_configuration,
                live.this,
                self._slice(deadline),
                ctypes.byref(struct),
            )
            if hr == 0:
                if self._final is None and self._state is ClientState.CONFIGURABLE:
                    self._final = struct.to_config()
                    live.configured(self._final)
                    self._move(ClientState.INITIALIZING)
                continue
            if hr != _TIMEOUT:
                raise self._failure(hr, "get_configuration")
            if deadline is not None and time.monotonic() >= deadline:
                raise self._error(VDTimeoutError, "get_configuration: timed out")

    def open_device(self, name: str) -> SqlVdiDevice:
        """Open the device ``name`` (device 0 is named like the set)."""
        live = self._require("open_device")
        if self._state is ClientState.ABORTED:
            raise self._abort_error("open_device")
        if self._state is not ClientState.INITIALIZING:
            cls = VDOpenError if self._state is ClientState.ACTIVE else VDProtocolError
            raise self._error(cls, "open_device is not allowed now")
        if not isinstance(name, str) or not name or "\0" in name:
            raise self._error(VDInvalidError, f"open_device: bad device name {name!r}")
        out = ctypes.POINTER(lib.DeviceObject)()
        hr = self._guarded(
            live,
            "open_device",
            self.library.open_device,
            live.this,
            name.encode(),
            ctypes.byref(out),
        )
        if hr == _ABORT and self._aborted_by is None:
            # At OpenDevice this is how a client that cannot map SQL Server's buffer memory
            # fails (research note, "Pitfalls"), but also how a statement that failed after
            # configuring the set ends it: name a permissions problem only when one is found.
            failed = lib.error(hr, "open_device", set_name=live.name, device=name)
            reason = explain_open_abort(failed, umask=self._umask)
            self._record_abort(SetAbortCause.SERVER, reason)
        if hr != 0:
            raise self._failure(hr, "open_device", name)
        device = SqlVdiDevice(self, live, name, out)
        self._devices.append(device)
        if len(self._devices) == live.device_count:
            self._move(ClientState.ACTIVE)
        return device

    # --- abort and close -------------------------------------------------------------

    def signal_abort(self, reason: str | None = None) -> None:
        """Abort the whole set: every call blocked in it returns ``VD_E_ABORT``; idempotent.
        ``reason`` is kept in this object's ``abort_reason`` (SQL Server is not told)."""
        self._signal_abort(
            f"the client signalled abort: {reason}" if reason else "the client signalled abort"
        )

    def _signal_abort(self, reason: str) -> None:
        live = self._require("signal_abort")
        if self._state is ClientState.ABORTED:
            return
        ended = self._state is ClientState.NORMALLY_TERMINATED
        self._record_abort(SetAbortCause.CLIENT, reason)
        hr = self._guarded(live, "signal_abort", self.library.signal_abort, live.this)
        if hr not in (0, _ABORT) and not ended:  # after the end a refusal changes nothing
            raise self._failure(hr, "signal_abort")

    def close(self) -> None:
        """Release the set (Close, then the destructor).

        A set that neither ended normally nor aborted is aborted first (SQL Server must
        stop); if devices were then still open, ``VDOpenError`` is raised after the set
        was released, as our own set does. While a worker thread is inside a call on the
        set, nothing is released: the set is aborted and ``VDProtocolError`` raised.
        """
        live = self._require("close")
        with self._lock:
            busy = self._in_flight
            if not busy:
                self._live = None  # from here no thread can enter the library on this set
        if busy:
            if self._state is not ClientState.ABORTED:
                self._record_abort(SetAbortCause.CLIENT, "the client closed the set during a call")
                self.library.signal_abort(live.this)
            raise self._error(
                VDProtocolError,
                f"close: {busy} call(s) still in progress in worker threads; the set was "
                "aborted, close it again once they returned",
            )
        open_devices = [d.name for d in self._devices if not d._closed]
        terminated = self._state in (ClientState.NORMALLY_TERMINATED, ClientState.ABORTED)
        if not terminated:
            reason = "the client closed the set before it terminated"
            if open_devices:
                reason += f" (devices still open: {', '.join(open_devices)})"
            self._record_abort(SetAbortCause.CLIENT, reason)
            self.library.signal_abort(live.this)
        for device in self._devices:
            for delivered in device._delivered.values():
                if not delivered.release():  # the mapping goes away with Close
                    device._exported(delivered, "close")
            device._delivered.clear()
        try:
            hr = self.library.close(live.this)
        finally:
            self.library.destruct(live.this)
            self._devices = []
            self._move(ClientState.DNE)
        if not terminated and open_devices:
            raise VDOpenError(
                f"close: devices were still open ({', '.join(open_devices)}); the set was "
                "aborted and released",
                set_name=live.name,
                state="ACTIVE",
            )
        if hr not in (0, _OPEN):  # VD_E_OPEN: released anyway, after the abort
            raise lib.error(hr, "close", set_name=live.name, state="DNE")

    # --- buffer handles ------------------------------------------------------------

    def _held(self) -> list[_Delivered]:
        return [e for d in self._devices for e in d._delivered.values()]

    def get_buffer_handle(self, view: memoryview) -> int:
        """The library's handle of the buffer ``view`` (a view this set handed out)."""
        live = self._require("get_buffer_handle")
        for entry in self._held():
            if entry.address and any(v is view for v in entry.views):
                handle = ctypes.c_uint()
                buffer = ctypes.cast(entry.address, ctypes.POINTER(ctypes.c_uint8))
                hr = self._guarded(
                    live,
                    "get_buffer_handle",
                    self.library.get_buffer_handle,
                    live.this,
                    buffer,
                    ctypes.byref(handle),
                )
                if hr != 0:
                    raise self._failure(hr, "get_buffer_handle")
                return handle.value
        raise self._error(
            VDInvalidError, "get_buffer_handle: not the buffer of an outstanding READ or WRITE"
        )

    def map_buffer_handle(self, handle: int) -> memoryview:
        """A view of the buffer ``handle`` names, released with its command's completion."""
        live = self._require("map_buffer_handle")
        if not isinstance(handle, int) or not 0 <= handle <= _U32:
            raise self._error(VDInvalidError, f"map_buffer_handle: bad handle {handle!r}")
        out = ctypes.POINTER(ctypes.c_uint8)()
        hr = self._guarded(
            live,
            "map_buffer_handle",
            self.library.map_buffer_handle,
            live.this,
            _signed32(handle),
            ctypes.byref(out),
        )
        if hr != 0:
            raise self._failure(hr, "map_buffer_handle")
        address = ctypes.cast(out, ctypes.c_void_p).value or 0
        for entry in self._held():
            if address and entry.address == address:
                views = _views(address, entry.command.size, entry.command.code is CommandCode.READ)
                entry.views.extend(views)
                return views[-1]
        raise self._error(
            VDInvalidError,
            f"map_buffer_handle: {handle} is not a handle of an outstanding buffer",
        )

    # --- conveniences ----------------------------------------------------------------

    async def __aenter__(self) -> SqlVdiDeviceSet:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._live is None:
            return
        if exc is not None and self._state is not ClientState.ABORTED:
            self.signal_abort()
        self.close()


class SqlVdiDevice:
    """One virtual device of a SQL Server set: get commands, complete them
    (``vdistream.pump.ClientDevice``)."""

    def __init__(
        self,
        owner: SqlVdiDeviceSet,
        live: _Live,
        name: str,
        this: ctypes._Pointer[lib.DeviceObject],
    ) -> None:
        self._owner = owner
        self._live = live
        self._name = name
        self._this = this
        self._closed = False  # VD_E_CLOSE delivered: the server closed this device
        self._delivered: dict[int, _Delivered] = {}

    def __repr__(self) -> str:
        return f"<SqlVdiDevice {self._name!r} of {self._owner!r}>"

    @property
    def name(self) -> str:
        return self._name

    def _check_set(self, call: str) -> None:
        if self._owner._live is not self._live:
            raise VDProtocolError(
                f"{call}: this device's set was closed",
                set_name=self._live.name,
                device=self._name,
                state="DNE",
            )

    def _get_slice(self, timeout_ms: int) -> tuple[int, ctypes._Pointer[lib.VDCCommand]]:
        out = ctypes.POINTER(lib.VDCCommand)()
        hr = self._owner.library.get_command(self._this, timeout_ms, ctypes.byref(out))
        return hr, out

    async def get_command(self, timeout: float | None = None) -> Command:
        """The next command; ``timeout`` in seconds (``None`` or negative: as long as
        the set lives). ``VDClosedError`` once SQL Server closed the device (the normal
        end), ``VDAbortError`` once the set aborted, ``VDTimeoutError`` after ``timeout``."""
        owner = self._owner
        self._check_set("get_command")
        await anyio.lowlevel.checkpoint_if_cancelled()
        deadline = None if timeout is None or timeout < 0 else time.monotonic() + timeout
        poll = True
        while True:
            if owner._state is ClientState.ABORTED:  # as every call on an aborted set
                raise owner._abort_error("get_command", self._name)
            if self._closed:
                raise self._closed_error()
            if poll:  # a command already queued is taken at once, without a thread hop
                poll = False
                hr, out = owner._guarded(self._live, "get_command", self._get_slice, 0)
            else:
                hr, out = await owner._in_thread(
                    self._live, "get_command", self._get_slice, owner._slice(deadline)
                )
            if hr == 0:
                command = self._deliver(out)
                if command is not None:
                    return command
                continue
            if hr == _CLOSE:
                self._closed = True
                if owner._aborted():
                    # aborted while the slice returned (the job's abort, the watchdog): the
                    # set stays aborted, and the pump ends the job ABORTED on VDAbortError
                    raise owner._abort_error("get_command", self._name)
                if (
                    owner._state is ClientState.ACTIVE
                    and len(owner._devices) == self._live.device_count
                    and all(d._closed for d in owner._devices)
                ):
                    owner._move(ClientState.NORMALLY_TERMINATED)
                raise self._closed_error()
            if hr != _TIMEOUT:
                raise owner._failure(hr, "get_command", self._name)
            if deadline is not None and time.monotonic() >= deadline:
                raise owner._error(VDTimeoutError, "get_command: timed out", self._name)

    def _exported(self, entry: _Delivered, call: str) -> None:
        _log.warning(
            "buffer_still_exported",
            set=self._live.name,
            device=self._name,
            command=entry.command.code.name,
            call=call,
        )

    def _closed_error(self) -> VDIError:
        return self._owner._error(
            VDClosedError, "get_command: SQL Server closed this device", self._name
        )

    def _deliver(self, pointer: ctypes._Pointer[lib.VDCCommand]) -> Command | None:
        raw = pointer.contents
        serial = ctypes.addressof(raw)
        try:
            code = CommandCode(raw.commandCode)
        except ValueError:
            # A command this binding does not know: refuse it as clients must (§3.5).
            hr = self._owner.library.complete_command(
                self._this, pointer, Completion.NOT_SUPPORTED, 0, 0
            )
            if hr != 0:
                raise self._owner._failure(hr, "complete_command", self._name) from None
            return None
        address = ctypes.cast(raw.buffer, ctypes.c_void_p).value or 0
        views: list[memoryview] = []
        if code in _DATA and address and raw.size >= 0:
            views = _views(address, raw.size, code is CommandCode.READ)
        command = Command(
            code=code,
            size=raw.size,
            position=raw.position,
            buffer=views[-1] if views else None,
            serial=serial,
        )
        self._delivered[serial] = _Delivered(pointer, command, address if views else 0, views)
        return command

    def complete_command(
        self, command: Command, completion: int, bytes_transferred: int = 0, position: int = 0
    ) -> None:
        """Hand ``command`` back; its buffer views are released first, then the buffer
        goes back to SQL Server. ``VDAbortError`` after an abort (the set is gone)."""
        owner = self._owner
        self._check_set("complete_command")
        entry = self._delivered.get(command.serial) if isinstance(command, Command) else None
        if entry is None or entry.command is not command:
            raise owner._error(
                VDInvalidError,
                f"complete_command: {command!r} is not an outstanding command of this device",
                self._name,
            )
        if not isinstance(completion, int) or not 0 <= completion <= _U32:
            raise owner._error(
                VDInvalidError,
                f"complete_command: completion code {completion!r} is not a Win32 code",
                self._name,
            )
        limit = command.size if entry.address else _U32
        if not isinstance(bytes_transferred, int) or not 0 <= bytes_transferred <= limit:
            raise owner._error(
                VDInvalidError,
                f"complete_command: bytes_transferred={bytes_transferred!r} is outside 0..{limit}",
                self._name,
            )
        if not isinstance(position, int) or not -(2**63) <= position < 2**63:
            raise owner._error(
                VDInvalidError,
                f"complete_command: position {position!r} is not an int64",
                self._name,
            )
        del self._delivered[command.serial]
        # before the buffer goes back: a view used later raises ValueError
        if not entry.release():
            # Something still reads the buffer: SQL Server must not reuse that memory.
            self._exported(entry, "complete_command")
            owner._signal_abort(
                f"a buffer of device {self._name!r} was still exported at its completion "
                "(something still held a view of it)"
            )
            raise owner._abort_error("complete_command", self._name)
        hr = owner._guarded(
            self._live,
            "complete_command",
            owner.library.complete_command,
            self._this,
            entry.pointer,
            _signed32(completion),
            bytes_transferred,
            position,
        )
        if hr != 0:
            raise owner._failure(hr, "complete_command", self._name)


if TYPE_CHECKING:  # mypy proves the job's and the pumps' contracts are met

    def _is_client_set(s: SqlVdiDeviceSet) -> ClientSet:
        return s

    def _is_client_device(d: SqlVdiDevice) -> ClientDevice:
        return d
