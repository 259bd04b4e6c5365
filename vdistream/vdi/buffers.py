"""The buffer area: one preallocated shared region cut into aligned slots.

Layout of a slot (spec §2.1, §7)::

    ... | prefix zone | data (capacity bytes) | ... | prefix zone | data | ...
                      ^ aligned to max(server alignment, request, client alignment)

The area is a memfd-backed ``mmap`` (an anonymous one where memfd is missing), so that
an out-of-process transport can later hand the same pages to another process. It is
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
import mmap
import os

from vdistream.errors import VDMemoryError

__all__ = ("BufferArea", "Slot", "address_of")

_ALIGN_SLACK = 65536  # the largest alignment we honour; the mapping is only page aligned


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


class _Segment:
    """One mapping of the area and the slots cut from it."""

    def __init__(self, length: int) -> None:
        self.map = _map_shared(length)
        self.view = memoryview(self.map)
        self.base = address_of(self.view) or 0
        self.length = length

    def close(self) -> None:
        self.view.release()
        try:
            self.map.close()
        except BufferError:
            # A view exported elsewhere keeps the pages alive until it is released.
            pass


def _map_shared(length: int) -> mmap.mmap:
    try:
        fd = os.memfd_create("vdistream-buffer-area", os.MFD_CLOEXEC)
    except (AttributeError, OSError):
        return mmap.mmap(-1, length)
    try:
        os.ftruncate(fd, length)
        return mmap.mmap(fd, length)
    finally:
        os.close(fd)


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
        self._declared.append((size, alignment, count))

    def materialize(self) -> None:
        """Map everything declared so far as one segment."""
        if self._declared:
            declared, self._declared = self._declared, []
            self._add_segment(declared)

    def extend(self, size: int, alignment: int, count: int) -> None:
        self._add_segment([(size, alignment, count)])

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
            segment = _Segment(length)
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

    def in_use(self) -> list[Slot]:
        return [slot for slot in self._slots if slot.in_use]

    def close(self) -> None:
        for slot in self._slots:
            slot.release_views()
        for segment in self._segments:
            segment.close()
