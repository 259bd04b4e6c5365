"""What the command line and the daemon do: backup, restore, verify, list, prune.

Each operation resolves URLs, runs a :class:`~vdistream.coordinator.Job` and deals with
the catalog: a backup's manifest is written LAST, after every device stream committed,
and a backup whose manifest could not be written is removed again, so that a backup
either exists completely or not at all. Restore and verify trust nothing they have not
checked: the manifest's own checksum, then every stream's size, then (while reading)
every stream's SHA-256, then the engine's own framing, and for verify the database's
own check of a restore into a temporary place.

Before a backup's engine starts, the destination is checked: debris of backups whose
owner is provably gone is swept away (and logged), the storage answers a small probe
(reachable, writable), and the backup id is free; the backup then runs inside the
storage's in-progress marker (``Storage.in_progress``), so that a backup killed midway
leaves debris the next run can prove dead. A restore sweeps its destination too.

A mirrored backup (``BackupSettings.mirror``, ``--mirror``) does all of that in both
destinations, writes every stream to both in the same pass
(``vdistream.storage.mirror``) and a manifest to each; it exists in both or in neither.

A restore publishes its target only once every stream passed every check (the pumps
check each stream at its end, before the engine hears of it: see ``vdistream.pump``).
What a ``cmd:`` consumer did with the bytes before a failure cannot be undone:
``run_restore(verify_first=True)`` reads and checks every stream completely first and
feeds the consumer only if all pass (at the price of reading everything twice).
Errors name streams where they are now (the storage read), not where the manifest
says they were written.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
import platform
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import anyio.to_thread

from vdistream import threads
from vdistream._version import __version__
from vdistream.catalog import (
    CatalogError,
    DeviceEntry,
    Manifest,
    check_streams,
    hash_stream,
    list_manifests,
    manifest_key,
    parse_backup_ref,
    read_manifest,
    write_manifest,
)
from vdistream.coordinator import (
    AbortCause,
    ExpectedStream,
    Job,
    JobKind,
    JobOptions,
    JobResult,
    JobStatus,
    new_backup_id,
)
from vdistream.coordinator import opened_storage as opened_storage
from vdistream.engines import Engine, StripingOptions
from vdistream.engines.databases import (
    EXTERNAL_SCHEME,
    DatabaseSource,
    content_check,
    resolve_source,
    restore_engine,
)
from vdistream.engines.external import ExternalOptions
from vdistream.engines.workdir import claim_workdir, release_workdir, sweep_workdir
from vdistream.errors import (
    ConfigError,
    PipelineError,
    StorageError,
    StorageIntegrityError,
    StorageNotFoundError,
    VdistreamError,
)
from vdistream.log import get_logger
from vdistream.operations.keys import KeySource, backup_key, pipeline_for
from vdistream.ownership import OwnerLock
from vdistream.pipeline.chain import PipelineConfig, SourceChain
from vdistream.pipeline.spec import CompressionSpec
from vdistream.sqlserver.url import is_sqlserver_url
from vdistream.storage import Storage
from vdistream.storage.mirror import MirrorStorage
from vdistream.throttle import Limits, RateLimit, shared_limits

if TYPE_CHECKING:  # SQL Server, encryption and files mode are imported when used (start-up)
    from vdistream.engines.pgfiles.layout import FileRecord
    from vdistream.operations.sqlserver import SqlRestoreOptions
    from vdistream.sqlserver.source import SqlServerSource

__all__ = (
    "VERIFY_WORKDIR_PREFIX",
    "BackupOutcome",
    "BackupSettings",
    "Check",
    "JobHook",
    "VerifyReport",
    "list_backups",
    "opened_storage",
    "restore_sqlserver",
    "run_backup",
    "run_restore",
    "run_verify",
)

JobHook = Callable[[Job], None]

#: the scratch directory of a verify's trial restore: ``WORKDIR/vdistream-verify-*``
VERIFY_WORKDIR_PREFIX = "vdistream-verify-"

_log = get_logger(__name__)


@dataclasses.dataclass(frozen=True)
class BackupSettings:
    """How a backup is cut: T-SQL-like transfer options plus the job's own."""

    devices: int = 4
    block_size: int = 65536
    max_transfer_size: int = 1024 * 1024
    buffer_count: int | None = None  # total, shared by all devices; None: 2 per device
    stall_timeout: float = 60.0
    mode: str | None = None  # postgresql: basebackup (default) or dump
    backup_id: str | None = None
    compression: CompressionSpec | None = None
    encryption: KeySource | None = None
    #: where staged data goes (SQLite's snapshot); None: the system's temporary directory
    workdir: Path | None = None
    #: SQL Server: the path of libsqlvdi.so (None: VDISTREAM_SQLVDI, then the default)
    sqlvdi: str | None = None
    #: ``external:NAME``: the runtime directory the set is published in, who may open
    #: it, how long it waits for its engine (``vdistream.engines.external``)
    external: ExternalOptions | None = None
    #: the job's bandwidth limit in bytes per second, shared by its devices (None: none)
    max_rate: int | None = None
    #: a second destination written in the same pass (``--mirror``): a storage URL (or
    #: an open ``Storage``, the caller's to close); see ``run_backup``
    mirror: str | Storage | None = None

    def striping(self) -> StripingOptions:
        return StripingOptions(
            block_size=self.block_size,
            max_transfer_size=self.max_transfer_size,
            buffer_count=self.buffer_count,
        )

    def job(self) -> JobOptions:
        # One limit for the job, mirrored or not: each byte the engine produces counts
        # once, where the pump takes it, however many destinations it goes to.
        return JobOptions(
            devices=self.devices, stall_timeout=self.stall_timeout, max_rate=self.max_rate
        )


