"""Thin ctypes access to both stand-in libraries, for tests of the ABI and for child processes.

Calls return the libraries' raw results (0 or a negative ``VD_E_*`` int) so that tests can
assert on exact codes. The client classes are driven as the research note describes: an
8-byte object, the C1 constructor, ``this`` as the first argument, D1 at the end.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

__all__ = (
    "ERROR_HANDLE_EOF",
    "ERROR_OPERATION_ABORTED",
    "ERROR_SUCCESS",
    "SYMBOLS",
    "VDC_CLEAR_ERROR",
    "VDC_FLUSH",
    "VDC_READ",
    "VDC_WRITE",
    "VD_E_ABORT",
    "VD_E_BUSY",
    "VD_E_CLOSE",
    "VD_E_INVALID",
    "VD_E_NOTOPEN",
    "VD_E_NOTSUPPORTED",
    "VD_E_OPEN",
    "VD_E_PROTOCOL",
    "VD_E_TIMEOUT",
    "ClientDevice",
    "ClientLibrary",
    "ClientSet",
    "ServerLibrary",
    "ServerSet",
    "VDCCommand",
    "VDConfig",
)


def _vd_error(code: int) -> int:
    """vdierror.h's VD_ERROR(code) as the signed int the Linux library returns."""
    return ctypes.c_int32(0x80770000 | code).value


VD_E_NOTOPEN = _vd_error(2)
VD_E_TIMEOUT = _vd_error(3)
VD_E_ABORT = _vd_error(4)
VD_E_INVALID = _vd_error(6)
VD_E_NOTSUPPORTED = _vd_error(9)
VD_E_PROTOCOL = _vd_error(12)
VD_E_OPEN = _vd_error(13)
VD_E_CLOSE = _vd_error(14)
VD_E_BUSY = _vd_error(15)

VDC_READ, VDC_WRITE, VDC_CLEAR_ERROR, VDC_FLUSH = 1, 2, 3, 12
ERROR_SUCCESS, ERROR_HANDLE_EOF, ERROR_OPERATION_ABORTED = 0, 38, 995

# The research note's table (sqlvdi-linux.md): member -> exported symbol.
SYMBOLS = {
    "set_ctor": "_ZN22ClientVirtualDeviceSetC1Ev",
    "set_dtor": "_ZN22ClientVirtualDeviceSetD1Ev",
    "create": "_ZN22ClientVirtualDeviceSet6CreateEPcP8VDConfig",
    "get_configuration": "_ZN22ClientVirtualDeviceSet16GetConfigurationElP8VDConfig",
    "open_device": "_ZN22ClientVirtualDeviceSet10OpenDeviceEPcPP19ClientVirtualDevice",
    "close": "_ZN22ClientVirtualDeviceSet5CloseEv",
    "signal_abort": "_ZN22ClientVirtualDeviceSet11SignalAbortEv",
    "open_in_secondary": "_ZN22ClientVirtualDeviceSet15OpenInSecondaryEPc",
    "get_buffer_handle": "_ZN22ClientVirtualDeviceSet15GetBufferHandleEPhPj",
    "map_buffer_handle": "_ZN22ClientVirtualDeviceSet15MapBufferHandleEiPPh",
    "get_command": "_ZN19ClientVirtualDevice10GetCommandElPP11VDC_Command",
    "complete_command": "_ZN19ClientVirtualDevice15CompleteCommandEP11VDC_Commandiml",
}


class VDConfig(ctypes.Structure):
    """vdi.h's VDConfig: 11 x uint32, 44 bytes."""

    _fields_ = [
        (name, ctypes.c_uint32)
        for name in (
            "deviceCount",
            "features",
            "prefixZoneSize",
            "alignment",
            "softFileMarkBlockSize",
            "EOMWarningSize",
            "serverTimeOut",
            "blockSize",
            "maxIODepth",
            "maxTransferSize",
            "bufferAreaSize",
        )
    ]


class VDCCommand(ctypes.Structure):
    """vdi.h's VDC_Command: 24 bytes, buffer at offset 16."""

    _fields_ = [
        ("commandCode", ctypes.c_int32),
        ("size", ctypes.c_int32),
        ("position", ctypes.c_int64),
        ("buffer", ctypes.c_void_p),
    ]


_P = ctypes.c_void_p
_CMD_P = ctypes.POINTER(VDCCommand)


