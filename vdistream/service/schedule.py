"""Cron-style schedules: ``CronExpr``, ``next_fire`` and an async ``Scheduler``, on cronsim.

Syntax (Vixie cron, plus the usual extensions)
-----------------------------------------------

``minute hour day-of-month month day-of-week``, separated by whitespace:

=============  =======  ==========================================================
field          values   names
=============  =======  ==========================================================
minute         0-59
hour           0-23
day-of-month   1-31
month          1-12     ``jan`` ... ``dec`` (any case)
day-of-week    0-7      ``sun`` ... ``sat`` (any case); 0 and 7 are both Sunday
=============  =======  ==========================================================

Each field is a comma-separated list of ``*``, ``N``, ``A-B`` (``A <= B``, no wrap
around), each optionally followed by ``/STEP`` (``*/15``, ``1-30/2``). ``N/STEP`` means
``N-MAX/STEP`` (cronie's extension: ``5/15`` is 5, 20, 35, 50). The shortcuts
``@yearly`` (``@annually``), ``@monthly``, ``@weekly``, ``@daily`` (``@midnight``) and
``@hourly`` stand for ``0 0 1 1 *``, ``0 0 1 * *``, ``0 0 * * 0``, ``0 0 * * *`` and
``0 * * * *``. ``@reboot`` is refused: the daemon has no such moment.

Day of month and day of week, as in Vixie cron: when either field *starts with* ``*``
(``*`` or ``*/2``), a day must match both; when both are restricted, a day matching
either is enough (``0 0 13 * fri`` fires on every 13th and on every Friday).

An expression that can never fire (``0 0 30 2 *``, ``0 0 31 4,6,9,11 *``) is refused
at parse time, so a typo cannot silently switch a backup off. ``0 0 29 2 *`` is fine
(leap years only). Errors are ``CronError`` (a ``ConfigError``) naming the field.

Time zones and daylight saving time
-----------------------------------

A schedule is a set of *wall-clock* times in one time zone (a ``zoneinfo`` zone;
default: the system's local zone, see ``local_timezone``). ``next_fire(expr, after,
tz)`` returns the first fire instant strictly after ``after`` (an aware datetime, any
zone), as an aware datetime in ``tz``. Resolution is one minute; seconds of ``after``
only matter for "strictly after".

Each matching wall-clock time fires **at most once**, at one well-defined instant:

* **Gap** (spring forward, e.g. Europe/Berlin 2024-03-31 02:00 -> 03:00): a matching
  wall time that does not exist fires at the end of the gap, the first wall time that
  exists (03:00 CEST). ``30 2 * * *`` therefore still runs once that night, at 03:00,
  like ISC cron's "fixed-time jobs in a skipped interval run right after the change".
  Several matching times inside one gap (``*/15 2 * * *``, or ``0 * * * *`` at 02:00
  and 03:00) collapse into that single fire.
* **Overlap** (fall back, e.g. 2024-10-27 03:00 CEST -> 02:00 CET): a wall time that
  occurs twice fires at its *first* occurrence only (CEST). ``30 2 * * *`` runs once;
  ``0 * * * *`` runs at 02:00 CEST and next at 03:00 CET, two real hours later.

Who wants strictly periodic fires uses ``UTC``.

Where this wraps cronsim, and why
---------------------------------

cronsim parses the fields and walks the matching wall-clock times; three things are
ours. **DST**: cronsim follows Debian cron, which runs jobs with a ``*`` in the minute
or hour field by elapsed time (``0 * * * *`` fires twice in an overlap, ``*/15 2 * * *``
not at all in a gap); so cronsim walks *naive* wall times here and ``_instant`` applies
the rules above to every expression. **Syntax**: cronsim also takes a seconds field
and Quartz's ``L``, ``W``, ``#``, and says only "Bad minute"; ``_check_field`` refuses
those and names the field and the item. **Never fires**: cronsim gives up after 50
years; no fire from 2000 on means never (no 5-field expression waits that long).
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta, tzinfo
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import anyio
import anyio.abc
from cronsim import CronSim, CronSimError

from vdistream.errors import ConfigError
from vdistream.log import get_logger

__all__ = (
    "CronError",
    "CronExpr",
    "ScheduleCallback",
    "Scheduler",
    "local_timezone",
    "next_fire",
    "resolve_timezone",
)

log = get_logger(__name__)


class CronError(ConfigError):
    """A cron expression is malformed or can never fire; the message names the field."""


#: ``await callback(schedule_name, planned_fire_time)``
ScheduleCallback = Callable[[str, datetime], Awaitable[None]]

_SHORTCUTS = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}

# literal English names: calendar's follow the locale
_MONTHS = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
_DAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")
# (name, lowest, highest, names)
_FIELDS: tuple[tuple[str, int, int, dict[str, int]], ...] = (
    ("minute", 0, 59, {}),
    ("hour", 0, 23, {}),
    ("day-of-month", 1, 31, {}),
    ("month", 1, 12, {name: i for i, name in enumerate(_MONTHS, start=1)}),
    ("day-of-week", 0, 7, {name: i for i, name in enumerate(_DAYS)}),
)
_ITEM = re.compile(r"^(?:(?P<star>\*)|(?P<lo>[0-9a-z]+)(?:-(?P<hi>[0-9a-z]+))?)(?:/(?P<step>.*))?$")


def _check_field(text: str, index: int) -> None:
    """Raise ``CronError`` naming the field and item unless ``text`` is a list of
    ``*``, ``N`` or ``A-B`` items with an optional ``/STEP`` (module doc: Syntax)."""
    field_name, lo, hi, names = _FIELDS[index]

    def value(token: str) -> int:
        if token.isascii() and token.isdigit():
            number = int(token)
        elif token in names:
            number = names[token]
        else:
            known = f" or a name ({', '.join(names)})" if names else ""
            raise CronError(f"{field_name} field: {token!r} is not a number{known}")
        if not lo <= number <= hi:
            raise CronError(f"{field_name} field: {number} is out of range {lo}-{hi}")
        return number

    for item in text.lower().split(","):
        match = _ITEM.match(item)
        if not item or match is None:
            raise CronError(f"{field_name} field: {item!r} is not *, N, A-B or one with /STEP")
        if match["lo"] is not None:
            start = value(match["lo"])
            if match["hi"] is not None and value(match["hi"]) < start:
                raise CronError(f"{field_name} field: range {item!r} runs backwards")
        step = match["step"]
        if step is not None and not (step.isascii() and step.isdigit() and int(step) > 0):
            raise CronError(f"{field_name} field: step in {item!r} must be a number >= 1")


@dataclass(frozen=True)
class CronExpr:
    """A parsed 5-field cron expression. Build with ``CronExpr.parse(text)``.

    Weekdays are cron's: 0 is Sunday. ``dom_star``/``dow_star`` record whether the
    day-of-month / day-of-week field started with ``*`` (Vixie's AND-vs-OR rule).
    Equality compares the sets, not the text (``@daily == "0 0 * * *"``).
    """

    text: str = field(compare=False)
    minutes: frozenset[int] = field(repr=False)
    hours: frozenset[int] = field(repr=False)
    days: frozenset[int] = field(repr=False)
    months: frozenset[int] = field(repr=False)
    weekdays: frozenset[int] = field(repr=False)
    dom_star: bool = field(repr=False)
    dow_star: bool = field(repr=False)
    #: the five fields given to cronsim (shortcuts expanded)
    fields: str = field(repr=False, compare=False)

    @classmethod
    def parse(cls, text: str) -> CronExpr:
        """Parse ``text``; raise ``CronError`` if malformed or if it can never fire."""
        if not isinstance(text, str):
            raise CronError(f"a cron expression is a string, not {type(text).__name__}")
        stripped = text.strip()
        if stripped.startswith("@") and stripped.lower() not in _SHORTCUTS:
            raise CronError(
                f"unknown shortcut {stripped!r} (known: {', '.join(sorted(_SHORTCUTS))})"
            )
        parts = _SHORTCUTS.get(stripped.lower(), stripped).split()
        if len(parts) != 5:
            raise CronError(
                f"{text!r} has {len(parts)} fields; expected 5 (minute hour day-of-month "
                "month day-of-week) or a shortcut like @daily"
            )
        for index, part in enumerate(parts):
            _check_field(part, index)
        try:
            sim = CronSim(" ".join(parts), datetime(2000, 1, 1))
            next(sim)  # the fields are valid: only "no day ever matches" is left to fail
        except (CronSimError, StopIteration):
            raise CronError(
                f"{text!r} never fires: no date matches its day and month fields"
            ) from None
        return cls(
            stripped,
            frozenset(sim.minutes),
            frozenset(sim.hours),
            frozenset(sim.days),
            frozenset(sim.months),
            frozenset(d % 7 for d in sim.weekdays if isinstance(d, int)),  # Sunday: 0 and 7
            dom_star=parts[2].startswith("*"),
            dow_star=parts[4].startswith("*"),
            fields=" ".join(parts),
        )

    def __str__(self) -> str:
        return self.text

    def matches_date(self, day: date) -> bool:
        """Whether the day fields match ``day`` (Vixie's dom/dow rule)."""
        dom = day.day in self.days
        dow = day.isoweekday() % 7 in self.weekdays
        if self.dom_star or self.dow_star:
            return dom and dow
        return dom or dow

    def matches(self, wall: datetime) -> bool:
        """Whether the wall-clock fields of ``wall`` (its own zone, if aware) match."""
        return (
            wall.minute in self.minutes
            and wall.hour in self.hours
            and wall.month in self.months
            and self.matches_date(wall.date())
        )

    def next_fire(self, after: datetime, tz: tzinfo | None = None) -> datetime:
        """See the module function ``next_fire``."""
        return next_fire(self, after, tz)


def local_timezone() -> tzinfo:
    """The system's local zone as a ``tzinfo`` that knows its DST rules.

    ``$TZ`` if it names a zone (``Europe/Berlin``, ``:Europe/Berlin`` or a file path),
    else ``/etc/localtime`` (by its symlink's zone name when it is one), else UTC.
    """
    name = os.environ.get("TZ", "").removeprefix(":")
    if name:
        with contextlib.suppress(ConfigError):
            return resolve_timezone(name)
    localtime = Path("/etc/localtime")
    with contextlib.suppress(OSError, ValueError, ZoneInfoNotFoundError):
        target = str(localtime.resolve())
        if "zoneinfo/" in target:
            return ZoneInfo(target.rsplit("zoneinfo/", 1)[1])
    try:
        with localtime.open("rb") as f:
            return ZoneInfo.from_file(f, key="localtime")
    except (OSError, ValueError):
        return UTC


def resolve_timezone(name: str | None) -> tzinfo:
    """``ZoneInfo(name)``; ``None`` or ``""`` is the local zone; an absolute path is read
    as a TZif file. Raise ``ConfigError`` for an unknown zone."""
    if not name:
        return local_timezone()
    try:
        if name.startswith("/"):
            with open(name, "rb") as f:
                return ZoneInfo.from_file(f, key=name)
        return ZoneInfo(name)
    except (OSError, ValueError, ZoneInfoNotFoundError) as exc:
        raise ConfigError(f"unknown time zone {name!r}") from exc


def _wall(instant: datetime, zone: tzinfo) -> datetime:
    return instant.astimezone(zone).replace(tzinfo=None)


def _instant(wall: datetime, zone: tzinfo) -> datetime:
    """The UTC instant a matching wall time fires at (module docstring: gaps, overlaps)."""
    wall = wall.replace(fold=0)
    utc = wall.replace(tzinfo=zone).astimezone(UTC)  # fold=0: first occurrence
    if _wall(utc, zone) == wall:
        return utc
    # the wall time does not exist: fire at the first wall minute after it that does
    probe = wall
    for _ in range(3 * 24 * 60):
        probe += timedelta(minutes=1)
        utc = probe.replace(tzinfo=zone).astimezone(UTC)
        if _wall(utc, zone) == probe:
            return utc
    raise ValueError(f"no existing wall time within 3 days after {wall} in {zone}")


def next_fire(expr: str | CronExpr, after: datetime, tz: tzinfo | None = None) -> datetime:
    """The first fire of ``expr`` strictly after ``after``, as an aware datetime in ``tz``.

    ``after`` must be aware (any zone); ``tz`` defaults to ``local_timezone()``. DST
    gaps and overlaps: see the module docstring. Raises ``CronError`` for a bad
    expression and ``ValueError`` for a naive ``after``.
    """
    cron = expr if isinstance(expr, CronExpr) else CronExpr.parse(expr)
    if after.tzinfo is None or after.utcoffset() is None:
        raise ValueError("next_fire needs an aware datetime (with tzinfo)")
    zone = tz if tz is not None else local_timezone()
    limit = after.astimezone(UTC)
    # Instants never decrease as wall times increase (first occurrence, end of the
    # gap), and the wall time of "after" fires no later than "after": so the answer is
    # the first matching wall time after it whose instant is later (module doc: DST).
    with contextlib.suppress(OverflowError):  # cronsim stepping past year 9999: no fire
        for wall in CronSim(cron.fields, _wall(limit, zone)):
            instant = _instant(wall, zone)
            if instant > limit:
                return instant.astimezone(zone)
    raise CronError(f"{cron.text!r} does not fire after {after.isoformat()}")


_utc_now = functools.partial(datetime.now, UTC)


class Scheduler:
    """Calls ``await callback(name, planned)`` whenever a named schedule fires.

    ``schedules`` maps a name (the service's: ``NAME``, ``NAME:diff``, ``NAME:log`` for
    database ``NAME``'s backup kinds) to a cron text or ``CronExpr``; texts are
    parsed at once (``CronError``). ``clock`` returns aware datetimes (default: now in
    UTC); ``sleep(seconds)`` waits (default ``anyio.sleep``); both are injectable for
    tests. The scheduler owns no task: ``await scheduler.run()`` (or ``await
    tg.start(scheduler.run)``, which returns once the first fire times are computed)
    runs in the caller's task group until the caller cancels it. It calls the callback
    for every schedule that is due, in order of planned time then name, and otherwise
    sleeps, never longer than ``max_wait`` seconds, so a wall-clock jump (NTP step,
    suspend) is noticed within ``max_wait``. Contracts:

    * the first fires are the ones strictly after the clock reading when ``run``
      starts: times missed while the daemon was down are not replayed (the job manager
      may do catch-up from its state database);
    * a schedule that became due several times while nothing looked (suspend, a slow
      callback, the clock jumping forward) fires **once**, with its oldest missed
      planned time, then continues with the first fire after the current clock reading;
    * the callback should return promptly (submit a job, do not run it). An
      ``Exception`` from it is logged (``schedule_callback_failed``) and the schedule
      continues; cancellation and other ``BaseException`` propagate.
    """

    def __init__(
        self,
        schedules: Mapping[str, str | CronExpr],
        callback: ScheduleCallback,
        *,
        tz: tzinfo | None = None,
        clock: Callable[[], datetime] = _utc_now,
        sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
        max_wait: float = 60.0,
    ) -> None:
        if not max_wait > 0:
            raise ValueError("max_wait must be > 0")
        self._crons = {
            name: e if isinstance(e, CronExpr) else CronExpr.parse(e)
            for name, e in schedules.items()
        }
        self._callback = callback
        self._zone = tz if tz is not None else local_timezone()
        self._clock = clock
        self._sleep = sleep
        self._max_wait = max_wait
        self._next: dict[str, datetime] = {}

    @property
    def timezone(self) -> tzinfo:
        return self._zone

    def next_fires(self) -> dict[str, datetime]:
        """The next planned fire of each schedule (computed from the clock if ``run``
        has not started yet)."""
        if not self._next and self._crons:
            now = self._now()
            return {n: next_fire(c, now, self._zone) for n, c in self._crons.items()}
        return dict(self._next)

    def _now(self) -> datetime:
        now = self._clock()
        if now.tzinfo is None or now.utcoffset() is None:
            raise ValueError("the scheduler's clock must return aware datetimes")
        return now

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Fire schedules until cancelled. Never returns on its own."""
        now = self._now()
        self._next = {n: next_fire(c, now, self._zone) for n, c in self._crons.items()}
        task_status.started()
        while True:
            now = self._now()
            due = sorted((planned, name) for name, planned in self._next.items() if planned <= now)
            for planned, name in due:
                self._next[name] = next_fire(self._crons[name], now, self._zone)
                late = (now - planned).total_seconds()
                log.info(
                    "schedule_fired",
                    schedule=name,
                    planned=planned.isoformat(),
                    late_seconds=round(late, 3),
                )
                try:
                    await self._callback(name, planned)
                except Exception:
                    log.exception("schedule_callback_failed", schedule=name)
            if due:
                continue  # callbacks took time: look at the clock again
            wait = self._max_wait
            if self._next:
                soonest = (min(self._next.values()) - now).total_seconds()
                wait = min(max(soonest, 0.0), self._max_wait)
            await self._sleep(wait)