@dataclasses.dataclass(frozen=True)
class BackupOutcome:
    """A backup's end: the job's result, and once complete its manifest and where it is
    (``mirror_manifest_url``: the mirror's own manifest, for a mirrored backup)."""

    result: JobResult
    manifest: Manifest | None = None
    manifest_url: str | None = None
    mirror_manifest_url: str | None = None
    #: whether the backup was mirrored (the summary then has ``"mirror_manifest"``)
    mirrored: bool = False
    #: the keys of dead owners' debris the preflight sweep removed (in both destinations
    #: when mirrored); the summary counts them (``"debris_removed"``), the log names them
    debris_removed: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return self.result.ok and self.manifest is not None

    def summary(self) -> dict[str, Any]:
        """The JSON summary; ``"mirror_manifest"`` (the mirror's manifest URL, ``None``
        when it failed) only for a mirrored backup, so unmirrored output is unchanged."""
        summary: dict[str, Any] = {
            "id": self.result.backup_id,
            "status": self.result.status.value,
            "manifest": self.manifest_url,
            "bytes": self.manifest.stored_bytes if self.manifest else self.result.bytes,
            "logical_bytes": self.result.bytes,
            "devices": [dataclasses.asdict(d) for d in self.manifest.devices]
            if self.manifest
            else [],
            "seconds": round(self.result.duration, 3),
            "error": None if self.result.ok else str(self.result.error),
            "aborted_by": self.result.aborted_by.value if self.result.aborted_by else None,
            "debris_removed": len(self.debris_removed),
        }
        if self.mirrored:
            summary["mirror_manifest"] = self.mirror_manifest_url
        return summary


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


async def run_backup(
    source_url: str,
    destination: str | Storage,
    settings: BackupSettings | None = None,
    *,
    on_job: JobHook | None = None,
) -> BackupOutcome:
    """Back up ``source_url`` into ``destination``; the manifest is written last.

    With ``settings.mirror`` (``--mirror DEST2``) every device stream is written to both
    destinations in the same pass (``vdistream.storage.mirror``: the engine produces
    once, the stages run once, the stored bytes are teed), and each destination gets a
    manifest of its own, naming its own streams, so that restore and verify work from
    either alone. SQL Server's rule for ``MIRROR TO``: the backup is complete only when
    both committed every stream and both manifests are durable; a failure of either
    (preflight, a stream, a commit, a manifest) or a cancellation (Ctrl-C, SIGTERM)
    leaves nothing of it in either. The mirror may be neither the destination (also
    not under another name: a symlink, ``..``) nor inside it or around it
    (``ConfigError``). Both destinations are swept and probed, both hold the
    in-progress mark, and the id must be free in both. The manifests are written one
    after the other (the destination's first): a process killed between the two
    (``kill -9``, a power cut) leaves the destination's backup complete and the
    mirror's streams as debris, which the mirror's next sweep removes.
    """
    settings = settings or BackupSettings()
    source: DatabaseSource | SqlServerSource
    if is_sqlserver_url(source_url):
        from vdistream.sqlserver.source import SqlServerSource

        source = SqlServerSource.resolve(source_url, mode=settings.mode, library=settings.sqlvdi)
        source.preflight()
    else:
        source = resolve_source(source_url, mode=settings.mode)
    async with contextlib.AsyncExitStack() as stack:
        storage = await stack.enter_async_context(opened_storage(destination))
        mirror = None
        if settings.mirror is not None:
            mirror = await stack.enter_async_context(opened_storage(settings.mirror))
            await _check_mirror(storage, mirror)
        versions = {"vdistream": __version__, "python": platform.python_version()}
        versions.update(await source.describe())
        key = await backup_key(settings.encryption)
        pipeline = PipelineConfig(compression=settings.compression, key=key)
        # Decided here, not by the job: the preflight and the in-progress marker need it.
        backup_id = settings.backup_id or new_backup_id()
        destinations = (storage,) if mirror is None else (storage, mirror)
        swept: list[str] = []
        for each in destinations:
            swept += await _preflight(each)
        for each in destinations:
            await stack.enter_async_context(each.in_progress(backup_id))
        # under the markers: no other backup with this id can start between check and use
        for each in destinations:
            await _check_id_free(each, backup_id)
        target = storage if mirror is None else MirrorStorage(storage, mirror)
        outcome = await _backup_job(source, target, settings, on_job, backup_id, pipeline, versions)
        return dataclasses.replace(outcome, debris_removed=tuple(swept))
    raise AssertionError("unreachable")  # mypy: the block above returns or raises


