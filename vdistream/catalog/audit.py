"""Find (and optionally remove) what no committed backup references.

A backup exists only through its committed manifest (``<backup_id>/manifest.json``),
which names every device stream's key. Everything else under a storage is debris of
jobs that failed or were killed: device streams committed before the job died, and on
S3 multipart uploads that were never completed or aborted (they cost money and are
invisible to ``list``). ``audit`` reports them; ``audit(..., clean=True)`` removes them.

What is kept, always:

* every readable manifest and every key its ``devices`` name;
* everything under ``<backup_id>/`` of a manifest that exists but cannot be read
  (corrupt, edited, newer format): it may describe a real backup, so its streams are
  reported as unverifiable, never deleted;
* with ``min_age``, anything younger than that (or whose age the storage cannot tell).

Work of live jobs is never touched: a backup whose owner mark (``Storage.in_progress``:
a held lock file, or an S3 mark of a process that runs on this host) says a live
process writes it is reported in ``in_progress`` and skipped entirely. Where that
cannot be told (a mark of another host, a job of an older version without a mark, a
job running elsewhere on the same bucket), give ``min_age`` longer than any job runs:
a running job's streams and uploads look exactly like debris until its manifest is
committed. The audit assumes the storage holds only vdistream backups; foreign objects
under its prefix are reported as unreferenced too.

Storages with multipart uploads (``S3Storage``) are recognised by their
``list_uploads()`` and ``abort_upload(key, upload_id)`` methods, storages with owner
marks by ``owner_marks()`` and ``remove_mark(mark)``; for the others only objects are
audited, and for ``FileStorage`` also temporary files left by sinks that were never
committed or aborted (a killed process), stale lock files, and empty directories
(``--clean`` removes those too, also the ones its own removals leave).

``AuditReport.debris_left`` is what a cron job alerts on: debris was found and is
still there (not cleaned, or its removal failed). Debris younger than ``min_age``
(``too_young``) and live jobs' work (``in_progress``) do not count: a live job may own
them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
from pathlib import Path
from typing import Protocol, runtime_checkable

from vdistream import threads
from vdistream.catalog.manifest import MANIFEST_NAME
from vdistream.catalog.store import list_manifests
from vdistream.errors import StorageError, StorageNotFoundError
from vdistream.storage._common import OwnerMark
from vdistream.storage.base import Storage
from vdistream.storage.file import _TEMP_NAME, FileStorage, _unlink_if_present

__all__ = ("AuditReport", "OrphanUpload", "audit")


class _Upload(Protocol):
    key: str
    upload_id: str
    initiated: datetime.datetime | None


@runtime_checkable
class _MultipartStorage(Protocol):
    async def list_uploads(self, prefix: str = "") -> list[_Upload]: ...

    async def abort_upload(self, key: str, upload_id: str) -> None: ...


@runtime_checkable
class _MarkedStorage(Protocol):
    """A storage whose ``in_progress`` leaves owner marks (file locks, S3 marks)."""

    async def owner_marks(self) -> list[OwnerMark]: ...

    async def remove_mark(self, mark: OwnerMark) -> None: ...


@runtime_checkable
class _DatedStorage(Protocol):
    """A storage that can tell when its objects were written (``S3Storage``)."""

    async def list_objects(self, prefix: str = "") -> list[_DatedObject]: ...


class _DatedObject(Protocol):
    key: str
    last_modified: datetime.datetime | None


@dataclasses.dataclass(frozen=True)
class OrphanUpload:
    """An in-progress multipart upload (``key`` relative to the storage)."""

    key: str
    upload_id: str
    initiated: datetime.datetime | None


@dataclasses.dataclass(frozen=True)
class AuditReport:
    """What ``audit`` found, and with ``clean=True`` what it removed.

    ``orphan_objects``, ``orphan_uploads``, ``temporaries`` (sink temporaries and
    stale owner marks, by name relative to the storage) and ``empty_directories`` are
    the debris found (old enough to count, see ``min_age``); ``removed_objects``,
    ``aborted_uploads``, ``removed_temporaries`` and ``removed_directories`` what was
    actually removed; ``failures`` what could not be removed and why.
    """

    url: str
    backups: tuple[str, ...]
    referenced: tuple[str, ...]
    orphan_objects: tuple[str, ...]
    orphan_uploads: tuple[OrphanUpload, ...]
    temporaries: tuple[str, ...] = ()
    #: objects under a backup whose manifest cannot be read: kept, never cleaned
    unverifiable: tuple[str, ...] = ()
    #: why those manifests could not be read
    problems: tuple[str, ...] = ()
    #: keys a manifest names that do not exist (a damaged backup)
    missing: tuple[str, ...] = ()
    #: debris skipped because it is younger than ``min_age`` or of unknown age
    too_young: tuple[str, ...] = ()
    #: backups a live process is writing (its owner mark says so): skipped entirely
    in_progress: tuple[str, ...] = ()
    #: directories holding nothing at all (file storage), relative to the storage
    empty_directories: tuple[str, ...] = ()
    cleaned: bool = False
    removed_objects: tuple[str, ...] = ()
    aborted_uploads: tuple[OrphanUpload, ...] = ()
    removed_temporaries: tuple[str, ...] = ()
    removed_directories: tuple[str, ...] = ()
    failures: tuple[str, ...] = ()

    @property
    def clean(self) -> bool:
        """Nothing unreferenced is left (after cleaning, if it cleaned)."""
        if self.cleaned:
            return not self.failures and not self.too_young
        return not self.debris_left

    @property
    def debris_left(self) -> bool:
        """Debris was found and is still there: found by a report-only audit, or its
        removal failed (``failures``) in a cleaning one. What ``too_young`` and
        ``in_progress`` name is not counted: a live job may own it. The command line's
        ``storage audit`` exits non-zero when this is true."""
        if self.cleaned:
            return bool(self.failures)
        return bool(
            self.orphan_objects or self.orphan_uploads or self.temporaries or self.empty_directories
        )


async def audit(
    storage: Storage,
    *,
    clean: bool = False,
    min_age: datetime.timedelta | None = None,
) -> AuditReport:
    """Report the objects, multipart uploads, temporaries, stale owner marks and empty
    directories under ``storage`` that no committed manifest references and no live
    job owns; with ``clean`` remove them (see the module doc).

    ``min_age`` protects debris younger than that; where the storage cannot tell an
    object's age (file objects, memory) such objects are then reported, not removed.
    """
    now = datetime.datetime.now(datetime.UTC)
    # Everything is listed BEFORE the owner marks are read: a backup that starts
    # meanwhile then has its mark read too, and its files are never taken for orphans.
    manifests, problems = await list_manifests(storage)
    keys = await storage.list()
    listed_uploads = await storage.list_uploads() if isinstance(storage, _MultipartStorage) else []
    file_temporaries: list[tuple[str, datetime.datetime | None]] = []
    file_empty: list[tuple[str, datetime.datetime | None]] = []
    if isinstance(storage, FileStorage):
        file_temporaries = await threads.run_sync(_temporaries, storage.path)
        file_empty = await threads.run_sync(_empty_directories, storage.path)
    marks = await storage.owner_marks() if isinstance(storage, _MarkedStorage) else []

    ages = await _object_ages(storage) if min_age is not None else {}
    too_young: list[str] = []

    def old_enough(name: str, when: datetime.datetime | None) -> bool:
        if min_age is None:
            return True
        if when is None or now - when < min_age:
            too_young.append(name)
            return False
        return True

    # A mark whose owner may live (alive None: another host, or no way to tell) protects
    # its backup like a live one until it is older than ``min_age``: only the operator's
    # age bound can declare another host's job dead.
    live = sorted(
        {
            mark.backup_id
            for mark in marks
            if mark.alive is True
            or (mark.alive is None and not old_enough(mark.name, mark.modified))
        }
    )

    def is_live(name: str) -> bool:
        return name.partition("/")[0] in live and "/" in name

    backups = tuple(m.backup_id for m in manifests)
    readable = set(backups)

    referenced: set[str] = set()
    for manifest in manifests:
        referenced.add(f"{manifest.backup_id}/{MANIFEST_NAME}")
        referenced.update(device.key for device in manifest.devices)
    # A manifest that exists but cannot be read protects everything under its id.
    unreadable_ids = {
        key.rpartition("/")[0]
        for key in keys
        if key.endswith("/" + MANIFEST_NAME) and key.rpartition("/")[0] not in readable
    }
    present = set(keys)
    unverifiable = sorted(
        key
        for key in keys
        if key not in referenced and any(key.startswith(f"{i}/") for i in unreadable_ids)
    )
    orphans = [
        key
        for key in keys
        if key not in referenced and key not in unverifiable and not is_live(key)
    ]
    orphan_objects = [key for key in orphans if old_enough(key, ages.get(key))]

    uploads: list[OrphanUpload] = []
    for upload in listed_uploads:
        if is_live(upload.key):
            continue
        found = OrphanUpload(upload.key, upload.upload_id, upload.initiated)
        if old_enough(f"upload {upload.key} ({upload.upload_id})", upload.initiated):
            uploads.append(found)

    temporaries: list[str] = [
        mark.name for mark in marks if mark.alive is not True and mark.backup_id not in live
    ]
    for name, mtime in file_temporaries:
        if not is_live(name) and old_enough(name, mtime):
            temporaries.append(name)
    empty: list[str] = []
    for name, mtime in file_empty:
        if not is_live(name + "/") and old_enough(name + "/", mtime):
            empty.append(name)

    report = AuditReport(
        url=storage.url,
        backups=backups,
        referenced=tuple(sorted(referenced & present)),
        orphan_objects=tuple(orphan_objects),
        orphan_uploads=tuple(uploads),
        temporaries=tuple(sorted(temporaries)),
        unverifiable=tuple(unverifiable),
        problems=tuple(problems),
        missing=tuple(sorted(referenced - present)),
        too_young=tuple(too_young),
        in_progress=tuple(live),
        empty_directories=tuple(empty),
    )
    if not clean:
        return report
    return await _clean(storage, report, marks, min_age)


async def _clean(
    storage: Storage,
    report: AuditReport,
    marks: list[OwnerMark],
    min_age: datetime.timedelta | None,
) -> AuditReport:
    removed: list[str] = []
    aborted: list[OrphanUpload] = []
    removed_temps: list[str] = []
    removed_dirs: list[str] = []
    failures: list[str] = []
    for key in report.orphan_objects:
        try:
            await storage.delete(key)
        except StorageNotFoundError:
            removed.append(key)  # gone already: the goal is met
        except StorageError as exc:
            failures.append(f"delete {key}: {exc}")
        else:
            removed.append(key)
    if report.orphan_uploads and isinstance(storage, _MultipartStorage):
        for upload in report.orphan_uploads:
            try:
                await storage.abort_upload(upload.key, upload.upload_id)
            except StorageError as exc:
                failures.append(f"abort upload {upload.key} ({upload.upload_id}): {exc}")
            else:
                aborted.append(upload)
    stale = {mark.name: mark for mark in marks if mark.name in report.temporaries}
    for name in report.temporaries:
        try:
            if name in stale and isinstance(storage, _MarkedStorage):
                await storage.remove_mark(stale[name])
            elif isinstance(storage, FileStorage):
                await threads.run_sync(_unlink_if_present, storage.path / name)
            else:
                continue
        except (OSError, StorageError) as exc:
            failures.append(f"remove temporary {name}: {exc}")
        else:
            removed_temps.append(name)
    if isinstance(storage, FileStorage):
        # The directories found empty (old enough), and those our removals emptied.
        live = set(report.in_progress)
        gone = [*removed, *removed_temps]
        for name, _ in await threads.run_sync(_empty_directories, storage.path):
            if name.partition("/")[0] in live:
                continue
            ours = any(key.startswith(name + "/") for key in gone)
            if min_age is not None and name not in report.empty_directories and not ours:
                continue
            try:
                await threads.run_sync(_rmdir, storage.path, name)
            except OSError as exc:
                failures.append(f"remove directory {name}: {exc.strerror or exc}")
            else:
                removed_dirs.append(name)
    return dataclasses.replace(
        report,
        cleaned=True,
        removed_objects=tuple(removed),
        aborted_uploads=tuple(aborted),
        removed_temporaries=tuple(removed_temps),
        removed_directories=tuple(removed_dirs),
        failures=tuple(failures),
    )


async def _object_ages(storage: Storage) -> dict[str, datetime.datetime | None]:
    if isinstance(storage, _DatedStorage):
        return {obj.key: obj.last_modified for obj in await storage.list_objects()}
    if isinstance(storage, FileStorage):
        return await threads.run_sync(_file_ages, storage.path)
    return {}


def _file_ages(root: Path) -> dict[str, datetime.datetime | None]:
    ages: dict[str, datetime.datetime | None] = {}
    for directory, _, names in os.walk(root):
        for name in names:
            path = Path(directory, name)
            try:
                mtime = path.stat().st_mtime
            except OSError:
                continue
            key = path.relative_to(root).as_posix()
            ages[key] = datetime.datetime.fromtimestamp(mtime, datetime.UTC)
    return ages


def _temporaries(root: Path) -> list[tuple[str, datetime.datetime | None]]:
    """Sink temporaries anywhere under the storage directory (a sink writes its
    temporary in its key's directory; older versions wrote them in the root)."""
    found: list[tuple[str, datetime.datetime | None]] = []
    for directory, _, names in os.walk(root):
        for name in names:
            if not _TEMP_NAME.fullmatch(name):
                continue
            dated = _dated(root, Path(directory, name))
            if dated is not None:
                found.append(dated)
    return sorted(found)


def _empty_directories(root: Path) -> list[tuple[str, datetime.datetime | None]]:
    """Directories under ``root`` (not ``root``) holding nothing but empty
    directories, deepest first, so removing them in order works."""
    found: list[tuple[str, datetime.datetime | None]] = []
    empty: set[Path] = set()
    for directory, subdirectories, names in os.walk(root, topdown=False):
        path = Path(directory)
        if path == root or names:
            continue
        if all(path / sub in empty for sub in subdirectories):
            empty.add(path)
            dated = _dated(root, path)
            if dated is not None:
                found.append(dated)
    return found


def _dated(root: Path, path: Path) -> tuple[str, datetime.datetime] | None:
    """``path`` relative to ``root`` and when it last changed; None once it is gone."""
    try:
        mtime = path.lstat().st_mtime
    except OSError:
        return None
    return path.relative_to(root).as_posix(), datetime.datetime.fromtimestamp(mtime, datetime.UTC)


def _rmdir(root: Path, name: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.rmdir(root / name)
        with contextlib.suppress(OSError):
            threads.fsync_directory((root / name).parent)
