"""What the object stores (S3, Azure Blob) share: keys under a prefix, owner marks and
the sweep of dead backups' debris.

``PrefixedKeys`` maps keys to the store's names under ``prefix``. ``MarkedObjectStore``
implements ``in_progress``, ``owner_marks``, ``remove_mark`` and ``sweep`` once, over the
primitives each backend provides: ``_list_raw`` (every object, internal names too),
``list``, ``list_uploads`` and ``abort_upload`` (S3 multipart uploads, Azure blobs of
uncommitted blocks), ``_delete``, and for the mark ``_put_mark`` (conditional create,
``StorageExistsError`` when one is there), ``_read_mark_version`` and
``_delete_dead_mark`` (which may make the delete conditional on the version read).
"""

from __future__ import annotations

import builtins
import contextlib
import json
import secrets
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import anyio

from vdistream.errors import StorageError, StorageExistsError, StorageNotFoundError
from vdistream.ownership import owner_record, record_owner_gone, record_owner_state
from vdistream.storage._common import (
    MANIFEST_NAME,
    OwnerMark,
    check_backup_id,
    check_key,
    join_url,
    owner_text,
)
from vdistream.storage.base import BackupInProgressError, Storage
from vdistream.storage.s3.tasks import BACKGROUNDS, Background

if TYPE_CHECKING:
    import structlog
    from anyio.abc import TaskGroup

__all__ = ("MARK_NAME", "MarkedObjectStore", "PrefixedKeys")

#: the owner mark ``in_progress`` writes under ``<backup_id>/``
MARK_NAME = ".vdistream-owner.json"


class PrefixedKeys:
    """Keys relative to the storage and the store's full names under ``prefix``."""

    prefix: str
    url: str

    def _full_key(self, key: str) -> str:
        check_key(key, url=self.url)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _url(self, full_key: str) -> str:
        return join_url(self.url, self._relative(full_key))

    def _relative(self, full_key: str) -> str:
        return full_key[len(self.prefix) + 1 :] if self.prefix else full_key

    def _root(self) -> str:
        return f"{self.prefix}/" if self.prefix else ""


class _Listed(Protocol):
    @property
    def key(self) -> str: ...
    @property
    def last_modified(self) -> datetime | None: ...


class _Upload(Protocol):
    @property
    def key(self) -> str: ...
    @property
    def upload_id(self) -> str: ...


