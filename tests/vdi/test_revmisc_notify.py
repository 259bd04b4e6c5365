"""The wake-up of a device set chooses its path by the waiting task, not by whether an
asyncio loop runs: trio run as a guest of an asyncio loop (``start_guest_run``) has a
running asyncio loop, but its tasks cannot await an asyncio future. trio is a test
dependency (pyproject.toml's test extra), not one of vdistream's."""

from __future__ import annotations

import asyncio
import time

import anyio
import trio

from vdistream.vdi._notify import Notifier


async def wake_three_then_time_out() -> tuple[list[int], bool, int]:
    notifier = Notifier()
    woken: list[int] = []

    async def waiter(number: int) -> None:
        await notifier.wait(None)
        woken.append(number)

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            for number in range(3):
                tg.start_soon(waiter, number)
            await anyio.wait_all_tasks_blocked()
            notifier.notify_all()
        with anyio.move_on_after(0.01) as scope:
            await notifier.wait(None)  # cancelled by the scope
        await notifier.wait(time.monotonic() + 0.01)  # ended by its deadline
    return sorted(woken), scope.cancelled_caught, len(notifier._waiters)


def test_waits_under_trio() -> None:
    assert trio.run(wake_three_then_time_out) == ([0, 1, 2], True, 0)


def test_waits_under_trio_as_a_guest_of_asyncio() -> None:
    async def host() -> object:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[object] = loop.create_future()
        trio.lowlevel.start_guest_run(
            wake_three_then_time_out,
            run_sync_soon_threadsafe=loop.call_soon_threadsafe,
            done_callback=done.set_result,
            host_uses_signal_set_wakeup_fd=True,
        )
        outcome = await done
        return outcome.unwrap()  # type: ignore[attr-defined]

    assert asyncio.run(host()) == ([0, 1, 2], True, 0)
