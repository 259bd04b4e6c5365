"""Microsoft's ``libsqlvdi.so`` bound with ctypes: its two C++ classes, called through their
exported member functions (research note ``sqlvdi-linux.md``; spec §8).

The Linux ``vdi.h`` has no flat C API: ``ClientVirtualDeviceSet`` and
``ClientVirtualDevice`` each hold one opaque pointer (8 bytes), and their members are
exported under Itanium-mangled names (``SYMBOLS``). A member is called as a function
whose first argument is ``this``; the constructor (C1) fills a set object we allocate
(``SetObject``: 64 zeroed bytes, not 8, in case the class of the binary is larger than
its header says), the destructor (D1) empties it. The names were produced by compiling the
header's declarations with g++ and could not be checked against Microsoft's binary
here, so a missing one is an error that names it.

Every member returns an ``int``: 0 (NOERROR) or a ``VD_E_*`` HRESULT as a signed 32-bit
value (``0x80770004`` arrives as ``-2139684860``); :func:`check` maps it to the
``VDIError`` subclass of that HRESULT. ctypes releases the GIL during foreign calls,
so the blocking ones (``GetConfiguration``, ``GetCommand``) run in worker threads
(``vdistream.sqlserver.device_set``).
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Final

from vdistream.errors import VDIError, VdistreamError
from vdistream.protocol import VDConfig

__all__ = (
    "DEFAULT_PATH",
    "ENV_VAR",
    "SETTING",
    "SYMBOLS",
    "DeviceObject",
    "SetObject",
    "SqlVdi",
    "SqlVdiLibraryError",
    "VDCCommand",
    "VDConfigStruct",
    "check",
    "error",
    "library_path",
    "load",
)

DEFAULT_PATH: Final = "/opt/mssql/lib/libsqlvdi.so"
#: The environment variable that names the library (over the default, under the setting).
ENV_VAR: Final = "VDISTREAM_SQLVDI"
#: The name of the setting that names the library.
SETTING: Final = "sqlvdi"


class SqlVdiLibraryError(VdistreamError):
    """``libsqlvdi.so`` is absent, cannot be loaded, or lacks a member function."""


# --- structs (#pragma pack(8), x86-64) ------------------------------------------------


class VDConfigStruct(ctypes.Structure):
    """``VDConfig``: eleven ``uint32_t``, 44 bytes, the image of ``VDConfig.pack()``."""

    _fields_ = [
        ("deviceCount", ctypes.c_uint32),
        ("features", ctypes.c_uint32),
        ("prefixZoneSize", ctypes.c_uint32),
        ("alignment", ctypes.c_uint32),
        ("softFileMarkBlockSize", ctypes.c_uint32),
        ("EOMWarningSize", ctypes.c_uint32),
        ("serverTimeOut", ctypes.c_uint32),
        ("blockSize", ctypes.c_uint32),
        ("maxIODepth", ctypes.c_uint32),
        ("maxTransferSize", ctypes.c_uint32),
        ("bufferAreaSize", ctypes.c_uint32),
    ]

    @classmethod
    def from_config(cls, config: VDConfig) -> VDConfigStruct:
        return cls.from_buffer_copy(config.pack())

    def to_config(self) -> VDConfig:
        return VDConfig.unpack(bytes(self))


class VDCCommand(ctypes.Structure):
    """``VDC_Command``: what ``GetCommand`` points at, 24 bytes, the buffer at offset 16."""

    _fields_ = [
        ("commandCode", ctypes.c_int32),
        ("size", ctypes.c_int32),
        ("position", ctypes.c_int64),
        ("buffer", ctypes.POINTER(ctypes.c_uint8)),
    ]


class SetObject(ctypes.Structure):
    """A ``ClientVirtualDeviceSet`` object, which we allocate (ctypes zeroes it).

    The header declares one opaque pointer (``CVDS* cvds``), but the header's layout could
    not be checked against Microsoft's binary: a constructor of a class with more members
    (a mutex, a name) than the header shows would write past an 8-byte object into our
    heap. 64 bytes leaves room for that at no cost; only ``cvds`` is ever read.
    """

    _fields_ = [("cvds", ctypes.c_void_p), ("_reserved", ctypes.c_ubyte * 56)]


class DeviceObject(ctypes.Structure):
    """A ``ClientVirtualDevice`` object (``CVD* cvd``): the library allocates it in
    ``OpenDevice``; we only pass the pointer back, never read or size it."""

    _fields_ = [("cvd", ctypes.c_void_p)]


assert ctypes.sizeof(VDConfigStruct) == 44
assert ctypes.sizeof(VDCCommand) == 24
assert VDCCommand.position.offset == 8
assert VDCCommand.buffer.offset == 16
assert ctypes.sizeof(SetObject) == 64
assert ctypes.sizeof(DeviceObject) == 8

_U8P = ctypes.POINTER(ctypes.c_uint8)
_SET = ctypes.POINTER(SetObject)
_DEV = ctypes.POINTER(DeviceObject)
_INT = ctypes.c_int

#: attribute -> (symbol, member function, restype, argtypes); ``this`` first.
SYMBOLS: Final[dict[str, tuple[str, str, type | None, tuple[type, ...]]]] = {
    "construct": (
        "_ZN22ClientVirtualDeviceSetC1Ev",
        "ClientVirtualDeviceSet::ClientVirtualDeviceSet()",
        None,
        (_SET,),
    ),
    "destruct": (
        "_ZN22ClientVirtualDeviceSetD1Ev",
        "ClientVirtualDeviceSet::~ClientVirtualDeviceSet()",
        None,
        (_SET,),
    ),
    "create": (
        "_ZN22ClientVirtualDeviceSet6CreateEPcP8VDConfig",
        "ClientVirtualDeviceSet::Create(char*, VDConfig*)",
        _INT,
        (_SET, ctypes.c_char_p, ctypes.POINTER(VDConfigStruct)),
    ),
    "get_configuration": (
        "_ZN22ClientVirtualDeviceSet16GetConfigurationElP8VDConfig",
        "ClientVirtualDeviceSet::GetConfiguration(time_t, VDConfig*)",
        _INT,
        (_SET, ctypes.c_long, ctypes.POINTER(VDConfigStruct)),
    ),
    "open_device": (
        "_ZN22ClientVirtualDeviceSet10OpenDeviceEPcPP19ClientVirtualDevice",
        "ClientVirtualDeviceSet::OpenDevice(char*, ClientVirtualDevice**)",
        _INT,
        (_SET, ctypes.c_char_p, ctypes.POINTER(_DEV)),
    ),
    "close": (
        "_ZN22ClientVirtualDeviceSet5CloseEv",
        "ClientVirtualDeviceSet::Close()",
        _INT,
        (_SET,),
    ),
    "signal_abort": (
        "_ZN22ClientVirtualDeviceSet11SignalAbortEv",
        "ClientVirtualDeviceSet::SignalAbort()",
        _INT,
        (_SET,),
    ),
    "open_in_secondary": (
        "_ZN22ClientVirtualDeviceSet15OpenInSecondaryEPc",
        "ClientVirtualDeviceSet::OpenInSecondary(char*)",
        _INT,
        (_SET, ctypes.c_char_p),
    ),
    "get_buffer_handle": (
        "_ZN22ClientVirtualDeviceSet15GetBufferHandleEPhPj",
        "ClientVirtualDeviceSet::GetBufferHandle(uint8_t*, unsigned int*)",
        _INT,
        (_SET, _U8P, ctypes.POINTER(ctypes.c_uint)),
    ),
    "map_buffer_handle": (
        "_ZN22ClientVirtualDeviceSet15MapBufferHandleEiPPh",
        "ClientVirtualDeviceSet::MapBufferHandle(int, uint8_t**)",
        _INT,
        (_SET, ctypes.c_int, ctypes.POINTER(_U8P)),
    ),
    "get_command": (
        "_ZN19ClientVirtualDevice10GetCommandElPP11VDC_Command",
        "ClientVirtualDevice::GetCommand(time_t, VDC_Command**)",
        _INT,
        (_DEV, ctypes.c_long, ctypes.POINTER(ctypes.POINTER(VDCCommand))),
    ),
    "complete_command": (
        "_ZN19ClientVirtualDevice15CompleteCommandEP11VDC_Commandiml",
        "ClientVirtualDevice::CompleteCommand(VDC_Command*, int, unsigned long, int64_t)",
        _INT,
        (_DEV, ctypes.POINTER(VDCCommand), ctypes.c_int, ctypes.c_ulong, ctypes.c_int64),
    ),
}


class SqlVdi:
    """The loaded library, every member function bound with its exact C signature.

    Attributes are the members by the names of ``SYMBOLS``; each takes ``this`` first
    and returns the raw ``int`` (constructor and destructor return nothing).
    """

    construct: Callable[..., None]
    destruct: Callable[..., None]
    create: Callable[..., int]
    get_configuration: Callable[..., int]
    open_device: Callable[..., int]
    close: Callable[..., int]
    signal_abort: Callable[..., int]
    open_in_secondary: Callable[..., int]
    get_buffer_handle: Callable[..., int]
    map_buffer_handle: Callable[..., int]
    get_command: Callable[..., int]
    complete_command: Callable[..., int]

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            # absolute: a name without "/" would make dlopen search its own path instead
            self.cdll = ctypes.CDLL(os.path.abspath(path))
        except OSError as exc:  # the loader's own reason: wrong ELF class, a missing dependency
            raise SqlVdiLibraryError(
                f"cannot load the SQL Server VDI library {path}: {exc}"
            ) from exc
        for attribute, (symbol, member, restype, argtypes) in SYMBOLS.items():
            try:
                function = getattr(self.cdll, symbol)
            except AttributeError:
                raise SqlVdiLibraryError(
                    f"{path} is not a libsqlvdi.so this binding knows: it does not export "
                    f"{symbol} ({member})"
                ) from None
            function.restype = restype
            function.argtypes = argtypes
            setattr(self, attribute, function)

    def __repr__(self) -> str:
        return f"<SqlVdi {str(self.path)!r}>"


def library_path(setting: str | None = None) -> Path:
    """Where the library is: the ``sqlvdi`` setting, else ``VDISTREAM_SQLVDI``, else
    ``DEFAULT_PATH`` (where SQL Server installs it)."""
    if setting:
        return Path(setting).expanduser()
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser()
    return Path(DEFAULT_PATH)


_cache: dict[str, SqlVdi] = {}
_cache_lock = threading.Lock()


def load(path: Path | str | None = None) -> SqlVdi:
    """The library at ``path`` (default: :func:`library_path`), loaded once per path."""
    where = Path(path) if path is not None else library_path()
    key = os.path.abspath(where)
    with _cache_lock:
        cached = _cache.get(key)
        if cached is not None:
            return cached
        if not where.is_file():
            raise SqlVdiLibraryError(
                f"no SQL Server VDI library at {where}: install SQL Server there, or name the "
                f"path of libsqlvdi.so in {ENV_VAR} or the {SETTING!r} setting"
            )
        library = SqlVdi(where)
        _cache[key] = library
        return library


def error(
    hr: int, call: str, *, set_name: str | None, device: str | None = None, state: object = None
) -> VDIError:
    """The ``VDIError`` subclass of ``hr`` (signed or unsigned), naming the call."""
    return VDIError.from_hresult(
        hr, f"{call} failed", set_name=set_name, device=device, state=state
    )


def check(
    hr: int, call: str, *, set_name: str | None, device: str | None = None, state: object = None
) -> None:
    """Raise the ``VDIError`` of ``hr`` unless it is NOERROR (0)."""
    if hr != 0:
        raise error(hr, call, set_name=set_name, device=device, state=state)
