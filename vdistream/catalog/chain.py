"""SQL Server backup chains: which backups restore a database, in which order. Pure, no I/O.

A SQL Server manifest (engine ``"mssql"``) carries ``Manifest.sqlserver``: the backup's
type (``D`` full, ``I`` differential, ``L`` log), ``copy_only`` and its LSNs from
``msdb.dbo.backupset`` (decimal strings, compared as integers). The rules used here are
SQL Server's own (msdb's "LSNs and restore planning"):

* ``last_lsn`` is the LSN of the next log record *after* the backup: a log backup holds
  the log records ``first_lsn <= lsn < last_lsn``; a full or differential backup
  recovers the database exactly to its ``last_lsn``.
* A log backup restores after a full, a differential or another log backup ending at
  LSN ``p`` when it **contains** ``p``: ``first_lsn <= p < last_lsn`` (a log ending at
  ``p`` exactly holds nothing newer: SQL Server refuses it as too early, 4326; one
  starting after ``p`` is too recent, 4305). Between regular log backups this is
  ``first_lsn == previous last_lsn``. Full and differential backups do not break or
  reset the log chain, so logs run across fulls.
* A differential is based on the full whose ``checkpoint_lsn`` is its
  ``differential_base_lsn`` (``database_backup_lsn`` when that is missing). A copy-only
  full is never a differential base, so no differential matches one.
* A copy-only log backup leaves the log chain as it was: it starts where the next
  regular log backup will start, and ends earlier. Regular logs are always preferred;
  a copy-only log is used only where no regular log contains the point reached (the
  regular one is missing), so it is in practice the last log of a restore.

``plan_restore`` turns this into steps (``RESTORE DATABASE``/``LOG`` with
``NORECOVERY`` until the last, ``STOPAT`` on the log that reaches the point asked);
``chains`` and ``describe`` are what ``vdistream list`` shows; ``dependencies`` is what
retention must keep for a kept backup to stay restorable.

Every function takes manifests (those of other engines are ignored) or ``SqlBackup``
values, and compares backups of one ``(server, database)`` only.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from vdistream.catalog.manifest import CatalogError, Manifest

__all__ = (
    "Chain",
    "ChainEntry",
    "ChainGapError",
    "Kind",
    "RestorePlan",
    "RestoreStep",
    "SqlBackup",
    "chain_labels",
    "chains",
    "dependencies",
    "describe",
    "plan_restore",
)

ENGINE = "mssql"
Kind = Literal["full", "diff", "log"]
_KINDS: dict[str, Kind] = {"D": "full", "I": "diff", "L": "log"}
_WORDS: dict[Kind, str] = {"full": "full", "diff": "differential", "log": "log"}


class ChainGapError(CatalogError):
    """A log backup the restore needs is missing: the log chain has a gap. ``lsn`` is
    the LSN no log backup contains, ``after`` the backup ending there, ``reachable``
    the latest point that can be restored with what is there."""

    def __init__(
        self, message: str, *, database: str, lsn: int, after: str, reachable: datetime
    ) -> None:
        super().__init__(message)
        self.database = database
        self.lsn = lsn
        self.after = after
        self.reachable = reachable


@dataclass(frozen=True)
class SqlBackup:
    """One SQL Server backup as chains see it (from ``Manifest.sqlserver``)."""

    id: str
    database: str
    server: str
    type: str  # "D" full, "I" differential, "L" log
    copy_only: bool
    first_lsn: int
    last_lsn: int
    checkpoint_lsn: int | None
    database_backup_lsn: int | None
    differential_base_lsn: int | None
    started: datetime
    finished: datetime

    @property
    def kind(self) -> Kind:
        return _KINDS[self.type]

    @property
    def base_lsn(self) -> int | None:
        """For a differential, the ``checkpoint_lsn`` of the full it is based on."""
        if self.differential_base_lsn is not None:
            return self.differential_base_lsn
        return self.database_backup_lsn

    @classmethod
    def from_manifest(cls, manifest: Manifest) -> SqlBackup | None:
        """The SQL Server facts of ``manifest``; None for the other engines and for a
        backup whose LSNs msdb did not give (``lsn_error``). A SQL Server
        manifest without them, or with malformed ones, is a ``CatalogError``."""
        if manifest.engine != ENGINE:
            return None
        record = manifest.sqlserver
        if record is not None and record.get("lsn_error"):
            # SQL Server kept it but msdb could not be read: it restores on its own and
            # belongs to no chain (a chain through it shows as a gap)
            return None
        if record is None:
            raise CatalogError(
                f"SQL Server backup {manifest.backup_id} records no backup type or LSNs "
                "in its manifest; it cannot be placed in a chain"
            )
        return cls.from_record(manifest.backup_id, record)

    @classmethod
    def from_record(cls, backup_id: str, record: Mapping[str, Any]) -> SqlBackup:
        """From the ``sqlserver`` dict of a manifest (the keys ``Manifest.sqlserver``
        documents); a missing or malformed value is a ``CatalogError`` naming it."""
        where = f"SQL Server backup {backup_id}"
        kind = record.get("type")
        if kind not in _KINDS:
            raise CatalogError(f"{where}: backup type {kind!r} is not D, I or L")
        first = _lsn(record, "first_lsn", where)
        last = _lsn(record, "last_lsn", where)
        checkpoint = _lsn(record, "checkpoint_lsn", where)
        if first is None or last is None or (kind == "D" and checkpoint is None):
            missing = "first_lsn/last_lsn" if first is None or last is None else "checkpoint_lsn"
            raise CatalogError(f"{where}: {missing} is missing")
        if last < first:
            raise CatalogError(f"{where}: last_lsn {last} is before first_lsn {first}")
        database = record.get("database")
        if not isinstance(database, str) or not database:
            raise CatalogError(f"{where}: no database name")
        copy_only = record.get("copy_only", False)
        if not isinstance(copy_only, bool):
            raise CatalogError(f"{where}: copy_only is {copy_only!r}, not true or false")
        return cls(
            id=backup_id,
            database=database,
            server=str(record.get("server") or ""),
            type=kind,
            copy_only=copy_only,
            first_lsn=first,
            last_lsn=last,
            checkpoint_lsn=checkpoint,
            database_backup_lsn=_lsn(record, "database_backup_lsn", where),
            differential_base_lsn=_lsn(record, "differential_base_lsn", where),
            started=_time(record, "started", where),
            finished=_time(record, "finished", where),
        )


@dataclass(frozen=True)
class RestoreStep:
    """One ``RESTORE``: ``DATABASE`` for a full or differential, ``LOG`` for a log;
    ``recovery`` False means ``NORECOVERY``; ``stopat`` only on the last log."""

    manifest_id: str
    kind: Kind
    recovery: bool
    stopat: datetime | None = None


@dataclass(frozen=True)
class RestorePlan:
    """The steps, in order. ``reaches`` is the point the database is at afterwards:
    ``to``, or with ``to=None`` the end of the last backup restored."""

    database: str
    server: str
    to: datetime | None
    steps: tuple[RestoreStep, ...]
    reaches: datetime


@dataclass(frozen=True)
class ChainEntry:
    """A backup in a chain with its label for ``list`` (``full``, ``diff of <id>``,
    ``log 3/5 of <id>``, ``log (gap before)``...); ``linked``: restorable from the
    chain's full with the backups present."""

    backup: SqlBackup
    label: str
    linked: bool


