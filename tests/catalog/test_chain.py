"""SQL Server chains: restore plans, gaps, copy-only rules, list labels, dependencies."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from vdistream.catalog import CatalogError, DeviceEntry, Manifest
from vdistream.catalog.chain import (
    Chain,
    ChainGapError,
    RestorePlan,
    RestoreStep,
    SqlBackup,
    chain_labels,
    chains,
    dependencies,
    describe,
    plan_restore,
)
from vdistream.service import BackupInfo, Reason, RetentionPolicy, plan_retention

T0 = datetime(2026, 12, 6, tzinfo=UTC)
SERVER = "sql1,1433"


def at(hours: float) -> datetime:
    return T0 + timedelta(hours=hours)


def sql(
    backup_id: str,
    kind: str,
    first: int,
    last: int,
    finished: float,
    *,
    checkpoint: int | None = None,
    base: int | None = None,
    copy_only: bool = False,
    database: str = "db",
    server: str = SERVER,
) -> Manifest:
    """A SQL Server manifest as the engine writes it; LSNs as decimal strings."""
    record: dict[str, Any] = {
        "database": database,
        "type": kind,
        "copy_only": copy_only,
        "first_lsn": str(first),
        "last_lsn": str(last),
        "checkpoint_lsn": str(checkpoint if checkpoint is not None else first),
        "database_backup_lsn": None if base is None else str(base),
        "differential_base_lsn": None if base is None else str(base),
        "started": (at(finished) - timedelta(minutes=5)).isoformat(),
        "finished": at(finished).isoformat(),
        "server": server,
        "version": "16.0.4135.4",
    }
    started = record["started"]
    return Manifest(
        backup_id=backup_id,
        engine="mssql",
        mode={"D": "full", "I": "diff", "L": "log"}[kind],
        source=f"mssql://sa@{server.replace(',', ':')}/{database}",
        started=started,
        ended=record["finished"],
        vdi={"device_count": 1, "block_size": 65536, "max_transfer_size": 1048576},
        devices=(DeviceEntry(0, "set", f"{backup_id}/stream-00-of-01.vdi", "memory://x", 1, "a"),),
        versions={"vdistream": "0.1.0"},
        sqlserver=record,
    )


# One day of backups of "db": F1 at midnight, hourly logs, a differential at 02:30, a
# copy-only log at 02:40 (after L2, before L3: it starts where L3 starts, ends earlier).
F1 = sql("F1", "D", 1000, 1100, 0.0, checkpoint=1000)
L1 = sql("L1", "L", 900, 1200, 1.0)  # contains F1's last LSN: the first log after F1
L2 = sql("L2", "L", 1200, 1300, 2.0)
D1 = sql("D1", "I", 1250, 1320, 2.5, checkpoint=1250, base=1000)
CL = sql("CL", "L", 1300, 1330, 2 + 40 / 60, copy_only=True)
L3 = sql("L3", "L", 1300, 1400, 3.0)
L4 = sql("L4", "L", 1400, 1500, 4.0)
DAY = [F1, L1, L2, D1, CL, L3, L4]


def without(*gone: Manifest) -> list[Manifest]:
    return [m for m in DAY if m not in gone]


def steps(plan: RestorePlan) -> list[tuple[str, str, bool, datetime | None]]:
    return [(s.manifest_id, s.kind, s.recovery, s.stopat) for s in plan.steps]


# --- plan_restore ------------------------------------------------------------------------


def test_latest_is_full_then_newest_differential_then_logs() -> None:
    plan = plan_restore(DAY, "db")
    assert steps(plan) == [
        ("F1", "full", False, None),
        ("D1", "diff", False, None),
        ("L3", "log", False, None),  # contains D1's last LSN 1320; the copy-only CL is not used
        ("L4", "log", True, None),  # RECOVERY on the last step only
    ]
    assert plan.reaches == at(4)
    assert plan.to is None
    assert plan.server == SERVER


def test_input_order_does_not_matter() -> None:
    assert plan_restore(list(reversed(DAY)), "db") == plan_restore(DAY, "db")


def test_point_in_time_puts_stopat_on_the_first_log_that_finishes_after_it() -> None:
    to = at(3.5)
    plan = plan_restore(DAY, "db", to)
    assert steps(plan) == [
        ("F1", "full", False, None),
        ("D1", "diff", False, None),
        ("L3", "log", False, None),
        ("L4", "log", True, to),
    ]
    assert plan.reaches == to


def test_point_in_time_before_the_differential_uses_logs_from_the_full() -> None:
    to = at(2.25)  # D1 finished at 02:30: too late for 02:15
    assert steps(plan_restore(DAY, "db", to)) == [
        ("F1", "full", False, None),
        ("L1", "log", False, None),
        ("L2", "log", False, None),
        ("L3", "log", True, to),
    ]


def test_point_in_time_equal_to_a_log_end_stops_in_that_log() -> None:
    assert steps(plan_restore(DAY, "db", at(1))) == [
        ("F1", "full", False, None),
        ("L1", "log", True, at(1)),
    ]


def test_point_in_time_equal_to_the_differential_needs_no_log() -> None:
    assert steps(plan_restore(DAY, "db", at(2.5))) == [
        ("F1", "full", False, None),
        ("D1", "diff", True, None),
    ]


def test_a_full_alone_restores_with_recovery() -> None:
    plan = plan_restore([F1], "db")
    assert plan.steps == (RestoreStep("F1", "full", True, None),)
    assert plan.reaches == at(0)


def test_the_newest_full_before_the_time_is_the_base() -> None:
    f2 = sql("F2", "D", 1450, 1460, 3.8, checkpoint=1450)
    l5 = sql("L5", "L", 1500, 1600, 5.0)
    backups = [*DAY, f2, l5]
    assert [s.manifest_id for s in plan_restore(backups, "db").steps] == ["F2", "L4", "L5"]
    # before F2 finished: F1's chain, and D1 (a differential of F1, not of F2)
    assert [s.manifest_id for s in plan_restore(backups, "db", at(3.5)).steps] == [
        "F1",
        "D1",
        "L3",
        "L4",
    ]


def test_a_time_before_every_full_is_refused_naming_the_earliest() -> None:
    with pytest.raises(CatalogError) as caught:
        plan_restore(DAY, "db", at(-1))
    assert not isinstance(caught.value, ChainGapError)
    assert str(caught.value) == (
        "no full backup of 'db' (server sql1,1433) finished at or before "
        "2026-12-05 23:00:00 UTC: the earliest, F1, finished at 2026-12-06 00:00:00 UTC, "
        "the earliest point a restore can reach"
    )


def test_no_full_at_all_is_refused() -> None:
    with pytest.raises(CatalogError, match=r"no full backup of 'db' .*3 backup\(s\)"):
        plan_restore([L1, L2, D1], "db")


def test_a_time_after_the_last_log_is_refused_naming_the_latest_reachable() -> None:
    with pytest.raises(CatalogError) as caught:
        plan_restore(DAY, "db", at(5))
    assert not isinstance(caught.value, ChainGapError)
    assert str(caught.value) == (
        "the backups of 'db' (server sql1,1433) reach 2026-12-06 04:00:00 UTC (the end of "
        "log backup L4), not 2026-12-06 05:00:00 UTC: restore to that time or an earlier "
        "one, or to the latest"
    )
    with pytest.raises(CatalogError, match="reach 2026-12-06 00:00:00 UTC"):
        plan_restore([F1], "db", at(0.5))


def test_naive_time_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="aware"):
        plan_restore(DAY, "db", datetime(2026, 12, 6, 3))


def test_unknown_database_names_the_ones_present() -> None:
    with pytest.raises(CatalogError, match=r"no SQL Server backup of 'nope' here .*: db\)"):
        plan_restore(DAY, "nope")


# --- gaps ---------------------------------------------------------------------------------


def test_gap_is_refused_naming_the_missing_lsn_and_the_latest_reachable_point() -> None:
    backups = without(L2, D1, CL)  # F1, L1 (to 1200), L3 starts at 1300
    with pytest.raises(ChainGapError) as caught:
        plan_restore(backups, "db", at(3.5))
    assert str(caught.value) == (
        "no log backup of 'db' (server sql1,1433) contains LSN 1200, where log backup L1 "
        "ends; the next log backup, L3, starts at LSN 1300: the log chain has a gap, so "
        "'db' cannot be restored to 2026-12-06 03:30:00 UTC; restore to an earlier time "
        "(latest reachable: 2026-12-06 01:00:00 UTC, the end of L1)"
    )
    assert caught.value.lsn == 1200
    assert caught.value.after == "L1"
    assert caught.value.reachable == at(1)
    assert caught.value.database == "db"
    # what the message calls reachable is reachable
    assert steps(plan_restore(backups, "db", at(1))) == [
        ("F1", "full", False, None),
        ("L1", "log", True, at(1)),
    ]


def test_latest_never_stops_silently_before_a_gap() -> None:
    with pytest.raises(ChainGapError, match=r"cannot be restored to its latest backup"):
        plan_restore(without(L2, D1, CL), "db")


def test_gap_after_the_differential() -> None:
    with pytest.raises(ChainGapError) as caught:
        plan_restore(without(L3, CL), "db")
    assert "contains LSN 1320, where differential backup D1 ends" in str(caught.value)
    assert "the next log backup, L4, starts at LSN 1400" in str(caught.value)
    assert caught.value.reachable == at(2.5)


def test_a_gap_after_the_point_asked_does_not_matter() -> None:
    plan = plan_restore(without(L3, CL), "db", at(1.5))
    assert [s.manifest_id for s in plan.steps] == ["F1", "L1", "L2"]


def test_gap_message_offers_a_later_full() -> None:
    f2 = sql("F2", "D", 1450, 1460, 4.5, checkpoint=1450)
    l5 = sql("L5", "L", 1400, 1600, 5.0)
    with pytest.raises(ChainGapError) as caught:
        plan_restore([F1, L1, f2, l5], "db", at(3))
    assert str(caught.value).endswith(
        "(latest reachable: 2026-12-06 01:00:00 UTC, the end of L1) or to "
        "2026-12-06 04:30:00 UTC or later (from full backup F2)"
    )
    assert [s.manifest_id for s in plan_restore([F1, L1, f2, l5], "db").steps] == ["F2", "L5"]


# --- differentials and copy-only ----------------------------------------------------------


def test_differential_of_another_full_is_ignored() -> None:
    f0 = sql("F0", "D", 500, 600, -24.0, checkpoint=500)
    stray = sql("DX", "I", 1280, 1390, 2.9, checkpoint=1280, base=500)  # newer, wrong base
    plan = plan_restore([f0, *DAY, stray], "db")
    assert [s.manifest_id for s in plan.steps] == ["F1", "D1", "L3", "L4"]


def test_differential_base_falls_back_to_database_backup_lsn() -> None:
    record = dict(D1.sqlserver or {}, differential_base_lsn=None)
    d = SqlBackup.from_record("D1", record)
    assert d.base_lsn == 1000
    plan = plan_restore([SqlBackup.from_record("F1", F1.sqlserver or {}), d], "db")
    assert [s.manifest_id for s in plan.steps] == ["F1", "D1"]


def test_copy_only_log_is_used_only_where_no_regular_log_continues() -> None:
    # with L3 present, L3 is used even for a point inside CL's range
    assert [s.manifest_id for s in plan_restore(DAY, "db", at(2.6)).steps] == [
        "F1",
        "D1",
        "L3",
    ]
    # without L3, CL carries the restore from D1 (1320) to 02:40
    plan = plan_restore(without(L3), "db", at(2.6))
    assert steps(plan) == [
        ("F1", "full", False, None),
        ("D1", "diff", False, None),
        ("CL", "log", True, at(2.6)),
    ]
    # and no further: nothing contains CL's end, 1330
    with pytest.raises(ChainGapError, match=r"contains LSN 1330, where log backup CL ends"):
        plan_restore(without(L3), "db")


def test_regular_logs_are_preferred_to_a_copy_only_log_reaching_further() -> None:
    # not what SQL Server produces (a copy-only log ends before the next regular one),
    # but the rule is: a regular log continues the chain whenever one does
    long = sql("LONG", "L", 1300, 1450, 2.8, copy_only=True)
    assert [s.manifest_id for s in plan_restore([*DAY, long], "db").steps] == [
        "F1",
        "D1",
        "L3",
        "L4",
    ]


def test_copy_only_full_is_the_base_only_when_no_regular_full_is() -> None:
    c = sql("C", "D", 1210, 1220, 1.5, checkpoint=1210, copy_only=True)
    # the regular F1 wins although C is newer; D1 is F1's
    assert [s.manifest_id for s in plan_restore([c, *DAY], "db").steps] == [
        "F1",
        "D1",
        "L3",
        "L4",
    ]
    # without a regular full, C is the base: its logs follow (L2 contains 1220), and
    # no differential builds on a copy-only full
    alone = [c, L2, D1, L3, L4]
    assert [s.manifest_id for s in plan_restore(alone, "db").steps] == ["C", "L2", "L3", "L4"]


# --- databases and servers ----------------------------------------------------------------


def test_databases_and_servers_are_separate() -> None:
    # "sales" has the log "db" is missing, by LSN: it must not fill db's gap
    sales = [
        sql("S1", "D", 1000, 1100, 0.0, database="sales"),
        sql("S2", "L", 1100, 1300, 1.5, database="sales"),
    ]
    with pytest.raises(ChainGapError):
        plan_restore([*without(L2, D1, CL), *sales], "db")
    assert [s.manifest_id for s in plan_restore([*DAY, *sales], "sales").steps] == ["S1", "S2"]

    other = [
        sql("O1", "D", 1000, 1100, 0.0, server="sql2,1433"),
        sql("O2", "L", 1100, 1300, 1.5, server="sql2,1433"),
    ]
    with pytest.raises(CatalogError, match=r"several servers \(sql1,1433, sql2,1433\)"):
        plan_restore([*DAY, *other], "db")
    plan = plan_restore([*DAY, *other], "db", server="sql2,1433")
    assert [s.manifest_id for s in plan.steps] == ["O1", "O2"]
    assert plan.server == "sql2,1433"
    assert [s.manifest_id for s in plan_restore([*DAY, *other], "db", server=SERVER).steps] == [
        "F1",
        "D1",
        "L3",
        "L4",
    ]


def test_other_engines_are_ignored() -> None:
    sqlite = Manifest(
        backup_id="lite",
        engine="sqlite",
        mode=None,
        source="sqlite:///x.db",
        started=T0.isoformat(),
        ended=T0.isoformat(),
        vdi={},
        devices=(),
        versions={},
    )
    assert plan_restore([sqlite, *DAY], "db") == plan_restore(DAY, "db")
    assert describe(sqlite) == ""
    assert dependencies([sqlite])["lite"] == frozenset()
    assert chain_labels([sqlite]) == {"lite": ""}


# --- chains, labels, describe ---------------------------------------------------------------


def test_chains_label_every_backup() -> None:
    f2 = sql("F2", "D", 1450, 1460, 3.8, checkpoint=1450)
    l5 = sql("L5", "L", 1500, 1600, 5.0)
    orphan = sql("L0", "L", 700, 900, -1.0)  # before any full present
    found = chains([orphan, *DAY, f2, l5])
    assert [(c.full.id if c.full else None) for c in found] == ["F1", "F2", None]
    assert all(isinstance(c, Chain) and c.database == "db" for c in found)
    assert chain_labels([orphan, *DAY, f2, l5]) == {
        "F1": "full",
        "L1": "log 1/3 of F1",
        "L2": "log 2/3 of F1",
        "D1": "diff of F1",
        "CL": "log (copy-only) of F1",
        "L3": "log 3/3 of F1",
        "F2": "full",
        "L4": "log 1/2 of F2",  # contains F2's last LSN 1460
        "L5": "log 2/2 of F2",
        "L0": "log (no full before it)",
    }
    assert found[0].complete
    assert not found[2].complete


def test_chains_mark_the_logs_after_a_gap() -> None:
    (chain,) = chains(without(L2, D1, CL))
    assert [(e.backup.id, e.label, e.linked) for e in chain.entries] == [
        ("F1", "full", True),
        ("L1", "log 1/1 of F1", True),
        ("L3", "log (gap before)", False),
        ("L4", "log (gap before)", False),
    ]
    assert not chain.complete


def test_chains_of_copy_only_full_and_a_differential_without_its_full() -> None:
    c = sql("C", "D", 1210, 1220, 1.5, checkpoint=1210, copy_only=True)
    assert chain_labels([c, L2, D1]) == {
        "C": "full (copy-only)",
        "L2": "log 1/1 of C",
        "D1": "diff (its full is missing)",
    }


def test_describe() -> None:
    text = "full backup of 'db', LSN 1000..1100, finished 2026-12-06 00:00:00 UTC"
    assert describe(F1) == text
    assert describe(D1) == (
        "differential backup of 'db', LSN 1250..1320, base LSN 1000, "
        "finished 2026-12-06 02:30:00 UTC"
    )
    assert describe(CL) == (
        "log backup of 'db' (copy-only), LSN 1300..1330, finished 2026-12-06 02:40:00 UTC"
    )


# --- dependencies and retention -------------------------------------------------------------


def test_dependencies() -> None:
    f2 = sql("F2", "D", 1450, 1460, 3.8, checkpoint=1450)
    l5 = sql("L5", "L", 1500, 1600, 5.0)
    needs = dependencies([*DAY, f2, l5])
    assert needs == {
        "F1": frozenset(),
        "D1": {"F1"},
        "L1": {"F1"},
        "L2": {"F1", "L1"},
        "CL": {"F1", "L1", "L2"},  # branches off after L2
        "L3": {"F1", "L1", "L2"},  # no differential: logs chain from the full
        "F2": frozenset(),
        "L4": {"F2"},
        "L5": {"F2", "L4"},
    }
    # after a gap: the full and every earlier log, so what remains stays intact
    gap = dependencies(without(L2, D1, CL))
    assert gap["L4"] == {"F1", "L1", "L3"}


def test_retention_keeps_the_chain_of_a_kept_log() -> None:
    """Catalog and retention together: keep_last=1 keeps only L4 by the rules, and its
    chain (F1, L1, L2, L3) through ``needs``; D1 and CL are needed by nobody."""
    needs = dependencies(DAY)
    infos = [
        BackupInfo(m.backup_id, datetime.fromisoformat(m.ended), True, needs[m.backup_id])
        for m in DAY
    ]
    plan = plan_retention(infos, RetentionPolicy(keep_last=1), at(10))
    assert sorted(b.id for b in plan.keep) == ["F1", "L1", "L2", "L3", "L4"]
    assert sorted(b.id for b in plan.delete) == ["CL", "D1"]
    assert plan.reasons["F1"] == (Reason.NEEDED,)
    # and what is kept still restores to its latest point
    kept = [m for m in DAY if m.backup_id in {b.id for b in plan.keep}]
    assert [s.manifest_id for s in plan_restore(kept, "db").steps] == [
        "F1",
        "L1",
        "L2",
        "L3",
        "L4",
    ]


# --- parsing ---------------------------------------------------------------------------------


def test_manifest_round_trip_keeps_the_chain_facts() -> None:
    again = Manifest.from_json(D1.to_json(), where="test")
    b = SqlBackup.from_manifest(again)
    assert b == SqlBackup.from_manifest(D1)
    assert b is not None
    assert (b.type, b.kind, b.first_lsn, b.last_lsn, b.base_lsn) == ("I", "diff", 1250, 1320, 1000)
    assert b.finished == at(2.5)
    assert b.server == SERVER


def test_large_lsns_compare_as_integers() -> None:
    # 25-digit numeric LSNs: as strings "9..." > "1..."; as integers the reverse
    full = sql("F", "D", 9_000_000_000_000_000_001, 9_000_000_000_000_000_100, 0.0)
    log = sql("L", "L", 9_000_000_000_000_000_050, 10_000_000_000_000_000_000_001, 1.0)
    assert [s.manifest_id for s in plan_restore([full, log], "db").steps] == ["F", "L"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"type": "X"}, "backup type 'X' is not D, I or L"),
        ({"first_lsn": None}, "first_lsn/last_lsn is missing"),
        ({"last_lsn": "12a"}, "last_lsn is '12a', not a decimal LSN"),
        ({"checkpoint_lsn": None}, "checkpoint_lsn is missing"),
        ({"last_lsn": "999"}, "last_lsn 999 is before first_lsn 1000"),
        ({"finished": "yesterday"}, "finished is 'yesterday', not an ISO 8601 time"),
        ({"copy_only": "no"}, "copy_only is 'no', not true or false"),
        ({"database": ""}, "no database name"),
    ],
)
def test_malformed_records_are_refused(change: dict[str, Any], message: str) -> None:
    record = dict(F1.sqlserver or {}, **change)
    with pytest.raises(CatalogError) as caught:
        SqlBackup.from_record("F1", record)
    assert str(caught.value) == f"SQL Server backup F1: {message}"


def test_msdb_dates_without_a_zone_are_utc() -> None:
    record = dict(F1.sqlserver or {}, finished="2026-12-06T10:00:00.123", started="2026-12-06")
    b = SqlBackup.from_record("F1", record)
    assert b.finished == datetime(2026, 12, 6, 10, 0, 0, 123000, tzinfo=UTC)
    assert b.started == T0


def test_sqlserver_manifest_without_its_facts_is_refused() -> None:
    bare = Manifest(
        backup_id="B",
        engine="mssql",
        mode="full",
        source="mssql://sa@h:1433/db",
        started=T0.isoformat(),
        ended=T0.isoformat(),
        vdi={},
        devices=(),
        versions={},
    )
    with pytest.raises(CatalogError, match="B records no backup type or LSNs"):
        plan_restore([bare], "db")


def test_the_same_id_twice_with_different_facts_is_refused() -> None:
    twin = sql("F1", "D", 1000, 1101, 0.0)
    assert plan_restore([F1, F1], "db") == plan_restore([F1], "db")  # the same, twice: fine
    with pytest.raises(CatalogError, match="F1 appears twice"):
        plan_restore([F1, twin], "db")
