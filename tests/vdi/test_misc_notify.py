"""The wake-up under every wait of a device set (``vdistream.vdi._notify``): every
waiter is woken, a deadline ends a wait without an error, a cancelled or finished wait
leaves nothing behind; the same on the anyio path used off asyncio."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import anyio
import pytest

from vdistream.vdi._notify import Notifier, _wake

pytestmark = pytest.mark.asyncio

Wait = Callable[[Notifier, float | None], Awaitable[None]]


@pytest.fixture(params=["asyncio", "anyio"])
def wait(request: pytest.FixtureRequest) -> Wait:
    """``wait(notifier, deadline)`` on one of the two paths."""
    if request.param == "asyncio":
        return lambda notifier, deadline: notifier.wait(deadline)
    return lambda notifier, deadline: notifier._wait_anyio(deadline)


async def test_notify_all_wakes_every_waiter(wait: Wait) -> None:
    notifier = Notifier()
    woken: list[int] = []

    async def waiter(number: int) -> None:
        await wait(notifier, None)
        woken.append(number)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            for number in range(3):
                tg.start_soon(waiter, number)
            await anyio.wait_all_tasks_blocked()
            assert len(notifier._waiters) == 3
            notifier.notify_all()
    assert sorted(woken) == [0, 1, 2]
    assert not notifier._waiters


async def test_a_deadline_ends_the_wait_quietly(wait: Wait) -> None:
    notifier = Notifier()
    with anyio.fail_after(5):
        await wait(notifier, time.monotonic() + 0.01)
        await wait(notifier, time.monotonic() - 1)  # already past
    assert not notifier._waiters


async def test_a_cancelled_wait_leaves_no_waiter(wait: Wait) -> None:
    notifier = Notifier()
    with anyio.fail_after(5):
        with anyio.CancelScope() as scope:
            async with anyio.create_task_group() as tg:
                tg.start_soon(wait, notifier, None)
                await anyio.wait_all_tasks_blocked()
                assert len(notifier._waiters) == 1
                scope.cancel()
    assert scope.cancelled_caught
    assert not notifier._waiters
    notifier.notify_all()  # nothing left to wake: no error


async def test_a_notified_waiter_with_a_deadline_leaves_no_timer(wait: Wait) -> None:
    notifier = Notifier()
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(wait, notifier, time.monotonic() + 3600)
            await anyio.wait_all_tasks_blocked()
            notifier.notify_all()
    assert not notifier._waiters
    pending = [
        handle
        for handle in asyncio.get_running_loop()._scheduled  # type: ignore[attr-defined]
        if handle._callback is _wake and not handle.cancelled()
    ]
    assert pending == []