async def _check_mirror(storage: Storage, mirror: Storage) -> None:
    """``ConfigError`` when the mirror is the destination itself (one copy, not two):
    the same URL, or two directories that are one (a symlink, ``..``, a bind mount);
    or when one is inside the other (each one's sweep, audit and retention would see
    the other's backups as foreign objects)."""
    one, two = storage.url.rstrip("/"), mirror.url.rstrip("/")
    where = "same" if one == two else None
    if one.startswith(two + "/") or two.startswith(one + "/"):
        where = "inside"
    if one.startswith("file:") and two.startswith("file:"):
        from vdistream.storage.file import FileStorage  # loaded only for two directories

        if isinstance(storage, FileStorage) and isinstance(mirror, FileStorage):
            # the paths decide (``a/../a`` is not inside ``a``; a symlink is the same)
            where = await threads.run_sync(_directories_overlap, storage.path, mirror.path)
    if where == "same":
        raise ConfigError(
            f"the mirror {mirror.url} is the destination itself: give another destination"
        )
    if where == "inside":
        raise ConfigError(
            f"the mirror {mirror.url} and the destination {storage.url} are one inside "
            "the other: give two separate destinations"
        )


def _directories_overlap(one: Path, two: Path) -> str | None:
    """``"same"`` when two paths name one directory, ``"inside"`` when one is within
    the other, else ``None`` (either may not exist yet)."""
    first, second = one.resolve(), two.resolve()
    if first == second:
        return "same"
    try:
        if os.path.samefile(one, two):
            return "same"
    except OSError:
        pass  # one of them does not exist yet
    if first.is_relative_to(second) or second.is_relative_to(first):
        return "inside"
    return None


async def _sweep(storage: Storage) -> list[str]:
    """Remove debris of killed jobs in ``storage`` (only that of owners provably gone)
    and log it; the keys removed. A failing sweep is logged and left to the next run or
    ``storage audit`` (nothing removed)."""
    try:
        removed = await storage.sweep()
    except StorageError as exc:
        _log.warning("debris_sweep_failed", storage=storage.url, error=str(exc))
        return []
    if removed:
        _log.info("debris_swept", storage=storage.url, removed=list(removed))
    return list(removed)


async def _preflight(storage: Storage) -> list[str]:
    """Before the engine starts: debris swept (the keys removed are returned), the
    destination reachable and writable."""
    removed = await _sweep(storage)
    await storage.probe()
    return removed


async def _check_id_free(storage: Storage, backup_id: str) -> None:
    """``CatalogError`` "backup X already exists in DEST" unless the id is free."""
    taken = await storage.list(f"{backup_id}/")
    if manifest_key(backup_id) in taken:
        raise CatalogError(f"backup {backup_id} already exists in {storage.url}")
    if taken:
        raise CatalogError(
            f"{storage.url} already holds streams of a backup {backup_id} (another backup "
            "with this id is running, or one was interrupted: `vdistream storage audit` "
            "shows it); choose another id"
        )