class ClientLibrary:
    """libsqlvdi.so bound by its mangled names."""

    def __init__(self, path: Path | str) -> None:
        self.dll = ctypes.CDLL(str(path))
        signatures: dict[str, tuple[type, list[type]]] = {
            "set_ctor": (ctypes.c_int, [_P]),  # returns void; the int is ignored
            "set_dtor": (ctypes.c_int, [_P]),
            "create": (ctypes.c_int, [_P, ctypes.c_char_p, ctypes.POINTER(VDConfig)]),
            "get_configuration": (ctypes.c_int, [_P, ctypes.c_long, ctypes.POINTER(VDConfig)]),
            "open_device": (ctypes.c_int, [_P, ctypes.c_char_p, ctypes.POINTER(_P)]),
            "close": (ctypes.c_int, [_P]),
            "signal_abort": (ctypes.c_int, [_P]),
            "open_in_secondary": (ctypes.c_int, [_P, ctypes.c_char_p]),
            "get_buffer_handle": (ctypes.c_int, [_P, _P, ctypes.POINTER(ctypes.c_uint)]),
            "map_buffer_handle": (ctypes.c_int, [_P, ctypes.c_int, ctypes.POINTER(_P)]),
            "get_command": (ctypes.c_int, [_P, ctypes.c_long, ctypes.POINTER(_CMD_P)]),
            "complete_command": (
                ctypes.c_int,
                [_P, _CMD_P, ctypes.c_int, ctypes.c_ulong, ctypes.c_int64],
            ),
        }
        self.fn = {}
        for key, (restype, argtypes) in signatures.items():
            fn = getattr(self.dll, SYMBOLS[key])
            fn.restype, fn.argtypes = restype, argtypes
            self.fn[key] = fn

    def new_set(self) -> ClientSet:
        return ClientSet(self)


class ClientDevice:
    """A ClientVirtualDevice* returned by OpenDevice (freed by the set's Close)."""

    def __init__(self, lib: ClientLibrary, address: int) -> None:
        self.lib, self.address = lib, address

    def get_command(self, timeout_ms: int) -> tuple[int, VDCCommand | None]:
        out = _CMD_P()
        rc = self.lib.fn["get_command"](self.address, timeout_ms, ctypes.byref(out))
        return rc, (out.contents if rc == 0 else None)

    def complete(self, cmd: VDCCommand, code: int, nbytes: int = 0, position: int = 0) -> int:
        return int(
            self.lib.fn["complete_command"](
                self.address, ctypes.pointer(cmd), code, nbytes, position
            )
        )

    @staticmethod
    def data(cmd: VDCCommand) -> bytes:
        """The bytes of a WRITE command's buffer."""
        return ctypes.string_at(cmd.buffer, cmd.size)

    @staticmethod
    def fill(cmd: VDCCommand, data: bytes) -> None:
        """Copy data into a READ command's buffer."""
        ctypes.memmove(cmd.buffer, data, len(data))


class ClientSet:
    """A ClientVirtualDeviceSet object constructed in ctypes memory."""

    def __init__(self, lib: ClientLibrary) -> None:
        self.lib = lib
        self.obj = ctypes.create_string_buffer(8)
        self.this = ctypes.addressof(self.obj)
        lib.fn["set_ctor"](self.this)

    def create(self, name: str, cfg: VDConfig) -> int:
        return int(self.lib.fn["create"](self.this, name.encode(), ctypes.byref(cfg)))

    def get_configuration(self, timeout_ms: int) -> tuple[int, VDConfig]:
        cfg = VDConfig()
        rc = self.lib.fn["get_configuration"](self.this, timeout_ms, ctypes.byref(cfg))
        return rc, cfg

    def open_device(self, name: str) -> tuple[int, ClientDevice | None]:
        out = _P()
        rc = self.lib.fn["open_device"](self.this, name.encode(), ctypes.byref(out))
        return rc, (ClientDevice(self.lib, out.value) if rc == 0 and out.value else None)

    def close(self) -> int:
        return int(self.lib.fn["close"](self.this))

    def signal_abort(self) -> int:
        return int(self.lib.fn["signal_abort"](self.this))

    def open_in_secondary(self, name: str) -> int:
        return int(self.lib.fn["open_in_secondary"](self.this, name.encode()))

    def get_buffer_handle(self, buffer: int | None) -> tuple[int, int]:
        handle = ctypes.c_uint()
        rc = self.lib.fn["get_buffer_handle"](self.this, buffer, ctypes.byref(handle))
        return rc, handle.value

    def map_buffer_handle(self, handle: int) -> tuple[int, int | None]:
        out = _P()
        rc = self.lib.fn["map_buffer_handle"](self.this, handle, ctypes.byref(out))
        return rc, out.value

    def destroy(self) -> None:
        """The D1 destructor (closes the set if still open)."""
        self.lib.fn["set_dtor"](self.this)