@dataclass(frozen=True)
class Chain:
    """One full of one ``(server, database)`` with its differentials and the log
    backups that follow it (until the next regular full): the full first, then by LSN.
    ``full`` is None for the backups that follow no full present."""

    server: str
    database: str
    full: SqlBackup | None
    entries: tuple[ChainEntry, ...]

    @property
    def complete(self) -> bool:
        """A full is present and every backup links to it."""
        return self.full is not None and all(e.linked for e in self.entries)


# --- restore planning ------------------------------------------------------------------


def plan_restore(
    manifests: Iterable[Manifest | SqlBackup],
    database: str,
    to: datetime | None = None,
    *,
    server: str | None = None,
) -> RestorePlan:
    """The restore sequence bringing ``database`` to ``to`` (aware), or with
    ``to=None`` to the latest point the backups reach.

    * **Base**: the newest full (not copy-only) that finished at or before ``to``. A
      copy-only full is used only when no regular full finished by then: it restores
      like any full, but differentials never build on it, and preferring the regular
      full keeps the plan on the chain the backup schedule maintains.
    * **Differential**: the newest one based on that full (``differential_base_lsn ==
      full.checkpoint_lsn``) that finished at or before ``to``; differentials of other
      fulls are ignored.
    * **Logs**, in LSN order from the base's ``last_lsn``: each must contain the point
      reached so far (``first_lsn <= point < last_lsn``, see the module docstring);
      regular logs are preferred, a copy-only one is used only where no regular log
      contains the point. With ``to``, the first log that finished at or after ``to``
      is the last step and gets ``STOPAT = to``; a base that finished exactly at
      ``to`` needs no log.
    * ``NORECOVERY`` on every step but the last, ``RECOVERY`` on the last.

    ``server`` (``host,port`` as recorded) picks the source server when backups of
    ``database`` come from several. Refused with ``CatalogError``: no backup or no full
    of ``database``, or none finished by ``to`` (the message names the earliest full);
    ``to`` later than the backups reach (names the latest reachable time). A missing
    log on the way is a ``ChainGapError`` (names the missing LSN and the latest
    reachable time), with ``to=None`` too: "latest" never silently stops before a gap.
    """
    if to is not None and (to.tzinfo is None or to.utcoffset() is None):
        raise ValueError("to must be an aware datetime")
    group, server = _group(_collect(manifests), database, server)
    where = f"'{database}'" + (f" (server {server})" if server else "")

    fulls = [b for b in group if b.type == "D"]
    if not fulls:
        raise CatalogError(
            f"no full backup of {where} here: a restore starts from a full backup "
            f"and the {len(group)} backup(s) of it are differentials and logs"
        )
    usable = [f for f in fulls if to is None or f.finished <= to]
    if not usable:
        earliest = min(fulls, key=lambda f: (f.finished, f.id))
        raise CatalogError(
            f"no full backup of {where} finished at or before {_fmt(to)}: the earliest, "
            f"{earliest.id}, finished at {_fmt(earliest.finished)}, the earliest point "
            "a restore can reach"
        )
    regular = [f for f in usable if not f.copy_only]
    full = max(regular or usable, key=lambda f: (f.finished, f.last_lsn, f.id))
    diffs = [
        d
        for d in group
        if d.type == "I"
        and d.base_lsn == full.checkpoint_lsn
        and not full.copy_only
        and d.last_lsn >= full.last_lsn
        and (to is None or d.finished <= to)
    ]
    diff = max(diffs, key=lambda d: (d.last_lsn, d.finished, d.id)) if diffs else None

    chosen: list[SqlBackup] = [full] if diff is None else [full, diff]
    stopat: datetime | None = None
    logs = [b for b in group if b.type == "L"]
    last = chosen[-1]
    if to is None or last.finished < to:
        while True:
            point = last.last_lsn
            log = _next_log(logs, point)
            if log is None:
                _refuse_end(where, database, group, fulls, logs, last, to)
                break  # to=None and no later log: this is the latest
            chosen.append(log)
            last = log
            if to is not None and log.finished >= to:
                stopat = to
                break

    steps = tuple(
        RestoreStep(
            manifest_id=b.id,
            kind=b.kind,
            recovery=i == len(chosen) - 1,
            stopat=stopat if i == len(chosen) - 1 else None,
        )
        for i, b in enumerate(chosen)
    )
    return RestorePlan(
        database=database,
        server=full.server,
        to=to,
        steps=steps,
        reaches=to if to is not None else last.finished,
    )


