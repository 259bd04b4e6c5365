"""The frame checksums that stand in for the logical SHA-256 of a compressed stream
are verified by our decoders even when the frame was flushed mid-stream (zstd
``FLUSH_BLOCK``, lz4 flush without ending the frame) many times: a flipped byte inside
a stored (raw) block decodes without complaint, and only the checksum at the frame's
end catches it."""

from __future__ import annotations

import hashlib
from pathlib import Path

import anyio
import pytest

from tests.pipeline.conftest import CONTEXT, random_data
from vdistream.errors import CorruptStreamError
from vdistream.pipeline import parse_compression
from vdistream.pipeline.chain import PipelineConfig, SinkChain, SourceChain
from vdistream.storage import FileStorage

pytestmark = pytest.mark.asyncio

MIB = 1 << 20


@pytest.mark.parametrize(
    ("compression", "caught_by"),
    [
        ("zstd:1", "doesn't match checksum"),
        ("zstd:3", "doesn't match checksum"),
        ("lz4", "contentChecksum_invalid"),
    ],
)
async def test_a_flushed_frame_is_checked_at_its_end(
    tmp_path: Path, compression: str, caught_by: str
) -> None:
    storage = FileStorage(tmp_path)
    settings = PipelineConfig(compression=parse_compression(compression))
    assert not settings.hashes_logical  # the frame's checksum is all there is
    limiter = anyio.CapacityLimiter(2)
    chain = SinkChain.build(
        await storage.open_sink("s"), settings, context=CONTEXT, limiter=limiter
    )
    data = random_data(3 * MIB + 333, seed=14)  # incompressible: stored blocks
    with memoryview(data) as view:
        for offset in range(0, len(data), 200_000):
            await chain.outer.write(view[offset : offset + 200_000])
            await chain.outer.flush()  # a block (not frame) end after every write
    await chain.outer.commit()

    path = tmp_path / "s"
    stored = bytearray(path.read_bytes())
    stored[len(stored) // 2] ^= 0x01
    path.write_bytes(bytes(stored))

    source = SourceChain.build(
        await storage.open_source("s"), settings, context=CONTEXT, limiter=limiter
    )
    buffer = memoryview(bytearray(MIB))
    got = 0

    async def read_to_the_end() -> None:
        nonlocal got
        while count := await source.outer.readinto(buffer):
            got += count

    with pytest.raises(CorruptStreamError, match=caught_by):
        await read_to_the_end()
    await source.outer.close()
    assert got < len(data)  # the end of the stream was never delivered
    # the damaged bytes decoded: the stored stream is whole, one byte differs
    assert source.stored.sha256 == hashlib.sha256(stored).hexdigest()