class ServerLibrary:
    """libsqlvdi_standin_server.so's vdss_* API."""

    def __init__(self, path: Path | str) -> None:
        self.dll = ctypes.CDLL(str(path))
        u32p, i32p = ctypes.POINTER(ctypes.c_uint32), ctypes.POINTER(ctypes.c_int)
        table: dict[str, tuple[type | None, list[type]]] = {
            "vdss_open": (ctypes.c_int, [ctypes.c_char_p, ctypes.c_int, ctypes.POINTER(_P)]),
            "vdss_client_config": (ctypes.c_int, [_P, ctypes.POINTER(VDConfig)]),
            "vdss_open_device": (ctypes.c_int, [_P, ctypes.c_char_p, i32p]),
            "vdss_configure": (ctypes.c_int, [_P, ctypes.POINTER(VDConfig), ctypes.c_uint64]),
            "vdss_buffer_base": (_P, [_P]),
            "vdss_send": (
                ctypes.c_int,
                [
                    _P,
                    ctypes.c_int,
                    ctypes.c_int,
                    ctypes.c_int,
                    ctypes.c_int64,
                    ctypes.c_uint64,
                    u32p,
                ],
            ),
            "vdss_wait": (
                ctypes.c_int,
                [_P, ctypes.c_int, ctypes.c_int, u32p, i32p, u32p, ctypes.POINTER(ctypes.c_int64)],
            ),
            "vdss_close_device": (ctypes.c_int, [_P, ctypes.c_int]),
            "vdss_signal_abort": (ctypes.c_int, [_P]),
            "vdss_client_alive": (ctypes.c_int, [_P]),
            "vdss_close": (ctypes.c_int, [_P]),
        }
        self.fn = {}
        for name, (restype, argtypes) in table.items():
            fn = getattr(self.dll, name)
            fn.restype, fn.argtypes = restype, argtypes
            self.fn[name] = fn

    def open(self, set_name: str, timeout_ms: int) -> tuple[int, ServerSet | None]:
        out = _P()
        rc = self.fn["vdss_open"](set_name.encode(), timeout_ms, ctypes.byref(out))
        return rc, (ServerSet(self, out.value) if rc == 0 and out.value else None)


class ServerSet:
    """One set as the server side sees it."""

    def __init__(self, lib: ServerLibrary, handle: int) -> None:
        self.lib, self.handle = lib, handle

    def client_config(self) -> VDConfig:
        cfg = VDConfig()
        assert self.lib.fn["vdss_client_config"](self.handle, ctypes.byref(cfg)) == 0
        return cfg

    def open_device(self, name: str) -> tuple[int, int]:
        index = ctypes.c_int(-1)
        rc = self.lib.fn["vdss_open_device"](self.handle, name.encode(), ctypes.byref(index))
        return rc, index.value

    def configure(self, cfg: VDConfig, buffer_bytes: int) -> int:
        return int(self.lib.fn["vdss_configure"](self.handle, ctypes.byref(cfg), buffer_bytes))

    def buffer(self, size: int) -> memoryview:
        """The first `size` bytes of the buffer area, writable, in this process's mapping."""
        base = self.lib.fn["vdss_buffer_base"](self.handle)
        assert base, "no buffer area before vdss_configure"
        return memoryview((ctypes.c_ubyte * size).from_address(base)).cast("B")

    def send(
        self, device: int, code: int, size: int = 0, position: int = 0, offset: int = 0
    ) -> tuple[int, int]:
        tag = ctypes.c_uint32()
        rc = self.lib.fn["vdss_send"](
            self.handle, device, code, size, position, offset, ctypes.byref(tag)
        )
        return rc, tag.value

    def wait(self, device: int, timeout_ms: int) -> tuple[int, int, int, int, int]:
        """(rc, tag, completion code, bytes, position)."""
        tag, code = ctypes.c_uint32(), ctypes.c_int()
        nbytes, position = ctypes.c_uint32(), ctypes.c_int64()
        rc = self.lib.fn["vdss_wait"](
            self.handle,
            device,
            timeout_ms,
            ctypes.byref(tag),
            ctypes.byref(code),
            ctypes.byref(nbytes),
            ctypes.byref(position),
        )
        return rc, tag.value, code.value, nbytes.value, position.value

    def close_device(self, device: int) -> int:
        return int(self.lib.fn["vdss_close_device"](self.handle, device))

    def signal_abort(self) -> int:
        return int(self.lib.fn["vdss_signal_abort"](self.handle))

    def client_alive(self) -> bool:
        return bool(self.lib.fn["vdss_client_alive"](self.handle))

    def close(self) -> int:
        return int(self.lib.fn["vdss_close"](self.handle))
