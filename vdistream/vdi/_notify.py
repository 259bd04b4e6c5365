"""A level-triggered wake-up used by every wait in a device set.

Waiters re-check their condition after each wake-up, so a notification can never be
lost and a spurious one costs only a re-check. Events are created lazily inside the
waiting task, so set objects can be built outside a running event loop.
"""

from __future__ import annotations

import math

import anyio

__all__ = ("Notifier",)


class Notifier:
    __slots__ = ("_events",)

    def __init__(self) -> None:
        self._events: set[anyio.Event] = set()

    def notify_all(self) -> None:
        if self._events:
            events, self._events = self._events, set()
            for event in events:
                event.set()

    async def wait(self, deadline: float | None) -> None:
        """Wait for the next notification or until ``deadline`` (monotonic clock)."""
        event = anyio.Event()
        self._events.add(event)
        try:
            with anyio.CancelScope(deadline=math.inf if deadline is None else deadline):
                await event.wait()
        finally:
            self._events.discard(event)
