"""The async Scheduler with an injected clock and sleep: fires at the right times, each
wait bounded, missed fires coalesced, callback errors contained, clean cancellation."""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import anyio
import anyio.lowlevel
import pytest

from vdistream.service import CronError, CronExpr, Scheduler

START = datetime(2024, 3, 30, 23, 50, tzinfo=UTC)


class FakeClock:
    """``now()`` is the fake time; ``sleep(s)`` records s and moves the time on."""

    def __init__(self, start: datetime) -> None:
        self.now = start
        self.sleeps: list[float] = []
        self.jumps: dict[int, timedelta] = {}  # sleep number -> extra jump after it

    def __call__(self) -> datetime:
        return self.now

    async def sleep(self, seconds: float) -> None:
        assert seconds >= 0
        self.sleeps.append(seconds)
        self.now += timedelta(seconds=seconds) + self.jumps.get(len(self.sleeps), timedelta())
        await anyio.lowlevel.checkpoint()


class Recorder:
    def __init__(self, clock: FakeClock, stop_after: int) -> None:
        self.clock = clock
        self.calls: list[tuple[str, datetime, datetime]] = []  # name, planned, clock
        self.stop_after = stop_after
        self.done = anyio.Event()

    async def __call__(self, name: str, planned: datetime) -> None:
        self.calls.append((name, planned, self.clock.now))
        if len(self.calls) >= self.stop_after:
            self.done.set()


async def run_until_done(scheduler: Scheduler, recorder: Recorder) -> None:
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            await tg.start(scheduler.run)
            await recorder.done.wait()
            tg.cancel_scope.cancel()


@pytest.mark.asyncio
async def test_fires_each_schedule_at_its_times() -> None:
    clock = FakeClock(START)
    recorder = Recorder(clock, stop_after=7)
    scheduler = Scheduler(
        {"app": "*/5 * * * *", "billing": CronExpr.parse("0 0 * * *")},
        recorder,
        tz=UTC,
        clock=clock,
        sleep=clock.sleep,
        max_wait=60,
    )
    await run_until_done(scheduler, recorder)
    t = START
    expected = [
        ("app", t + timedelta(minutes=5)),
        ("app", t + timedelta(minutes=10)),
        ("billing", t + timedelta(minutes=10)),  # same instant: by name
        ("app", t + timedelta(minutes=15)),
        ("app", t + timedelta(minutes=20)),
        ("app", t + timedelta(minutes=25)),
        ("app", t + timedelta(minutes=30)),
    ]
    assert [(name, planned) for name, planned, _ in recorder.calls] == expected
    # called when the clock reached the planned time, not before and not late
    assert all(now == planned for _, planned, now in recorder.calls)
    # every wait bounded by max_wait
    assert clock.sleeps
    assert max(clock.sleeps) <= 60


@pytest.mark.asyncio
async def test_waits_are_bounded_even_for_a_far_schedule() -> None:
    clock = FakeClock(datetime(2024, 1, 1, 0, 0, 30, tzinfo=UTC))
    recorder = Recorder(clock, stop_after=1)
    scheduler = Scheduler(
        {"monthly": "@monthly"}, recorder, tz=UTC, clock=clock, sleep=clock.sleep, max_wait=600
    )
    await run_until_done(scheduler, recorder)
    assert recorder.calls[0][1] == datetime(2024, 2, 1, tzinfo=UTC)
    assert max(clock.sleeps) <= 600
    assert len(clock.sleeps) >= 31 * 24 * 6 - 1


@pytest.mark.asyncio
async def test_schedules_are_read_in_the_given_zone() -> None:
    berlin = ZoneInfo("Europe/Berlin")
    clock = FakeClock(datetime(2024, 3, 30, 12, 0, tzinfo=UTC))
    recorder = Recorder(clock, stop_after=2)
    scheduler = Scheduler(
        {"db": "30 2 * * *"}, recorder, tz=berlin, clock=clock, sleep=clock.sleep, max_wait=3600
    )
    assert scheduler.timezone is berlin
    await run_until_done(scheduler, recorder)
    planned = [p for _, p, _ in recorder.calls]
    assert [p.isoformat() for p in planned] == [
        "2024-03-31T03:00:00+02:00",  # DST gap: the end of the gap
        "2024-04-01T02:30:00+02:00",
    ]


