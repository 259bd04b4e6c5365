"""Block arithmetic of Azure block blobs, and block ids (pure).

A block blob holds at most 50,000 committed blocks of at most 4000 MiB each. A stream of
unknown length cannot use one fixed block size (8 MiB blocks stop at 390 GiB), so the
schedule is S3's (``vdistream.storage.s3.parts``) with Azure's numbers: it starts at
``block_size`` (8 MiB) and doubles every 5,000 blocks, capped at 4000 MiB::

    blocks      1-5000:    8 MiB each, streams up to  39 GiB
    blocks  5001-10000:   16 MiB each, streams up to 117 GiB
    ...
    blocks 45001-50000: 4000 MiB each, streams up to  38.6 TiB

Memory follows the block size: ``max_blocks_in_flight + 1`` block buffers per sink.
Azure has no smallest block, so tests may use tiny blocks.

Block ids: every id of one blob must have the same length; ours are the base64 of the
sink's 16-hex-digit token and the 8-digit block number, so two sinks (a replay, a killed
earlier attempt) never name each other's blocks, and a committed blob's block list
tells whose it is.
"""

from __future__ import annotations

import base64

__all__ = (
    "BLOCK_GROWTH_INTERVAL",
    "DEFAULT_BLOCK_SIZE",
    "MAX_BLOCKS",
    "MAX_BLOCK_SIZE",
    "SINGLE_PUT_LIMIT",
    "block_id",
    "block_size_for",
    "initial_block_size",
    "stream_capacity",
)

MiB = 1 << 20
#: Azure's largest block (service version 2019-12-12 and later).
MAX_BLOCK_SIZE = 4000 * MiB
#: Azure's most committed blocks per blob.
MAX_BLOCKS = 50_000
#: The first block size when nothing else is known.
DEFAULT_BLOCK_SIZE = 8 * MiB
#: The largest blob written with one ``Put Blob`` from bytes; larger ones (a stream that
#: ended before filling its first block, a big ``write_bytes``) go as one staged block
#: sent as a stream, then a block list: aiohttp warns that a bytes body above 1 MiB may
#: hold up the event loop, and the SDK reads a stream given to ``Put Blob`` into bytes.
SINGLE_PUT_LIMIT = 1 * MiB
#: The block size doubles after every this many blocks.
BLOCK_GROWTH_INTERVAL = 5_000
_HINT_BLOCKS = 10_000


def block_size_for(
    number: int, *, initial: int = DEFAULT_BLOCK_SIZE, growth_interval: int = BLOCK_GROWTH_INTERVAL
) -> int:
    """The size of block ``number`` (1-based): ``initial`` doubled once per
    ``growth_interval`` blocks before it, at most ``MAX_BLOCK_SIZE``."""
    if number < 1:
        raise ValueError(f"block numbers start at 1, not {number}")
    if initial < 1 or growth_interval < 1:
        raise ValueError("initial block size and growth interval must be positive")
    steps = (number - 1) // growth_interval
    if steps >= 64:
        return MAX_BLOCK_SIZE
    return min(MAX_BLOCK_SIZE, initial << steps)


def stream_capacity(
    *, initial: int = DEFAULT_BLOCK_SIZE, growth_interval: int = BLOCK_GROWTH_INTERVAL
) -> int:
    """The largest stream the schedule stages in ``MAX_BLOCKS`` blocks."""
    total, number = 0, 1
    while number <= MAX_BLOCKS:
        size = block_size_for(number, initial=initial, growth_interval=growth_interval)
        run_end = min(MAX_BLOCKS, ((number - 1) // growth_interval + 1) * growth_interval)
        total += size * (run_end - number + 1)
        number = run_end + 1
    return total


def initial_block_size(expected_size: int | None, *, default: int = DEFAULT_BLOCK_SIZE) -> int:
    """The first block size for a stream expected to hold ``expected_size`` bytes: the
    smallest ``default * 2**k`` whose 10,000 blocks cover it (``default`` without one)."""
    size = default
    if expected_size is None:
        return size
    while size * _HINT_BLOCKS < expected_size and size < MAX_BLOCK_SIZE:
        size *= 2
    return min(size, MAX_BLOCK_SIZE)


def block_id(token: str, number: int) -> str:
    """The id of block ``number`` of the sink with ``token`` (16 hex digits)."""
    return base64.b64encode(f"{token}{number:08d}".encode("ascii")).decode("ascii")