async def _backup_job(
    source: DatabaseSource | SqlServerSource,
    storage: Storage,
    settings: BackupSettings,
    on_job: JobHook | None,
    backup_id: str,
    pipeline: PipelineConfig,
    versions: dict[str, str],
) -> BackupOutcome:
    started = _now()
    file_mode = await source.file_mode()  # as the job starts: what its snapshot reads
    engine: Engine
    options = settings.job()
    if not isinstance(source, DatabaseSource):  # SQL Server's
        from vdistream.sqlserver.engine import Transfer

        transfer = Transfer(settings.block_size, settings.max_transfer_size, settings.buffer_count)
        engine = source.backup_engine(settings.devices, transfer, backup_id=backup_id)
        engine.check()  # a statement SQL Server cannot take fails before the job starts
        # SQL Server may take a while to start a backup on a busy server (a checkpoint)
        options = dataclasses.replace(options, configuration_timeout=120.0)
    else:
        engine = source.backup_engine(
            settings.striping(), tempdir=settings.workdir, external=settings.external, job=backup_id
        )
    job = Job(
        JobKind.BACKUP,
        engine,
        storage,
        backup_id=backup_id,
        options=options,
        pipeline=pipeline,
    )
    if on_job is not None:
        on_job(job)
    result = await job.run()
    mirrored = isinstance(storage, MirrorStorage)
    if not result.ok:
        return BackupOutcome(result, mirrored=mirrored)
    destinations = storage.storages if isinstance(storage, MirrorStorage) else (storage,)
    written: list[tuple[Storage, str]] = []
    writing: Storage | None = None  # the destination whose manifest is being written
    try:
        devices = []
        for index, device in enumerate(result.devices):
            stored_bytes, sha256 = device.stored_bytes, device.stored_sha256
            if sha256 is None or stored_bytes is None:  # written out of order: read it back
                stored_bytes, sha256 = await _hash_everywhere(
                    destinations, device.key, Limits(job.limits)
                )
            devices.append(
                DeviceEntry(
                    index,
                    device.name,
                    device.key,
                    device.url,
                    stored_bytes,
                    sha256,
                    logical_bytes=device.bytes,
                    logical_sha256=device.sha256 if pipeline.any else sha256,
                )
            )
        engine_result = result.engine_result
        # an engine in another process chose its own transfer sizes: the set says which
        made = result.configuration if source.kind == "external" else None
        block_size = made.block_size if made is not None else settings.block_size
        largest = made.max_transfer_size if made is not None else settings.max_transfer_size
        sqlserver = getattr(engine_result, "sqlserver", None)
        postgresql = getattr(engine_result, "postgresql", None)
        manifest = Manifest(
            backup_id=result.backup_id,
            engine=source.kind,
            mode=source.mode,
            source=source.display,
            started=started,
            ended=_now(),
            vdi={
                "device_count": settings.devices,
                "block_size": block_size,
                "max_transfer_size": largest,
                "buffer_count": settings.striping().buffers_for(settings.devices),
                "features": getattr(engine_result, "features", 0),
            },
            devices=tuple(devices),
            versions=versions,
            # SQL Server's image is the stream it wrote: it says no other size
            logical_bytes=result.bytes
            if sqlserver
            else getattr(engine_result, "logical_bytes", None),
            pipeline=pipeline.describe() if pipeline.any else None,
            file_mode=file_mode,
            sqlserver=sqlserver,
            postgresql=postgresql,
        )
        # One manifest per destination, each naming its own streams (a mirror is
        # restored from alone); the backup exists only once every one is durable.
        for each in destinations:
            writing = each
            url = await write_manifest(each, manifest.relocated(each.url))
            written.append((each, url))  # one by one: a later failure takes these back
            writing = None
    except (CatalogError, StorageError) as exc:
        # Streams without a manifest (in either destination) are no backup: take them
        # away again, and the manifest one destination already got with them.
        with anyio.CancelScope(shield=True):
            left = await _take_back(storage, result, written)
        if left:
            exc.args = (f"{exc}; left behind: {', '.join(left)}",)
        failed = dataclasses.replace(result, status=JobStatus.FAILED, aborted_by=AbortCause.SINK)
        return BackupOutcome(
            dataclasses.replace(failed, reason=str(exc), error=exc), mirrored=mirrored
        )
    except BaseException:
        # Cancelled (Ctrl-C, SIGTERM, a daemon's abort) after every stream committed:
        # the same take-back, or one destination would keep a complete backup and the
        # other unmarked streams no sweep removes. The manifest being written may have
        # committed before the cancellation arrived: it goes too. Bounded like the
        # job's own cleanup; what is left is logged.
        if writing is not None:
            written.append((writing, f"{writing.url.rstrip('/')}/{manifest_key(backup_id)}"))
        with anyio.CancelScope(shield=True), anyio.move_on_after(options.drain_timeout):
            await _take_back(storage, result, written)
        raise
    urls = [url for _, url in written]
    return BackupOutcome(
        result,
        manifest,
        urls[0],
        mirror_manifest_url=urls[1] if mirrored else None,
        mirrored=mirrored,
    )


async def _hash_everywhere(
    destinations: tuple[Storage, ...], key: str, limits: Limits
) -> tuple[int, str]:
    """A stream written out of order, read back: its size and SHA-256, which must be
    the same in every destination of a mirror (``StorageIntegrityError`` otherwise).
    The read honours the job's bandwidth limits (a live ``vdistream throttle`` too)."""
    found = [await _hash_limited(each, key, limits) for each in destinations]
    for each, other in zip(destinations[1:], found[1:], strict=True):
        if other != found[0]:
            raise StorageIntegrityError(
                f"the mirror's copy differs: {other[0]} bytes with SHA-256 {other[1]}, the "
                f"destination's has {found[0][0]} bytes with {found[0][1]}",
                url=f"{each.url.rstrip('/')}/{key}",
            )
    return found[0]