@pytest.mark.asyncio
async def test_missed_fires_are_coalesced_into_one() -> None:
    clock = FakeClock(datetime(2024, 5, 1, 10, 0, tzinfo=UTC))
    # after the first sleep, the machine "suspends" for 3 hours
    clock.jumps[1] = timedelta(hours=3)
    recorder = Recorder(clock, stop_after=2)
    scheduler = Scheduler(
        {"hourly": "@hourly"}, recorder, tz=UTC, clock=clock, sleep=clock.sleep, max_wait=60
    )
    await run_until_done(scheduler, recorder)
    (_, p1, c1), (_, p2, c2) = recorder.calls
    assert p1 == datetime(2024, 5, 1, 11, 0, tzinfo=UTC)  # the oldest missed time, once
    assert c1 == datetime(2024, 5, 1, 13, 1, tzinfo=UTC)  # seen late, after the jump
    assert p2 == datetime(2024, 5, 1, 14, 0, tzinfo=UTC)  # then the next one after now
    assert c2 == p2


@pytest.mark.asyncio
async def test_no_catch_up_at_start() -> None:
    clock = FakeClock(datetime(2024, 5, 1, 10, 0, 0, 1, tzinfo=UTC))
    recorder = Recorder(clock, stop_after=1)
    scheduler = Scheduler(
        {"a": "0 10 * * *"}, recorder, tz=UTC, clock=clock, sleep=clock.sleep, max_wait=3600
    )
    assert scheduler.next_fires() == {"a": datetime(2024, 5, 2, 10, 0, tzinfo=UTC)}
    await run_until_done(scheduler, recorder)
    assert recorder.calls[0][1] == datetime(2024, 5, 2, 10, 0, tzinfo=UTC)


@pytest.mark.asyncio
async def test_a_failing_callback_is_logged_and_scheduling_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock(datetime(2024, 5, 1, 10, 0, tzinfo=UTC))
    calls: list[datetime] = []
    done = anyio.Event()

    async def callback(name: str, planned: datetime) -> None:
        calls.append(planned)
        if len(calls) == 3:
            done.set()
        if len(calls) == 1:
            raise RuntimeError("queue full")

    scheduler = Scheduler(
        {"a": "* * * * *"}, callback, tz=UTC, clock=clock, sleep=clock.sleep, max_wait=60
    )
    with caplog.at_level(logging.ERROR, logger="vdistream.service.schedule"):
        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                await tg.start(scheduler.run)
                await done.wait()
                tg.cancel_scope.cancel()
    assert len(calls) == 3
    assert [r.getMessage() for r in caplog.records] == ["schedule_callback_failed"]


@pytest.mark.asyncio
async def test_cancellation_stops_cleanly_and_leaves_no_task() -> None:
    before = asyncio.all_tasks()
    started = anyio.Event()

    async def callback(name: str, planned: datetime) -> None:
        raise AssertionError("must not fire")

    # the real clock and the real sleep: a schedule a year away
    scheduler = Scheduler({"a": "0 0 1 1 *"}, callback, tz=UTC, max_wait=30)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            await tg.start(scheduler.run)
            started.set()
            await anyio.sleep(0.05)
            tg.cancel_scope.cancel()
    assert started.is_set()
    assert asyncio.all_tasks() == before


@pytest.mark.asyncio
async def test_cancellation_during_the_callback_propagates() -> None:
    clock = FakeClock(datetime(2024, 5, 1, 10, 0, tzinfo=UTC))
    entered = anyio.Event()
    finished = False

    async def callback(name: str, planned: datetime) -> None:
        nonlocal finished
        entered.set()
        await anyio.sleep_forever()
        finished = True

    scheduler = Scheduler({"a": "* * * * *"}, callback, tz=UTC, clock=clock, sleep=clock.sleep)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(scheduler.run)
            await entered.wait()
            tg.cancel_scope.cancel()
    assert not finished


@pytest.mark.asyncio
async def test_no_schedules_still_waits_in_bounded_steps() -> None:
    clock = FakeClock(START)

    async def callback(name: str, planned: datetime) -> None:
        raise AssertionError

    scheduler = Scheduler({}, callback, tz=UTC, clock=clock, sleep=clock.sleep, max_wait=5)
    assert scheduler.next_fires() == {}
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            await tg.start(scheduler.run)
            while len(clock.sleeps) < 3:
                await anyio.lowlevel.checkpoint()
            tg.cancel_scope.cancel()
    assert set(clock.sleeps) == {5}


@pytest.mark.asyncio
async def test_bad_arguments() -> None:
    async def callback(name: str, planned: datetime) -> None:
        pass

    with pytest.raises(ValueError, match="max_wait"):
        Scheduler({}, callback, max_wait=0)
    with pytest.raises(CronError, match="fields"):
        Scheduler({"a": "* *"}, callback)
    naive = Scheduler({"a": "* * * * *"}, callback, tz=UTC, clock=lambda: datetime(2024, 1, 1))
    with pytest.raises(ValueError, match="aware"):
        await naive.run()
