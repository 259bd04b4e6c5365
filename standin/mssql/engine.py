"""Runs statements: BACKUP and RESTORE through VDI with SQL Server's rules, and the queries.

LSN rules as msdb.dbo.backupset documents them: a full backup takes a checkpoint
(``checkpoint_lsn``), ``first_lsn`` = that checkpoint, ``last_lsn`` = the next LSN after the
backup; ``database_backup_lsn`` = checkpoint of the base full; a differential holds the pages
changed since its base (``differential_base_lsn``); a log backup holds the records from the end
of the previous log backup (or the first full) to now. COPY_ONLY moves neither the differential
base nor the log chain.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from standin.mssql import tsql
from standin.mssql.data import PAGE_SIZE, Database, DbFile, LogRecord, Store
from standin.mssql.devices import Run, Transfer, abort_quietly
from standin.mssql.messages import Message, StatementFailed, error, info, terminating
from standin.mssql.queries import PRODUCT_VERSION, format_value, run_select, sql_datetime
from standin.mssql.stream import (
    STRIPE,
    BackupPlan,
    FamilyReader,
    StreamDamaged,
    StreamMalformed,
    decode_log,
    encode_log,
)
from standin.mssql.vdss import VdssLib

__all__ = ("Engine", "Output", "Session")

_BACKUP_TYPES = {
    "D": (1, "Database"),
    "I": (5, "Database Differential"),
    "L": (2, "Transaction Log"),
}


@dataclass
class Session:
    nocount: bool = False


@dataclass
class Output:
    message: Callable[[Message], None]
    rows: Callable[[list[str], list[list[Any]]], None]


def _now() -> datetime:
    return sql_datetime(datetime.now(UTC).replace(tzinfo=None))


def _ts(value: datetime) -> float:
    return value.replace(tzinfo=UTC).timestamp()


def _parse_stopat(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        value = datetime.fromisoformat(text.strip().replace(" ", "T"))
    except ValueError as exc:
        raise StatementFailed(
            error(241, "Conversion failed when converting date and/or time from character string.")
        ) from exc
    return _ts(value.replace(tzinfo=None)) if value.tzinfo is None else value.timestamp()


def _rate(pages: int, seconds: float) -> str:
    seconds = max(seconds, 0.001)
    rate = pages * PAGE_SIZE / 1048576 / seconds
    return f"{pages} pages in {seconds:.3f} seconds ({rate:.3f} MB/sec)."


class Engine:
    """The statements and the state they act on; one instance per server process."""

    def __init__(self, store: Store, lib: VdssLib | None, server_name: str) -> None:
        self.store = store
        self.lib = lib
        self.server_name = server_name
        self.lock = threading.Lock()
        self.log: list[str] = []
        self.active: dict[int, tuple[str, Run]] = {}
        self.pace: int | None = None
        self.fail_next: dict[str, int] = {}
        self.busy: set[str] = set()

    # -- control helpers

    def statements(self) -> list[str]:
        with self.lock:
            return list(self.log)

    def running(self) -> list[str]:
        with self.lock:
            return [name for name, _ in self.active.values()]

    def cancel_all(self) -> None:
        with self.lock:
            runs = [run for _, run in self.active.values()]
        for run in runs:
            run.cancel.set()

    @contextlib.contextmanager
    def _tracking(self, set_name: str, run: Run) -> Iterator[None]:
        with self.lock:
            self.active[id(run)] = (set_name, run)
            # every set this server touched, kept beyond its death (see sets_seen in control)
            with (self.store.directory / "sets.log").open("a", encoding="utf-8") as f:
                f.write(set_name + "\n")
        try:
            yield
        finally:
            with self.lock:
                del self.active[id(run)]

    def _run(self, cancel: threading.Event, database: str) -> Run:
        return Run(cancel=cancel, pace=lambda: self.pace, database=database)

    # -- entry point

    def execute(self, sql: str, session: Session, out: Output, cancel: threading.Event) -> None:
        with self.lock:
            self.log.append(sql)
        _trace(f"statement: {sql}")

        emit = out.message

        def traced(m: Message) -> None:
            if m.severity > 10 or m.number == 3014:
                _trace(f"  Msg {m.number}: {m.text}")
            emit(m)

        out = Output(traced, out.rows)
        try:
            statements = tsql.parse_batch(sql)
        except tsql.TsqlError as exc:
            out.message(error(exc.number, exc.text, exc.severity))
            return
        for st in statements:
            if cancel.is_set():
                return
            try:
                self._statement(st, session, out, cancel)
            except StatementFailed as exc:
                for m in exc.messages:
                    out.message(m)

    def _statement(
        self, st: tsql.Statement, session: Session, out: Output, cancel: threading.Event
    ) -> None:
        if isinstance(st, tsql.SetOption):
            if st.name == "NOCOUNT":
                session.nocount = st.on
        elif isinstance(st, tsql.Select):
            columns, rows = run_select(self.store, st, self.server_name)
            out.rows(columns, rows)
            if not session.nocount:
                out.message(info(0, f"({len(rows)} row{'s' if len(rows) != 1 else ''} affected)"))
        elif isinstance(st, tsql.DropDatabase):
            for name in st.names:
                with self.store.lock:
                    if self.store.get(name) is None:
                        raise StatementFailed(
                            error(
                                3701,
                                f"Cannot drop the database '{name}', because it does not exist "
                                "or you do not have permission.",
                            )
                        )
                    self.store.drop(name)
        elif isinstance(st, tsql.Backup):
            self._backup(st, out, cancel)
        else:
            self._restore(st, out, cancel)

    # -- option checks shared by BACKUP and RESTORE

    def _sizes(self, st: tsql.Backup | tsql.Restore) -> tuple[int, int, int | None]:
        block = 512 if st.block_size is None else st.block_size
        mts = 65536 if st.max_transfer_size is None else st.max_transfer_size
        if not 512 <= block <= 65536:
            raise StatementFailed(
                error(3250, f"The value '{block}' is not within range for the BLOCKSIZE parameter.")
            )
        if block & (block - 1):
            raise StatementFailed(
                error(3252, "The block size parameter must supply a value that is a power of 2.")
            )
        if not 65536 <= mts <= 4194304 or mts % 65536:
            raise StatementFailed(
                error(
                    3250,
                    f"The value '{mts}' is not within range for the MAXTRANSFERSIZE parameter.",
                )
            )
        if st.buffer_count is not None and not 1 <= st.buffer_count <= 10000:
            raise StatementFailed(
                error(
                    3250,
                    f"The value '{st.buffer_count}' is not within range for the BUFFERCOUNT "
                    "parameter.",
                )
            )
        return block, mts, st.buffer_count

    # -- BACKUP

    def _backup(self, st: tsql.Backup, out: Output, cancel: threading.Event) -> None:
        op = "BACKUP LOG" if st.log else "BACKUP DATABASE"
        run = self._run(cancel, st.database)
        transfer: Transfer | None = None
        ok = False
        with self._tracking(st.devices[0], run):
            try:
                if self.lib is None:
                    raise StatementFailed(error(3201, "The stand-in has no VDI library."))
                block, mts, buffers = self._sizes(st)
                plan = self._plan_backup(st, block)
                with self.lock:
                    run.fail_after = self.fail_next.pop(plan.meta["database"].casefold(), None)
                transfer = Transfer(
                    self.lib,
                    st.devices,
                    run,
                    backup=True,
                    block_size=block,
                    max_transfer_size=mts,
                    buffer_count=buffers,
                )
                started = time.monotonic()
                transfer.open()
                writers = transfer.write(plan)
                self._record(st, plan, [w.digest() for w in writers], sum(w.total for w in writers))
                transfer.close_devices()
                ok = True
            except StatementFailed as exc:
                if transfer is None:
                    abort_quietly(self.lib, st.devices[0], run)
                raise StatementFailed(*exc.messages, terminating(op)) from None
            finally:
                if transfer is not None:
                    transfer.close(abort=not ok)
        elapsed = time.monotonic() - started
        meta = plan.meta
        pages = -(-plan.total // PAGE_SIZE)
        data_file, log_file = meta["files"][0]["logical"], meta["files"][1]["logical"]
        file = log_file if st.log else data_file
        out.message(
            info(
                4035,
                f"Processed {pages} pages for database '{meta['database']}', file '{file}' "
                "on file 1.",
            )
        )
        what = "BACKUP LOG" if st.log else "BACKUP DATABASE"
        if meta["type"] == "I":
            what += " WITH DIFFERENTIAL"
        out.message(info(3014, f"{what} successfully processed {_rate(pages, elapsed)}"))

    def _plan_backup(self, st: tsql.Backup, block: int) -> BackupPlan:
        store = self.store
        with store.lock:
            db = store.get(st.database)
            if db is None:
                raise StatementFailed(
                    error(
                        911,
                        f"Database '{st.database}' does not exist. Make sure that the name is "
                        "entered correctly.",
                    )
                )
            if db.state != "ONLINE" or db.name.casefold() in self.busy:
                raise StatementFailed(
                    error(
                        927,
                        f"Database '{db.name}' cannot be opened. It is in the middle of a restore.",
                        severity=14,
                    )
                )
            now = _now()
            meta: dict[str, Any] = {
                "guid": _guid(),
                "name": st.name,
                "description": st.description,
                "database": db.name,
                "seed": db.seed,
                "size_pages": db.size_pages,
                "family_guid": db.family_guid,
                "files": [vars(f) for f in db.files],
                "backup_start_date": now.isoformat(),
                "database_creation_date": datetime.fromtimestamp(db.create_date, UTC)
                .replace(tzinfo=None)
                .isoformat(),
                "server": self.server_name,
                "checksum": st.checksum,
            }
            # the backup itself logs a record (checkpoint or log-backup marker)
            mark = db.lsn + 1
            db.lsn = mark
            db.log.append(LogRecord(mark, _ts(now), ()))
            if st.log:
                if db.log_chain_lsn is None:
                    raise StatementFailed(
                        error(
                            4214,
                            "BACKUP LOG cannot be performed because there is no current "
                            "database backup.",
                        )
                    )
                first, last = db.log_chain_lsn, db.lsn + 1
                meta.update(
                    type="L",
                    copy_only=st.copy_only,
                    first_lsn=first,
                    last_lsn=last,
                    checkpoint_lsn=db.checkpoint_lsn,
                    database_backup_lsn=db.full_ckpt or 0,
                    differential_base_lsn=None,
                )
                store.save()
                blob = encode_log(db.log_pages(first, last))
                return BackupPlan(meta, len(st.devices), block, log_blob=blob)
            db.checkpoint_lsn = mark
            pages: range | list[int]
            if st.differential:
                if db.full_ckpt is None:
                    raise StatementFailed(
                        error(
                            3035,
                            f'Cannot perform a differential backup for database "{db.name}", '
                            "because a current database backup does not exist. Perform a full "
                            "database backup by reissuing BACKUP DATABASE, omitting the WITH "
                            "DIFFERENTIAL option.",
                        )
                    )
                base = db.full_ckpt
                pages = sorted(p for p, v in db.versions.items() if v > base)
                # COPY_ONLY has no effect with DIFFERENTIAL (Microsoft's BACKUP documentation)
                meta.update(type="I", copy_only=False, database_backup_lsn=base)
                meta["differential_base_lsn"] = base
            else:
                pages = range(db.size_pages)
                meta.update(type="D", copy_only=st.copy_only, database_backup_lsn=db.full_ckpt or 0)
                meta["differential_base_lsn"] = None
            meta.update(first_lsn=mark, last_lsn=mark + 1, checkpoint_lsn=mark)
            store.save()
            return BackupPlan(meta, len(st.devices), block, pages=pages, versions=dict(db.versions))

    def _record(self, st: tsql.Backup, plan: BackupPlan, digests: list[str], size: int) -> None:
        meta = plan.meta
        store = self.store
        with store.lock:
            row = {
                "backup_set_id": store.next_backup_set_id,
                "backup_set_guid": meta["guid"],
                "name": meta["name"],
                "description": meta["description"],
                "database_name": meta["database"],
                "server_name": self.server_name,
                "type": meta["type"],
                "is_copy_only": 1 if meta["copy_only"] else 0,
                "first_lsn": meta["first_lsn"],
                "last_lsn": meta["last_lsn"],
                "checkpoint_lsn": meta["checkpoint_lsn"],
                "database_backup_lsn": meta["database_backup_lsn"],
                "differential_base_lsn": meta["differential_base_lsn"],
                "backup_start_date": meta["backup_start_date"],
                "backup_finish_date": _now().isoformat(),
                "backup_size": size,
                "has_backup_checksums": 1 if meta["checksum"] else 0,
                "family_guid": meta["family_guid"],
                "recovery_model": "FULL",
                "position": 1,
                "family_count": plan.families,
                "block_size": plan.block_size,
                "devices": list(st.devices),
                "stream_sha256": digests,
            }
            store.next_backup_set_id += 1
            store.msdb.append(row)
            db = store.get(meta["database"])
            if db is not None and db.family_guid == meta["family_guid"] and not meta["copy_only"]:
                if meta["type"] == "D":
                    db.full_ckpt = meta["checkpoint_lsn"]
                    if db.log_chain_lsn is None:
                        db.log_chain_lsn = meta["first_lsn"]
                elif meta["type"] == "L":
                    db.log_chain_lsn = meta["last_lsn"]
            store.save()

    # -- RESTORE

    def _restore(self, st: tsql.Restore, out: Output, cancel: threading.Event) -> None:
        op = {
            "DATABASE": "RESTORE DATABASE",
            "LOG": "RESTORE LOG",
            "VERIFYONLY": "VERIFY DATABASE",
            "HEADERONLY": "RESTORE HEADERONLY",
            "FILELISTONLY": "RESTORE FILELIST",
            "LABELONLY": "RESTORE LABELONLY",
        }[st.what]
        if not st.devices:
            self._recover_only(st, out)
            return
        run = self._run(cancel, st.database or "")
        transfer: Transfer | None = None
        ok = False
        target = (st.database or "").casefold()
        marked = False
        with self._tracking(st.devices[0], run):
            try:
                if self.lib is None:
                    raise StatementFailed(error(3201, "The stand-in has no VDI library."))
                block, mts, buffers = self._sizes(st)
                stopat = _parse_stopat(st.stopat)
                if st.what in ("DATABASE", "LOG"):
                    with self.lock:
                        if target in self.busy:
                            raise StatementFailed(
                                error(
                                    3101,
                                    "Exclusive access could not be obtained because the "
                                    "database is in use.",
                                )
                            )
                        self.busy.add(target)
                        marked = True
                transfer = Transfer(
                    self.lib,
                    st.devices,
                    run,
                    backup=False,
                    block_size=block,
                    max_transfer_size=mts,
                    buffer_count=buffers,
                )
                started = time.monotonic()
                transfer.open()
                readers = transfer.read_headers()
                header, row = self._check_media(st, readers)
                run.database = st.database or header["database"]
                if st.what in ("HEADERONLY", "FILELISTONLY", "LABELONLY"):
                    columns, rows = self._describe(st.what, header, row)
                    transfer.close_devices()
                    ok = True
                    out.rows(columns, rows)
                    return
                if st.what != "VERIFYONLY":
                    with self.store.lock:
                        self._check_restore(st, header, stopat)
                transfer.read_all(readers)
                versions, records = self._verify(st, readers, header, row)
                if st.what == "VERIFYONLY":
                    transfer.close_devices()
                    ok = True
                    out.message(info(3262, "The backup set on file 1 is valid."))
                    return
                with self.store.lock:
                    files = self._check_restore(st, header, stopat)
                    note = self._apply(st, header, files, versions, records, stopat)
                transfer.close_devices()
                ok = True
            except StatementFailed as exc:
                if transfer is None:
                    abort_quietly(self.lib, st.devices[0], run)
                raise StatementFailed(*exc.messages, terminating(op)) from None
            finally:
                if transfer is not None:
                    transfer.close(abort=not ok)
                if marked:
                    with self.lock:
                        self.busy.discard(target)
        elapsed = time.monotonic() - started
        assert st.database is not None
        pages = self._processed(st, header, versions, records, out)
        if note is not None:
            out.message(note)
        what = "RESTORE LOG" if st.what == "LOG" else "RESTORE DATABASE"
        out.message(info(3014, f"{what} successfully processed {_rate(pages, elapsed)}"))

    def _processed(
        self,
        st: tsql.Restore,
        header: dict[str, Any],
        versions: dict[int, int],
        records: list[LogRecord],
        out: Output,
    ) -> int:
        files = header["files"]
        total: int = header["total_data_length"]
        if header["type"] == "L":
            pages = -(-total // PAGE_SIZE)
            logical = files[1]["logical"]
        else:
            pages = total // PAGE_SIZE
            logical = files[0]["logical"]
        out.message(
            info(
                4035,
                f"Processed {pages} pages for database '{st.database}', file '{logical}' "
                "on file 1.",
            )
        )
        return pages

    def _recover_only(self, st: tsql.Restore, out: Output) -> None:
        """``RESTORE DATABASE x WITH RECOVERY``: bring a RESTORING database online."""
        with self.store.lock:
            db = self.store.get(st.database or "")
            if db is None:
                raise StatementFailed(
                    error(
                        911,
                        f"Database '{st.database}' does not exist. Make sure that the name is "
                        "entered correctly.",
                    ),
                    terminating("RESTORE DATABASE"),
                )
            if st.recovery and db.state == "RESTORING":
                db.state = "ONLINE"
                db.redo_lsn = db.restore_base_ckpt = db.redo_time = None
                self.store.save()
        out.message(info(3014, f"RESTORE DATABASE successfully processed {_rate(0, 0.001)}"))

    def _check_media(
        self, st: tsql.Restore, readers: list[FamilyReader]
    ) -> tuple[dict[str, Any], dict[str, Any] | None]:
        bad = [d for d, r in enumerate(readers) if r.header is None]
        if bad:
            raise StatementFailed(_malformed(st.devices[bad[0]], "no backup set header"))
        headers = [r.header for r in readers if r.header is not None]
        first = headers[0]
        families = first["families"]
        seen: set[int] = set()
        for d, h in enumerate(headers):
            if h["guid"] != first["guid"]:
                raise StatementFailed(_malformed(st.devices[d], "belongs to another backup set"))
            if h["family"] in seen:
                raise StatementFailed(
                    error(
                        3227,
                        f"The volume on device '{st.devices[d]}' is a duplicate of stripe set "
                        f"media family {h['family'] + 1}. Remove it and insert a different volume.",
                    )
                )
            seen.add(h["family"])
        if len(headers) < families:
            raise StatementFailed(
                error(
                    3132,
                    f"The media set has {families} media families but only {len(headers)} are "
                    "provided. All members must be provided.",
                )
            )
        if len(headers) > families:
            raise StatementFailed(
                error(
                    3231,
                    f'The media loaded on "{st.devices[0]}" is formatted to support {families} '
                    f"media families, but {len(headers)} media families are expected according "
                    "to the backup device specification.",
                )
            )
        row = self.store.find_backup(first["guid"])
        if row is None and st.what in ("DATABASE", "LOG", "VERIFYONLY"):
            raise StatementFailed(_malformed(st.devices[0], "unknown backup set"))
        header = next(h for h in headers if h["family"] == 0)
        return header, row

    def _check_restore(
        self, st: tsql.Restore, header: dict[str, Any], stopat: float | None
    ) -> list[DbFile]:
        """SQL Server's planning checks, under the store lock; the files the restore will use."""
        name = st.database or ""
        target = self.store.get(name)
        kind = header["type"]
        if st.what == "LOG" and kind != "L":
            raise StatementFailed(
                error(
                    3135,
                    "The backup set in file 1 was created by BACKUP DATABASE and cannot be used "
                    "for this restore operation.",
                )
            )
        if st.what == "DATABASE" and kind == "L":
            raise StatementFailed(
                error(
                    3135,
                    "The backup set in file 1 was created by BACKUP LOG and cannot be used for "
                    "this restore operation.",
                )
            )
        if kind == "D":
            return self._check_full(st, header, target, stopat)
        if target is None:
            raise StatementFailed(
                error(
                    3118,
                    f'The database "{name}" does not exist. RESTORE can only create a database '
                    "when restoring either a full backup or a file backup of the primary file.",
                )
            )
        if target.state != "RESTORING" or target.redo_lsn is None:
            raise StatementFailed(
                error(
                    3117,
                    "The log or differential backup cannot be restored because no files are "
                    "ready to rollforward.",
                )
            )
        if target.family_guid != header["family_guid"]:
            raise StatementFailed(_other_database(name))
        redo = target.redo_lsn
        if kind == "I":
            if (
                header["differential_base_lsn"] != target.restore_base_ckpt
                or header["last_lsn"] < redo
            ):
                raise StatementFailed(
                    error(
                        3136,
                        "This differential backup cannot be restored because the database has "
                        "not been restored to the correct earlier state.",
                    )
                )
            return target.files
        if header["first_lsn"] > redo:
            raise StatementFailed(
                error(
                    4305,
                    f"The log in this backup set begins at LSN {header['first_lsn']}, which is too "
                    f"recent to apply to the database. An earlier log backup that includes LSN "
                    f"{redo} can be restored.",
                )
            )
        if header["last_lsn"] <= redo:
            raise StatementFailed(
                error(
                    4326,
                    f"The log in this backup set terminates at LSN {header['last_lsn']}, which is "
                    f"too early to apply to the database. A more recent log backup that includes "
                    f"LSN {redo} can be restored.",
                )
            )
        if stopat is not None and target.redo_time is not None and stopat < target.redo_time:
            raise StatementFailed(
                error(
                    4335,
                    "The specified STOPAT time is too early. All or part of the database is "
                    "already rolled forward beyond that point.",
                )
            )
        return target.files

    def _check_full(
        self,
        st: tsql.Restore,
        header: dict[str, Any],
        target: Database | None,
        stopat: float | None,
    ) -> list[DbFile]:
        name = st.database or ""
        if target is not None and target.state == "ONLINE" and not st.replace:
            if target.family_guid != header["family_guid"]:
                raise StatementFailed(_other_database(target.name))
            raise StatementFailed(
                error(
                    3159,
                    f'The tail of the log for the database "{target.name}" has not been backed '
                    "up. Use BACKUP LOG WITH NORECOVERY to backup the log if it contains work you "
                    "do not want to lose. Use the WITH REPLACE or WITH STOPAT clause of the "
                    "RESTORE statement to just overwrite the contents of the log.",
                )
            )
        if stopat is not None and stopat < _ts(datetime.fromisoformat(header["backup_start_date"])):
            raise StatementFailed(
                error(
                    4338,
                    "The STOPAT clause specifies a point too early to allow this backup set to be "
                    "restored. Choose a different stop point or use RESTORE DATABASE WITH "
                    "RECOVERY to recover at the current point.",
                )
            )
        moves = dict(st.moves)
        logical = {f["logical"] for f in header["files"]}
        for m in moves:
            if m not in logical:
                raise StatementFailed(
                    error(
                        3234,
                        f"Logical file '{m}' is not part of database '{name}'. Use RESTORE "
                        "FILELISTONLY to list the logical file names.",
                    )
                )
        files = [
            DbFile(f["logical"], moves.get(f["logical"], f["physical"]), f["type_desc"])
            for f in header["files"]
        ]
        problems: list[Message] = []
        for f in files:
            owner = self.store.file_owner(f.physical)
            if owner is not None and owner is not target:
                problems.append(
                    error(
                        1834,
                        f"The file '{f.physical}' cannot be overwritten.  It is being used by "
                        f"database '{owner.name}'.",
                    )
                )
                problems.append(
                    error(
                        3156,
                        f"File '{f.logical}' cannot be restored to '{f.physical}'. Use WITH MOVE "
                        "to identify a valid location for the file.",
                    )
                )
        if problems:
            problems.append(
                error(
                    3119,
                    "Problems were identified while planning for the RESTORE statement. Previous "
                    "messages provide details.",
                )
            )
            raise StatementFailed(*problems)
        return files

    def _verify(
        self,
        st: tsql.Restore,
        readers: list[FamilyReader],
        header: dict[str, Any],
        row: dict[str, Any] | None,
    ) -> tuple[dict[int, int], list[LogRecord]]:
        """Every family whole, its trailer and its SHA-256 as recorded; the restored content."""
        database = st.database or header["database"]
        for d, reader in enumerate(readers):
            try:
                reader.finish()
            except StreamMalformed as exc:
                raise StatementFailed(_malformed(st.devices[d], str(exc))) from exc
            except StreamDamaged as exc:
                raise StatementFailed(_damaged(database, exc.page, str(exc))) from exc
            assert reader.header is not None
            assert row is not None
            if reader.digest() != row["stream_sha256"][reader.header["family"]]:
                raise StatementFailed(
                    _damaged(database, 0, "the stream differs from the one the backup wrote")
                )
        versions: dict[int, int] = {}
        records: list[LogRecord] = []
        if header["type"] == "L":
            blob = bytearray(header["total_data_length"])
            for reader in readers:
                assert reader.header is not None
                family, families = reader.header["family"], reader.header["families"]
                data = b"".join(reader.log_parts)
                for local in range(0, len(data), STRIPE):
                    glob = ((local // STRIPE) * families + family) * STRIPE
                    blob[glob : glob + min(STRIPE, len(data) - local)] = data[
                        local : local + STRIPE
                    ]
            try:
                records = decode_log(bytes(blob))
            except (StreamMalformed, ValueError) as exc:
                raise StatementFailed(_damaged(database, 0, "log records are damaged")) from exc
        else:
            seen = sum(r.pages_seen for r in readers)
            if seen * PAGE_SIZE != header["total_data_length"]:
                raise StatementFailed(_damaged(database, 0, "pages are missing"))
            for reader in readers:
                versions.update(reader.versions)
        return versions, records

    def _apply(
        self,
        st: tsql.Restore,
        header: dict[str, Any],
        files: list[DbFile],
        versions: dict[int, int],
        records: list[LogRecord],
        stopat: float | None,
    ) -> Message | None:
        """Commit a verified restore (under the store lock); an informational note or None."""
        store = self.store
        name = st.database or ""
        target = store.get(name)
        restoring = not st.recovery
        kind = header["type"]
        start = _ts(datetime.fromisoformat(header["backup_start_date"]))
        note = None
        if kind == "D":
            changed = {p: v for p, v in versions.items() if v}
            db = Database(
                name=target.name if target is not None else name,
                database_id=target.database_id if target is not None else store.take_database_id(),
                seed=header["seed"],
                size_pages=header["size_pages"],
                family_guid=header["family_guid"],
                files=files,
                lsn=header["last_lsn"] - 1,
                checkpoint_lsn=header["checkpoint_lsn"],
                create_date=time.time(),
                versions=changed,
                history_base=dict(changed),
                full_ckpt=header["checkpoint_lsn"],
                log_chain_lsn=header["first_lsn"],
                redo_lsn=header["last_lsn"],
                restore_base_ckpt=header["checkpoint_lsn"],
                redo_time=start,
            )
            store.databases[db.name.casefold()] = db
        elif kind == "I":
            assert target is not None
            db = target
            db.versions.update(versions)
            db.history_base = dict(db.versions)
            db.log = []
            db.lsn = header["last_lsn"] - 1
            db.checkpoint_lsn = header["checkpoint_lsn"]
            db.redo_lsn = header["last_lsn"]
            db.redo_time = start
        else:
            assert target is not None
            assert target.redo_lsn is not None
            db = target
            redo = target.redo_lsn
            stopped = False
            for record in records:
                if record.lsn < redo or record.lsn >= header["last_lsn"]:
                    continue
                if stopat is not None and record.time > stopat:
                    stopped = True
                    db.redo_lsn = record.lsn
                    break
                for page in record.pages:
                    db.versions[page] = record.lsn
                db.log.append(record)
                db.lsn = record.lsn
                db.redo_time = record.time
            if not stopped:
                db.redo_lsn = header["last_lsn"]
                db.lsn = header["last_lsn"] - 1
                if stopat is not None and st.recovery:
                    restoring = True
                    note = info(
                        4322,
                        "This backup set contains records that were logged before the "
                        "designated point in time. The database is being left in the restoring "
                        "state so that more roll forward can be performed.",
                    )
        if restoring:
            db.state = "RESTORING"
        else:
            db.state = "ONLINE"
            db.redo_lsn = db.restore_base_ckpt = db.redo_time = None
        store.save()
        return note

    def _describe(
        self, what: str, header: dict[str, Any], row: dict[str, Any] | None
    ) -> tuple[list[str], list[list[Any]]]:
        start = datetime.fromisoformat(header["backup_start_date"])
        finish = datetime.fromisoformat(row["backup_finish_date"]) if row else start
        size = row["backup_size"] if row else 0
        if what == "FILELISTONLY":
            columns = [
                "LogicalName", "PhysicalName", "Type", "FileGroupName", "Size", "MaxSize",
                "FileId", "CreateLSN", "DropLSN", "UniqueId", "ReadOnlyLSN", "ReadWriteLSN",
                "BackupSizeInBytes", "SourceBlockSize", "FileGroupId", "LogGroupGUID",
                "DifferentialBaseLSN", "DifferentialBaseGUID", "IsReadOnly", "IsPresent",
                "TDEThumbprint", "SnapshotUrl",
            ]  # fmt: skip
            rows = []
            for file_id, f in enumerate(header["files"], start=1):
                data = f["type_desc"] == "ROWS"
                nbytes = header["size_pages"] * PAGE_SIZE if data else 8 << 20
                rows.append(
                    [
                        f["logical"], f["physical"], "D" if data else "L",
                        "PRIMARY" if data else None, nbytes, 35184372080640, file_id, 0, 0,
                        _guid(), 0, 0, nbytes if data else 0, 512, 1 if data else 0, None,
                        header["differential_base_lsn"] or 0, None, 0, 1, None, None,
                    ]
                )  # fmt: skip
            return columns, [[format_value(v) for v in r] for r in rows]
        code, description = _BACKUP_TYPES[header["type"]]
        values = {
            "BackupName": header["name"], "BackupDescription": header["description"],
            "BackupType": code, "ExpirationDate": None, "Compressed": 0, "Position": 1,
            "DeviceType": 7, "UserName": "sa", "ServerName": header["server"],
            "DatabaseName": header["database"], "DatabaseVersion": 957,
            "DatabaseCreationDate": datetime.fromisoformat(header["database_creation_date"]),
            "BackupSize": size, "FirstLSN": header["first_lsn"], "LastLSN": header["last_lsn"],
            "CheckpointLSN": header["checkpoint_lsn"],
            "DatabaseBackupLSN": header["database_backup_lsn"], "BackupStartDate": start,
            "BackupFinishDate": finish, "SortOrder": 52, "CodePage": 0,
            "UnicodeLocaleId": 1033, "UnicodeComparisonStyle": 196609,
            "CompatibilityLevel": 160, "SoftwareVendorId": 4608, "SoftwareVersionMajor": 16,
            "SoftwareVersionMinor": 0, "SoftwareVersionBuild": int(PRODUCT_VERSION.split(".")[2]),
            "MachineName": header["server"], "Flags": 512, "BindingID": header["family_guid"],
            "RecoveryForkID": header["family_guid"], "Collation": "SQL_Latin1_General_CP1_CI_AS",
            "FamilyGUID": header["family_guid"], "HasBulkLoggedData": 0, "IsSnapshot": 0,
            "IsReadOnly": 0, "IsSingleUser": 0,
            "HasBackupChecksums": 1 if header["checksum"] else 0, "IsDamaged": 0,
            "BeginsLogChain": 0, "HasIncompleteMetaData": 0, "IsForceOffline": 0,
            "IsCopyOnly": 1 if header["copy_only"] else 0,
            "FirstRecoveryForkID": header["family_guid"], "ForkPointLSN": None,
            "RecoveryModel": "FULL", "DifferentialBaseLSN": header["differential_base_lsn"],
            "DifferentialBaseGUID": None, "BackupTypeDescription": description,
            "BackupSetGUID": header["guid"], "CompressedBackupSize": size, "Containment": 0,
            "KeyAlgorithm": None, "EncryptorThumbprint": None, "EncryptorType": None,
        }  # fmt: skip
        return list(values), [[format_value(v) for v in values.values()]]


def _trace(line: str) -> None:
    """One line on stderr (the server's log file): what ran and how it ended."""
    stamp = datetime.now(UTC).strftime("%H:%M:%S.%f")[:-3]
    sys.stderr.write(f"{stamp} {line}\n")
    sys.stderr.flush()


def _guid() -> str:
    import uuid

    return str(uuid.uuid4()).upper()


def _malformed(device: str, why: str) -> Message:
    return error(
        3241,
        f"The media family on device '{device}' is incorrectly formed. SQL Server cannot process "
        f"this media family. ({why})",
    )


def _damaged(database: str, page: int, why: str) -> Message:
    return error(
        3183,
        f'RESTORE detected an error on page (1:{page}) in database "{database}" as read from the '
        f"backup set. ({why})",
    )


def _other_database(name: str) -> Message:
    return error(
        3154,
        f"The backup set holds a backup of a database other than the existing '{name}' database.",
    )