async def _take_back(
    storage: Storage, result: JobResult, manifests: list[tuple[Storage, str]]
) -> list[str]:
    """Delete the manifests written and every stream of ``result`` (in every destination
    of a mirror); the URLs of what could not be deleted (logged)."""
    left: list[str] = []
    for each, url in manifests:
        try:
            await each.delete(manifest_key(result.backup_id))
        except StorageNotFoundError:
            pass
        except StorageError as exc:
            _log.error("manifest_not_removed", url=url, error=str(exc))
            left.append(url)
    for device in result.devices:
        try:
            await storage.delete(device.key)
        except StorageNotFoundError:
            pass
        except StorageError as exc:
            # The error's URL: a mirror's delete names the side that refused (the
            # device's URL is the destination's, which may be gone already).
            where = exc.url or device.url
            _log.error("stream_not_removed", url=where, error=str(exc))
            left.append(where)
    return left


def _file_records(manifest: Manifest) -> list[FileRecord] | None:
    """The files a PostgreSQL files-mode backup holds, from its manifest (None for
    other backups)."""
    files = (manifest.postgresql or {}).get("files")
    if files is None:
        return None
    from vdistream.engines.pgfiles.layout import FileRecord

    try:
        return [FileRecord.from_json(row) for row in files]
    except (TypeError, ValueError) as exc:
        raise CatalogError(
            f"backup {manifest.backup_id}: the manifest's file list is unreadable: {exc}"
        ) from exc


async def _restore_job(
    storage: Storage,
    manifest: Manifest,
    target: str,
    *,
    overwrite: bool,
    on_job: JobHook | None,
    create: bool = False,
    owner: str | None = None,
    keys: KeySource | None = None,
    verify_first: bool = False,
    engine: Engine | None = None,
    job_options: JobOptions | None = None,
    delta: bool = False,
    tablespaces_under: Path | None = None,
    external: ExternalOptions | None = None,
    max_rate: int | None = None,
) -> JobResult:
    """One restore job of ``manifest`` into ``target``; ``engine`` (SQL Server's) stands
    in for the one ``restore_engine`` would build from the target. ``max_rate`` (bytes
    per second, the job's, shared by its devices) applies to whatever options it runs
    with."""
    await check_streams(storage, manifest)
    pipeline = await pipeline_for(manifest, keys)
    if verify_first:
        checks = await _reread_all(storage, manifest, pipeline, max_rate)
        bad = [c for c in checks if not c.ok]
        if bad:
            raise CatalogError(
                f"backup {manifest.backup_id} failed its check before the restore, so "
                f"nothing was restored: " + "; ".join(f"{c.name}: {c.detail}" for c in bad)
            )
    if engine is None:
        options = StripingOptions(
            block_size=manifest.vdi["block_size"],
            max_transfer_size=manifest.vdi["max_transfer_size"],
        )
        engine = restore_engine(
            manifest.engine,
            manifest.mode,
            target,
            options,
            overwrite=overwrite,
            create=create,
            owner=owner,
            file_mode=manifest.file_mode,
            delta=delta,
            expected=_file_records(manifest),
            tablespaces_under=tablespaces_under,
            external=external,
            job=manifest.backup_id,
        )
    running = job_options or JobOptions(devices=len(manifest.devices))
    if max_rate is not None:
        running = dataclasses.replace(running, max_rate=max_rate)
    job = Job(
        JobKind.RESTORE,
        engine,
        storage,
        backup_id=manifest.backup_id,
        options=running,
        keys=[d.key for d in manifest.devices],
        expected=[
            ExpectedStream(d.bytes, d.sha256, d.logical_bytes, d.logical_sha256)
            for d in manifest.devices
        ],
        pipeline=pipeline,
    )
    if on_job is not None:
        on_job(job)
    return await job.run()


