"""Storage that misbehaves on purpose, wrapped around a real one."""

from __future__ import annotations

import builtins
import dataclasses

import anyio

from vdistream.errors import StorageError
from vdistream.storage import Sink, Source, Storage


@dataclasses.dataclass
class Faults:
    write_delay: float = 0.0  # every write takes this long (after touching the buffer)
    fail_after_bytes: int | None = None  # a write past this many bytes fails
    hang_write_after_bytes: int | None = None  # a write past this many bytes never returns
    hang_commit: bool = False
    fail_flush: bool = False
    fail_commit_of: str | None = None  # the commit of the key ending in this fails
    flush_delay: float = 0.0
    flushes_started: int = 0
    #: filled in: the first byte of every buffer, read AFTER the delay; a released
    #: buffer would raise ValueError here instead
    late_reads: int = 0
    commits_started: int = 0
    aborted: int = 0


class FaultySink(Sink):
    def __init__(self, inner: Sink, faults: Faults) -> None:
        self.inner = inner
        self.faults = faults
        self.url = inner.url
        self.device = inner.device

    @property
    def random_access(self) -> bool:
        return self.inner.random_access

    @property
    def bytes_written(self) -> int:
        return self.inner.bytes_written

    @property
    def size(self) -> int:
        return self.inner.size

    async def write(self, data: memoryview, *, position: int | None = None) -> None:
        f = self.faults
        total = self.inner.bytes_written + data.nbytes
        if f.fail_after_bytes is not None and total > f.fail_after_bytes:
            raise StorageError("injected write failure", url=self.url, device=self.device)
        if f.hang_write_after_bytes is not None and total > f.hang_write_after_bytes:
            await anyio.sleep_forever()
        if f.write_delay:
            # Like a thread still copying: shielded, so cancellation cannot cut it short.
            with anyio.CancelScope(shield=True):
                await anyio.sleep(f.write_delay)
                _ = data[0] if data.nbytes else 0  # raises ValueError if released under us
                f.late_reads += 1
        await self.inner.write(data, position=position)

    async def flush(self) -> None:
        self.faults.flushes_started += 1
        if self.faults.fail_flush:
            raise StorageError("injected flush failure", url=self.url, device=self.device)
        if self.faults.flush_delay:
            await anyio.sleep(self.faults.flush_delay)
        await self.inner.flush()

    async def commit(self) -> None:
        self.faults.commits_started += 1
        if self.faults.hang_commit:
            await anyio.sleep_forever()
        if self.faults.fail_commit_of and self.url.endswith(self.faults.fail_commit_of):
            await anyio.sleep(0.05)  # let the other devices publish first
            raise StorageError("injected commit failure", url=self.url, device=self.device)
        await self.inner.commit()

    async def abort(self) -> None:
        self.faults.aborted += 1
        await self.inner.abort()


class FaultyStorage(Storage):
    def __init__(self, inner: Storage, faults: Faults) -> None:
        self.inner = inner
        self.faults = faults
        self.url = inner.url

    async def open_sink(self, key: str, *, device: str | None = None) -> Sink:
        return FaultySink(await self.inner.open_sink(key, device=device), self.faults)

    async def open_source(self, key: str) -> Source:
        return await self.inner.open_source(key)

    async def list(self, prefix: str = "") -> builtins.list[str]:
        return await self.inner.list(prefix)

    async def stat(self, key: str) -> int:
        return await self.inner.stat(key)

    async def delete(self, key: str) -> None:
        await self.inner.delete(key)
