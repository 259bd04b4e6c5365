"""The buffer area: one preallocated shared region cut into aligned slots.

Layout of a slot (spec §2.1, §7)::

    ... | prefix zone | data (capacity bytes) | ... | prefix zone | data | ...
                      ^ aligned to max(server alignment, request, client alignment)

The area is a memfd-backed ``mmap`` (an anonymous one where memfd is missing), so that
an out-of-process transport can hand the same pages to another process: each segment
keeps its memfd open until the area is closed (``segment_files()``), sealed against
shrinking and growing, so another process that maps it can neither pull pages from
under this one (``SIGBUS``) nor resize it. ``position()`` and ``slot_at()`` translate
between a slot and its (segment index, offset in the segment), the only way the other
process names a buffer. It is
sized once, from the server's ``request_buffers`` declarations, at
``end_configuration``; a ``request_buffers`` made after configuration adds one more
segment of exactly that size (the spec allows the area to span several mappings).
Allocation never grows it: a caller waits for a free slot. Buffers travel as
``memoryview`` slices of the mapping; nothing is copied.
"""

from __future__ import annotations

import bisect
import ctypes
import dataclasses
import fcntl
import mmap
import os
import weakref
from collections.abc import Callable

from vdistream.errors import VDMemoryError

__all__ = (
    "ALIGNMENT",
    "MAX_BUFFERS",
    "BufferArea",
    "SegmentFile",
    "Slot",
    "address_of",
    "map_aligned",
)

#: The largest alignment honoured, and the boundary every segment is mapped at (in this
#: process and, through ``map_aligned``, in an engine's).
ALIGNMENT = 65536
_ALIGN_SLACK = ALIGNMENT  # room to shift slots where a mapping is only page aligned
#: The most buffers one area holds: 64 devices with 1024 commands outstanding each. A
#: larger count is refused (``VDMemoryError``) before anything is laid out.
MAX_BUFFERS = 64 * 1024


def address_of(view: memoryview) -> int | None:
    """The address of a writable, non-empty byte view, or None if it has none to give."""
    if view.readonly or view.nbytes == 0 or not view.contiguous:
        return None
    try:
        anchor = ctypes.c_char.from_buffer(view)
    except (TypeError, ValueError):
        return None
    address = ctypes.addressof(anchor)
    del anchor  # drop the export at once, so the view can still be released
    return address


def _align_up(value: int, alignment: int) -> int:
    return (value + alignment - 1) // alignment * alignment


@dataclasses.dataclass(eq=False, slots=True)
class Slot:
    handle: int
    segment: _Segment
    data_offset: int
    capacity: int
    alignment: int
    prefix_size: int
    in_use: bool = False
    pending: int = 0  # commands sent with this buffer and not yet completed
    views: list[memoryview] = dataclasses.field(default_factory=list)

    @property
    def address(self) -> int:
        return self.segment.base + self.data_offset

    def data(self, offset: int, size: int) -> memoryview:
        start = self.data_offset + offset
        return self.segment.view[start : start + size]

    def release_views(self) -> None:
        """Release the views of this slot handed out to the server."""
        for view in self.views:
            view.release()
        self.views.clear()

    def prefix(self) -> memoryview:
        return self.segment.view[self.data_offset - self.prefix_size : self.data_offset]


@dataclasses.dataclass(frozen=True, slots=True)
class SegmentFile:
    """One segment of the area as another process maps it: ``fd`` (a memfd owned by
    the area, open until the area is closed; -1 where memfd is missing) mapped
    ``MAP_SHARED`` at offset 0 for ``length`` bytes."""

    index: int
    fd: int
    length: int


class _Segment:
    """One mapping of the area, the memfd behind it, and the slots cut from it."""

    def __init__(self, index: int, length: int) -> None:
        self.index = index
        self.fd, self.map, self.view = _map_shared(length)
        self.base = address_of(self.view) or 0
        self.length = length
        # The memfd is closed by close(), or when a set that was never closed is collected.
        self._close_fd = weakref.finalize(self, os.close, self.fd) if self.fd >= 0 else None

    def close(self) -> None:
        self.view.release()
        try:
            self.map.close()
        except BufferError:
            # A view exported elsewhere keeps the pages alive until it is released.
            pass
        self.fd = -1
        if self._close_fd is not None:
            self._close_fd()


_SEALS = getattr(fcntl, "F_SEAL_SHRINK", 0) | getattr(fcntl, "F_SEAL_GROW", 0)


