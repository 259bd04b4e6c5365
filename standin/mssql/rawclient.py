"""A minimal VDI client over the stand-in ``libsqlvdi.so`` by raw ctypes (tests, benchmark).

It calls the C++ members by their mangled names with ``this`` first, as a binding must; one
thread per device serves commands: WRITE stores (or drops) the bytes, READ feeds them back
and answers the end with ERROR_HANDLE_EOF, the rest complete with success.
"""

from __future__ import annotations

import ctypes
import threading
from dataclasses import dataclass, field
from pathlib import Path

from standin.mssql.vdss import (
    NOERROR,
    VD_E_ABORT,
    VD_E_CLOSE,
    VD_E_TIMEOUT,
    VDC_READ,
    VDC_WRITE,
    VDConfig,
)
from standin.sqlvdi.abi import VDCCommand

__all__ = ("ClientResult", "RawClient", "VDCCommand", "ended_well")

ERROR_SUCCESS = 0
ERROR_HANDLE_EOF = 38


_SET = "_ZN22ClientVirtualDeviceSet"
_P = ctypes.c_void_p


@dataclass
class ClientResult:
    """What each device saw: the bytes written, the command codes, the end code."""

    streams: list[bytearray] = field(default_factory=list)
    commands: list[list[int]] = field(default_factory=list)
    ends: list[int] = field(default_factory=list)
    written: list[int] = field(default_factory=list)


class RawClient:
    """``Create`` a set, then ``run`` the device loops while the statement runs elsewhere."""

    def __init__(self, library: Path) -> None:
        dll = self.dll = ctypes.CDLL(str(library))
        self._ctor = getattr(dll, f"{_SET}C1Ev")
        self._dtor = getattr(dll, f"{_SET}D1Ev")
        self._create = getattr(dll, f"{_SET}6CreateEPcP8VDConfig")
        self._getcfg = getattr(dll, f"{_SET}16GetConfigurationElP8VDConfig")
        self._open = getattr(dll, f"{_SET}10OpenDeviceEPcPP19ClientVirtualDevice")
        self._close = getattr(dll, f"{_SET}5CloseEv")
        self._abort = getattr(dll, f"{_SET}11SignalAbortEv")
        self._getcmd = dll._ZN19ClientVirtualDevice10GetCommandElPP11VDC_Command
        self._complete = dll._ZN19ClientVirtualDevice15CompleteCommandEP11VDC_Commandiml
        for fn, args in (
            (self._ctor, [_P]),
            (self._dtor, [_P]),
            (self._create, [_P, ctypes.c_char_p, ctypes.POINTER(VDConfig)]),
            (self._getcfg, [_P, ctypes.c_long, ctypes.POINTER(VDConfig)]),
            (self._open, [_P, ctypes.c_char_p, ctypes.POINTER(_P)]),
            (self._close, [_P]),
            (self._abort, [_P]),
            (self._getcmd, [_P, ctypes.c_long, ctypes.POINTER(ctypes.POINTER(VDCCommand))]),
            (
                self._complete,
                [_P, ctypes.POINTER(VDCCommand), ctypes.c_int, ctypes.c_ulong, ctypes.c_int64],
            ),
        ):
            fn.argtypes = args
            fn.restype = ctypes.c_int
        self._obj = ctypes.create_string_buffer(8)
        self._this = ctypes.cast(self._obj, _P)
        self._ctor(self._this)
        self.config = VDConfig()

    def create(
        self, name: str, devices: int = 1, *, features: int = 0, timeout_ms: int = 0
    ) -> None:
        cfg = VDConfig(deviceCount=devices, features=features, serverTimeOut=timeout_ms)
        rc = self._create(self._this, name.encode(), ctypes.byref(cfg))
        if rc != NOERROR:
            raise RuntimeError(f"Create({name}) returned {rc:#x}")

    def get_configuration(self, timeout_ms: int) -> int:
        return int(self._getcfg(self._this, timeout_ms, ctypes.byref(self.config)))

    def signal_abort(self) -> None:
        self._abort(self._this)

    def run(
        self,
        names: list[str],
        *,
        feed: list[bytes] | None = None,
        store: bool = True,
        fail_write_with: int | None = None,
    ) -> ClientResult:
        """Open every device and serve it in its own thread until VD_E_CLOSE or an error."""
        result = ClientResult()
        devices = []
        for name in names:
            dev = _P()
            rc = self._open(self._this, name.encode(), ctypes.byref(dev))
            if rc not in (NOERROR, VD_E_ABORT):
                raise RuntimeError(f"OpenDevice({name}) returned {rc:#x}")
            # a set the server aborted before the device was opened ends right there,
            # as it would for any client (the abort may land before or after OpenDevice)
            devices.append(dev if rc == NOERROR else None)
            result.streams.append(bytearray())
            result.commands.append([])
            result.ends.append(0 if rc == NOERROR else rc)
            result.written.append(0)

        def serve(d: int) -> None:
            if devices[d] is None:
                return
            cmd = ctypes.POINTER(VDCCommand)()
            source = memoryview(feed[d]) if feed is not None else memoryview(b"")
            pos = 0
            while True:
                rc = self._getcmd(devices[d], 1000, ctypes.byref(cmd))
                if rc == VD_E_TIMEOUT:
                    continue
                if rc != NOERROR:
                    result.ends[d] = rc
                    return
                c = cmd.contents
                result.commands[d].append(c.commandCode)
                code, moved = ERROR_SUCCESS, 0
                if c.commandCode == VDC_WRITE:
                    moved = c.size
                    if fail_write_with is not None:
                        code, moved = fail_write_with, 0
                    elif store:
                        result.streams[d] += ctypes.string_at(c.buffer, c.size)
                    result.written[d] += moved
                elif c.commandCode == VDC_READ:
                    chunk = source[pos : pos + c.size]
                    ctypes.memmove(c.buffer, bytes(chunk), len(chunk))
                    pos += len(chunk)
                    moved = len(chunk)
                    code = ERROR_SUCCESS if moved == c.size else ERROR_HANDLE_EOF
                self._complete(devices[d], cmd, code, moved, 0)

        threads = [threading.Thread(target=serve, args=(d,)) for d in range(len(names))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return result

    def close(self) -> int:
        rc = int(self._close(self._this))
        self._dtor(self._this)
        return rc


def ended_well(result: ClientResult) -> bool:
    return all(end == VD_E_CLOSE for end in result.ends)
