"""The daemon's work on stored backups: which belong to a database, which are verified,
deleting one, applying retention, and removing what a killed job left behind.

* ``database_backups(manifests, database)``: the daemon names a database's backups
  ``<database>.<time>-<random>`` (``jobs.new_backup_id``); ``group_of(backup_id)`` is
  that database's name, ``""`` for ids without a ``.`` (backups made by
  ``vdistream backup`` by hand), which retention never mixes with a database's.
* ``verified_ids(store, database, backup_ids)``: of the backups present, those whose
  **latest** finished verification succeeded, plus the state database's last-verified
  record.
* ``delete_backup(storage, backup_id)``: the manifest FIRST (from then on the backup
  does not exist for ``list``, ``restore`` or ``verify``), then every object under
  ``<backup_id>/``. A failure after the manifest leaves debris, never a backup that
  looks complete and is not.
* ``apply_retention(...)``: ``plan_retention`` over one database's backups, then the
  deletions (unless ``dry_run``); backups that a running or queued job uses are kept.
  Each backup's ``needs`` is what ``catalog.chain.dependencies`` says it needs to be
  restored (a SQL Server log: its full and the logs between; a differential: its
  full; the other engines' backups: nothing), so retention keeps those of every kept
  backup (``Reason.NEEDED``). When the chain cannot be read (a SQL Server manifest
  without its type or LSNs) nothing of the database is deleted and ``problem`` says
  why: deleting without knowing what a kept log needs could break its chain.
* ``remove_partial_backup(storage, backup_id, ...)``: after a crash, a backup job's
  objects under ``<backup_id>/`` when no readable manifest commits them, its S3
  multipart uploads, and the temporary files of its file sinks (see the function).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
from collections.abc import Collection, Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread

from vdistream.catalog import CatalogError, Manifest, manifest_key, read_manifest
from vdistream.catalog.chain import dependencies
from vdistream.errors import StorageError, StorageNotFoundError
from vdistream.log import get_logger
from vdistream.service.retention import BackupInfo, RetentionPlan, RetentionPolicy, plan_retention
from vdistream.service.state import JobStore
from vdistream.storage import BackupInProgressError, Storage
from vdistream.storage.file import FileStorage

__all__ = (
    "DeletedBackup",
    "RetentionOutcome",
    "apply_retention",
    "backup_ended",
    "delete_backup",
    "group_of",
    "remove_partial_backup",
    "verified_ids",
)

log = get_logger(__name__)

# A file sink's temporary: ".<final name>.<16 hex>.tmp" in the storage's root.
_STREAM_TEMP = re.compile(r"\.stream-\d{2,}-of-\d{2,}\.vdi\.[0-9a-f]{16}\.tmp")


def group_of(backup_id: str) -> str:
    """The database a backup id belongs to (``""``: none, e.g. a backup made by hand)."""
    head, dot, _ = backup_id.partition(".")
    return head if dot else ""


def backup_ended(manifest: Manifest) -> datetime:
    """When the backup ended, as an aware datetime (manifests store UTC ISO 8601)."""
    ended = datetime.fromisoformat(manifest.ended)
    return ended if ended.tzinfo is not None else ended.replace(tzinfo=UTC)


async def verified_ids(store: JobStore, database: str, backup_ids: Iterable[str]) -> set[str]:
    """Backups of ``database`` among ``backup_ids`` (the ones in the destination) whose
    latest finished verification succeeded; only their rows are read, never the whole
    history (``JobStore.verify_outcomes``)."""
    decided = await store.verify_outcomes(database, backup_ids)
    last = await store.last_verified(database)
    if last is not None and last.backup_id not in decided:
        decided[last.backup_id] = True
    return {backup_id for backup_id, ok in decided.items() if ok}


@dataclasses.dataclass(frozen=True)
class DeletedBackup:
    """One deletion: ``error`` is ``None`` when everything of it is gone."""

    backup_id: str
    removed: tuple[str, ...]
    error: str | None = None


async def delete_backup(storage: Storage, backup_id: str) -> DeletedBackup:
    """Delete ``backup_id``: its manifest first, then every object under its id, under
    the backup's owner mark (``Storage.in_progress``), so that a ``vdistream key``
    rewrap of the same manifest cannot put it back over deleted streams. A backup whose
    mark another live process holds is kept, and the reason says so."""
    try:
        async with storage.in_progress(backup_id):
            return await _delete_marked(storage, backup_id)
    except BackupInProgressError as exc:
        return DeletedBackup(backup_id, (), f"in use by another process, kept: {exc}")


async def _delete_marked(storage: Storage, backup_id: str) -> DeletedBackup:
    removed: list[str] = []
    key = manifest_key(backup_id)
    with anyio.CancelScope(shield=True):
        try:
            await storage.delete(key)
            removed.append(key)
        except StorageNotFoundError:
            pass
        except StorageError as exc:
            return DeletedBackup(backup_id, (), f"cannot delete the manifest: {exc}")
        try:
            for key in await storage.list(f"{backup_id}/"):
                try:
                    await storage.delete(key)
                except StorageNotFoundError:
                    continue
                removed.append(key)
        except StorageError as exc:
            return DeletedBackup(backup_id, tuple(removed), f"manifest deleted, streams not: {exc}")
        await _remove_empty_directory(storage, backup_id)
    return DeletedBackup(backup_id, tuple(removed))


async def _remove_empty_directory(storage: Storage, backup_id: str) -> None:
    """A file destination keeps ``<backup_id>/`` once its files are gone: remove it
    when it is empty (anything else in it stays)."""
    if isinstance(storage, FileStorage):
        with contextlib.suppress(OSError):
            await anyio.to_thread.run_sync(os.rmdir, storage.path / backup_id)


@dataclasses.dataclass(frozen=True)
class RetentionOutcome:
    """What retention decided for one database and what it deleted."""

    database: str
    policy: RetentionPolicy
    plan: RetentionPlan
    deleted: tuple[DeletedBackup, ...]
    #: backups the plan would delete but a job still uses: kept this time
    in_use: tuple[str, ...] = ()
    dry_run: bool = False
    #: why nothing was deleted although the plan says so (the chains cannot be read)
    problem: str | None = None

    @property
    def ok(self) -> bool:
        return all(d.error is None for d in self.deleted)

    def summary(self) -> dict[str, Any]:
        def row(backup: BackupInfo) -> dict[str, Any]:
            return {
                "id": backup.id,
                "ended": backup.ended.isoformat(),
                "verified": backup.verified,
                "reasons": [reason.value for reason in self.plan.reasons[backup.id]],
            }

        return {
            "database": self.database,
            "policy": {
                "keep_last": self.policy.keep_last,
                "keep_within": None
                if self.policy.keep_within is None
                else self.policy.keep_within.total_seconds(),
            },
            "dry_run": self.dry_run,
            "keep": [row(b) for b in self.plan.keep],
            "delete": [row(b) for b in self.plan.delete],
            "in_use": list(self.in_use),
            "deleted": [d.backup_id for d in self.deleted if d.error is None],
            "errors": {d.backup_id: d.error for d in self.deleted if d.error is not None},
            "problem": self.problem,
        }


async def apply_retention(
    storage: Storage,
    manifests: Sequence[Manifest],
    database: str,
    policy: RetentionPolicy,
    verified: Collection[str],
    *,
    now: datetime | None = None,
    in_use: Collection[str] = (),
    dry_run: bool = False,
) -> RetentionOutcome:
    """Plan retention over the manifests of ``database`` (``group_of``) and delete
    what the plan says, except backups in ``in_use`` and what a kept backup needs
    (module doc). Deletion order: oldest first."""
    mine = [m for m in manifests if group_of(m.backup_id) == database]
    problem = None
    try:
        needs = dependencies(mine)
    except CatalogError as exc:
        problem = f"nothing deleted: the backup chains cannot be read: {exc}"
        log.error("retention_chains_unreadable", database=database, error=str(exc))
        needs = {}
    # A log or differential whose LSNs msdb did not give sits in no known chain: what
    # it needs, and who needs it, cannot be told, so nothing may go.
    blind = [
        m.backup_id
        for m in mine
        if m.sqlserver is not None
        and m.sqlserver.get("lsn_error")
        and m.sqlserver.get("type") != "D"
    ]
    if blind and problem is None:
        problem = (
            f"nothing deleted: SQL Server gave no LSNs for {', '.join(blind)}, so the chains "
            "through them cannot be known (delete them by hand once a newer full is kept)"
        )
        log.error("retention_chains_unreadable", database=database, error=problem)
    infos = [
        BackupInfo(
            m.backup_id,
            backup_ended(m),
            m.backup_id in verified,
            needs.get(m.backup_id, frozenset()),
        )
        for m in mine
    ]
    plan = plan_retention(infos, policy, now or datetime.now(UTC))
    busy = tuple(b.id for b in plan.delete if b.id in in_use)
    deleted: list[DeletedBackup] = []
    if not dry_run and problem is None:
        for backup in reversed(plan.delete):
            if backup.id in busy:
                continue
            done = await delete_backup(storage, backup.id)
            deleted.append(done)
            if done.error is None:
                log.info("backup_deleted", database=database, backup_id=backup.id)
            else:
                log.error(
                    "backup_delete_failed", database=database, backup_id=backup.id, error=done.error
                )
    return RetentionOutcome(database, policy, plan, tuple(deleted), busy, dry_run, problem)


async def remove_partial_backup(
    storage: Storage,
    backup_id: str,
    *,
    started: datetime | None = None,
    before: datetime | None = None,
) -> dict[str, Any]:
    """Remove what the backup job ``backup_id`` left when its daemon died.

    * A readable committed manifest means the backup completed before the daemon
      died: everything under ``<backup_id>/`` is kept (``{"committed": true}``; the
      job stays recorded failed, as interrupted, and its result says so). An
      unreadable manifest keeps everything too (it may describe a real backup;
      ``vdistream verify`` tells). The temporaries below are removed in every case.
    * Otherwise every object under ``<backup_id>/`` is deleted, and on S3 the
      multipart uploads under it are aborted.
    * First of all ``storage.sweep()``: the backup's owner lock (file) or marker (S3)
      died with the daemon, so the storage removes its debris, and any other dead
      owner's, itself; what it removed is reported with the rest.
    * On a file destination, sinks of older versions left temporary files in the
      destination's root (``.stream-NN-of-MM.vdi.<hex>.tmp``), which carry no backup
      id: those last modified between ``started`` (when the job started) and
      ``before`` (when this daemon started) are removed, as are those in
      ``<backup_id>/`` that the sweep did not take.

    Returns what was done, for the job record.
    """
    prefix = f"{backup_id}/"
    # The dead daemon's owner locks are free now: the storage's own sweep removes the
    # debris of every backup whose owner is provably gone, this one's first of all.
    with anyio.CancelScope(shield=True):
        try:
            removed: list[str] = list(await storage.sweep())
            failures: list[str] = []
        except StorageError as exc:
            removed, failures = [], [str(exc)]
    keys = await storage.list(prefix)
    if manifest_key(backup_id) in keys:
        # The temporaries are swept all the same: a job that reused the id of a
        # committed backup (refused at its commit) may have been killed before that.
        with anyio.CancelScope(shield=True):
            await _remove_temporaries(storage, backup_id, started, before, removed, failures)
        outcome = {"committed": True, "kept": keys, "removed": removed, "failures": failures}
        try:
            await read_manifest(storage, backup_id)
        except CatalogError as exc:
            outcome.update(committed=False, problem=str(exc))
        return outcome
    with anyio.CancelScope(shield=True):
        for key in keys:
            try:
                await storage.delete(key)
            except StorageNotFoundError:
                continue
            except StorageError as exc:
                failures.append(str(exc))
                continue
            removed.append(key)
        # Only S3 has multipart uploads; asked by capability, so that a daemon with no
        # S3 destination never loads the AWS libraries.
        list_uploads = getattr(storage, "list_uploads", None)
        abort_upload = getattr(storage, "abort_upload", None)
        if list_uploads is not None and abort_upload is not None:
            try:
                for upload in await list_uploads(prefix):
                    await abort_upload(upload.key, upload.upload_id)
                    removed.append(f"upload {upload.key} ({upload.upload_id})")
            except StorageError as exc:
                failures.append(str(exc))
        await _remove_temporaries(storage, backup_id, started, before, removed, failures)
        await _remove_empty_directory(storage, backup_id)
    return {"committed": False, "removed": removed, "failures": failures}


async def _remove_temporaries(
    storage: Storage,
    backup_id: str,
    started: datetime | None,
    before: datetime | None,
    removed: list[str],
    failures: list[str],
) -> None:
    """The file sinks' temporaries of a job that ran from ``started`` to ``before``."""
    if not isinstance(storage, FileStorage) or started is None:
        return
    low = started.timestamp() - 1.0
    high = (before or datetime.now(UTC)).timestamp()
    temps = await anyio.to_thread.run_sync(_stream_temporaries, storage.path, low, high)
    temps += await anyio.to_thread.run_sync(
        _stream_temporaries, storage.path / backup_id, low, high
    )
    for path in temps:
        try:
            await anyio.to_thread.run_sync(os.unlink, path)
        except FileNotFoundError:
            continue
        except OSError as exc:
            failures.append(f"cannot remove {path}: {exc.strerror or exc}")
            continue
        removed.append(path.relative_to(storage.path).as_posix())


def _stream_temporaries(root: Path, low: float, high: float) -> list[Path]:
    found: list[Path] = []
    try:
        entries = list(os.scandir(root))
    except (FileNotFoundError, NotADirectoryError):
        return found
    for entry in entries:
        if not _STREAM_TEMP.fullmatch(entry.name) or not entry.is_file(follow_symlinks=False):
            continue
        try:
            mtime = entry.stat(follow_symlinks=False).st_mtime
        except OSError:
            continue
        if low <= mtime <= high:
            found.append(Path(entry.path))
    return found