def _refuse_end(
    where: str,
    database: str,
    group: Sequence[SqlBackup],
    fulls: Sequence[SqlBackup],
    logs: Sequence[SqlBackup],
    last: SqlBackup,
    to: datetime | None,
) -> None:
    """No log contains ``last.last_lsn``: a gap when a later log exists, otherwise the
    end of what was backed up (fine for "latest", refused for a later ``to``)."""
    point = last.last_lsn
    later = [lg for lg in logs if lg.first_lsn > point]
    target = "its latest backup" if to is None else _fmt(to)
    reachable = f"latest reachable: {_fmt(last.finished)}, the end of {last.id}"
    if later:
        nxt = min(later, key=lambda lg: (lg.first_lsn, lg.copy_only, lg.id))
        message = (
            f"no log backup of {where} contains LSN {point}, where {_WORDS[last.kind]} "
            f"backup {last.id} ends; the next log backup, {nxt.id}, starts at LSN "
            f"{nxt.first_lsn}: the log chain has a gap, so '{database}' cannot be "
            f"restored to {target}; restore to an earlier time ({reachable})"
        )
        if to is not None:
            newer = [f for f in fulls if f.finished > to]
            if newer:
                first = min(newer, key=lambda f: (f.finished, f.id))
                message += f" or to {_fmt(first.finished)} or later (from full backup {first.id})"
        raise ChainGapError(
            message, database=database, lsn=point, after=last.id, reachable=last.finished
        )
    if to is not None:
        raise CatalogError(
            f"the backups of {where} reach {_fmt(last.finished)} (the end of "
            f"{_WORDS[last.kind]} backup {last.id}), not {_fmt(to)}: restore to that time "
            "or an earlier one, or to the latest"
        )


