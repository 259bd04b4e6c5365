"""``apply_retention`` over SQL Server chains: a kept log keeps its full and the logs
between them (``catalog.chain.dependencies``), on a real file destination; a chain
that cannot be read deletes nothing."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from vdistream.catalog import DeviceEntry, Manifest, manifest_key
from vdistream.catalog.store import write_manifest
from vdistream.service import Reason, RetentionPolicy
from vdistream.service.backups import apply_retention
from vdistream.storage.file import FileStorage

T0 = datetime(2026, 12, 6, tzinfo=UTC)
SERVER = "sql1,1433"


def sql(backup_id: str, kind: str, first: int, last: int, hours: float) -> Manifest:
    """A SQL Server manifest as the engine writes it (LSNs as decimal strings)."""
    finished = T0 + timedelta(hours=hours)
    record: dict[str, Any] = {
        "database": "erp",
        "type": kind,
        "copy_only": False,
        "first_lsn": str(first),
        "last_lsn": str(last),
        "checkpoint_lsn": str(first),
        "database_backup_lsn": None,
        "differential_base_lsn": None,
        "started": (finished - timedelta(minutes=1)).isoformat(),
        "finished": finished.isoformat(),
        "server": SERVER,
        "version": "16.0.4135.4",
    }
    return Manifest(
        backup_id=f"erp.{backup_id}",
        engine="mssql",
        mode={"D": "full", "I": "diff", "L": "log"}[kind],
        source="mssql://sa@sql1:1433/erp",
        started=record["started"],
        ended=record["finished"],
        vdi={"device_count": 1, "block_size": 65536, "max_transfer_size": 1048576},
        devices=(
            DeviceEntry(0, "set", f"erp.{backup_id}/stream-00-of-01.vdi", "file:///x", 1, "a"),
        ),
        versions={"vdistream": "0.1.0"},
        sqlserver=record,
    )


# Two fulls with their logs: logs run on across F2 (L3 continues where L2 ended).
F1 = sql("F1", "D", 1000, 1100, 0)
L1 = sql("L1", "L", 900, 1200, 1)
L2 = sql("L2", "L", 1200, 1300, 2)
F2 = sql("F2", "D", 1350, 1400, 3)
L3 = sql("L3", "L", 1300, 1500, 4)
L4 = sql("L4", "L", 1500, 1600, 5)
DAY = [F1, L1, L2, F2, L3, L4]


async def stored(tmp_path: Path, manifests: list[Manifest]) -> FileStorage:
    (tmp_path / "dest").mkdir()
    storage = FileStorage(tmp_path / "dest")
    for manifest in manifests:
        stream = tmp_path / "dest" / manifest.devices[0].key
        stream.parent.mkdir()
        stream.write_bytes(b"x")
        await write_manifest(storage, manifest)
    return storage


def present(tmp_path: Path) -> set[str]:
    return {p.name for p in (tmp_path / "dest").iterdir() if (p / "manifest.json").exists()}


@pytest.mark.asyncio
async def test_a_kept_log_keeps_its_full_and_the_logs_between(tmp_path: Path) -> None:
    """keep_last = 1 keeps L4 alone by rule; L4 needs F2 and L3, which stay (NEEDED);
    F1, L1 and L2 go."""
    storage = await stored(tmp_path, DAY)
    ids = {m.backup_id for m in DAY}
    outcome = await apply_retention(
        storage, DAY, "erp", RetentionPolicy(keep_last=1), ids, now=T0 + timedelta(days=9)
    )
    assert outcome.ok
    assert [b.id for b in outcome.plan.keep] == ["erp.L4", "erp.L3", "erp.F2"]
    assert Reason.KEEP_LAST in outcome.plan.reasons["erp.L4"]
    assert outcome.plan.reasons["erp.F2"] == (Reason.NEEDED,)
    assert outcome.plan.reasons["erp.L3"] == (Reason.NEEDED,)
    assert sorted(d.backup_id for d in outcome.deleted) == ["erp.F1", "erp.L1", "erp.L2"]
    assert present(tmp_path) == {"erp.F2", "erp.L3", "erp.L4"}
    rows = {row["id"]: row for row in outcome.summary()["keep"]}
    assert rows["erp.F2"]["reasons"] == [Reason.NEEDED.value]


@pytest.mark.asyncio
async def test_logs_between_a_full_and_a_kept_log_are_kept(tmp_path: Path) -> None:
    """Only F1's chain: keep_last = 1 keeps L2, which needs F1 and L1: nothing goes."""
    chain = [F1, L1, L2]
    storage = await stored(tmp_path, chain)
    outcome = await apply_retention(
        storage,
        chain,
        "erp",
        RetentionPolicy(keep_last=1),
        {m.backup_id for m in chain},
        now=T0 + timedelta(days=9),
    )
    assert outcome.deleted == ()
    assert outcome.plan.delete == ()
    assert outcome.plan.reasons["erp.L1"] == (Reason.NEEDED,)
    assert outcome.plan.reasons["erp.F1"] == (Reason.NEEDED,)
    assert present(tmp_path) == {"erp.F1", "erp.L1", "erp.L2"}


@pytest.mark.asyncio
async def test_a_chain_that_cannot_be_read_deletes_nothing(tmp_path: Path) -> None:
    """A SQL Server manifest without its backup type or LSNs: which backups a kept one
    needs is unknown, so retention deletes nothing of the database and says why."""
    bare = dataclasses.replace(sql("F0", "D", 1, 2, -1), sqlserver=None)
    manifests = [bare, *DAY]
    storage = await stored(tmp_path, manifests)
    outcome = await apply_retention(
        storage,
        manifests,
        "erp",
        RetentionPolicy(keep_last=1),
        {m.backup_id for m in manifests},
        now=T0 + timedelta(days=9),
    )
    assert outcome.deleted == ()
    assert outcome.problem is not None
    assert "erp.F0" in outcome.problem
    assert outcome.summary()["problem"] == outcome.problem
    assert present(tmp_path) == {m.backup_id for m in manifests}
    assert (tmp_path / "dest" / manifest_key("erp.F1")).is_file()


def _lsn_unknown(backup: Manifest) -> Manifest:
    """``backup`` as kept when msdb could not be read after SQL Server's success."""
    assert backup.sqlserver is not None
    known = {k: backup.sqlserver[k] for k in ("database", "type", "copy_only", "server")}
    return dataclasses.replace(backup, sqlserver={**known, "lsn_error": "msdb unreachable"})


@pytest.mark.asyncio
@pytest.mark.parametrize("middle", [False, True], ids=["newest", "between"])
async def test_a_log_without_lsns_stops_retention_for_its_database(
    tmp_path: Path, middle: bool
) -> None:
    blind = _lsn_unknown(sql("L5", "L", 1600, 1700, 6))
    backups = [*DAY, blind, *([sql("L6", "L", 1700, 1800, 7)] if middle else [])]
    storage = await stored(tmp_path, backups)
    outcome = await apply_retention(
        storage,
        backups,
        "erp",
        RetentionPolicy(keep_last=1),
        {m.backup_id for m in backups},
        now=T0 + timedelta(days=9),
    )
    assert outcome.deleted == ()
    assert outcome.problem is not None
    assert "erp.L5" in outcome.problem
    assert sorted(present(tmp_path)) == sorted(m.backup_id for m in backups)
