"""``MirrorStorage`` on two real directories: the storage conformance suite (every
contract of ``vdistream.storage.base`` holds for the pair), the same bytes on both
sides, and all-or-nothing commits when one side fails."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from tests.storage.test_file import files_under
from vdistream.errors import StorageError, StorageExistsError, StorageFullError
from vdistream.storage import FileStorage, SinkState, Storage
from vdistream.storage.mirror import MirrorSink, MirrorStorage
from vdistream.testing import StorageConformance


def mirror_of(tmp_path: Path) -> MirrorStorage:
    return MirrorStorage(FileStorage(tmp_path / "one"), FileStorage(tmp_path / "two"))


class TestMirrorConformance(StorageConformance):
    @pytest.fixture
    def storage(self, tmp_path: Path) -> Storage:
        return mirror_of(tmp_path)

    def residue(self, storage: Storage) -> list[str]:
        """Everything in the primary (temporaries included), plus whatever one side holds
        and the other does not (marked as such): the checks compare this with the keys
        committed, so a difference between the sides fails them too."""
        assert isinstance(storage, MirrorStorage)
        assert isinstance(storage.primary, FileStorage)
        assert isinstance(storage.secondary, FileStorage)
        one, two = files_under(storage.primary.path), files_under(storage.secondary.path)
        return [
            *one,
            *(f"only in the secondary: {name}" for name in sorted(set(two) - set(one))),
            *(f"only in the primary: {name}" for name in sorted(set(one) - set(two))),
        ]


@pytest.mark.asyncio
async def test_both_sides_hold_the_same_bytes_from_the_same_buffers(tmp_path: Path) -> None:
    storage = mirror_of(tmp_path)
    data = os.urandom(3 << 20)
    sink = await storage.open_sink("b/s", device="dev0")
    assert isinstance(sink, MirrorSink)
    with memoryview(bytearray(data)) as view:
        for start in range(0, len(data), 1 << 20):
            await sink.write(view[start : start + (1 << 20)])
    await sink.flush()
    assert (tmp_path / "one" / "b").exists()
    assert not (tmp_path / "one" / "b" / "s").exists()
    await sink.commit()
    assert sink.state is SinkState.COMMITTED
    want = hashlib.sha256(data).hexdigest()
    for side in ("one", "two"):
        assert hashlib.sha256((tmp_path / side / "b" / "s").read_bytes()).hexdigest() == want
    assert sink.size == sink.bytes_written == len(data)


@pytest.mark.asyncio
async def test_a_key_taken_on_one_side_publishes_on_neither(tmp_path: Path) -> None:
    """The destinations disagree (the secondary already holds the key): the commit is
    refused, the primary's new object is deleted again, the old one is untouched."""
    storage = mirror_of(tmp_path)
    await storage.secondary.write_bytes("b/s", b"old")
    sink = await storage.open_sink("b/s")
    await sink.write(memoryview(b"new stream"))
    with pytest.raises(StorageError) as caught:
        await sink.commit()
    # not the retryable refusal: the sink is failed, nothing may be deleted for a retry
    assert not isinstance(caught.value, StorageExistsError)
    assert str(caught.value) == (
        f"b/s exists in only one destination ({(tmp_path / 'two' / 'b' / 's').as_uri()}): "
        f"the destinations disagree ({(tmp_path / 'one' / 'b' / 's').as_uri()})"
    )
    assert not (tmp_path / "one" / "b" / "s").exists()
    assert (tmp_path / "two" / "b" / "s").read_bytes() == b"old"
    await sink.abort()
    assert files_under(tmp_path / "one") == []
    assert files_under(tmp_path / "two") == ["b/s"]


@pytest.mark.asyncio
async def test_a_failing_side_fails_the_write_and_abort_clears_both(tmp_path: Path) -> None:
    """A real full medium on the secondary (RLIMIT_FSIZE, as tests/storage/test_disk_full
    uses): the write fails naming the secondary's object, abort leaves nothing."""
    import resource
    import signal

    storage = mirror_of(tmp_path)
    sink = await storage.open_sink("b/s", device="dev0")
    await sink.write(memoryview(b"x" * 1000))
    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, old_limit[1]))
    try:
        with pytest.raises(StorageFullError) as caught:
            await sink.write(memoryview(b"y" * (2 << 20)))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)
    assert "file://" in str(caught.value)
    assert sink.state is SinkState.FAILED
    with pytest.raises(StorageError, match="cannot commit: the sink is failed"):
        await sink.commit()
    await sink.abort()
    assert files_under(tmp_path / "one") == []
    assert files_under(tmp_path / "two") == []
