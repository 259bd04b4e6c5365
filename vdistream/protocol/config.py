"""``VDConfig``: the 44-byte configuration record both sides of a set agree on (spec §2.1).

Fields keep the spec's units (bytes, milliseconds) because the record packs to the
spec's binary layout: eleven little-endian unsigned 32-bit integers, ``"<11I"``.
Offsets 0-24 are the client's inputs; 28-40 are filled in by the server.

Validation rules (spec §2.1, §2.2; the spec leaves the exact checks open, so these are
our decisions):

* ``device_count`` is 1..64.
* ``features`` is one positioning mode (pipe-like, tape-like, disk-like), optionally
  with ``REMOVABLE`` (pipe, disk) and ``DISCARD``, plus the orthogonal add-ons
  ``SNAPSHOT_PREPARE`` and ``REQUEST_COMPLETE``. The undocumented bits
  (``ENUM_FROZEN_FILES``, ``VSS_WRITER``, ``LATCH_STATS``) are refused, and so are the
  bits only the server sets (``WRITE_MEDIA``, ``READ_MEDIA``, ``COMPLETE_ENABLED``) when
  a client offers them (:meth:`VDConfig.client_problems`).
* ``alignment`` is 0 (no requirement) or a power of two up to 64 KiB.
* ``prefix_zone_size`` is at most 4 MiB (the largest transfer), so that a prefix can
  never outgrow the data it precedes.
* ``block_size`` is 0 (not yet set) or a power of two in 512..65536.
* ``max_transfer_size`` is 0 (not yet set) or a multiple of 64 KiB in 64 KiB..4 MiB.
"""

from __future__ import annotations

import dataclasses
import struct
from typing import Self

from vdistream.protocol.codes import Features

__all__ = (
    "ALIGNMENT_MAX",
    "BLOCK_SIZE_MAX",
    "BLOCK_SIZE_MIN",
    "DEVICE_COUNT_MAX",
    "MAX_IO_DEPTH",
    "SERVER_FEATURES",
    "TRANSFER_SIZE_MAX",
    "TRANSFER_UNIT",
    "VDConfig",
    "is_power_of_two",
    "supported_features",
    "valid_block_size",
    "valid_max_transfer_size",
    "valid_server_alignment",
)

DEVICE_COUNT_MAX = 64
BLOCK_SIZE_MIN = 512
BLOCK_SIZE_MAX = 65536
TRANSFER_UNIT = 65536
TRANSFER_SIZE_MAX = 4 * 1024 * 1024
ALIGNMENT_MAX = 65536
#: The deprecated ``maxIODepth`` the server always reports.
MAX_IO_DEPTH = 4

_LAYOUT = struct.Struct("<11I")
_U32 = 0xFFFFFFFF

#: Bits only the server may set in a final configuration.
SERVER_FEATURES = Features.WRITE_MEDIA | Features.READ_MEDIA | Features.COMPLETE_ENABLED
_ADDONS = Features.SNAPSHOT_PREPARE | Features.REQUEST_COMPLETE | Features.DISCARD
_MODES = frozenset(
    {
        Features.LIKE_PIPE,
        Features.REMOVABLE,  # removable pipe (SQL 2005+)
        Features.LIKE_TAPE,
        Features.LIKE_DISK,
        Features.LIKE_DISK | Features.REMOVABLE,
    }
)


def is_power_of_two(value: int) -> bool:
    return value > 0 and value & (value - 1) == 0


def supported_features(features: int) -> bool:
    """True when the client bits of ``features`` form a combination the spec supports."""
    mode = Features(features & ~(_ADDONS | SERVER_FEATURES) & _U32)
    return mode in _MODES


@dataclasses.dataclass(frozen=True, slots=True)
class VDConfig:
    """The VDI configuration record, fields in struct order."""

    device_count: int = 1
    features: int = 0
    prefix_zone_size: int = 0
    alignment: int = 0
    soft_file_mark_block_size: int = 0
    eom_warning_size: int = 0
    server_timeout_ms: int = 0
    block_size: int = 0
    max_io_depth: int = 0
    max_transfer_size: int = 0
    buffer_area_size: int = 0

    def pack(self) -> bytes:
        """The 44-byte little-endian image; ``ValueError`` naming a field not a u32."""
        problems = self._u32_problems()
        if problems:
            raise ValueError("; ".join(problems))
        return _LAYOUT.pack(*dataclasses.astuple(self))

    @classmethod
    def unpack(cls, data: bytes | bytearray | memoryview) -> Self:
        if len(data) != _LAYOUT.size:
            raise ValueError(f"VDConfig is {_LAYOUT.size} bytes, got {len(data)}")
        return cls(*_LAYOUT.unpack(data))

    def replace(self, **changes: int) -> Self:
        return dataclasses.replace(self, **changes)

    def _u32_problems(self) -> list[str]:
        return [
            f"{field.name}={value!r} is not an unsigned 32-bit integer"
            for field in dataclasses.fields(self)
            if not isinstance(value := getattr(self, field.name), int) or not 0 <= value <= _U32
        ]

    def problems(self) -> list[str]:
        """Every rule of the module docstring this record breaks, in words."""
        out = self._u32_problems()
        if out:
            return out
        if not 1 <= self.device_count <= DEVICE_COUNT_MAX:
            out.append(f"device_count={self.device_count} is outside 1..{DEVICE_COUNT_MAX}")
        undocumented = Features.ENUM_FROZEN_FILES | Features.VSS_WRITER | Features.LATCH_STATS
        if self.features & undocumented:
            out.append(f"features 0x{self.features & undocumented:x} are undocumented")
        elif not supported_features(self.features):
            out.append(f"features 0x{self.features:x} are not a supported combination")
        if self.alignment and not (
            is_power_of_two(self.alignment) and self.alignment <= ALIGNMENT_MAX
        ):
            out.append(f"alignment={self.alignment} is not a power of two up to 64 KiB")
        if self.prefix_zone_size > TRANSFER_SIZE_MAX:
            out.append(f"prefix_zone_size={self.prefix_zone_size} exceeds 4 MiB")
        if self.block_size and not valid_block_size(self.block_size):
            out.append(f"block_size={self.block_size} is not a power of two in 512..65536")
        if self.max_transfer_size and not valid_max_transfer_size(self.max_transfer_size):
            out.append(
                f"max_transfer_size={self.max_transfer_size} is not a multiple of 64 KiB "
                "in 64 KiB..4 MiB"
            )
        return out

    def client_problems(self) -> list[str]:
        """:meth:`problems`, plus server-only feature bits offered by a client."""
        out = self.problems()
        if isinstance(self.features, int) and self.features & SERVER_FEATURES:
            out.append(
                f"features 0x{self.features & SERVER_FEATURES:x} are set by the server, "
                "not the client"
            )
        return out


def valid_block_size(value: int) -> bool:
    return is_power_of_two(value) and BLOCK_SIZE_MIN <= value <= BLOCK_SIZE_MAX


def valid_max_transfer_size(value: int) -> bool:
    return value % TRANSFER_UNIT == 0 and TRANSFER_UNIT <= value <= TRANSFER_SIZE_MAX


def valid_server_alignment(value: int, block_size: int) -> bool:
    return is_power_of_two(value) and block_size <= value <= ALIGNMENT_MAX