def _map_shared(length: int) -> tuple[int, mmap.mmap, memoryview]:
    """A memfd of ``length`` bytes (sealed against resizing), its mapping and the view of
    its bytes (at an address aligned to 64 KiB, see ``map_aligned``); ``-1`` and an
    anonymous mapping where memfd is missing."""
    try:
        fd = os.memfd_create("vdistream-buffer-area", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    except (AttributeError, OSError):
        anonymous = mmap.mmap(-1, length)
        return -1, anonymous, memoryview(anonymous)
    try:
        os.ftruncate(fd, length)
        if _SEALS:
            # Another process may map this: it must not shrink it under our mapping.
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS | fcntl.F_SEAL_SEAL)
        mapping, view = map_aligned(fd, length)
        return fd, mapping, view
    except BaseException:
        os.close(fd)
        raise


_PROT_RW = mmap.PROT_READ | mmap.PROT_WRITE
_MAP_FIXED = 0x10  # <sys/mman.h>, the same on every Linux architecture


def _libc_mmap() -> Callable[..., int | None] | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        function = libc.mmap
    except (OSError, AttributeError):
        return None
    function.restype = ctypes.c_void_p
    function.argtypes = (
        ctypes.c_void_p,
        ctypes.c_size_t,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_long,
    )
    return function


_mmap_function = _libc_mmap()


def map_aligned(fd: int, length: int) -> tuple[mmap.mmap, memoryview]:
    """Map ``length`` bytes of ``fd`` (shared, read-write) at an address aligned to
    ``ALIGNMENT`` (64 KiB): the mmap object that owns the mapping, and the view of the
    file's bytes.

    Both processes of a set map its memfds this way, so an offset aligned in the file is
    aligned in both address spaces: the client lays buffers out by offset, the engine
    finds them at the same alignment. How: an anonymous mapping of ``length`` + 64 KiB
    reserves the range and owns it (closing it unmaps everything); the memfd is then
    mapped over the aligned part of it with ``MAP_FIXED`` (libc's ``mmap`` through
    ctypes). Without libc's ``mmap`` the file is mapped where the kernel chooses (page
    aligned). ``ValueError`` when the file is shorter than ``length`` (the pages past
    its end would fault when touched)."""
    size = os.fstat(fd).st_size
    if size < length:
        # Pages past the end of the file would fault (SIGBUS) when touched.
        raise ValueError(f"the file has {size} bytes, fewer than the {length} to map")
    if _mmap_function is None:
        plain = mmap.mmap(fd, length, flags=mmap.MAP_SHARED, prot=_PROT_RW)
        return plain, memoryview(plain)
    reservation = mmap.mmap(-1, length + ALIGNMENT)
    whole = memoryview(reservation)
    base = address_of(whole)
    assert base is not None  # an anonymous read-write mapping
    offset = -base % ALIGNMENT
    got = _mmap_function(base + offset, length, _PROT_RW, mmap.MAP_SHARED | _MAP_FIXED, fd, 0)
    if got != base + offset:
        error = ctypes.get_errno()
        whole.release()
        reservation.close()
        raise OSError(error, f"mmap of the buffer area at a 64 KiB boundary: {os.strerror(error)}")
    view = whole[offset : offset + length]
    whole.release()
    return reservation, view