def _next_log(logs: Iterable[SqlBackup], point: int) -> SqlBackup | None:
    """The log backup that continues from ``point``: one that contains it, regular
    ones first; among several, the one reaching furthest."""
    found = [lg for lg in logs if lg.first_lsn <= point < lg.last_lsn]
    if not found:
        return None
    return max(found, key=lambda lg: (not lg.copy_only, lg.last_lsn, lg.id))


# --- chains for list, dependencies for retention ----------------------------------------


def chains(manifests: Iterable[Manifest | SqlBackup]) -> list[Chain]:
    """Every chain, by server, database and LSN: one per full, with the differentials
    based on it and the log backups that follow it until the next regular full (a
    log belongs to the newest regular full ending before the log ends; to a copy-only
    full only when no regular one does). Backups that follow no full present form a
    last chain with ``full=None`` per ``(server, database)``."""
    return [c for c, _ in _build(_collect(manifests))]


def chain_labels(manifests: Iterable[Manifest | SqlBackup]) -> dict[str, str]:
    """Backup id -> its label in its chain (the ``list`` column); "" for the other
    engines."""
    items = list(manifests)
    labels = {_id(m): "" for m in items}
    for chain in chains(items):
        labels.update({e.backup.id: e.label for e in chain.entries})
    return labels


def dependencies(manifests: Iterable[Manifest | SqlBackup]) -> dict[str, frozenset[str]]:
    """Backup id -> the ids it needs to be restored (every input backup has an entry).

    * a full: nothing;
    * a differential: its full;
    * a log: its full and every log between the full and it (its chain's logs ending
      at or before the point it continues from). Differentials are never needed: a
      restore may always go full -> logs. A log after a gap needs the same (its full
      and every earlier log of its chain), so retention keeps what remains intact;
    * backups of the other engines, and differentials whose full is absent: nothing.
    """
    items = list(manifests)
    needs: dict[str, frozenset[str]] = {_id(m): frozenset() for m in items}
    for chain, walked in _build(_collect(items)):
        head = frozenset() if chain.full is None else frozenset({chain.full.id})
        for entry in chain.entries:
            b = entry.backup
            if b.type == "I" and chain.full is not None:
                needs[b.id] = head
            elif b.type == "L":
                if b in walked:
                    before = walked[: walked.index(b)]
                elif entry.linked:  # a copy-only side log: the walked logs up to its start
                    branch = _branch_point(chain, walked, b)
                    before = [lg for lg in walked if lg.last_lsn <= branch]
                else:  # after a gap, or no full: every log of the chain before it
                    logs = [e.backup for e in chain.entries if e.backup.type == "L"]
                    before = [lg for lg in logs if lg.last_lsn <= b.first_lsn]
                needs[b.id] = head | {lg.id for lg in before}
    return needs


def describe(manifest: Manifest | SqlBackup) -> str:
    """A short text for one backup: ``full backup of 'db' (copy-only), LSN a..b,
    finished 2026-12-06 10:00:00 UTC``; "" for the other engines."""
    b = manifest if isinstance(manifest, SqlBackup) else SqlBackup.from_manifest(manifest)
    if b is None:
        return ""
    copy = " (copy-only)" if b.copy_only else ""
    text = f"{_WORDS[b.kind]} backup of '{b.database}'{copy}, LSN {b.first_lsn}..{b.last_lsn}"
    if b.type == "I" and b.base_lsn is not None:
        text += f", base LSN {b.base_lsn}"
    return f"{text}, finished {_fmt(b.finished)}"


def _build(backups: Sequence[SqlBackup]) -> list[tuple[Chain, list[SqlBackup]]]:
    """The chains, each with the logs restorable from its full in restore order."""
    out: list[tuple[Chain, list[SqlBackup]]] = []
    groups: dict[tuple[str, str], list[SqlBackup]] = {}
    for b in backups:
        groups.setdefault((b.server, b.database), []).append(b)
    for (server, database), group in sorted(groups.items()):
        fulls = sorted(
            (b for b in group if b.type == "D"), key=lambda f: (f.last_lsn, f.finished, f.id)
        )
        members: dict[str | None, list[SqlBackup]] = {f.id: [] for f in fulls}
        members[None] = []
        for b in group:
            if b.type == "I":
                bases = [f for f in fulls if f.checkpoint_lsn == b.base_lsn and not f.copy_only]
                members[bases[-1].id if bases else None].append(b)
            elif b.type == "L":
                owner = _owner(fulls, b)
                members[None if owner is None else owner.id].append(b)
        for full in [*fulls, None]:
            own = sorted(
                members[None if full is None else full.id],
                key=lambda b: (b.first_lsn, b.last_lsn, b.type, b.id),
            )
            if full is None and not own:
                continue
            out.append(_chain(server, database, full, own))
    return out