class MarkedObjectStore(PrefixedKeys, Storage):
    """Owner marks and the sweep over the backend's primitives (module docstring)."""

    #: the backend module's logger: the log events keep their logger's name
    _events: ClassVar[structlog.stdlib.BoundLogger]

    # --- the Storage contract ---

    @contextlib.asynccontextmanager
    async def background(self) -> AsyncIterator[None]:
        """Part uploads (S3), block stagings (Azure) and read-ahead of the sinks and
        sources opened in this block run in one task group of the storage's, so they
        overlap the next calls. Each sink or source still ends its own calls (commit,
        abort, close) before the block does; an error of the block comes out as itself,
        not as an exception group. Blocks may nest, and jobs may share a storage: each
        sees its own block."""
        failure: Exception | None = None
        async with anyio.create_task_group() as group:
            block = Background(self, group)
            token = BACKGROUNDS.set((block, *BACKGROUNDS.get()))
            try:
                yield
            except Exception as exc:
                failure = exc
            finally:
                block.open = False
                BACKGROUNDS.reset(token)
        if failure is not None:
            raise failure

    def current_background(self) -> Background | None:
        """The innermost ``background()`` block of this storage the caller runs in."""
        return next((b for b in BACKGROUNDS.get() if b.storage is self and b.open), None)

    @property
    def background_group(self) -> TaskGroup | None:
        block = self.current_background()
        return block.group if block is not None else None

    async def list(self, prefix: str = "") -> builtins.list[str]:
        return [obj.key for obj in await self.list_objects(prefix)]

    # --- the backend's primitives ---

    async def list_objects(self, prefix: str = "") -> Sequence[_Listed]:
        """The committed objects whose key starts with ``prefix``, sorted by key."""
        raise NotImplementedError

    async def _list_raw(self, prefix: str = "") -> Sequence[_Listed]:
        raise NotImplementedError

    async def list_uploads(self, prefix: str = "") -> Sequence[_Upload]:
        raise NotImplementedError

    async def abort_upload(self, key: str, upload_id: str) -> None:
        raise NotImplementedError

    async def _delete(self, full_key: str) -> None:
        raise NotImplementedError

    async def _put_mark(self, full_key: str, body: bytes, token: str) -> None:
        raise NotImplementedError

    async def _read_mark_version(self, full_key: str) -> tuple[dict[str, Any] | None, str | None]:
        """The owner record (None when gone or unreadable) and its version, if any."""
        raise NotImplementedError

    async def _delete_dead_mark(self, full_key: str, version: str | None) -> None:
        raise NotImplementedError

    # --- owner marks and sweep ---

    @contextlib.asynccontextmanager
    async def in_progress(self, backup_id: str) -> AsyncIterator[None]:
        """The owner mark (see the module docstring and ``Storage.in_progress``). A mark
        whose owner is provably gone is replaced; any other (a live owner, or one on
        another host) raises ``BackupInProgressError``. One that cannot be deleted at
        exit is logged: its owner is gone by then, so the next ``sweep`` removes it."""
        check_backup_id(backup_id, url=self.url)
        full_key = f"{self._root()}{backup_id}/{MARK_NAME}"
        # unique, so that a conditional put meeting another holder's mark in this very
        # process is never mistaken for its own replay
        token = secrets.token_hex(8)
        body = json.dumps(
            {
                **owner_record(),
                "backup_id": backup_id,
                "started": datetime.now(UTC).isoformat(timespec="seconds"),
                "token": token,
            }
        ).encode()
        with anyio.CancelScope(shield=True):
            await self._place_mark(backup_id, full_key, body, token)
        try:
            yield
        finally:
            with anyio.CancelScope(shield=True):
                try:
                    await self._delete(full_key)
                except StorageError as exc:
                    self._events.warning("owner_mark_not_removed", key=full_key, error=str(exc))

    async def _place_mark(self, backup_id: str, full_key: str, body: bytes, token: str) -> None:
        for _ in range(3):
            try:
                await self._put_mark(full_key, body, token)
                return
            except StorageExistsError:
                pass
            record, version = await self._read_mark_version(full_key)
            if not record_owner_gone(record):
                raise BackupInProgressError(
                    f"backup {backup_id} is being written by another process "
                    f"({owner_text(record)})",
                    url=join_url(self.url, backup_id),
                )
            await self._delete_dead_mark(full_key, version)  # a dead owner's: ours now
        raise BackupInProgressError(
            f"backup {backup_id} is being started by another process at the same time",
            url=join_url(self.url, backup_id),
        )

    async def _read_mark(self, full_key: str) -> dict[str, Any] | None:
        return (await self._read_mark_version(full_key))[0]

    async def owner_marks(self) -> builtins.list[OwnerMark]:
        """Every backup's owner mark: ``alive`` False when its owner is provably gone,
        True when it is this host's and runs, None when it cannot be told (another
        host, an unreadable mark)."""
        marks: builtins.list[OwnerMark] = []
        for obj in await self._list_raw():
            backup_id, _, name = obj.key.partition("/")
            if name != MARK_NAME:
                continue
            record = await self._read_mark(self._root() + obj.key)
            marks.append(
                OwnerMark(backup_id, obj.key, record_owner_state(record), obj.last_modified, record)
            )
        return marks

    async def remove_mark(self, mark: OwnerMark) -> None:
        """Delete an owner mark (``vdistream.catalog.audit`` decides which)."""
        with anyio.CancelScope(shield=True), contextlib.suppress(StorageNotFoundError):
            await self._delete(self._root() + mark.name)

    async def sweep(self) -> builtins.list[str]:
        """``Storage.sweep``: for each backup whose mark proves its owner gone, abort the
        uploads under ``<backup_id>/`` (S3 multipart uploads, Azure uncommitted blocks),
        delete its objects unless a committed manifest is there, then the mark. Other
        hosts' marks are kept."""
        removed: builtins.list[str] = []
        with anyio.CancelScope(shield=True):
            for mark in await self.owner_marks():
                if mark.alive is not False:
                    continue
                try:
                    removed += await self._sweep_backup(mark)
                except StorageError as exc:
                    self._events.warning("debris_not_removed", storage=self.url, error=str(exc))
        return removed

    async def _sweep_backup(self, mark: OwnerMark) -> builtins.list[str]:
        prefix = f"{mark.backup_id}/"
        removed: builtins.list[str] = []

        def gone(item: str) -> None:
            removed.append(item)
            self._events.info("debris_removed", storage=self.url, item=item)

        async def still_dead() -> bool:
            # A new backup with the same id may take the dead mark over at any time
            # (``_place_mark``): then everything under the id is its own. Checked after
            # each listing, before anything listed is removed.
            return await self._read_mark(self._root() + mark.name) == mark.record

        uploads = await self.list_uploads(prefix)
        if not await still_dead():
            return removed
        for upload in uploads:
            await self.abort_upload(upload.key, upload.upload_id)
            gone(f"upload {upload.key} {upload.upload_id}")
        keys = await self.list(prefix)
        if f"{prefix}{MANIFEST_NAME}" not in keys:
            if not await still_dead():
                return removed
            for key in keys:
                with contextlib.suppress(StorageNotFoundError):
                    await self._delete(self._full_key(key))
                gone(key)
        if await still_dead():
            await self.remove_mark(mark)
            gone(mark.name)
        return removed
