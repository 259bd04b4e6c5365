"""ctypes binding of the stand-in's server side (``libsqlvdi_standin_server.so``, Contract A)."""

from __future__ import annotations

import ctypes
from pathlib import Path

from standin.sqlvdi.abi import VDConfig  # one definition of the 44-byte struct

__all__ = (
    "ERROR_DISK_FULL",
    "ERROR_HANDLE_EOF",
    "ERROR_IO_DEVICE",
    "ERROR_NO_DATA_DETECTED",
    "ERROR_OPERATION_ABORTED",
    "ERROR_SUCCESS",
    "ERROR_TIMEOUT",
    "NOERROR",
    "VDC_CLEAR_ERROR",
    "VDC_COMPLETE",
    "VDC_FLUSH",
    "VDC_READ",
    "VDC_WRITE",
    "VDF_COMPLETE_ENABLED",
    "VDF_READ_MEDIA",
    "VDF_REQUEST_COMPLETE",
    "VDF_WRITE_MEDIA",
    "VD_E_ABORT",
    "VD_E_CLOSE",
    "VD_E_NOTOPEN",
    "VD_E_TIMEOUT",
    "VDConfig",
    "VdssError",
    "VdssLib",
    "VdssSet",
    "hresult_text",
)


def _hr(code: int) -> int:
    # vdierror.h: MAKE_HRESULT(1, 0x77, code), returned as a signed int on Linux
    return ctypes.c_int32(0x80770000 | code).value


NOERROR = 0
VD_E_NOTOPEN = _hr(0x2)
VD_E_TIMEOUT = _hr(0x3)
VD_E_ABORT = _hr(0x4)
VD_E_CLOSE = _hr(0xE)

VDC_READ = 1
VDC_WRITE = 2
VDC_CLEAR_ERROR = 3
VDC_FLUSH = 12
VDC_COMPLETE = 19

VDF_REQUEST_COMPLETE = 0x2000
VDF_WRITE_MEDIA = 0x10000
VDF_READ_MEDIA = 0x20000
VDF_COMPLETE_ENABLED = 0x40000

ERROR_SUCCESS = 0
ERROR_HANDLE_EOF = 38
ERROR_DISK_FULL = 112
ERROR_OPERATION_ABORTED = 995
ERROR_NO_DATA_DETECTED = 1104
ERROR_IO_DEVICE = 1117
ERROR_TIMEOUT = 1460

_NAMES = {
    0x2: "VD_E_NOTOPEN",
    0x3: "VD_E_TIMEOUT",
    0x4: "VD_E_ABORT",
    0x5: "VD_E_SECURITY",
    0x6: "VD_E_INVALID",
    0x9: "VD_E_NOTSUPPORTED",
    0xC: "VD_E_PROTOCOL",
    0xD: "VD_E_OPEN",
    0xE: "VD_E_CLOSE",
    0xF: "VD_E_BUSY",
}


def hresult_text(rc: int) -> str:
    """``0x80770002(VD_E_NOTOPEN)``: how SQL Server's messages show a VDI HRESULT."""
    value = rc & 0xFFFFFFFF
    name = _NAMES.get(value & 0xFFFF, "failed to retrieve text for this error. Reason: 15105")
    return f"0x{value:08X}({name})"


class VdssError(Exception):
    """A ``vdss_*`` call returned an HRESULT other than NOERROR."""

    def __init__(self, call: str, rc: int) -> None:
        super().__init__(f"{call}: {hresult_text(rc)}")
        self.call = call
        self.rc = rc


_P = ctypes.c_void_p
_I = ctypes.c_int
_U32P = ctypes.POINTER(ctypes.c_uint32)
_IP = ctypes.POINTER(ctypes.c_int)
_I64P = ctypes.POINTER(ctypes.c_int64)

