"""The numbers of the Virtual Device Interface: feature bits, commands, completions, HRESULTs.

Values are carried over from the VDI headers (spec §2.2, §3.3, §3.9, §4.1, §10).
"""

from __future__ import annotations

import enum

__all__ = ("INFINITE_MS", "CommandCode", "Completion", "Fault", "Features", "HResult", "Whence")

#: The spec's ``INFINITE`` timeout (milliseconds); Python callers pass ``None`` instead.
INFINITE_MS = 0xFFFFFFFF


class Features(enum.IntFlag):
    """``VDF_*`` feature bits of ``VDConfig.features`` (spec §2.2)."""

    LIKE_PIPE = 0
    REMOVABLE = 0x1
    REWIND = 0x2
    POSITION = 0x10
    SKIP_BLOCKS = 0x20
    REVERSE_POSITION = 0x40
    DISCARD = 0x80
    FILE_MARKS = 0x100
    RANDOM_ACCESS = 0x200
    SNAPSHOT_PREPARE = 0x400
    ENUM_FROZEN_FILES = 0x800
    VSS_WRITER = 0x1000
    REQUEST_COMPLETE = 0x2000
    WRITE_MEDIA = 0x10000
    READ_MEDIA = 0x20000
    COMPLETE_ENABLED = 0x40000
    LATCH_STATS = 0x80000000
    LIKE_TAPE = 0x173
    LIKE_DISK = 0x200


class CommandCode(enum.IntEnum):
    """``VDC_*`` command codes (spec §3.3)."""

    READ = 1
    WRITE = 2
    CLEAR_ERROR = 3
    REWIND = 4
    WRITE_MARK = 5
    SKIP_MARKS = 6
    SKIP_BLOCKS = 7
    LOAD = 8
    GET_POSITION = 9
    SET_POSITION = 10
    DISCARD = 11
    FLUSH = 12
    SNAPSHOT = 13
    MOUNT_SNAPSHOT = 14
    PREPARE_TO_FREEZE = 15
    FILE_INFO_BEGIN = 16
    FILE_INFO_END = 17
    GET_ERROR = 18
    COMPLETE = 19


class Completion(enum.IntEnum):
    """Win32 completion codes a command completes with (spec §3.9). Never HRESULTs."""

    SUCCESS = 0
    INVALID_HANDLE = 6
    HANDLE_EOF = 38
    HANDLE_DISK_FULL = 39
    NOT_SUPPORTED = 50
    DISK_FULL = 112
    OPERATION_ABORTED = 995
    END_OF_MEDIA = 1100
    FILEMARK_DETECTED = 1101
    NO_DATA_DETECTED = 1104
    IO_DEVICE = 1117
    EOM_OVERFLOW = 1129
    NO_SYSTEM_RESOURCES = 1450


class Fault(enum.IntEnum):
    """Win32 codes a failed READ or WRITE completes with (spec §3.9); apart from
    ``Completion`` because api.md pins that list exactly."""

    WRITE_FAULT = 29
    READ_FAULT = 30


class Whence(enum.IntEnum):
    """Origin of a ``SET_POSITION`` on a random-access device, carried in ``size``."""

    BEGINNING = 0
    CURRENT = 1
    END = 2


class HResult(enum.IntEnum):
    """The ``VD_E_*`` results of VDI calls, unsigned (spec §4.1).

    ``VD_E_QUEUE_FULL`` is the same value as ``VD_E_BUSY``; ``VD_E_IO_ERROR`` has no
    published value and is modelled as the ``IO_DEVICE`` completion instead.
    """

    NOERROR = 0
    NOTOPEN = 0x80770002
    TIMEOUT = 0x80770003
    ABORT = 0x80770004
    SECURITY = 0x80770005
    INVALID = 0x80770006
    INSTANCE_NAME = 0x80770007
    NOTSUPPORTED = 0x80770009
    MEMORY = 0x8077000A
    UNEXPECTED = 0x8077000B
    PROTOCOL = 0x8077000C
    OPEN = 0x8077000D
    CLOSE = 0x8077000E
    BUSY = 0x8077000F
    QUEUE_FULL = 0x8077000F
