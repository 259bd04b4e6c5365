"""Random sizes, device counts, modes and read sizes round-trip (hypothesis).

Synchronous tests that run their own event loop, because hypothesis drives them.
"""

from __future__ import annotations

import random

import anyio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.engines.fake_client import BLOCK, CHUNK, backup, restore
from vdistream import Features, Registry
from vdistream.engines import StripingOptions


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    size=st.integers(0, 12 * CHUNK),
    devices=st.integers(1, 6),
    disk=st.booleans(),
    reads=st.lists(st.sampled_from([BLOCK, 2 * BLOCK, 5 * BLOCK, CHUNK, 2 * CHUNK]), min_size=1),
    buffers=st.none() | st.integers(6, 16),
)
def test_random_round_trip(
    size: int, devices: int, disk: bool, reads: list[int], buffers: int | None
) -> None:
    data = random.Random(size).randbytes(size)
    features = Features.LIKE_DISK if disk else Features.LIKE_PIPE
    backup_options = StripingOptions(block_size=BLOCK, max_transfer_size=CHUNK)
    restore_options = StripingOptions(
        block_size=BLOCK,
        max_transfer_size=2 * CHUNK,
        read_sizes=tuple(reads),
        buffer_count=buffers,
    )

    async def main() -> None:
        client, _ = await backup(
            Registry(), data, devices, features=features, options=backup_options
        )
        restored, _, result = await restore(
            Registry(), client.streams, features=features, options=restore_options
        )
        assert restored == data
        assert result.logical_bytes == size

    anyio.run(main, backend="asyncio")
