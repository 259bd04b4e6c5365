"""A level-triggered wake-up used by every wait in a device set.

Waiters re-check their condition after each wake-up, so a notification can never be
lost and a spurious one costs only a re-check. Waiters are created lazily inside the
waiting task, so set objects can be built outside a running event loop.

On asyncio (what vdistream runs on) a waiter is a bare future of the running loop and
a deadline is a timer that wakes it (``loop.call_at``): no ``anyio.Event`` and no
cancel scope per wait, which is most of what a command round trip costs otherwise.
Cancellation reaches the awaiting task as on any asyncio wait (anyio's cancel scopes
cancel the task). Anywhere else (trio, also trio run as a guest of an asyncio loop:
a loop is running there, but the waiting task is not asyncio's) the same contract is
kept with an ``anyio.Event`` inside a cancel scope with the deadline.
"""

from __future__ import annotations

import asyncio
import time

import anyio

__all__ = ("Notifier",)


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class Notifier:
    __slots__ = ("_waiters",)

    def __init__(self) -> None:
        self._waiters: set[asyncio.Future[None] | anyio.Event] = set()

    def notify_all(self) -> None:
        if self._waiters:
            waiters, self._waiters = self._waiters, set()
            for waiter in waiters:
                if isinstance(waiter, asyncio.Future):
                    if not waiter.done():
                        waiter.set_result(None)
                else:
                    waiter.set()

    async def wait(self, deadline: float | None) -> None:
        """Wait for the next notification or until ``deadline`` (monotonic clock: the
        clock of asyncio's loop and of anyio's deadlines)."""
        try:
            task = asyncio.current_task()
        except RuntimeError:  # no asyncio loop in this thread
            task = None
        if task is None:
            # not an asyncio task: trio, or trio as a guest inside an asyncio loop
            # (a loop runs, but a bare future cannot be awaited from trio's tasks)
            await self._wait_anyio(deadline)
            return
        loop = task.get_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        self._waiters.add(waiter)
        timer = None
        if deadline is not None:
            # call_at takes the loop's clock; time.monotonic() is asyncio's default one
            timer = loop.call_at(loop.time() + (deadline - time.monotonic()), _wake, waiter)
        try:
            await waiter
        finally:
            self._waiters.discard(waiter)
            if timer is not None:
                timer.cancel()

    async def _wait_anyio(self, deadline: float | None) -> None:
        event = anyio.Event()
        self._waiters.add(event)
        try:
            with anyio.CancelScope(deadline=float("inf") if deadline is None else deadline):
                await event.wait()
        finally:
            self._waiters.discard(event)