async def run_restore(
    backup: str,
    target: str,
    *,
    overwrite: bool = False,
    create: bool = False,
    owner: str | None = None,
    keys: KeySource | None = None,
    on_job: JobHook | None = None,
    verify_first: bool = False,
    sqlserver: SqlRestoreOptions | None = None,
    delta: bool = False,
    external: ExternalOptions | None = None,
    max_rate: int | None = None,
) -> JobResult:
    """Restore ``backup`` (``DEST/ID`` or a manifest's location) into ``target``.

    ``max_rate`` limits the job to that many bytes per second (``--max-rate``), shared
    by its devices.

    ``overwrite`` replaces an existing SQLite file (``--clean`` for a PostgreSQL dump);
    ``create`` creates the target database of a PostgreSQL dump first; ``owner`` gives a
    restored PostgreSQL data directory to that user (the server's). ``delta`` restores a
    PostgreSQL files-mode backup over a stopped cluster's directory, writing only the
    files whose size or CRC-32 differ from the manifest's list (pgBackRest's delta).

    The target is published only when every stream passed every check: a SQLite file,
    a dump file or a data directory appears complete or not at all; a dump restored
    into a database runs as one transaction (``pg_restore --single-transaction``) that
    a failure rolls back. A ``cmd:`` consumer, though, has seen the bytes before a late
    failure and cannot be undone: ``verify_first`` reads and checks every stream
    completely first (raising ``CatalogError`` naming what failed, before the engine
    starts) and only then runs the restore, reading everything twice.

    A SQL Server backup goes into the database ``target`` names
    (``mssql://user@host:port/db``) with ``sqlserver``'s options (REPLACE, NORECOVERY,
    MOVE, STOPAT): see ``vdistream.operations.sqlserver``.

    ``external:NAME`` publishes the restore's set under NAME (``external``: where, who
    may open it, how long it waits) and serves the stored streams to the engine in
    another process that opens it (``vdistream drain NAME``); any backup but SQL
    Server's can go there.
    """
    dest, backup_id = parse_backup_ref(backup)
    async with opened_storage(dest) as storage:
        await _sweep(storage)
        manifest = (await read_manifest(storage, backup_id)).relocated(storage.url)
        if manifest.engine == "mssql":
            from vdistream.operations.sqlserver import SqlRestoreOptions

            if target.lower().startswith(EXTERNAL_SCHEME):
                raise ConfigError(
                    f"backup {manifest.backup_id} is SQL Server's: it is restored by SQL "
                    "Server (mssql://...), not by an external engine"
                )
            return await restore_sqlserver(
                storage,
                manifest,
                target,
                sqlserver or SqlRestoreOptions(),
                keys=keys,
                on_job=on_job,
                verify_first=verify_first,
                max_rate=max_rate,
            )
        return await _restore_job(
            storage,
            manifest,
            target,
            overwrite=overwrite,
            on_job=on_job,
            create=create,
            owner=owner,
            keys=keys,
            verify_first=verify_first,
            delta=delta,
            external=external,
            max_rate=max_rate,
        )


async def restore_sqlserver(
    storage: Storage,
    manifest: Manifest,
    target: str,
    options: SqlRestoreOptions,
    *,
    keys: KeySource | None = None,
    on_job: JobHook | None = None,
    verify_first: bool = False,
    existed: bool | None = None,
    max_rate: int | None = None,
) -> JobResult:
    """One SQL Server restore job (``vdistream.operations.sqlserver``'s rules): a target
    that exists needs ``replace``; one that did not (``existed`` False, asked of the
    server when ``None``) is dropped again when the restore fails."""
    from vdistream.operations.sqlserver import (
        check_target,
        database_state,
        drop_after_failure,
        restore_job_options,
        sqlserver_restore_engine,
    )
    from vdistream.sqlserver.url import MssqlURL

    url = MssqlURL.parse(target)
    engine = sqlserver_restore_engine(manifest, target, options)
    engine.check()  # the library and the statement, before anything runs
    if existed is None:
        state = await database_state(url)
        check_target(manifest, url, state, options.replace)
        existed = state is not None
    result = None
    try:
        result = await _restore_job(
            storage,
            manifest,
            target,
            overwrite=False,
            on_job=on_job,
            keys=keys,
            verify_first=verify_first,
            engine=engine,
            job_options=restore_job_options(manifest),
            max_rate=max_rate,
        )
    finally:
        # failed, or interrupted (Ctrl-C, SIGTERM): a database it made goes again
        left = None
        if (result is None or not result.ok) and not existed:
            left = await drop_after_failure(url)
    if not result.ok and left is not None:
        return _with_leftover(result, f"database {url.database!r} was left behind: {left}")
    return result


def _with_leftover(result: JobResult, what: str) -> JobResult:
    """``result`` whose error line also says what a failed cleanup left."""
    from vdistream.sqlserver.engine import SqlServerStatementError

    error = SqlServerStatementError(f"{result.error}; {what}")
    error.__cause__ = result.error
    return dataclasses.replace(result, reason=f"{result.reason}; {what}", error=error)


@dataclasses.dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


@dataclasses.dataclass(frozen=True)
class VerifyReport:
    backup_id: str
    checks: tuple[Check, ...]

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(c.ok for c in self.checks)

    def summary(self) -> dict[str, Any]:
        return {
            "id": self.backup_id,
            "status": "verified" if self.ok else "failed",
            "checks": [dataclasses.asdict(c) for c in self.checks],
        }


