"""An asyncio event loop on virtual time: when nothing is ready, the clock jumps to the
next timer instead of sleeping, so waits of minutes take microseconds and measure
exactly (``run(main)``). I/O still works (it is polled without blocking first)."""

from __future__ import annotations

import asyncio
import selectors
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

__all__ = ("run",)

_T = TypeVar("_T")


class _Selector(selectors.DefaultSelector):
    now = 1000.0

    def select(self, timeout: float | None = None) -> list[Any]:
        ready: list[Any] = super().select(0)
        if ready or (timeout is not None and timeout <= 0):
            return ready
        if timeout is None:  # nothing scheduled: only I/O (a thread) can wake the loop
            return super().select(None)
        # at least the loop's clock resolution: a timer due in less than a float step
        # of ``now`` must still come due
        self.now += max(timeout, 1e-9)
        return []


class VirtualLoop(asyncio.SelectorEventLoop):
    def __init__(self) -> None:
        self._virtual = _Selector()
        super().__init__(self._virtual)

    def time(self) -> float:
        return self._virtual.now


def run(main: Callable[[], Awaitable[_T]]) -> _T:
    """Run ``main()`` on a fresh virtual-time loop (anyio's asyncio backend)."""

    async def wrapped() -> _T:
        return await main()

    with asyncio.Runner(loop_factory=VirtualLoop) as runner:
        return runner.run(wrapped())
