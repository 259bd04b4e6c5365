"""Cron parsing and ``next_fire``: fields, Vixie's dom/dow rule, month ends, leap years,
DST gaps and overlaps (Europe/Berlin, America/New_York)."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta, tzinfo
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vdistream.errors import ConfigError
from vdistream.service import CronError, CronExpr, local_timezone, next_fire, resolve_timezone

BERLIN = ZoneInfo("Europe/Berlin")
NEW_YORK = ZoneInfo("America/New_York")


def at(
    zone: tzinfo,
    y: int,
    mo: int,
    d: int,
    h: int = 0,
    mi: int = 0,
    s: int = 0,
    us: int = 0,
    *,
    fold: int = 0,
) -> datetime:
    return datetime(y, mo, d, h, mi, s, us, tzinfo=zone, fold=fold)


def utc(*args: int) -> datetime:
    return at(UTC, *args)


def fires(expr: str, after: datetime, count: int, tz: ZoneInfo | None = None) -> list[datetime]:
    out = []
    for _ in range(count):
        after = next_fire(expr, after, tz or UTC)
        out.append(after)
    return out


# --- parsing -----------------------------------------------------------------------------


def test_fields_lists_ranges_steps() -> None:
    cron = CronExpr.parse("0,30 1-10/3 */10 1-12/6 *")
    assert cron.minutes == {0, 30}
    assert cron.hours == {1, 4, 7, 10}
    assert cron.days == {1, 11, 21, 31}
    assert cron.months == {1, 7}
    assert cron.weekdays == set(range(7))
    assert cron.dom_star
    assert cron.dow_star


def test_names_are_case_insensitive_and_7_is_sunday() -> None:
    cron = CronExpr.parse("0 0 * JAN,jul-Sep Mon-FRI,7")
    assert cron.months == {1, 7, 8, 9}
    assert cron.weekdays == {0, 1, 2, 3, 4, 5}
    assert CronExpr.parse("0 0 * * 5-7").weekdays == {5, 6, 0}
    assert CronExpr.parse("0 0 * * sun").weekdays == {0}


def test_start_with_step_means_start_to_max() -> None:
    assert CronExpr.parse("5/20 * * * *").minutes == {5, 25, 45}
    assert CronExpr.parse("0 22/1 * * *").hours == {22, 23}


@pytest.mark.parametrize(
    ("shortcut", "same_as"),
    [
        ("@yearly", "0 0 1 1 *"),
        ("@annually", "0 0 1 1 *"),
        ("@monthly", "0 0 1 * *"),
        ("@weekly", "0 0 * * 0"),
        ("@daily", "0 0 * * *"),
        ("@midnight", "0 0 * * *"),
        ("@hourly", "0 * * * *"),
        ("@HOURLY", "0 * * * *"),
    ],
)
def test_shortcuts(shortcut: str, same_as: str) -> None:
    cron = CronExpr.parse(shortcut)
    assert cron == CronExpr.parse(same_as)
    assert str(cron) == shortcut


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("", "has 0 fields"),
        ("* * * *", "has 4 fields"),
        ("* * * * * *", "has 6 fields"),
        ("60 * * * *", "minute field: 60 is out of range 0-59"),
        ("* 24 * * *", "hour field: 24 is out of range 0-23"),
        ("* * 0 * *", "day-of-month field: 0 is out of range 1-31"),
        ("* * 32 * *", "day-of-month field: 32"),
        ("* * * 13 *", "month field: 13"),
        ("* * * * 8", "day-of-week field: 8"),
        ("10-5 * * * *", "runs backwards"),
        ("* * * * fri-mon", "runs backwards"),
        ("*/0 * * * *", "step"),
        ("*/x * * * *", "step"),
        ("1,,2 * * * *", "minute field: ''"),
        ("* * * foo *", "'foo' is not a number or a name"),
        ("mon * * * *", "'mon' is not a number"),
        ("* * * * january", "'january'"),
        ("-1 * * * *", "minute field"),
        ("@reboot", "unknown shortcut"),
        ("@every 5m", "unknown shortcut"),
        ("0 0 30 2 *", "never fires"),
        ("0 0 31 apr,jun,sep,nov *", "never fires"),
        ("0 0 30,31 2 *", "never fires"),
    ],
)
def test_bad_expressions(text: str, problem: str) -> None:
    with pytest.raises(CronError) as caught:
        CronExpr.parse(text)
    assert problem in str(caught.value)
    assert isinstance(caught.value, ConfigError)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("0 0 L * *", "day-of-month field: 'l' is not a number"),
        ("0 0 LW * *", "day-of-month field: 'lw' is not a number"),
        ("0 0 * * 5L", "day-of-week field: '5l' is not a number"),
        ("0 0 * * mon#2", "day-of-week field: 'mon#2' is not *, N, A-B"),
        ("0 0 0 * * *", "has 6 fields"),
    ],
)
def test_cronsim_extensions_are_refused(text: str, problem: str) -> None:
    """cronsim would take Quartz's L, W, # and a seconds field; schedules are 5-field
    Vixie cron, so these are errors naming the field."""
    with pytest.raises(CronError) as caught:
        CronExpr.parse(text)
    assert problem in str(caught.value)


def test_feb_30_with_a_weekday_still_fires_by_or() -> None:
    # both day fields restricted: either matching is enough, so this is "every Monday
    # of February", not "never"
    cron = CronExpr.parse("0 0 30 2 mon")
    assert next_fire(cron, utc(2024, 1, 1), UTC) == utc(2024, 2, 5)


# --- next_fire in UTC --------------------------------------------------------------------

CASES = [
    # (expression, after, expected)
    ("*/15 * * * *", utc(2024, 5, 1, 10, 7), utc(2024, 5, 1, 10, 15)),
    ("*/15 * * * *", utc(2024, 5, 1, 10, 15), utc(2024, 5, 1, 10, 30)),  # strictly after
    ("*/15 * * * *", utc(2024, 5, 1, 10, 14, 59, 999999), utc(2024, 5, 1, 10, 15)),
    ("*/15 * * * *", utc(2024, 5, 1, 10, 15, 0, 1), utc(2024, 5, 1, 10, 30)),
    ("*/15 * * * *", utc(2024, 5, 1, 23, 50), utc(2024, 5, 2, 0, 0)),
    ("* * * * *", utc(2024, 12, 31, 23, 59), utc(2025, 1, 1, 0, 0)),
    ("0 3 * * *", utc(2024, 5, 1, 3, 0), utc(2024, 5, 2, 3, 0)),
    ("0 0 1 * *", utc(2024, 12, 15), utc(2025, 1, 1)),
    ("0 0 1 1 *", utc(2024, 1, 1), utc(2025, 1, 1)),
    # month ends
    ("0 0 31 * *", utc(2024, 4, 1), utc(2024, 5, 31)),  # April has 30 days
    ("0 0 31 * *", utc(2024, 1, 31, 0, 0), utc(2024, 3, 31)),  # Feb skipped
    ("0 0 30 * *", utc(2024, 1, 30, 12), utc(2024, 3, 30)),
    ("0 12 28-31 * *", utc(2023, 2, 28, 13), utc(2023, 3, 28, 12)),
    # leap years
    ("0 0 29 2 *", utc(2023, 3, 1), utc(2024, 2, 29)),
    ("0 0 29 2 *", utc(2024, 2, 29), utc(2028, 2, 29)),
    ("0 0 29 2 *", utc(2096, 3, 1), utc(2104, 2, 29)),  # 2100 is not a leap year
    ("0 0 29 2 *", utc(1999, 1, 1), utc(2000, 2, 29)),  # 2000 is
    # day of week, names, ranges
    ("0 9 * * mon-fri", utc(2024, 9, 6, 10), utc(2024, 9, 9, 9)),  # Fri -> Mon
    ("0 9 * * 1-5", utc(2024, 9, 7), utc(2024, 9, 9, 9)),
    ("30 18 * * sat,sun", utc(2024, 9, 2), utc(2024, 9, 7, 18, 30)),
    ("0 0 * * 7", utc(2024, 9, 2), utc(2024, 9, 8)),  # 7 is Sunday
    ("@weekly", utc(2024, 9, 2), utc(2024, 9, 8)),
    ("@monthly", utc(2024, 2, 29, 0, 1), utc(2024, 3, 1)),
    ("@yearly", utc(2024, 6, 1), utc(2025, 1, 1)),
    ("0 0 * feb *", utc(2024, 3, 1), utc(2025, 2, 1)),
    ("5/20 */6 * * *", utc(2024, 1, 1, 6, 30), utc(2024, 1, 1, 6, 45)),
    ("5/20 */6 * * *", utc(2024, 1, 1, 6, 46), utc(2024, 1, 1, 12, 5)),
    # Vixie: both restricted -> OR (every 13th and every Friday)
    ("0 0 13 * fri", utc(2024, 9, 1), utc(2024, 9, 6)),
    ("0 0 13 * fri", utc(2024, 9, 6), utc(2024, 9, 13)),  # Friday the 13th, once
    ("0 0 13 * fri", utc(2024, 9, 13), utc(2024, 9, 20)),
    ("0 0 13 * fri", utc(2024, 10, 11), utc(2024, 10, 13)),  # a Sunday, by dom
    ("0 0 1,15 * mon", utc(2024, 7, 2), utc(2024, 7, 8)),
    # Vixie: a day field starting with "*" -> AND
    ("0 0 1-7 * */7", utc(2024, 9, 2), utc(2024, 10, 6)),  # first Sunday of the month
    ("0 0 */2 * mon", utc(2024, 9, 1), utc(2024, 9, 9)),  # odd days that are Mondays
    ("0 0 * * mon", utc(2024, 9, 3), utc(2024, 9, 9)),
    ("0 0 13 * *", utc(2024, 9, 14), utc(2024, 10, 13)),
]


@pytest.mark.parametrize(("expr", "after", "expected"), CASES)
def test_next_fire_utc(expr: str, after: datetime, expected: datetime) -> None:
    got = next_fire(expr, after, UTC)
    assert got == expected
    assert got.tzinfo is UTC
    assert CronExpr.parse(expr).matches(got)


def test_friday_13th_sequence() -> None:
    got = fires("0 0 13 * 5", utc(2024, 12, 1), 6)
    assert [d.date() for d in got] == [
        date(2024, 12, 6),
        date(2024, 12, 13),
        date(2024, 12, 20),
        date(2024, 12, 27),
        date(2025, 1, 3),
        date(2025, 1, 10),
    ]


def test_the_result_is_in_the_requested_zone() -> None:
    got = next_fire("0 3 * * *", utc(2024, 6, 1, 12), BERLIN)
    assert got == datetime(2024, 6, 2, 3, 0, tzinfo=BERLIN)
    assert got.tzinfo is BERLIN
    assert got.utcoffset() == timedelta(hours=2)
    # "after" may be in any zone; only the instant counts
    after = datetime(2024, 6, 2, 2, 59, tzinfo=ZoneInfo("Asia/Tokyo"))  # 19:59 Berlin, June 1
    assert next_fire("0 3 * * *", after, BERLIN) == datetime(2024, 6, 2, 3, 0, tzinfo=BERLIN)


def test_naive_after_is_refused() -> None:
    with pytest.raises(ValueError, match="aware"):
        next_fire("* * * * *", datetime(2024, 1, 1), UTC)


@pytest.mark.parametrize(
    ("expr", "after"),
    [
        ("0 0 1 1 *", datetime(9999, 6, 1, tzinfo=UTC)),
        ("* * * * *", datetime(9999, 12, 31, 23, 59, tzinfo=UTC)),
        ("0 0 31 12 *", datetime(9999, 12, 31, 23, 59, tzinfo=UTC)),
    ],
)
def test_no_fire_before_year_10000_is_a_cron_error(expr: str, after: datetime) -> None:
    with pytest.raises(CronError) as caught:
        next_fire(expr, after, UTC)
    assert str(caught.value) == f"{expr!r} does not fire after {after.isoformat()}"


def test_default_zone_is_local(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TZ", "Asia/Kolkata")
    assert str(local_timezone()) == "Asia/Kolkata"
    got = next_fire("0 12 * * *", utc(2024, 1, 1, 0, 0))
    assert got.utcoffset() == timedelta(hours=5, minutes=30)
    assert (got.hour, got.minute) == (12, 0)
    monkeypatch.setenv("TZ", ":Europe/Berlin")
    assert str(local_timezone()) == "Europe/Berlin"
    monkeypatch.setenv("TZ", "Not/AZone")
    assert local_timezone() is not None  # falls back to /etc/localtime or UTC


def test_resolve_timezone() -> None:
    assert resolve_timezone("UTC") == ZoneInfo("UTC")
    with pytest.raises(ConfigError, match="unknown time zone"):
        resolve_timezone("Nowhere/City")
    with pytest.raises(ConfigError, match="unknown time zone"):
        resolve_timezone("/nonexistent/zonefile")


# --- daylight saving time ------------------------------------------------------------------
# Europe/Berlin: 2024-03-31 02:00 CET -> 03:00 CEST (gap);
#                2024-10-27 03:00 CEST -> 02:00 CET (02:00-02:59 twice).
# America/New_York: 2024-03-10 02:00 EST -> 03:00 EDT; 2024-11-03 02:00 EDT -> 01:00 EST.


def berlin(*args: int, fold: int = 0) -> datetime:
    return at(BERLIN, *args, fold=fold)


def new_york(*args: int, fold: int = 0) -> datetime:
    return at(NEW_YORK, *args, fold=fold)


def test_gap_a_fixed_time_fires_at_the_end_of_the_gap() -> None:
    got = fires("30 2 * * *", berlin(2024, 3, 30, 12), 3, BERLIN)
    assert [g.isoformat() for g in got] == [
        "2024-03-31T03:00:00+02:00",  # 02:30 does not exist that night
        "2024-04-01T02:30:00+02:00",
        "2024-04-02T02:30:00+02:00",
    ]
    assert got[0] == datetime(2024, 3, 31, 1, 0, tzinfo=UTC)  # the transition instant


def test_gap_several_times_collapse_into_one_fire() -> None:
    got = fires("*/15 2 * * *", berlin(2024, 3, 31, 0), 2, BERLIN)
    assert [g.isoformat() for g in got] == [
        "2024-03-31T03:00:00+02:00",
        "2024-04-01T02:00:00+02:00",
    ]
    hourly = fires("0 * * * *", berlin(2024, 3, 31, 0, 30), 4, BERLIN)
    assert [g.isoformat() for g in hourly] == [
        "2024-03-31T01:00:00+01:00",
        "2024-03-31T03:00:00+02:00",  # 02:00 and 03:00 are one fire
        "2024-03-31T04:00:00+02:00",
        "2024-03-31T05:00:00+02:00",
    ]


def test_gap_times_outside_the_gap_are_unaffected() -> None:
    assert next_fire("59 1 * * *", berlin(2024, 3, 31, 0), BERLIN).isoformat() == (
        "2024-03-31T01:59:00+01:00"
    )
    assert next_fire("0 3 * * *", berlin(2024, 3, 31, 0), BERLIN).isoformat() == (
        "2024-03-31T03:00:00+02:00"
    )


def test_after_inside_the_gap_end() -> None:
    # after = the instant the gap ends: the collapsed fire is not "after" it
    after = berlin(2024, 3, 31, 3, 0)
    assert next_fire("30 2 * * *", after, BERLIN).isoformat() == "2024-04-01T02:30:00+02:00"


def test_overlap_a_fixed_time_fires_once_at_the_first_occurrence() -> None:
    got = fires("30 2 * * *", berlin(2024, 10, 26, 12), 3, BERLIN)
    assert [g.isoformat() for g in got] == [
        "2024-10-27T02:30:00+02:00",  # CEST; not again at 02:30 CET
        "2024-10-28T02:30:00+01:00",
        "2024-10-29T02:30:00+01:00",
    ]


def test_overlap_hourly_skips_the_repeated_hour() -> None:
    got = fires("0 * * * *", berlin(2024, 10, 27, 0, 30), 4, BERLIN)
    assert [g.isoformat() for g in got] == [
        "2024-10-27T01:00:00+02:00",
        "2024-10-27T02:00:00+02:00",
        "2024-10-27T03:00:00+01:00",  # two real hours after 02:00 CEST
        "2024-10-27T04:00:00+01:00",
    ]


def test_overlap_after_in_the_second_occurrence() -> None:
    # 02:10 CET (the second 02:10): 02:30 already fired during the first pass
    after = berlin(2024, 10, 27, 2, 10, fold=1)
    assert after.utcoffset() == timedelta(hours=1)
    assert next_fire("30 2 * * *", after, BERLIN).isoformat() == "2024-10-28T02:30:00+01:00"
    assert next_fire("*/20 * * * *", after, BERLIN).isoformat() == "2024-10-27T03:00:00+01:00"
    # between the two passes, in the first one
    first = berlin(2024, 10, 27, 2, 10)
    assert next_fire("30 2 * * *", first, BERLIN).isoformat() == "2024-10-27T02:30:00+02:00"


def test_new_york_gap_and_overlap() -> None:
    assert next_fire("30 2 * * *", new_york(2024, 3, 10, 0), NEW_YORK).isoformat() == (
        "2024-03-10T03:00:00-04:00"
    )
    got = fires("30 1 * * *", new_york(2024, 11, 2, 12), 2, NEW_YORK)
    assert [g.isoformat() for g in got] == [
        "2024-11-03T01:30:00-04:00",  # first (EDT) occurrence only
        "2024-11-04T01:30:00-05:00",
    ]
    every_half_hour = fires("*/30 * * * *", new_york(2024, 11, 3, 0, 0), 5, NEW_YORK)
    assert [g.isoformat() for g in every_half_hour] == [
        "2024-11-03T00:30:00-04:00",
        "2024-11-03T01:00:00-04:00",
        "2024-11-03T01:30:00-04:00",
        "2024-11-03T02:00:00-05:00",
        "2024-11-03T02:30:00-05:00",
    ]


@pytest.mark.parametrize(
    "start",
    [berlin(2024, 3, 30, 22), berlin(2024, 10, 26, 22), new_york(2024, 11, 2, 22)],
    ids=["berlin-gap", "berlin-overlap", "new-york-overlap"],
)
def test_every_minute_across_a_transition(start: datetime) -> None:
    """Every fire matches, instants strictly increase, and no wall time fires twice."""
    zone = start.tzinfo
    assert isinstance(zone, ZoneInfo)
    seen: set[datetime] = set()
    previous = start
    for _ in range(8 * 60):
        got = next_fire("* * * * *", previous, zone)
        assert got > previous
        wall = got.replace(tzinfo=None, fold=0)
        assert wall not in seen
        seen.add(wall)
        assert got.tzinfo is zone
        previous = got
    # 8 hours of minutes minus the 60 repeated / missing ones
    span = (previous - start).total_seconds() / 60
    assert span in (8 * 60, 8 * 60 + 60)


def test_cron_expr_method_and_matches() -> None:
    cron = CronExpr.parse("0 12 * * *")
    assert cron.next_fire(utc(2024, 1, 1), UTC) == utc(2024, 1, 1, 12)
    assert cron.matches(datetime(2024, 1, 1, 12, 0))
    assert not cron.matches(datetime(2024, 1, 1, 12, 1))


def test_rare_expression_far_away() -> None:
    # Feb 29 on a Sunday (AND, because the weekday field starts with "*")
    got = next_fire("0 0 29 2 */7", utc(2004, 3, 1), UTC)
    assert got == utc(2032, 2, 29)
    assert got.isoweekday() == 7


# --- property: the first fire, no earlier match ---------------------------------------------


def _field(lo: int, hi: int) -> st.SearchStrategy[str]:
    values = st.integers(lo, hi).map(str)
    ranges = st.tuples(st.integers(lo, hi), st.integers(lo, hi)).map(lambda t: f"{min(t)}-{max(t)}")
    steps = st.tuples(st.sampled_from(["*", f"{lo}-{hi}"]), st.integers(1, 7)).map(
        lambda t: f"{t[0]}/{t[1]}"
    )
    item = st.one_of(st.just("*"), values, ranges, steps)
    return st.lists(item, min_size=1, max_size=3).map(",".join)


EXPRS = st.tuples(_field(0, 59), _field(0, 23), _field(1, 31), _field(1, 12), _field(0, 7)).map(
    " ".join
)


@settings(max_examples=150, deadline=None)
@given(
    expr=EXPRS,
    after=st.datetimes(min_value=datetime(1990, 1, 1), max_value=datetime(2090, 1, 1)),
)
def test_next_fire_is_the_first_match_in_utc(expr: str, after: datetime) -> None:
    try:
        cron = CronExpr.parse(expr)
    except CronError:
        return  # e.g. "never fires"
    start = after.replace(tzinfo=UTC)
    got = next_fire(cron, start, UTC)
    assert got > start
    assert cron.matches(got)
    assert got.second == got.microsecond == 0
    # no matching minute in between: check day by day, then minute by minute
    day = start.date()
    while day <= got.date():
        if cron.matches_date(day) and day.month in cron.months:
            for h in sorted(cron.hours):
                for m in sorted(cron.minutes):
                    t = datetime(day.year, day.month, day.day, h, m, tzinfo=UTC)
                    if start < t < got:
                        raise AssertionError(f"{expr}: {t} matches before {got}")
        day += timedelta(days=1)