async def run_verify(
    backup: str,
    *,
    content: bool = True,
    keys: KeySource | None = None,
    workdir: Path | None = None,
    engine: bool = False,
    server: str | None = None,
    sqlvdi: str | None = None,
    trigger: str | None = None,
    max_rate: int | None = None,
) -> VerifyReport:
    """Re-read every stream and check it; then, where the engine allows, the content.

    ``max_rate`` (bytes per second) limits the checksum re-read (all streams together),
    the trial restore's job and SQL Server's ``RESTORE VERIFYONLY`` job, each on its own.

    A SQL Server backup's content is checked by SQL Server itself, and only with
    ``engine``: ``RESTORE VERIFYONLY`` reads every stream back through the devices, on
    ``server`` (a ``mssql://`` URL; default: the server the backup came from, as its
    manifest names it, the password from the environment).

    Writes nothing but a temporary restore target (in a new directory under
    ``workdir``, default the system's temporary directory), removed afterwards; never
    touches the source database.
    """
    dest, backup_id = parse_backup_ref(backup)
    async with opened_storage(dest) as storage:
        return await _verify(
            storage,
            backup_id,
            content=content,
            keys=keys,
            workdir=workdir,
            engine=engine,
            server=server,
            sqlvdi=sqlvdi,
            trigger=trigger,
            max_rate=max_rate,
        )


async def _verify(
    storage: Storage,
    backup_id: str,
    *,
    content: bool,
    keys: KeySource | None,
    workdir: Path | None = None,
    engine: bool = False,
    server: str | None = None,
    sqlvdi: str | None = None,
    trigger: str | None = None,
    max_rate: int | None = None,
) -> VerifyReport:
    checks: list[Check] = []
    try:
        manifest = (await read_manifest(storage, backup_id)).relocated(storage.url)
    except CatalogError as exc:
        return VerifyReport(backup_id, (Check("manifest", False, str(exc)),))
    checks.append(Check("manifest", True, "present, checksum matches"))
    try:
        await check_streams(storage, manifest)
        checks.append(Check("sizes", True, f"{len(manifest.devices)} streams present"))
    except CatalogError as exc:
        checks.append(Check("sizes", False, str(exc)))
        return VerifyReport(backup_id, tuple(checks))

    try:
        pipeline = await pipeline_for(manifest, keys)
    except PipelineError as exc:
        checks.append(Check("key", False, str(exc)))
        return VerifyReport(backup_id, tuple(checks))
    if pipeline.encrypted:
        checks.append(Check("key", True, "opens the backup's data key"))
    checks.extend(await _reread_all(storage, manifest, pipeline, max_rate))
    if not content or not all(c.ok for c in checks):
        return VerifyReport(backup_id, tuple(checks))
    if manifest.engine == "mssql":
        if engine:
            checks.append(
                await _verifyonly(storage, manifest, server, keys, sqlvdi, trigger, max_rate)
            )
        return VerifyReport(backup_id, tuple(checks))
    if manifest.engine == "external":
        # the stream's format is the external engine's own: what vdistream can check of
        # it (every stream's size and SHA-256, the stages' checks) was checked above
        return VerifyReport(backup_id, tuple(checks))

    # A killed verify's directory is removed by the next one (its owner lock is free).
    def claim() -> tuple[Path, OwnerLock]:
        sweep_workdir(workdir, VERIFY_WORKDIR_PREFIX)
        return claim_workdir(workdir, VERIFY_WORKDIR_PREFIX)

    scratch, lock = await anyio.to_thread.run_sync(claim)
    try:
        target, check = await content_check(manifest.engine, manifest.mode, scratch)
        result = await _restore_job(
            storage,
            manifest,
            target,
            overwrite=False,
            on_job=None,
            keys=keys,
            # a files backup's tablespaces stay in the scratch directory too
            tablespaces_under=scratch / "tablespaces",
            max_rate=max_rate,
        )
        if not result.ok:
            checks.append(Check("restore", False, str(result.error)))
        else:
            stored = sum(d.stored_bytes or 0 for d in result.devices)
            checks.append(
                Check(
                    "restore",
                    True,
                    f"{stored} stored bytes read, {result.bytes} stream bytes reassembled",
                )
            )
            try:
                checks.append(Check("content", True, await check()))
            except (VdistreamError, OSError) as exc:
                checks.append(Check("content", False, str(exc)))
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(release_workdir, scratch, lock)
    return VerifyReport(backup_id, tuple(checks))


async def _verifyonly(
    storage: Storage,
    manifest: Manifest,
    server: str | None,
    keys: KeySource | None,
    sqlvdi: str | None,
    trigger: str | None = None,
    max_rate: int | None = None,
) -> Check:
    """SQL Server's own check: ``RESTORE VERIFYONLY`` through the devices."""
    from vdistream.operations.sqlserver import restore_job_options, sqlserver_verify_engine
    from vdistream.sqlserver.library import SqlVdiLibraryError
    from vdistream.sqlserver.url import with_trigger

    url = with_trigger(server or manifest.source, trigger)
    try:
        verify_engine = sqlserver_verify_engine(manifest, url, sqlvdi=sqlvdi)
        verify_engine.check()
    except (ConfigError, SqlVdiLibraryError) as exc:
        return Check("sqlserver", False, str(exc))
    result = await _restore_job(
        storage,
        manifest,
        url,
        overwrite=False,
        on_job=None,
        keys=keys,
        engine=verify_engine,
        job_options=restore_job_options(manifest),
        max_rate=max_rate,
    )
    if not result.ok:
        return Check("sqlserver", False, str(result.error))
    return Check(
        "sqlserver",
        True,
        f"RESTORE VERIFYONLY on {verify_engine.url.host},{verify_engine.url.port}: "
        f"the backup set is valid ({result.bytes} bytes read back)",
    )