def _owner(fulls: Sequence[SqlBackup], log: SqlBackup) -> SqlBackup | None:
    """The full a log's chain starts from: the newest regular full ending before the
    log ends, else the newest copy-only one."""
    before = [f for f in fulls if f.last_lsn < log.last_lsn]
    regular = [f for f in before if not f.copy_only]
    pool = regular or before
    return pool[-1] if pool else None


def _chain(
    server: str, database: str, full: SqlBackup | None, own: Sequence[SqlBackup]
) -> tuple[Chain, list[SqlBackup]]:
    logs = [b for b in own if b.type == "L"]
    walked: list[SqlBackup] = []
    if full is not None:
        point = full.last_lsn
        # the point strictly increases, so no log is taken twice
        while (log := _next_log(logs, point)) is not None:
            walked.append(log)
            point = log.last_lsn
    points = [] if full is None else [full.last_lsn, *(lg.last_lsn for lg in walked)]
    head = "" if full is None else full.id  # walked is empty without a full
    entries: list[ChainEntry] = []
    if full is not None:
        entries.append(ChainEntry(full, "full (copy-only)" if full.copy_only else "full", True))
    for b in own:
        if b.type == "I":
            label = f"diff of {full.id}" if full is not None else "diff (its full is missing)"
            entries.append(ChainEntry(b, label, full is not None))
        elif b in walked:
            copy = " (copy-only)" if b.copy_only else ""
            label = f"log {walked.index(b) + 1}/{len(walked)}{copy} of {head}"
            entries.append(ChainEntry(b, label, True))
        elif full is not None and any(b.first_lsn <= p < b.last_lsn for p in points):
            entries.append(ChainEntry(b, f"log (copy-only) of {full.id}", True))
        elif full is None:
            entries.append(ChainEntry(b, "log (no full before it)", False))
        else:
            entries.append(ChainEntry(b, "log (gap before)", False))
    return Chain(server, database, full, tuple(entries)), walked


def _branch_point(chain: Chain, walked: Sequence[SqlBackup], log: SqlBackup) -> int:
    """The first point of the chain a copy-only side log contains."""
    assert chain.full is not None  # only linked side logs get here
    points = [chain.full.last_lsn, *(lg.last_lsn for lg in walked)]
    return min(p for p in points if log.first_lsn <= p < log.last_lsn)


# --- parsing and grouping ---------------------------------------------------------------


def _collect(manifests: Iterable[Manifest | SqlBackup]) -> list[SqlBackup]:
    found: dict[str, SqlBackup] = {}
    for m in manifests:
        b = m if isinstance(m, SqlBackup) else SqlBackup.from_manifest(m)
        if b is None:
            continue
        if found.setdefault(b.id, b) != b:
            raise CatalogError(f"backup id {b.id} appears twice with different LSNs or times")
    return list(found.values())


def _group(
    backups: Sequence[SqlBackup], database: str, server: str | None
) -> tuple[list[SqlBackup], str]:
    group = [
        b for b in backups if b.database == database and (server is None or b.server == server)
    ]
    if not group:
        on = f" from server {server}" if server is not None else ""
        names = sorted({b.database for b in backups})
        known = f" (backed-up databases here: {', '.join(names[:10])})" if names else ""
        raise CatalogError(f"no SQL Server backup of '{database}'{on} here{known}")
    servers = sorted({b.server for b in group})
    if len(servers) > 1:
        raise CatalogError(
            f"the backups of '{database}' come from several servers ({', '.join(servers)}); "
            "name the one to restore from"
        )
    return group, servers[0]


def _id(m: Manifest | SqlBackup) -> str:
    return m.id if isinstance(m, SqlBackup) else m.backup_id


def _lsn(record: Mapping[str, Any], key: str, where: str) -> int | None:
    value = record.get(key)
    if value is None or value == "" or value == "NULL":
        return None
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise CatalogError(f"{where}: {key} is {value!r}, not a decimal LSN")
    text = str(value).strip()
    if not text.isdigit():
        raise CatalogError(f"{where}: {key} is {value!r}, not a decimal LSN")
    return int(text)


def _time(record: Mapping[str, Any], key: str, where: str) -> datetime:
    value = record.get(key)
    try:
        when = datetime.fromisoformat(value) if isinstance(value, str) else None
    except ValueError:
        when = None
    if when is None:
        raise CatalogError(f"{where}: {key} is {value!r}, not an ISO 8601 time")
    # msdb's dates as recorded are UTC without a zone
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


def _fmt(when: datetime | None) -> str:
    if when is None:
        return "the latest"
    return when.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