_SIGNATURES: dict[str, list[object]] = {
    "vdss_open": [ctypes.c_char_p, _I, ctypes.POINTER(_P)],
    "vdss_client_config": [_P, ctypes.POINTER(VDConfig)],
    "vdss_open_device": [_P, ctypes.c_char_p, _IP],
    "vdss_configure": [_P, ctypes.POINTER(VDConfig), ctypes.c_uint64],
    "vdss_send": [_P, _I, _I, _I, ctypes.c_int64, ctypes.c_uint64, _U32P],
    "vdss_wait": [_P, _I, _I, _U32P, _IP, _U32P, _I64P],
    "vdss_close_device": [_P, _I],
    "vdss_signal_abort": [_P],
    "vdss_client_alive": [_P],
    "vdss_close": [_P],
}


class VdssLib:
    """The loaded server-side library."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.dll = ctypes.CDLL(str(path))
        for name, argtypes in _SIGNATURES.items():
            fn = getattr(self.dll, name)
            fn.argtypes = argtypes
            fn.restype = ctypes.c_int
        self.dll.vdss_buffer_base.argtypes = [_P]
        self.dll.vdss_buffer_base.restype = _P

    def open(self, set_name: str, timeout_ms: int) -> VdssSet:
        handle = _P()
        rc = self.dll.vdss_open(set_name.encode(), timeout_ms, ctypes.byref(handle))
        if rc != NOERROR:
            raise VdssError("vdss_open", rc)
        return VdssSet(self, handle)


class VdssSet:
    """One opened virtual device set, server side. Per-device calls are thread-safe."""

    def __init__(self, lib: VdssLib, handle: ctypes.c_void_p) -> None:
        self._dll = lib.dll
        self._h = handle
        self.closed = False

    def _check(self, call: str, rc: int) -> None:
        if rc != NOERROR:
            raise VdssError(call, rc)

    def client_config(self) -> VDConfig:
        cfg = VDConfig()
        self._check("vdss_client_config", self._dll.vdss_client_config(self._h, ctypes.byref(cfg)))
        return cfg

    def open_device(self, name: str) -> int:
        index = ctypes.c_int()
        rc = self._dll.vdss_open_device(self._h, name.encode(), ctypes.byref(index))
        self._check("vdss_open_device", rc)
        return index.value

    def configure(self, cfg: VDConfig, buffer_area_bytes: int) -> int:
        """Publish the final configuration; returns the buffer area's address."""
        rc = self._dll.vdss_configure(self._h, ctypes.byref(cfg), buffer_area_bytes)
        self._check("vdss_configure", rc)
        base = self._dll.vdss_buffer_base(self._h)
        if not base:
            raise VdssError("vdss_buffer_base", -1)
        return int(base)

    def send(self, device: int, code: int, size: int, position: int, offset: int) -> int:
        tag = ctypes.c_uint32()
        rc = self._dll.vdss_send(self._h, device, code, size, position, offset, ctypes.byref(tag))
        self._check("vdss_send", rc)
        return tag.value

    def wait(self, device: int, timeout_ms: int) -> tuple[int, int, int, int, int]:
        """``(rc, tag, completion, bytes, position)``; rc is NOERROR, VD_E_TIMEOUT or VD_E_ABORT."""
        tag = ctypes.c_uint32()
        completion = ctypes.c_int()
        nbytes = ctypes.c_uint32()
        position = ctypes.c_int64()
        rc = self._dll.vdss_wait(
            self._h,
            device,
            timeout_ms,
            ctypes.byref(tag),
            ctypes.byref(completion),
            ctypes.byref(nbytes),
            ctypes.byref(position),
        )
        return rc, tag.value, completion.value, nbytes.value, position.value

    def close_device(self, device: int) -> int:
        return int(self._dll.vdss_close_device(self._h, device))

    def signal_abort(self) -> int:
        return int(self._dll.vdss_signal_abort(self._h))

    def client_alive(self) -> bool:
        return bool(self._dll.vdss_client_alive(self._h))

    def close(self) -> int:
        if self.closed:
            return NOERROR
        self.closed = True
        return int(self._dll.vdss_close(self._h))