async def _reread_all(
    storage: Storage, manifest: Manifest, pipeline: PipelineConfig, max_rate: int | None = None
) -> list[Check]:
    """Every device stream read back and checked (``_reread``), in device order; at most
    ``max_rate`` bytes per second in all, and within the limits a daemon shares with
    its jobs (``vdistream.throttle.sharing``), like a job's devices."""
    hashed: dict[int, Check] = {}
    limiter = anyio.CapacityLimiter(max(2, len(manifest.devices)))
    limits = Limits((RateLimit(max_rate, name="job"), *shared_limits()))

    async def reread(device: DeviceEntry) -> None:
        try:
            hashed[device.index] = await _reread(
                storage, manifest, device, pipeline, limiter, limits
            )
        except (StorageError, PipelineError) as exc:
            hashed[device.index] = Check(f"device {device.index}", False, str(exc))

    async with anyio.create_task_group() as tg:
        for device in manifest.devices:
            tg.start_soon(reread, device)
    return [hashed[i] for i in sorted(hashed)]


async def _reread(
    storage: Storage,
    manifest: Manifest,
    device: DeviceEntry,
    pipeline: PipelineConfig,
    limiter: anyio.CapacityLimiter,
    limits: Limits,
) -> Check:
    """Read one stream back through every stage: stored SHA-256, authentication tags,
    decompression, logical SHA-256. Nothing is written. ``device.url`` is where the
    stream is now (``Manifest.relocated``); every read waits for ``limits``."""
    name = f"device {device.index}"
    if not pipeline.any:
        size, sha256 = await _hash_limited(storage, device.key, limits)
        if size == device.bytes and sha256 == device.sha256:
            return Check(name, True, f"{size} bytes stored (no stages), sha256 {sha256[:16]}...")
        return Check(
            name,
            False,
            f"{device.url}: {size} bytes with SHA-256 {sha256}, the manifest says "
            f"{device.bytes} bytes with {device.sha256}",
        )
    from vdistream.pipeline.encrypt import stream_context

    context = stream_context(manifest.backup_id, device.index, len(manifest.devices))
    chain = SourceChain.build(
        await storage.open_source(device.key), pipeline, context=context, limiter=limiter
    )
    scratch = memoryview(bytearray(1 << 20))
    try:
        while got := await chain.outer.readinto(scratch):
            if limits.active:
                await limits.take(got)
    finally:
        await chain.outer.close()
    stored, logical = chain.stored, chain.logical
    wrong = []
    if (stored.bytes_read, stored.sha256) != (device.bytes, device.sha256):
        wrong.append(
            f"stored {stored.bytes_read} bytes with SHA-256 {stored.sha256}, the manifest "
            f"says {device.bytes} bytes with {device.sha256}"
        )
    if (logical.bytes_read, logical.sha256) != (device.logical_bytes, device.logical_sha256):
        wrong.append(
            f"decoded {logical.bytes_read} bytes with SHA-256 {logical.sha256}, the manifest "
            f"says {device.logical_bytes} bytes with {device.logical_sha256}"
        )
    if wrong:
        return Check(name, False, f"{device.url}: " + "; ".join(wrong))
    stages = " + ".join(
        x
        for x, on in (("decrypted", pipeline.encrypted), ("decompressed", pipeline.compressed))
        if on
    )
    if device.logical_sha256 is None:
        # newer backups: what checked the decoded bytes is the stages' own checks
        inner = ", ".join(
            what
            for what, on in (
                ("every segment authenticated", pipeline.encrypted),
                ("frame checksum verified", pipeline.compressed),
            )
            if on
        )
        matched = f"stored SHA-256 matches, {inner}"
    else:
        matched = "both SHA-256 match"
    return Check(
        name,
        True,
        f"{stored.bytes_read} bytes stored, {logical.bytes_read} {stages}, {matched}",
    )


async def _hash_limited(storage: Storage, key: str, limits: Limits) -> tuple[int, str]:
    """``hash_stream`` waiting for ``limits`` after each read (of 1 MiB, a transfer's
    size, so the limit's window holds) when any is in effect."""
    if not limits.active:
        return await hash_stream(storage, key)
    return await hash_stream(storage, key, after_read=limits.take, chunk=1 << 20)


async def list_backups(destination: str) -> tuple[list[Manifest], list[str]]:
    async with opened_storage(destination) as storage:
        return await list_manifests(storage)
