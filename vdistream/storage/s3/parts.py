"""Part-size arithmetic of S3 multipart uploads, and the digests parts carry (pure).

S3 allows at most 10,000 parts per upload, each at least 5 MiB (except the last) and at
most 5 GiB, and objects up to 5 TiB. A stream of unknown length therefore cannot use one
fixed part size: 8 MiB parts stop at 78 GiB. The schedule starts at ``part_size``
(default 8 MiB) and doubles every 1,000 parts, capped at 5 GiB::

    parts     1-1000:   8 MiB each, streams up to   7.8 GiB
    parts  1001-2000:  16 MiB each, streams up to  23.4 GiB
    parts  2001-3000:  32 MiB each, streams up to  54.7 GiB
    parts  3001-4000:  64 MiB each, streams up to 117   GiB
    parts  4001-5000: 128 MiB each, streams up to 242   GiB
    parts  5001-6000: 256 MiB each, streams up to 492   GiB
    parts  6001-7000: 512 MiB each, streams up to 992   GiB
    parts  7001-8000:   1 GiB each, streams up to   1.95 TiB
    parts  8001-9000:   2 GiB each, streams up to   3.90 TiB
    parts 9001-10000:   4 GiB each, streams up to   7.80 TiB

so every stream up to the 5 TiB object limit fits (``stream_capacity``), and small
streams keep small parts. Memory follows the part size: a 1 TiB stream ends with 1 GiB
parts, i.e. up to 3 GiB of part buffers for that device. With an ``expected_size`` hint
the first part size is the smallest ``part_size * 2**k`` that covers the hint in 2,000
parts (``initial_part_size``); the doubling still applies, so a wrong hint is harmless.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Callable
from typing import Any

import anyio.to_thread

__all__ = (
    "DEFAULT_PART_SIZE",
    "MAX_OBJECT_SIZE",
    "MAX_PARTS",
    "MAX_PART_SIZE",
    "MIN_PART_SIZE",
    "PART_GROWTH_INTERVAL",
    "b64",
    "digest",
    "initial_part_size",
    "md5",
    "multipart_etag",
    "part_size_for",
    "part_sizes",
    "stream_capacity",
)

MiB = 1 << 20
#: S3's smallest part (every part but the last).
MIN_PART_SIZE = 5 * MiB
#: S3's largest part.
MAX_PART_SIZE = 5 << 30
#: S3's most parts per upload.
MAX_PARTS = 10_000
#: S3's largest object.
MAX_OBJECT_SIZE = 5 << 40
#: The first part size when nothing else is known.
DEFAULT_PART_SIZE = 8 * MiB
#: The part size doubles after every this many parts.
PART_GROWTH_INTERVAL = 1_000
#: Parts of this many bytes are covered by a size hint (see ``initial_part_size``).
_HINT_PARTS = 2_000
# Hash in a worker thread above this size (hashlib releases the GIL there).
_THREAD_HASH_BYTES = 1 * MiB


def part_size_for(
    part_number: int,
    *,
    initial: int = DEFAULT_PART_SIZE,
    growth_interval: int = PART_GROWTH_INTERVAL,
) -> int:
    """The size of part ``part_number`` (1-based): ``initial`` doubled once per
    ``growth_interval`` parts before it, at most ``MAX_PART_SIZE``."""
    if part_number < 1:
        raise ValueError(f"part numbers start at 1, not {part_number}")
    if initial < 1 or growth_interval < 1:
        raise ValueError("initial part size and growth interval must be positive")
    steps = (part_number - 1) // growth_interval
    if steps >= 64:  # beyond any real size; avoid shifting absurdly far
        return MAX_PART_SIZE
    return min(MAX_PART_SIZE, initial << steps)


def stream_capacity(
    *,
    initial: int = DEFAULT_PART_SIZE,
    growth_interval: int = PART_GROWTH_INTERVAL,
    max_parts: int = MAX_PARTS,
) -> int:
    """The largest stream the schedule can upload in ``max_parts`` parts."""
    total, number = 0, 1
    while number <= max_parts:  # whole runs of equal parts at once
        size = part_size_for(number, initial=initial, growth_interval=growth_interval)
        run_end = min(max_parts, ((number - 1) // growth_interval + 1) * growth_interval)
        total += size * (run_end - number + 1)
        number = run_end + 1
    return total


def part_sizes(
    total_size: int,
    *,
    initial: int = DEFAULT_PART_SIZE,
    growth_interval: int = PART_GROWTH_INTERVAL,
    max_parts: int = MAX_PARTS,
) -> list[int]:
    """The part sizes a stream of ``total_size`` bytes is cut into, in order.

    All but the last follow ``part_size_for``; the last holds the remainder. Raises
    ``ValueError`` if the stream needs more than ``max_parts`` parts. A stream of 0
    bytes is one empty part (sent as a plain put).
    """
    if total_size < 0:
        raise ValueError(f"negative size {total_size}")
    sizes: list[int] = []
    left = total_size
    while True:
        number = len(sizes) + 1
        if number > max_parts:
            raise ValueError(f"{total_size} bytes need more than {max_parts} parts")
        size = part_size_for(number, initial=initial, growth_interval=growth_interval)
        if left <= size:
            sizes.append(left)
            return sizes
        sizes.append(size)
        left -= size


def initial_part_size(expected_size: int | None, *, default: int = DEFAULT_PART_SIZE) -> int:
    """The first part size for a stream expected to hold ``expected_size`` bytes.

    No hint (or a small one): ``default``. Otherwise the smallest ``default * 2**k``
    whose 2,000 parts cover the hint, at most ``MAX_PART_SIZE``.
    """
    size = default
    if expected_size is None:
        return size
    while size * _HINT_PARTS < expected_size and size < MAX_PART_SIZE:
        size *= 2
    return min(size, MAX_PART_SIZE)


def md5(data: bytes) -> Any:
    """MD5 as S3 uses it for ETags (not for security)."""
    return hashlib.md5(data, usedforsecurity=False)


def b64(raw: bytes) -> str:
    """A digest as S3's checksum headers carry it."""
    return base64.b64encode(raw).decode("ascii")


def multipart_etag(etags: list[str]) -> str | None:
    """The ETag S3 gives a multipart object: MD5 of the parts' MD5s, ``-count``."""
    try:
        joined = b"".join(bytes.fromhex(etag.strip('"')) for etag in etags)
    except ValueError:
        return None  # not MD5 ETags (some stores, SSE-KMS): cannot tell
    return f'"{md5(joined).hexdigest()}-{len(etags)}"'


async def digest(algorithm: Callable[[bytes], Any], data: bytes) -> bytes:
    """The digest of ``data``; large inputs hash in a worker thread (GIL released)."""
    if len(data) <= _THREAD_HASH_BYTES:
        return bytes(algorithm(data).digest())
    return bytes(await anyio.to_thread.run_sync(lambda: algorithm(data).digest()))
