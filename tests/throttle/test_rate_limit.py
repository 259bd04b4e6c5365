"""RateLimit and Limits on virtual time (``tests.throttle.virtual``): rates, fairness,
live changes, several limits, cancellation; and parse_rate's language."""

from __future__ import annotations

import anyio
import pytest

from tests.throttle.virtual import run
from vdistream.errors import ConfigError
from vdistream.throttle import Limits, RateLimit, format_rate, parse_rate, shared_limits, sharing

KIB, MIB = 1024, 1024 * 1024


# --- parse_rate / format_rate ---------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "rate"),
    [
        ("200M", 200 * MIB),
        ("200m", 200 * MIB),
        ("200MiB", 200 * MIB),
        ("200M/s", 200 * MIB),
        ("1.5G", 1536 * MIB),
        ("500K", 500 * KIB),
        ("1T", 1024**4),
        ("10MB", 10_000_000),
        ("2kb", 2000),
        ("100", 100),
        ("100B", 100),
        (" 3 M ", 3 * MIB),
        ("0", None),
        ("0M", None),
        ("off", None),
        ("Unlimited", None),
        ("none", None),
        (0, None),
        (4096, 4096),
        (None, None),
    ],
)
def test_parse_rate(text: str | int | None, rate: int | None) -> None:
    assert parse_rate(text) == rate


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("fast", "--max-rate: 'fast' is not a rate"),
        ("200X", "--max-rate: '200X' is not a rate"),
        ("-5M", "--max-rate: '-5M' is not a rate"),
        ("", "--max-rate: '' is not a rate"),
        ("0.5", "--max-rate: '0.5' is less than 1 byte per second"),
        (-1, "--max-rate: -1 is negative"),
        (True, "--max-rate: expected a rate like 200M, got bool"),
        (1.5, "--max-rate: expected a rate like 200M, got float"),
        ("1025T", "--max-rate: '1025T' is more than 1024T (a pebibyte) per second"),
        # float() makes these digits infinite: refused, not an OverflowError
        ("9" * 400, "--max-rate: '9999999999999999999999999999999...(402 characters) is more"),
        (10**40, "--max-rate: 10000000000000000000000000000000...(41 characters) is more than"),
        (1024**5 + 1, "--max-rate: 1125899906842625 is more than 1024T (a pebibyte) per second"),
    ],
)
def test_parse_rate_refuses(value: object, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_rate(value, what="--max-rate")  # type: ignore[arg-type]
    text = str(caught.value)
    assert text.startswith(message)
    assert "\n" not in text


@pytest.mark.parametrize("rate", [None, 1, 1000, 1024, 200 * MIB, 1536 * MIB, 3 * 1024**4, 12345])
def test_format_rate_reads_back(rate: int | None) -> None:
    assert parse_rate(format_rate(rate).removesuffix("/s")) == rate
    assert parse_rate(format_rate(rate)) == rate


def test_format_rate() -> None:
    assert format_rate(200 * MIB) == "200M/s"
    assert format_rate(None) == "unlimited"
    assert format_rate(1000) == "1000/s"


def test_set_rate_outside_an_event_loop() -> None:
    """A limit made and changed before any event loop runs (settings, a host
    application): no tokens were counted yet, so there is no clock to read."""
    limit = RateLimit(5 * MIB, name="global")
    limit.set_rate(7 * MIB)
    limit.set_rate(None)
    limit.set_rate(MIB)
    assert limit.rate == MIB

    async def main() -> float:
        start = anyio.current_time()
        await limit.acquire(MIB // 4)  # the bucket starts empty: 0.25 s at 1 MiB/s
        return anyio.current_time() - start

    assert run(main) == pytest.approx(0.25, abs=0.001)


def test_set_rate_checks() -> None:
    limit = RateLimit(name="job")
    with pytest.raises(ValueError, match=r"positive integer up to 1024\*\*5, or None"):
        limit.set_rate(-3)
    with pytest.raises(ValueError, match="up to 1024"):
        limit.set_rate(1024**5 + 1)  # the bucket's float arithmetic would overflow
    limit.set_rate(0)
    assert limit.rate is None
    assert repr(RateLimit(MIB, name="job")) == "RateLimit(1M/s, name='job')"


# --- rates on virtual time -------------------------------------------------------------


async def _taker(limits: Limits, chunk: int, until: float, moved: list[int], index: int) -> None:
    while anyio.current_time() < until:
        await limits.take(chunk)
        moved[index] += chunk


def test_unlimited_never_waits() -> None:
    async def main() -> float:
        limit = RateLimit()
        start = anyio.current_time()
        for _ in range(1000):
            await limit.acquire(MIB)
        assert not Limits([limit]).active
        return anyio.current_time() - start

    assert run(main) == 0.0


def test_one_taker_moves_at_the_rate() -> None:
    async def main() -> float:
        limit = RateLimit(10 * MIB)
        start = anyio.current_time()
        for _ in range(100):  # 100 MiB at 10 MiB/s
            await limit.acquire(MIB)
        return anyio.current_time() - start

    # the bucket starts empty and holds 2.5 MiB at most: each request waits for its bytes
    assert run(main) == pytest.approx(10.0, abs=0.01)


def test_devices_share_fairly_and_every_5s_window_is_honoured() -> None:
    """Four devices, 1 MiB transfers, 100 MiB/s for 30 s: each gets a quarter, and the
    bytes of every 5-second window (sampled every 0.25 s) are within 10 % of 500 MiB."""

    async def main() -> tuple[list[int], list[int]]:
        limits = Limits([RateLimit(100 * MIB)])
        moved, samples = [0, 0, 0, 0], []
        until = anyio.current_time() + 30
        async with anyio.create_task_group() as tg:
            for i in range(4):
                tg.start_soon(_taker, limits, MIB, until, moved, i)
            while anyio.current_time() < until:
                samples.append(sum(moved))
                await anyio.sleep(0.25)
        return moved, samples

    moved, samples = run(main)
    assert max(moved) - min(moved) <= MIB  # first come, first served: turns alternate
    windows = [b - a for a, b in zip(samples, samples[20:], strict=False)]
    assert len(windows) > 90
    worst = max(abs(w - 500 * MIB) / (500 * MIB) for w in windows)
    assert worst < 0.10, worst


def test_unequal_devices_get_equal_turns() -> None:
    """A device with small transfers is not starved by one with large ones: they take
    turns, so the small one waits for one large transfer at most."""

    async def main() -> list[int]:
        limits = Limits([RateLimit(MIB)])
        turns = [0, 0]

        async def take(index: int, chunk: int) -> None:
            while anyio.current_time() < 20:
                await limits.take(chunk)
                turns[index] += 1

        async with anyio.create_task_group() as tg:
            tg.start_soon(take, 0, 256 * KIB)
            tg.start_soon(take, 1, 16 * KIB)
        return turns

    small_or_large = run(main)
    assert abs(small_or_large[0] - small_or_large[1]) <= 1


def test_raising_the_rate_wakes_a_sleeping_waiter() -> None:
    """At 1 KiB/s a 1 MiB transfer leaves the bucket ~17 minutes in debt; the next one
    waits for it, and a new rate set 2 s into that wait lets it go right away."""

    async def main() -> float:
        limit = RateLimit(KIB)
        done = anyio.Event()

        async def wait() -> None:
            await limit.acquire(MIB)  # passes once the bucket is full (256 bytes)
            await limit.acquire(MIB)  # pays the debt first
            done.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(wait)
            await anyio.sleep(2)
            assert not done.is_set()
            assert limit.waiting == 1
            limit.set_rate(100 * MIB)
            start = anyio.current_time()
            await done.wait()
            waited = anyio.current_time() - start
        return waited

    # at the new rate: the debt (~1 MiB) and the request (1 MiB), 2 MiB at 100 MiB/s
    assert run(main) == pytest.approx(0.02, abs=0.001)


def test_removing_the_limit_releases_every_waiter() -> None:
    async def main() -> float:
        limits = Limits([RateLimit(KIB)])
        async with anyio.create_task_group() as tg:
            for _ in range(4):
                tg.start_soon(limits.take, MIB)
            await anyio.sleep(5)
            limits.limits[0].set_rate(None)
            start = anyio.current_time()
        return anyio.current_time() - start

    assert run(main) == 0.0


def test_lowering_the_rate_applies_within_a_second() -> None:
    """100 MiB/s, then 10 MiB/s from t=5: the second after the change already moves at
    the new rate (sampled every 0.25 s)."""

    async def main() -> list[tuple[float, int]]:
        limit = RateLimit(100 * MIB)
        limits = Limits([limit])
        moved, samples = [0, 0], []
        start = anyio.current_time()
        async with anyio.create_task_group() as tg:
            for i in range(2):
                tg.start_soon(_taker, limits, MIB, start + 12, moved, i)
            while anyio.current_time() < start + 12:
                if anyio.current_time() >= start + 5 and limit.rate != 10 * MIB:
                    limit.set_rate(10 * MIB)
                samples.append((anyio.current_time() - start, sum(moved)))
                await anyio.sleep(0.25)
        return samples

    samples = dict(run(main))
    assert samples[5.0] - samples[0.0] == pytest.approx(500 * MIB, rel=0.05)
    after = samples[11.0] - samples[6.0]  # from 1 s after the change
    assert after == pytest.approx(50 * MIB, rel=0.1)
    assert samples[6.0] - samples[5.0] <= 12 * MIB  # the first second is already slow


def test_several_limits_the_slowest_wins() -> None:
    """Two jobs of 4 devices each, each job limited to 40 MiB/s, all under a global
    limit of 30 MiB/s: together 30 MiB/s; alone a job gets its own 40."""

    async def main() -> tuple[list[int], list[int]]:
        glob = RateLimit(30 * MIB, name="global")
        jobs = [Limits([RateLimit(40 * MIB), glob]) for _ in range(2)]
        moved = [0] * 8
        async with anyio.create_task_group() as tg:
            for i in range(8):
                tg.start_soon(_taker, jobs[i // 4], 256 * KIB, 20.0 + 1000, moved, i)
        together = list(moved)
        moved = [0] * 4
        glob.set_rate(None)
        async with anyio.create_task_group() as tg:
            for i in range(4):
                tg.start_soon(_taker, jobs[0], 256 * KIB, anyio.current_time() + 10, moved, i)
        return together, moved

    together, alone = run(main)
    assert sum(together) == pytest.approx(20 * 30 * MIB, rel=0.03)
    # each job gets about half of the global limit
    assert sum(together[:4]) == pytest.approx(sum(together[4:]), rel=0.1)
    assert sum(alone) == pytest.approx(10 * 40 * MIB, rel=0.03)


def test_a_cancelled_waiter_leaves_the_line() -> None:
    """A waiter cancelled by its caller gives up its place and takes no tokens: the
    next one is served as if it never came."""

    async def main() -> float:
        limit = RateLimit(MIB)
        await limit.acquire(MIB)  # the bucket is empty now, in debt by 1 MiB - burst
        with anyio.move_on_after(0.1):
            await limit.acquire(MIB)
        assert limit.waiting == 0
        start = anyio.current_time()
        await limit.acquire(KIB)
        return anyio.current_time() - start

    # the debt of the first request (0.75 MiB) is paid, then 1 KiB: ~0.65 s from t=0.1
    assert run(main) == pytest.approx(0.75 - 0.1 + 1 / 1024, abs=0.01)


def test_release_lets_waiters_go_and_later_ones_pass() -> None:
    async def main() -> tuple[float, float]:
        limits = Limits([RateLimit(KIB)])
        async with anyio.create_task_group() as tg:
            for _ in range(3):
                tg.start_soon(limits.take, MIB)
            await anyio.sleep(1)
            assert limits.waiting
            limits.release()
            start = anyio.current_time()
        first = anyio.current_time() - start
        assert not limits.active
        await limits.take(MIB)
        return first, anyio.current_time() - start

    assert run(main) == (0.0, 0.0)


def test_sharing_puts_limits_in_effect_for_the_block() -> None:
    a, b = RateLimit(MIB, name="global"), RateLimit(KIB, name="db")
    assert shared_limits() == ()
    with sharing(a):
        assert shared_limits() == (a,)
        with sharing(b):
            assert shared_limits() == (a, b)
        assert shared_limits() == (a,)
    assert shared_limits() == ()
    assert Limits([a, b, a]).limits == (a, b)
