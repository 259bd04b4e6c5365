"""The conformance suite every ``vdistream.storage.Storage`` must pass (restic-style).

Two ways to run it:

* ``await check_storage(make_storage)`` runs every check, each against a fresh, empty
  storage from ``make_storage()``;
* subclass ``StorageConformance`` as a pytest test class and override its ``storage``
  fixture; each check becomes one test (``test_conformance[round_trip]``, ...)::

      class TestMyStorage(StorageConformance):
          @pytest.fixture
          def storage(self, tmp_path):
              return MyStorage(tmp_path)

Optionally give a ``residue`` function (or override ``StorageConformance.residue``):
it returns the names of *everything* the storage holds, temporaries included, so the
checks can prove that abort and cancellation leave no debris behind. Without it they
can only look through the storage's own ``list``, ``stat`` and ``open_source``.

Checks raise ``AssertionError`` with a message naming what was expected; they do not
rely on pytest's assertion rewriting.
"""

from __future__ import annotations

import functools
import itertools
import mmap
import random
from collections.abc import Awaitable, Callable, Collection, Iterable

import anyio
import anyio.lowlevel
import pytest

from vdistream.errors import StorageError, StorageExistsError, StorageNotFoundError
from vdistream.storage.base import Sink, Storage

__all__ = (
    "CANCEL_DELAYS",
    "STORAGE_CHECKS",
    "Residue",
    "StorageCheck",
    "StorageConformance",
    "StorageMaker",
    "cancel_during",
    "check_abort",
    "check_abort_after_commit",
    "check_buffers_not_retained",
    "check_cancel_abort",
    "check_cancel_commit",
    "check_cancel_flush",
    "check_cancel_open",
    "check_cancel_write",
    "check_context_manager",
    "check_delete",
    "check_in_progress",
    "check_invalid_keys",
    "check_list_prefixes",
    "check_no_overwrite",
    "check_probe",
    "check_random_access",
    "check_readinto",
    "check_round_trip",
    "check_sources",
    "check_storage",
    "check_uncommitted_invisible",
    "check_zero_length",
)

#: Returns a fresh, empty storage for one check.
StorageMaker = Callable[[], Awaitable[Storage]]
#: Names of everything ``storage`` holds, temporaries included; ``None`` if unknown.
Residue = Callable[[Storage], Collection[str] | None]
#: One check: runs against an empty storage, raises ``AssertionError`` on failure.
StorageCheck = Callable[[Storage, Residue | None], Awaitable[None]]

#: When the cancel lands: ``None`` = before the call (a deadline already passed), an
#: int = after that many scheduler passes of a sibling task, i.e. while the call runs.
CANCEL_DELAYS: tuple[int | None, ...] = (None, 0, 1, 2, 3, 5, 8, 13, 21, 34, 55, 100, 1000)


# --- helpers -------------------------------------------------------------------------


def _expect(condition: bool, message: str) -> None:
    if not condition:
        raise AssertionError(message)


async def _raises(error: type[BaseException], call: Awaitable[object], what: str) -> None:
    try:
        await call
    except error:
        return
    raise AssertionError(f"{what}: expected {error.__name__}, nothing was raised")


