"""plan_retention: every rule and edge case of the module docstring."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vdistream.service import BackupInfo, Reason, RetentionPlan, RetentionPolicy, plan_retention

NOW = datetime(2024, 6, 1, 12, 0, tzinfo=UTC)
DAY = timedelta(days=1)


def b(name: str, days_ago: float, verified: bool = True) -> BackupInfo:
    return BackupInfo(name, NOW - timedelta(days=days_ago), verified)


def ids(backups: tuple[BackupInfo, ...]) -> list[str]:
    return [x.id for x in backups]


def check_partition(plan: RetentionPlan, backups: list[BackupInfo]) -> None:
    assert sorted(ids(plan.keep) + ids(plan.delete)) == sorted(x.id for x in backups)
    assert set(plan.reasons) == {x.id for x in backups}
    for x in plan.delete:
        assert plan.reasons[x.id] == (Reason.EXPIRED,)
    for x in plan.keep:
        assert Reason.EXPIRED not in plan.reasons[x.id]
        assert plan.reasons[x.id]


# --- the policy itself ---------------------------------------------------------------------


def test_policy_validation() -> None:
    assert not RetentionPolicy().enabled
    assert RetentionPolicy(keep_last=1).enabled
    assert RetentionPolicy(keep_within=DAY).enabled
    with pytest.raises(ValueError, match="keep_last"):
        RetentionPolicy(keep_last=0)
    with pytest.raises(TypeError):
        RetentionPolicy(keep_last=True)
    with pytest.raises(ValueError, match="keep_within"):
        RetentionPolicy(keep_within=timedelta(0))


# --- edge cases ----------------------------------------------------------------------------


def test_empty_list() -> None:
    plan = plan_retention([], RetentionPolicy(keep_last=1), NOW)
    assert plan == RetentionPlan((), (), plan.reasons)
    assert dict(plan.reasons) == {}


def test_all_unverified_deletes_nothing() -> None:
    backups = [b(f"u{i}", i * 10, verified=False) for i in range(10)]
    plan = plan_retention(backups, RetentionPolicy(keep_last=1, keep_within=DAY), NOW)
    assert plan.delete == ()
    assert ids(plan.keep) == [f"u{i}" for i in range(10)]  # newest first
    assert all(plan.reasons[x.id] == (Reason.NO_VERIFIED,) for x in backups)


def test_no_policy_deletes_nothing() -> None:
    backups = [b(f"v{i}", i * 100) for i in range(5)]
    plan = plan_retention(backups, RetentionPolicy(), NOW)
    assert plan.delete == ()
    assert plan.reasons["v0"] == (Reason.NEWEST_VERIFIED, Reason.RETENTION_OFF)
    assert plan.reasons["v3"] == (Reason.RETENTION_OFF,)


def test_single_verified_backup_is_never_deleted() -> None:
    old = b("only", 365)
    plan = plan_retention([old], RetentionPolicy(keep_within=DAY), NOW)
    assert ids(plan.keep) == ["only"]
    assert plan.reasons["only"] == (Reason.NEWEST_VERIFIED,)


def test_input_order_does_not_matter() -> None:
    backups = [b(f"v{i}", i) for i in range(8)]
    policy = RetentionPolicy(keep_last=3)
    expected = plan_retention(backups, policy, NOW)
    shuffled = backups[:]
    random.Random(7).shuffle(shuffled)
    assert plan_retention(shuffled, policy, NOW) == expected
    assert ids(expected.keep) == ["v0", "v1", "v2"]
    assert ids(expected.delete) == ["v3", "v4", "v5", "v6", "v7"]


def test_bad_input() -> None:
    with pytest.raises(ValueError, match="twice"):
        plan_retention([b("a", 1), b("a", 2)], RetentionPolicy(keep_last=1), NOW)
    with pytest.raises(ValueError, match="aware"):
        plan_retention([BackupInfo("a", datetime(2024, 1, 1), True)], RetentionPolicy(), NOW)
    with pytest.raises(ValueError, match="aware"):
        plan_retention([], RetentionPolicy(), datetime(2024, 1, 1))


# --- keep_last ------------------------------------------------------------------------------


def test_keep_last_counts_verified_only() -> None:
    backups = [
        b("u0", 0.5, verified=False),  # newer than the newest verified: kept, not counted
        b("v1", 1),
        b("u2", 2, verified=False),  # older than the anchor, unverified: not counted, deleted
        b("v3", 3),
        b("v4", 4),
        b("v5", 5),
    ]
    plan = plan_retention(backups, RetentionPolicy(keep_last=3), NOW)
    check_partition(plan, backups)
    assert ids(plan.keep) == ["u0", "v1", "v3", "v4"]
    assert ids(plan.delete) == ["u2", "v5"]
    assert plan.reasons["u0"] == (Reason.NEWER_THAN_VERIFIED,)
    assert plan.reasons["v1"] == (Reason.NEWEST_VERIFIED, Reason.KEEP_LAST)
    assert plan.reasons["v4"] == (Reason.KEEP_LAST,)


def test_keep_last_one_keeps_only_the_anchor_and_newer() -> None:
    backups = [b("u0", 0, verified=False), b("u1", 1, verified=False), b("v2", 2), b("v3", 3)]
    plan = plan_retention(backups, RetentionPolicy(keep_last=1), NOW)
    assert ids(plan.keep) == ["u0", "u1", "v2"]
    assert ids(plan.delete) == ["v3"]


def test_keep_last_larger_than_the_list() -> None:
    backups = [b(f"v{i}", i) for i in range(3)]
    plan = plan_retention(backups, RetentionPolicy(keep_last=10), NOW)
    assert plan.delete == ()


def test_many_unverified_newer_backups_do_not_push_verified_ones_out() -> None:
    backups = [b(f"u{i}", i / 10, verified=False) for i in range(9)] + [b("v1", 1), b("v2", 2)]
    plan = plan_retention(backups, RetentionPolicy(keep_last=2), NOW)
    assert plan.delete == ()


# --- keep_within ----------------------------------------------------------------------------


def test_keep_within_keeps_young_backups_verified_or_not() -> None:
    backups = [
        b("v0", 0),
        b("u1", 3, verified=False),
        b("v5", 5),
        b("v8", 8),
        b("v20", 20),
    ]
    plan = plan_retention(backups, RetentionPolicy(keep_within=timedelta(days=7)), NOW)
    check_partition(plan, backups)
    assert ids(plan.keep) == ["v0", "u1", "v5"]
    assert ids(plan.delete) == ["v8", "v20"]
    assert plan.reasons["u1"] == (Reason.KEEP_WITHIN,)


def test_keep_within_boundary_is_inclusive() -> None:
    backups = [b("v0", 0), b("edge", 7), b("past", 7 + 1e-9 * 1000)]
    plan = plan_retention(backups, RetentionPolicy(keep_within=timedelta(days=7)), NOW)
    assert "edge" in ids(plan.keep)
    assert ids(plan.delete) == ["past"]


def test_keep_within_does_not_delete_the_anchor_even_if_old() -> None:
    backups = [b("u0", 0, verified=False), b("v30", 30), b("v40", 40)]
    plan = plan_retention(backups, RetentionPolicy(keep_within=timedelta(days=7)), NOW)
    assert ids(plan.keep) == ["u0", "v30"]
    assert ids(plan.delete) == ["v40"]


# --- both rules: kept if EITHER keeps -------------------------------------------------------


def test_either_rule_keeps() -> None:
    backups = [b(f"v{i}", i) for i in range(0, 30, 2)]  # every 2 days for a month
    policy = RetentionPolicy(keep_last=3, keep_within=timedelta(days=9))
    plan = plan_retention(backups, policy, NOW)
    check_partition(plan, backups)
    assert ids(plan.keep) == ["v0", "v2", "v4", "v6", "v8"]  # last 3, plus within 9 days
    assert plan.reasons["v2"] == (Reason.KEEP_LAST, Reason.KEEP_WITHIN)
    assert plan.reasons["v8"] == (Reason.KEEP_WITHIN,)

    policy = RetentionPolicy(keep_last=6, keep_within=timedelta(days=3))
    plan = plan_retention(backups, policy, NOW)
    assert ids(plan.keep) == ["v0", "v2", "v4", "v6", "v8", "v10"]


# --- only strictly older than the newest verified may go --------------------------------------


def test_nothing_newer_than_the_anchor_is_deleted_even_when_expired() -> None:
    # the newest verified backup is old; the unverified ones after it are older than
    # keep_within too, but they are newer than the anchor: kept
    backups = [
        b("u10", 10, verified=False),
        b("u20", 20, verified=False),
        b("v30", 30),
        b("v31", 31),
    ]
    plan = plan_retention(backups, RetentionPolicy(keep_last=1, keep_within=DAY), NOW)
    assert ids(plan.keep) == ["u10", "u20", "v30"]
    assert ids(plan.delete) == ["v31"]


def test_ties_with_the_anchor_are_kept() -> None:
    t = NOW - 5 * DAY
    backups = [
        BackupInfo("b-anchor", t, True),
        BackupInfo("a-same-time-verified", t, True),  # same ended, smaller id
        BackupInfo("a-same-time-unverified", t, False),
        b("old", 9),
    ]
    plan = plan_retention(backups, RetentionPolicy(keep_last=1), NOW)
    check_partition(plan, backups)
    assert plan.reasons["b-anchor"][0] is Reason.NEWEST_VERIFIED  # the id breaks the tie
    assert plan.reasons["a-same-time-verified"] == (Reason.SAME_TIME_AS_VERIFIED,)
    assert plan.reasons["a-same-time-unverified"] == (Reason.SAME_TIME_AS_VERIFIED,)
    assert ids(plan.delete) == ["old"]


def test_ties_among_older_backups_are_ordered_by_id() -> None:
    t = NOW - 5 * DAY
    backups = [b("new", 0), BackupInfo("x", t, True), BackupInfo("y", t, True)]
    plan = plan_retention(backups, RetentionPolicy(keep_last=2), NOW)
    assert ids(plan.keep) == ["new", "y"]
    assert ids(plan.delete) == ["x"]


# --- clock skew ---------------------------------------------------------------------------


def test_future_backups_are_kept_and_not_counted() -> None:
    backups = [
        BackupInfo("future", NOW + timedelta(days=365), True),
        b("v1", 1),
        b("v2", 2),
        b("v3", 3),
    ]
    plan = plan_retention(backups, RetentionPolicy(keep_last=1), NOW)
    check_partition(plan, backups)
    assert plan.reasons["future"] == (Reason.FUTURE,)
    assert plan.reasons["v1"] == (Reason.NEWEST_VERIFIED, Reason.KEEP_LAST)  # the anchor
    assert ids(plan.keep) == ["future", "v1"]
    assert ids(plan.delete) == ["v2", "v3"]


def test_only_future_verified_backups_mean_nothing_is_deleted() -> None:
    backups = [BackupInfo("future", NOW + timedelta(minutes=1), True), b("u1", 10, False)]
    plan = plan_retention(backups, RetentionPolicy(keep_last=1), NOW)
    assert plan.delete == ()
    assert plan.reasons["u1"] == (Reason.NO_VERIFIED,)


def test_a_backup_that_ended_exactly_now_is_not_future() -> None:
    backups = [BackupInfo("now", NOW, True), b("old", 3)]
    plan = plan_retention(backups, RetentionPolicy(keep_last=1), NOW)
    assert plan.reasons["now"][0] is Reason.NEWEST_VERIFIED
    assert ids(plan.delete) == ["old"]


def test_other_time_zones_compare_by_instant() -> None:
    from zoneinfo import ZoneInfo

    tokyo = ZoneInfo("Asia/Tokyo")
    backups = [
        BackupInfo("v-new", (NOW - DAY).astimezone(tokyo), True),
        BackupInfo("v-old", NOW - 2 * DAY, True),
    ]
    plan = plan_retention(backups, RetentionPolicy(keep_last=1), NOW.astimezone(tokyo))
    assert ids(plan.delete) == ["v-old"]


# --- properties ---------------------------------------------------------------------------

BACKUPS = st.lists(st.tuples(st.integers(-5, 60), st.booleans()), max_size=25).map(
    lambda items: [
        BackupInfo(f"id{i:02d}", NOW - timedelta(days=d), v) for i, (d, v) in enumerate(items)
    ]
)
POLICIES = st.builds(
    RetentionPolicy,
    keep_last=st.none() | st.integers(1, 10),
    keep_within=st.none() | st.integers(1, 30).map(lambda d: timedelta(days=d)),
)


@settings(max_examples=300, deadline=None)
@given(backups=BACKUPS, policy=POLICIES)
def test_invariants(backups: list[BackupInfo], policy: RetentionPolicy) -> None:
    plan = plan_retention(backups, policy, NOW)
    check_partition(plan, backups)
    present_verified = [x for x in backups if x.verified and x.ended <= NOW]
    if not present_verified:
        assert plan.delete == ()
        return
    anchor = max(present_verified, key=lambda x: (x.ended, x.id))
    assert anchor in plan.keep  # the last good backup survives
    for x in plan.delete:
        assert x.ended < anchor.ended  # strictly older than the newest verified
        assert x.ended <= NOW
        if policy.keep_within is not None:
            assert NOW - x.ended > policy.keep_within
    if policy.keep_last is not None:
        newest = sorted(present_verified, key=lambda x: (x.ended, x.id), reverse=True)
        for x in newest[: policy.keep_last]:
            assert x in plan.keep
    # applying the plan again deletes nothing more (idempotent)
    again = plan_retention(list(plan.keep), policy, NOW)
    assert again.delete == ()


# --- rule 7: what a kept backup needs is kept -------------------------------------------------


def needing(name: str, days_ago: float, *needs: str, verified: bool = True) -> BackupInfo:
    return BackupInfo(name, NOW - timedelta(days=days_ago), verified, frozenset(needs))


def test_a_kept_log_keeps_its_full_and_the_logs_between() -> None:
    # full F (day 10), logs L1..L3 after it; diff D (day 8) needed by nothing
    backups = [
        needing("F", 10),
        needing("L1", 9, "F"),
        needing("D", 8, "F"),
        needing("L2", 7, "F", "L1"),
        needing("L3", 6, "F", "L1", "L2"),
        needing("old", 20),
    ]
    plan = plan_retention(backups, RetentionPolicy(keep_last=1), NOW)
    check_partition(plan, backups)
    assert ids(plan.keep) == ["L3", "L2", "L1", "F"]  # newest first
    assert ids(plan.delete) == ["D", "old"]
    assert plan.reasons["L3"] == (Reason.NEWEST_VERIFIED, Reason.KEEP_LAST)
    for name in ("F", "L1", "L2"):
        assert plan.reasons[name] == (Reason.NEEDED,)
    assert Reason.NEEDED.value == "needed by a kept backup (its chain)"


def test_needs_are_followed_transitively() -> None:
    # each log names only its predecessor: the closure still reaches the full
    backups = [
        needing("F", 10),
        needing("L1", 9, "F"),
        needing("L2", 8, "L1"),
        needing("L3", 7, "L2"),
    ]
    plan = plan_retention(backups, RetentionPolicy(keep_last=1), NOW)
    assert plan.delete == ()
    assert [plan.reasons[n] for n in ("F", "L1", "L2")] == [(Reason.NEEDED,)] * 3


def test_a_deleted_full_whose_differentials_are_all_deleted_stays_deleted() -> None:
    backups = [
        needing("F2", 1),  # the anchor: a newer full
        needing("F1", 10),
        needing("D1", 9, "F1"),
        needing("D2", 8, "F1"),
    ]
    plan = plan_retention(backups, RetentionPolicy(keep_last=1), NOW)
    check_partition(plan, backups)
    assert ids(plan.keep) == ["F2"]
    assert ids(plan.delete) == ["D2", "D1", "F1"]


def test_a_kept_differential_keeps_its_full_but_not_its_siblings() -> None:
    backups = [
        needing("D2", 2, "F1"),
        needing("D1", 5, "F1"),
        needing("F1", 10),
    ]
    plan = plan_retention(backups, RetentionPolicy(keep_within=timedelta(days=3)), NOW)
    assert ids(plan.keep) == ["D2", "F1"]
    assert plan.reasons["F1"] == (Reason.NEEDED,)
    assert ids(plan.delete) == ["D1"]


def test_needs_of_a_future_or_unverified_newer_backup_are_kept_too() -> None:
    backups = [
        needing("future", -3, "F"),  # clock skew: kept, and so is what it needs
        needing("u", 1, "G", verified=False),  # newer than the anchor: kept
        needing("anchor", 2),
        needing("F", 9),
        needing("G", 8),
        needing("H", 7),
    ]
    plan = plan_retention(backups, RetentionPolicy(keep_last=1), NOW)
    check_partition(plan, backups)
    assert ids(plan.delete) == ["H"]
    assert plan.reasons["F"] == plan.reasons["G"] == (Reason.NEEDED,)


def test_needs_naming_absent_backups_are_ignored() -> None:
    backups = [needing("L9", 1, "gone", "other-database.x"), needing("old", 5)]
    plan = plan_retention(backups, RetentionPolicy(keep_last=1), NOW)
    assert ids(plan.keep) == ["L9"]
    assert ids(plan.delete) == ["old"]


def test_backups_kept_by_a_rule_do_not_get_needed_added() -> None:
    # reasons say what decided: a backup already kept keeps its own reasons
    backups = [needing("L", 1, "F"), needing("F", 2)]
    plan = plan_retention(backups, RetentionPolicy(keep_last=2), NOW)
    assert plan.reasons["F"] == (Reason.KEEP_LAST,)


NEEDY = st.lists(
    st.tuples(st.integers(-5, 60), st.booleans(), st.sets(st.integers(0, 24), max_size=3)),
    max_size=25,
).map(
    lambda items: [
        BackupInfo(
            f"id{i:02d}",
            NOW - timedelta(days=d),
            v,
            frozenset(f"id{n:02d}" for n in needs if n != i),
        )
        for i, (d, v, needs) in enumerate(items)
    ]
)


@settings(max_examples=300, deadline=None)
@given(backups=NEEDY, policy=POLICIES)
def test_invariants_with_needs(backups: list[BackupInfo], policy: RetentionPolicy) -> None:
    plan = plan_retention(backups, policy, NOW)
    check_partition(plan, backups)
    kept = {x.id for x in plan.keep}
    present = {x.id for x in backups}
    for x in plan.keep:
        assert (x.needs & present) <= kept  # nothing a kept backup needs is deleted
    # needs only ever add: without them, the rules keep a subset of what is kept now
    bare = [BackupInfo(x.id, x.ended, x.verified) for x in backups]
    plain = plan_retention(bare, policy, NOW)
    assert {x.id for x in plain.keep} <= kept
    for x in plan.keep:
        if plan.reasons[x.id] == (Reason.NEEDED,):
            assert x.id in {y.id for y in plain.delete}
        else:
            assert plan.reasons[x.id] == plain.reasons[x.id]
    # idempotent: applying the plan again deletes nothing more
    assert plan_retention(list(plan.keep), policy, NOW).delete == ()
