"""Recovery at start, and forgetting old jobs.

``recover(store, settings, started_at)`` (once, before the manager runs) marks the
jobs of a previous run that never ended as failed (``JobStore.mark_interrupted``) and
removes what they left: their backups' partial storage
(``backups.remove_partial_backup``), their restores' temporary files beside the
target, and everything in ``service.work_dir``, where verifications and SQLite
snapshots stage their data. ``prune_history`` forgets the jobs that ended longer than
``service.job_history`` ago (at start and every hour), except each backup's latest
verification, which retention still asks.
"""

from __future__ import annotations

import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread

from vdistream.engines.files import remove_stale_partials
from vdistream.engines.streams import partial_path
from vdistream.errors import VdistreamError
from vdistream.log import get_logger
from vdistream.service.backups import delete_backup, remove_partial_backup
from vdistream.service.settings import Settings
from vdistream.service.state import WRITE_TIMEOUT, JobRecord, JobStore, JobType, StateError
from vdistream.storage import open_storage

__all__ = ("prune_history", "recover")

log = get_logger(__name__)


async def recover(store: JobStore, settings: Settings, started_at: datetime) -> list[JobRecord]:
    """Mark the jobs a previous run left queued or running as failed and remove what
    they left (module doc); ``started_at``: when this daemon started."""
    await anyio.to_thread.run_sync(_empty_dir, settings.service.work_dir)
    await prune_history(store, settings)
    interrupted = await store.mark_interrupted()
    for record in interrupted:
        log.warning(
            "job_interrupted",
            job_id=record.id,
            kind=record.kind.value,
            database=record.database,
            backup_id=record.backup_id,
        )
        cleanup: dict[str, Any] | None = None
        if record.kind is JobType.RESTORE:
            target = record.params.get("target")
            removed = await anyio.to_thread.run_sync(_remove_partial_target, target)
            cleanup = {"removed": removed}
        elif record.kind is JobType.BACKUP and record.backup_id is not None:
            cleanup = await _remove_partial_backup(record, settings, started_at)
        if cleanup is not None:
            result = {**dict(record.result or {}), "cleanup": cleanup}
            await store.update(record.id, result=result)
    return interrupted


async def prune_history(store: JobStore, settings: Settings) -> None:
    """Forget jobs that ended longer than ``service.job_history`` ago."""
    history = settings.service.job_history
    if history is None:
        return
    try:
        with anyio.move_on_after(WRITE_TIMEOUT):
            forgotten = await store.delete_finished(datetime.now(UTC) - history)
            if forgotten:
                log.info("job_history_pruned", forgotten=forgotten, older_than=str(history))
    except StateError as exc:
        log.warning("job_history_not_pruned", error=str(exc))


async def _remove_partial_backup(
    record: JobRecord, settings: Settings, started_at: datetime
) -> dict[str, Any] | None:
    """What an interrupted backup left (``None``: its storage is unknown now), in its
    destination and in the mirror it recorded as it started (``runners``). Killed
    between its two manifests, a mirrored backup is complete in one place only; SQL
    Server's rule for ``MIRROR TO`` (complete in both or in neither) and the job's
    record (failed) say it goes from that place too."""
    assert record.backup_id is not None
    url = _storage_url_of(record, settings)
    if url is None:
        log.error(
            "partial_backup_not_removed",
            job_id=record.id,
            backup_id=record.backup_id,
            reason="its destination is no longer configured",
            storage_url=record.storage_url,
        )
        return None
    cleanup = await _clean(record, url, started_at)
    mirror = _mirror_url_of(record, settings)
    if mirror is None:
        return cleanup
    mirrored = await _clean(record, mirror, started_at, mirror=mirror)
    known = "error" not in cleanup and "error" not in mirrored
    if known and bool(cleanup.get("committed")) != bool(mirrored.get("committed")):
        side, where = (cleanup, url) if cleanup.get("committed") else (mirrored, mirror)
        side.update(committed=False, rolled_back=await _roll_back(record, where))
    return {**cleanup, "mirror": mirrored}


async def _clean(record: JobRecord, url: str, before: datetime, **where: str) -> dict[str, Any]:
    """``remove_partial_backup`` in the storage ``url``, bounded; its failure is the
    result's ``error``. ``where`` goes into the log events (the mirror's URL)."""
    assert record.backup_id is not None
    try:
        with anyio.fail_after(60):
            async with open_storage(url) as storage:
                cleanup = await remove_partial_backup(
                    storage, record.backup_id, started=record.started, before=before
                )
    except (VdistreamError, OSError, TimeoutError) as exc:
        log.error("partial_backup_not_removed", job_id=record.id, error=str(exc), **where)
        return {"error": f"cannot remove the partial backup: {exc}"}
    log.info(
        "partial_backup_removed",
        job_id=record.id,
        backup_id=record.backup_id,
        removed=len(cleanup.get("removed", ())),
        committed=cleanup.get("committed"),
        **where,
    )
    return cleanup


async def _roll_back(record: JobRecord, url: str) -> bool:
    """Delete the complete backup of an interrupted mirrored job from ``url``."""
    assert record.backup_id is not None
    try:
        with anyio.fail_after(60):
            async with open_storage(url) as storage:
                done = await delete_backup(storage, record.backup_id)
    except (VdistreamError, OSError, TimeoutError) as exc:
        log.error("partial_backup_not_removed", job_id=record.id, storage_url=url, error=str(exc))
        return False
    return done.error is None


def _mirror_url_of(record: JobRecord, settings: Settings) -> str | None:
    """The mirror a backup job recorded as it started (``runners``), if still configured."""
    name = (record.result or {}).get("mirror")
    if isinstance(name, str) and name in settings.destinations:
        return settings.destinations[name].url
    return None


def _storage_url_of(record: JobRecord, settings: Settings) -> str | None:
    name = record.params.get("destination")
    if isinstance(name, str) and name in settings.destinations:
        destination = settings.destinations[name]
        if record.storage_url in (None, destination.display_url):
            return destination.url
    if record.storage_url is not None and "***" not in record.storage_url:
        return record.storage_url
    return None


def _empty_dir(path: Path) -> None:
    """Create ``path`` (mode 0700) or remove everything in it."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    for entry in path.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def _remove_partial_target(target: object) -> list[str]:
    """The temporary files a restore into the file ``target`` writes before it puts
    the result in place (named by ``engines.files`` and ``engines.streams``); never
    ``target`` itself."""
    if not isinstance(target, str) or "://" in target or ":" in target.split("/", 1)[0]:
        return []  # a database URL or a command: nothing of ours on disk
    path = Path(target)
    # A partial file beside the target may be a live restore's (a CLI's, say): only
    # those whose lock nobody holds go. The dump-to-file ``.partial`` is the daemon's.
    removed = [str(p) for p in remove_stale_partials(path)]
    try:
        partial_path(path).unlink()
    except OSError:
        return removed
    return [*removed, str(partial_path(path))]