def _data(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


async def _write_in_pieces(sink: Sink, data: bytes, sizes: Iterable[int]) -> None:
    """Write ``data`` in pieces cycling through ``sizes`` (uneven on purpose)."""
    view, start = memoryview(data), 0
    for size in itertools.cycle(sizes):
        if start >= len(data):
            break
        await sink.write(view[start : start + size])
        start += size


async def _commit(storage: Storage, key: str, data: bytes) -> None:
    sink = await storage.open_sink(key)
    await sink.write(memoryview(data))
    await sink.commit()


async def _expect_present(storage: Storage, key: str, data: bytes) -> None:
    _expect(key in await storage.list(), f"{key!r} is committed but not listed")
    size = await storage.stat(key)
    _expect(size == len(data), f"stat({key!r}) = {size}, expected {len(data)}")
    stored = await storage.read_bytes(key)
    _expect(stored == data, f"{key!r} reads back {len(stored)} bytes, not the bytes written")


async def _expect_absent(storage: Storage, key: str) -> None:
    _expect(key not in await storage.list(), f"{key!r} is listed but was never committed")
    await _raises(StorageNotFoundError, storage.stat(key), f"stat({key!r})")
    await _raises(StorageNotFoundError, storage.open_source(key), f"open_source({key!r})")


async def _expect_no_residue(storage: Storage, residue: Residue | None) -> None:
    """Everything the storage holds is a committed key: no temporary is left over."""
    held = None if residue is None else residue(storage)
    if held is not None:
        committed = set(await storage.list())
        _expect(set(held) == committed, f"storage holds {sorted(held)}, committed {committed}")


async def _cancel_after(scope: anyio.CancelScope, passes: int) -> None:
    for _ in range(passes):
        await anyio.lowlevel.checkpoint()
    scope.cancel()


async def cancel_during(call: Callable[[], Awaitable[object]], delay: int | None) -> bool:
    """Run ``call()`` in a scope cancelled per ``delay`` (see ``CANCEL_DELAYS``).

    Returns True if the call returned normally, False if the cancellation stopped it.
    """
    completed = False
    with anyio.CancelScope() as scope:
        if delay is None:
            scope.cancel()
        async with anyio.create_task_group() as group:
            if delay is not None:
                group.start_soon(_cancel_after, scope, delay)
            await call()
            completed = True
            group.cancel_scope.cancel()  # the canceller is no longer needed
    return completed


# --- the checks ----------------------------------------------------------------------


async def check_round_trip(storage: Storage, residue: Residue | None = None) -> None:
    """Random data written in uneven pieces reads back exactly; sizes add up."""
    data = _data(300_007, seed=1)
    _expect(await storage.list() == [], "a fresh storage must be empty")
    sink = await storage.open_sink("round-trip", device="dev0")
    await _write_in_pieces(sink, data, (1, 7, 0, 4096, 65_539, 100_000, 13))
    _expect(sink.bytes_written == len(data), f"bytes_written {sink.bytes_written}")
    _expect(sink.size == len(data), f"size {sink.size}, expected {len(data)}")
    await sink.flush()
    await sink.commit()
    await _expect_present(storage, "round-trip", data)
    await _expect_no_residue(storage, residue)


async def check_readinto(storage: Storage, residue: Residue | None = None) -> None:
    """readinto with any buffer size reassembles the object; short only at the end."""
    data = _data(2_503, seed=2)
    await _commit(storage, "read", data)
    for buffer_size in (1, 3, 1000, len(data), len(data) + 17, 65_536):
        buffer = memoryview(bytearray(buffer_size))
        parts = bytearray()
        async with await storage.open_source("read") as source:
            _expect(source.size in (None, len(data)), f"source.size {source.size}")
            while count := await source.readinto(buffer):
                parts += buffer[:count]
                _expect(
                    count == buffer_size or len(parts) == len(data),
                    f"short read of {count} into {buffer_size} before the end",
                )
            _expect(await source.readinto(buffer) == 0, "reading past the end must give 0")
        _expect(bytes(parts) == data, f"buffer size {buffer_size}: bytes differ")
    async with await storage.open_source("read") as source:
        if source.random_access:
            buffer = memoryview(bytearray(100))
            count = await source.readinto(buffer, position=2_000)
            _expect(bytes(buffer[:count]) == data[2_000:2_100], "positional read differs")
            count = await source.readinto(buffer)  # continues after the positional read
            _expect(bytes(buffer[:count]) == data[2_100:2_200], "read after seek differs")
            count = await source.readinto(buffer, position=2_450)
            _expect(bytes(buffer[:count]) == data[2_450:], "positional read at the end")
            _expect(await source.readinto(buffer, position=9_999) == 0, "read past end")
        else:
            await _raises(
                StorageError,
                source.readinto(memoryview(bytearray(1)), position=0),
                "positional read from a sequential source",
            )
    await _expect_no_residue(storage, residue)


async def check_uncommitted_invisible(storage: Storage, residue: Residue | None = None) -> None:
    """Written and flushed but not committed: not listed, not stat-able, not readable."""
    await _commit(storage, "other", b"committed")
    sink = await storage.open_sink("pending")
    await sink.write(memoryview(_data(10_000, seed=3)))
    await sink.flush()
    await _expect_absent(storage, "pending")
    await _raises(StorageNotFoundError, storage.read_bytes("pending"), "read_bytes(pending)")
    _expect(await storage.list() == ["other"], "only the committed key may be listed")
    await sink.abort()
    await _expect_no_residue(storage, residue)


async def check_abort(storage: Storage, residue: Residue | None = None) -> None:
    """abort removes everything, is idempotent, and the key stays free."""
    sink = await storage.open_sink("aborted", device="dev7")
    await sink.write(memoryview(_data(70_000, seed=4)))
    await sink.flush()
    await sink.abort()
    await _expect_absent(storage, "aborted")
    await _expect_no_residue(storage, residue)
    await sink.abort()  # idempotent
    try:
        await sink.write(memoryview(b"late"))
    except StorageError as exc:
        _expect("dev7" in str(exc), f"error does not name the device: {exc}")
    else:
        raise AssertionError("write after abort must raise StorageError")
    await _raises(StorageError, sink.commit(), "commit after abort")
    await _expect_absent(storage, "aborted")
    empty = await storage.open_sink("never-written")
    await empty.abort()
    await _expect_absent(storage, "never-written")
    await _commit(storage, "aborted", b"fresh")  # nothing left blocks the key
    await _expect_present(storage, "aborted", b"fresh")
    await _expect_no_residue(storage, residue)


async def check_abort_after_commit(storage: Storage, residue: Residue | None = None) -> None:
    """abort after commit changes nothing; nor does a second commit."""
    data = _data(1_000, seed=5)
    sink = await storage.open_sink("kept")
    await sink.write(memoryview(data))
    await sink.commit()
    await sink.commit()
    await sink.abort()
    await sink.abort()
    await _expect_present(storage, "kept", data)
    await _raises(StorageError, sink.write(memoryview(b"x")), "write after commit")
    await _expect_no_residue(storage, residue)


async def check_no_overwrite(storage: Storage, residue: Residue | None = None) -> None:
    """commit never replaces a committed object; a refused sink may retry after delete."""
    old, new = _data(2_000, seed=6), _data(3_000, seed=7)
    early = await storage.open_sink("key")  # opened before the first commit
    await early.write(memoryview(new))
    await _commit(storage, "key", old)
    await _raises(StorageExistsError, early.commit(), "commit over a committed key")
    await _expect_present(storage, "key", old)
    await early.abort()
    await _expect_present(storage, "key", old)
    await _expect_no_residue(storage, residue)

    late = await storage.open_sink("key")
    await late.write(memoryview(new))
    await _raises(StorageExistsError, late.commit(), "commit over a committed key")
    await _expect_present(storage, "key", old)
    await storage.delete("key")
    await late.commit()  # refused, not failed: it may commit once the key is free
    await _expect_present(storage, "key", new)

    await _raises(StorageExistsError, storage.write_bytes("key", old), "write_bytes")
    await _expect_present(storage, "key", new)
    await storage.write_bytes("key", old, overwrite=True)
    await _expect_present(storage, "key", old)
    await _expect_no_residue(storage, residue)


async def check_context_manager(storage: Storage, residue: Residue | None = None) -> None:
    """``async with`` aborts unless committed, and lets exceptions through."""
    async with await storage.open_sink("forgotten") as sink:
        await sink.write(memoryview(b"never committed"))
    await _expect_absent(storage, "forgotten")

    class Boom(Exception):
        pass

    try:
        async with await storage.open_sink("failed") as sink:
            await sink.write(memoryview(b"half"))
            raise Boom
    except Boom:
        pass
    else:
        raise AssertionError("the exception must propagate out of the sink")
    await _expect_absent(storage, "failed")

    async with await storage.open_sink("done") as sink:
        await sink.write(memoryview(b"complete"))
        await sink.commit()
    await _expect_present(storage, "done", b"complete")
    await _expect_no_residue(storage, residue)


async def check_cancel_open(storage: Storage, residue: Residue | None = None) -> None:
    """A cancelled open_sink leaves nothing behind; a sink it returned can be aborted."""
    opened: list[Sink] = []

    async def open_one(key: str) -> None:
        opened.append(await storage.open_sink(key))

    for index, delay in enumerate(CANCEL_DELAYS):
        await cancel_during(functools.partial(open_one, f"cancel-open-{index}"), delay)
        while opened:
            await opened.pop().abort()
        _expect(await storage.list() == [], f"delay {delay}: an opened sink is listed")
        await _expect_no_residue(storage, residue)


async def check_cancel_write(storage: Storage, residue: Residue | None = None) -> None:
    """A cancelled write is all or nothing; the sink can still abort or commit."""
    first, second = _data(10_000, seed=8), _data(1 << 20, seed=9)
    for index, delay in enumerate(CANCEL_DELAYS):
        for finish in ("abort", "commit"):
            key = f"cancel-write-{index}-{finish}"
            sink = await storage.open_sink(key)
            await sink.write(memoryview(first))
            backing = bytearray(second)
            view = memoryview(backing)
            completed = await cancel_during(functools.partial(sink.write, view), delay)
            view.release()
            backing[:] = bytes(len(backing))  # the sink must have copied or written it
            written = sink.bytes_written
            _expect(
                written in (len(first), len(first) + len(second)),
                f"delay {delay}: a cancelled write left {written} bytes (torn write)",
            )
            _expect(not completed or written == len(first) + len(second), "lost a write")
            await _expect_absent(storage, key)
            await _finish(storage, sink, key, finish, (first + second)[:written])
    await _expect_no_residue(storage, residue)


async def _finish(storage: Storage, sink: Sink, key: str, how: str, data: bytes) -> None:
    """``abort`` the sink (nothing is visible) or ``commit`` it (``data`` is)."""
    if how == "abort":
        await sink.abort()
        await _expect_absent(storage, key)
    else:
        await sink.commit()
        await _expect_present(storage, key, data)


async def check_cancel_flush(storage: Storage, residue: Residue | None = None) -> None:
    """A cancelled flush publishes nothing; the sink can still abort or commit."""
    data = _data(200_000, seed=10)
    for index, delay in enumerate(CANCEL_DELAYS):
        for finish in ("abort", "commit"):
            key = f"cancel-flush-{index}-{finish}"
            sink = await storage.open_sink(key)
            await sink.write(memoryview(data))
            await cancel_during(sink.flush, delay)
            _expect(sink.bytes_written == len(data), "flush changed bytes_written")
            await _expect_absent(storage, key)
            await _finish(storage, sink, key, finish, data)
    await _expect_no_residue(storage, residue)


async def check_cancel_commit(storage: Storage, residue: Residue | None = None) -> None:
    """A cancelled commit leaves the whole object or nothing; abort or retry works."""
    data = _data(200_000, seed=11)
    for index, delay in enumerate(CANCEL_DELAYS):
        for finish in ("abort", "retry"):
            key = f"cancel-commit-{index}-{finish}"
            sink = await storage.open_sink(key)
            await sink.write(memoryview(data))
            completed = await cancel_during(sink.commit, delay)
            visible = key in await storage.list()
            _expect(visible or not completed, f"delay {delay}: commit returned, not visible")
            if visible:
                await _expect_present(storage, key, data)
            else:
                await _expect_absent(storage, key)
            if finish == "abort":
                await sink.abort()
            else:
                await sink.commit()  # no-op if it went through, else commits now
                visible = True
            if visible:
                await _expect_present(storage, key, data)
            else:
                await _expect_absent(storage, key)
    await _expect_no_residue(storage, residue)


async def check_cancel_abort(storage: Storage, residue: Residue | None = None) -> None:
    """abort completes even when cancelled, and inside an already-cancelled scope."""
    data = _data(200_000, seed=12)
    for index, delay in enumerate(CANCEL_DELAYS):
        key = f"cancel-abort-{index}"
        sink = await storage.open_sink(key)
        await sink.write(memoryview(data))
        await sink.flush()
        await cancel_during(sink.abort, delay)
        await _expect_absent(storage, key)
        await _expect_no_residue(storage, residue)
        await _raises(StorageError, sink.commit(), f"delay {delay}: commit after abort")
        await sink.abort()
    # The way out of a cancelled task: __aexit__ aborts inside the cancelled scope.
    sink = await storage.open_sink("cancelled-body")
    with anyio.CancelScope() as scope:
        async with sink:
            await sink.write(memoryview(data))
            scope.cancel()
            await anyio.sleep(60)
    _expect(scope.cancelled_caught, "the sleep should have been cancelled")
    await _raises(StorageError, sink.commit(), "commit after __aexit__ aborted")
    await _expect_absent(storage, "cancelled-body")
    await _expect_no_residue(storage, residue)


async def check_buffers_not_retained(storage: Storage, residue: Residue | None = None) -> None:
    """write and readinto keep no reference to the caller's buffer.

    The buffers in real use are views of the device set's shared ``mmap``; an mmap (or
    a bytearray) with a live view cannot be closed (or resized), which is the test.
    """
    data = _data(100_000, seed=13)
    area = mmap.mmap(-1, len(data))
    area[:] = data
    sink = await storage.open_sink("buffers")
    with memoryview(area) as view:
        await sink.write(view[:40_000])
        await sink.write(view[40_000:])
    try:
        area.close()
    except BufferError as exc:
        raise AssertionError("the sink kept a view of the written buffer") from exc
    await sink.commit()
    await _expect_present(storage, "buffers", data)

    target = bytearray(1_000)
    async with await storage.open_source("buffers") as source:
        with memoryview(target) as view:
            await source.readinto(view)
        try:
            target.extend(b"resize")
        except BufferError as exc:
            raise AssertionError("the source kept a view of the read buffer") from exc
    _expect(bytes(target[:1_000]) == data[:1_000], "readinto filled the wrong bytes")
    await _expect_no_residue(storage, residue)


async def check_delete(storage: Storage, residue: Residue | None = None) -> None:
    """delete removes one object; missing keys raise StorageNotFoundError."""
    await _commit(storage, "gone", b"1")
    await _commit(storage, "dir/stays", b"22")
    await storage.delete("gone")
    await _expect_absent(storage, "gone")
    await _expect_present(storage, "dir/stays", b"22")
    await _raises(StorageNotFoundError, storage.delete("gone"), "delete twice")
    await _raises(StorageNotFoundError, storage.delete("never"), "delete missing key")
    await _raises(StorageNotFoundError, storage.delete("dir"), "delete a key's parent")
    await _commit(storage, "gone", b"333")
    await _expect_present(storage, "gone", b"333")
    await storage.delete("dir/stays")
    _expect(await storage.list() == ["gone"], "list after deletes")
    await _expect_no_residue(storage, residue)


async def check_list_prefixes(storage: Storage, residue: Residue | None = None) -> None:
    """list filters by plain string prefix and sorts; nested keys work."""
    keys = ["c", "b/d/e", "ab", "bc", "a", "b/c"]
    for key in keys:
        await _commit(storage, key, key.encode())
    expectations = {
        "": sorted(keys),
        "a": ["a", "ab"],
        "b": ["b/c", "b/d/e", "bc"],
        "b/": ["b/c", "b/d/e"],
        "b/d": ["b/d/e"],
        "b/d/e": ["b/d/e"],
        "b/d/e/": [],
        "zzz": [],
    }
    for prefix, expected in expectations.items():
        listed = await storage.list(prefix)
        _expect(listed == expected, f"list({prefix!r}) = {listed}, expected {expected}")
    for key in keys:
        await _expect_present(storage, key, key.encode())
    await _expect_no_residue(storage, residue)


async def check_zero_length(storage: Storage, residue: Residue | None = None) -> None:
    """Empty objects commit, stat as 0 and read as b''; empty writes are harmless."""
    sink = await storage.open_sink("empty")
    await sink.commit()
    await _expect_present(storage, "empty", b"")
    sink = await storage.open_sink("empty-writes")
    await sink.write(memoryview(b""))
    await sink.write(memoryview(bytearray()))
    _expect(sink.bytes_written == 0 and sink.size == 0, "empty writes counted bytes")
    await sink.commit()
    await _expect_present(storage, "empty-writes", b"")
    async with await storage.open_source("empty") as source:
        _expect(await source.readinto(memoryview(bytearray(10))) == 0, "empty read")
    await _expect_no_residue(storage, residue)


async def check_random_access(storage: Storage, residue: Residue | None = None) -> None:
    """Positional writes land where asked, holes read as zeros; or they are refused."""
    sink = await storage.open_sink("random")
    if not sink.random_access:
        await _raises(StorageError, sink.write(memoryview(b"x"), position=0), "position=")
        await sink.abort()
        await _expect_absent(storage, "random")
        return
    await sink.write(memoryview(b"hello world"))
    await sink.write(memoryview(b"HE"), position=0)
    await sink.write(memoryview(b"!"), position=20)  # leaves a hole of zeros
    await sink.write(memoryview(b"tail"))  # continues after the last write
    await sink.write(memoryview(b"W"), position=6)  # inside: the size stays
    expected = b"HEllo World" + bytes(9) + b"!tail"
    _expect(sink.size == len(expected), f"size {sink.size}, expected {len(expected)}")
    _expect(sink.bytes_written == 19, f"bytes_written {sink.bytes_written}, expected 19")
    await _raises(StorageError, sink.write(memoryview(b"x"), position=-1), "position=-1")
    await sink.commit()
    await _expect_present(storage, "random", expected)
    await _expect_no_residue(storage, residue)


async def check_invalid_keys(storage: Storage, residue: Residue | None = None) -> None:
    """Malformed keys are refused before anything is written."""
    for key in ("", "/a", "a/", "a//b", ".", "..", "../a", "a/../b", "a/./b", "a\0b"):
        await _raises(StorageError, storage.open_sink(key), f"open_sink({key!r})")
        await _raises(StorageError, storage.stat(key), f"stat({key!r})")
    _expect(await storage.list() == [], "a refused key left something behind")
    await _expect_no_residue(storage, residue)


async def check_sources(storage: Storage, residue: Residue | None = None) -> None:
    """Sources close idempotently and refuse reads afterwards; errors name the URL."""
    await _commit(storage, "source", b"abc")
    source = await storage.open_source("source")
    _expect("source" in source.url, f"source url {source.url!r} does not name the key")
    await source.close()
    await source.close()
    try:
        await source.readinto(memoryview(bytearray(3)))
    except StorageError as exc:
        _expect(source.url in str(exc), f"error does not name the URL: {exc}")
    else:
        raise AssertionError("readinto after close must raise StorageError")
    sink = await storage.open_sink("sink-url", device="dev3")
    _expect("sink-url" in sink.url, f"sink url {sink.url!r} does not name the key")
    _expect(sink.device == "dev3", "the sink forgot its device")
    await sink.abort()
    await _expect_no_residue(storage, residue)


async def check_in_progress(storage: Storage, residue: Residue | None = None) -> None:
    """``in_progress`` marks a backup for its life and leaves nothing behind; ``sweep``
    never touches a live or a finished backup; internal names are no keys."""
    async with storage.in_progress("job"):
        await _commit(storage, "job/s1", b"kept")
        sink = await storage.open_sink("job/s2")
        await sink.write(memoryview(b"dropped"))
        await sink.abort()
        _expect(await storage.list() == ["job/s1"], "in_progress's mark is listed as a key")
        _expect(await storage.sweep() == [], "sweep removed something of a live backup")
    _expect(await storage.list() == ["job/s1"], "in_progress lost or left objects")
    await _expect_no_residue(storage, residue)
    _expect(await storage.sweep() == [], "sweep removed something of a finished backup")
    await _expect_present(storage, "job/s1", b"kept")
    for bad in ("a/b", "", "..", ".vdistream-owner.lock"):
        try:
            async with storage.in_progress(bad):
                pass
        except StorageError:
            continue
        raise AssertionError(f"in_progress({bad!r}): expected StorageError")
    await _raises(StorageError, storage.open_sink("job/.vdistream-x"), "an internal name")
    await _expect_no_residue(storage, residue)


async def check_probe(storage: Storage, residue: Residue | None = None) -> None:
    """``probe`` succeeds on a working storage and leaves nothing behind."""
    await storage.probe()
    _expect(await storage.list() == [], "probe left an object")
    await _expect_no_residue(storage, residue)


#: Every check, in the order ``check_storage`` runs them.
STORAGE_CHECKS: tuple[StorageCheck, ...] = (
    check_round_trip,
    check_readinto,
    check_uncommitted_invisible,
    check_abort,
    check_abort_after_commit,
    check_no_overwrite,
    check_context_manager,
    check_cancel_open,
    check_cancel_write,
    check_cancel_flush,
    check_cancel_commit,
    check_cancel_abort,
    check_buffers_not_retained,
    check_delete,
    check_list_prefixes,
    check_zero_length,
    check_random_access,
    check_invalid_keys,
    check_sources,
    check_in_progress,
    check_probe,
)


async def check_storage(make_storage: StorageMaker, *, residue: Residue | None = None) -> None:
    """Run every check in ``STORAGE_CHECKS``, each on a fresh storage; stop at the first
    failure, which names the check in an exception note."""
    for check in STORAGE_CHECKS:
        async with await make_storage() as storage:
            try:
                await check(storage, residue)
            except Exception as exc:
                exc.add_note(f"in storage conformance check {check.__name__}")
                raise


class StorageConformance:
    """The suite as a pytest class: subclass it as ``Test...`` and override ``storage``.

    ``storage`` must give a fresh, empty storage per test. Override ``residue`` to let
    the checks see temporaries too (see the module docstring).
    """

    @pytest.fixture
    def storage(self) -> Storage:
        raise NotImplementedError("override the storage fixture in the subclass")

    def residue(self, storage: Storage) -> Collection[str] | None:
        """Everything ``storage`` holds, temporaries included; ``None``: cannot tell."""
        return None

    @pytest.mark.asyncio
    @pytest.mark.parametrize(
        "check",
        STORAGE_CHECKS,
        ids=[check.__name__.removeprefix("check_") for check in STORAGE_CHECKS],
    )
    async def test_conformance(self, storage: Storage, check: StorageCheck) -> None:
        await check(storage, self.residue)