class BufferArea:
    """Slots of one set, with a free list per (capacity, alignment) class."""

    def __init__(self, *, prefix_zone_size: int, client_alignment: int) -> None:
        self.prefix_zone_size = prefix_zone_size
        self.client_alignment = max(client_alignment, 1)
        self._declared: list[tuple[int, int, int]] = []
        self._segments: list[_Segment] = []
        self._slots: list[Slot] = []
        self._starts: list[int] = []  # sorted slot addresses, parallel to _by_start
        self._by_start: list[Slot] = []
        self._free: dict[tuple[int, int], list[Slot]] = {}
        self._classes: list[tuple[int, int]] = []

    # --- sizing ----------------------------------------------------------------

    def declare(self, size: int, alignment: int, count: int) -> None:
        self._check_count(count)
        self._declared.append((size, alignment, count))

    def materialize(self) -> None:
        """Map everything declared so far as one segment."""
        if self._declared:
            declared, self._declared = self._declared, []
            self._add_segment(declared)

    def extend(self, size: int, alignment: int, count: int) -> None:
        self._check_count(count)
        self._add_segment([(size, alignment, count)])

    def _check_count(self, count: int) -> None:
        """``VDMemoryError`` when ``count`` more buffers would exceed ``MAX_BUFFERS``
        (checked before anything is laid out: the layout costs time and memory per
        buffer, and a count comes from the server, in another process too)."""
        total = len(self._slots) + sum(declared[2] for declared in self._declared) + count
        if total > MAX_BUFFERS:
            raise VDMemoryError(
                f"request_buffers: {count} more buffers would make {total}; a buffer area "
                f"holds at most {MAX_BUFFERS}"
            )

    def _add_segment(self, requests: list[tuple[int, int, int]]) -> None:
        layout: list[tuple[int, int, int]] = []  # (capacity, alignment, relative offset)
        cursor = 0
        for size, alignment, count in requests:
            align = max(alignment, self.client_alignment)
            for _ in range(count):
                offset = _align_up(cursor + self.prefix_zone_size, align)
                layout.append((size, align, offset))
                cursor = offset + size
        length = cursor + _ALIGN_SLACK
        try:
            segment = _Segment(len(self._segments), length)
        except (OSError, ValueError, OverflowError) as exc:
            raise VDMemoryError(f"cannot map a buffer area of {length} bytes: {exc}") from exc
        # Shift every offset so that the addresses (not just the offsets) are aligned.
        shift = (-segment.base) % _ALIGN_SLACK
        self._segments.append(segment)
        for capacity, align, offset in layout:
            slot = Slot(
                handle=len(self._slots),
                segment=segment,
                data_offset=offset + shift,
                capacity=capacity,
                alignment=align,
                prefix_size=self.prefix_zone_size,
            )
            self._slots.append(slot)
            index = bisect.bisect(self._starts, slot.address)
            self._starts.insert(index, slot.address)
            self._by_start.insert(index, slot)
            key = (capacity, align)
            if key not in self._free:
                self._free[key] = []
                self._classes = sorted(self._free)
            self._free[key].append(slot)

    def segment_files(self) -> list[SegmentFile]:
        """Every segment's memfd and length, in segment order (``[]`` once closed)."""
        return [SegmentFile(s.index, s.fd, s.length) for s in self._segments if s.fd >= 0]

    @property
    def total_bytes(self) -> int:
        return sum(segment.length for segment in self._segments)

    @property
    def slot_count(self) -> int:
        return len(self._slots)

    # --- allocation --------------------------------------------------------------

    def could_fit(self, size: int, alignment: int) -> bool:
        """Whether any slot, free or not, could ever satisfy this request."""
        return any(cap >= size and al >= alignment for cap, al in self._classes)

    def take(self, size: int, alignment: int) -> Slot | None:
        """The smallest free slot that fits, marked in use; None if all are busy."""
        for capacity, align in self._classes:
            if capacity >= size and align >= alignment:
                free = self._free[capacity, align]
                if free:
                    slot = free.pop()
                    slot.in_use = True
                    return slot
        return None

    def give_back(self, slot: Slot) -> None:
        slot.release_views()
        slot.in_use = False
        self._free[slot.capacity, slot.alignment].append(slot)

    def count_free(self, size: int, alignment: int) -> int:
        return sum(
            len(free)
            for (capacity, align), free in self._free.items()
            if capacity >= size and align >= alignment
        )

    # --- finding buffers ---------------------------------------------------------

    def locate(self, view: memoryview) -> tuple[Slot, int] | None:
        """The slot a writable view points into and the offset inside its data."""
        address = address_of(view)
        if address is None:
            return None
        index = bisect.bisect_right(self._starts, address) - 1
        if index < 0:
            return None
        slot = self._by_start[index]
        offset = address - slot.address
        if offset + view.nbytes > slot.capacity:
            return None
        return slot, offset

    def position(self, slot: Slot, offset: int = 0) -> tuple[int, int]:
        """(segment index, offset in that segment) of byte ``offset`` of ``slot``'s data."""
        return slot.segment.index, slot.data_offset + offset

    def slot_at(self, segment: int, offset: int) -> tuple[Slot, int] | None:
        """The slot whose data holds byte ``offset`` of segment ``segment``, and the
        offset inside its data; ``None`` when no slot's data holds it."""
        if not 0 <= segment < len(self._segments) or offset < 0:
            return None
        found = self._segments[segment]
        index = bisect.bisect_right(self._starts, found.base + offset) - 1
        if index < 0:
            return None
        slot = self._by_start[index]
        inner = found.base + offset - slot.address
        if slot.segment is not found or inner >= slot.capacity:
            return None
        return slot, inner

    def in_use(self) -> list[Slot]:
        return [slot for slot in self._slots if slot.in_use]

    def close(self) -> None:
        """Release the views, unmap, and close the memfds (idempotent)."""
        for slot in self._slots:
            slot.release_views()
        for segment in self._segments:
            segment.close()
