"""Review of the producer's pipe reads in a worker thread (``_read_available``, up to
20 ms of patience): a producer that dies in the middle of its output, after a pause
that makes a thread read come back short, still fails the stream with its exit
status."""

from __future__ import annotations

import pytest

from vdistream.engines.process import ProcessProducer, ProducerFailedError

pytestmark = pytest.mark.asyncio

MIB = 1 << 20


async def test_a_producer_that_exits_mid_stream_fails_with_its_status() -> None:
    # 2.5 MiB in pieces, a pause (so a thread read comes back short), then a failure
    script = "head -c 1500000 /dev/zero; sleep 0.05; head -c 1121440 /dev/zero; exit 7"
    producer = ProcessProducer(["/bin/sh", "-c", script])
    buffer = memoryview(bytearray(MIB))
    total = 0

    async def read_all() -> None:
        nonlocal total
        while count := await producer.readinto(buffer):
            total += count

    async with producer.running():
        with pytest.raises(ProducerFailedError, match="exited with status 7 after 2621440 bytes"):
            await read_all()
        await producer.aclose()
    assert total == 2_621_440
    assert producer.returncode == 7
