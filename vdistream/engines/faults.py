"""Fault injection for engines: fail, abort or stall at a chosen point of a job.

An engine built with ``fail_at=FailPoint(phase, action)`` behaves normally until it
reaches ``phase``, then:

* ``Action.SIGNAL_ABORT``: calls ``signal_abort()`` on the set (as SQL Server does when
  it decides to give up), then fails with ``InjectedFaultError``;
* ``Action.RAISE``: raises ``InjectedFaultError`` as an internal engine error would; the
  engine's failure path then aborts and closes the set;
* ``Action.STALL``: stops sending commands and waits, forever, until the set is aborted
  (by the client, say its stall watchdog) or the task is cancelled; then it fails with
  ``EngineAbortedError``. Other tasks of the engine that try to send a command join the
  stall, so nothing new reaches the client.

Phases (where each fires):

* ``BEFORE_CONFIGURATION``: the set is open, ``begin_configuration`` not yet called;
* ``AFTER_CONFIGURATION``: ``end_configuration`` ran (the client's
  ``get_configuration`` returns), no device is open on the engine's side yet;
* ``MID_STREAM``: data is flowing: at least ``after_commands`` data commands (READ or
  WRITE) and ``after_bytes`` bytes have been sent, and every device has a buffer out:
  a command in flight (sent, its result not yet taken by the engine) or, in a
  restore, read data not yet reassembled. If the data ends first, it fires after
  the last data command was sent (backup) or the last device reached its end (restore);
* ``DURING_FLUSH`` (backup): FLUSH was sent on every device and (within a second)
  taken by the client, before the engine awaits its completion (with a set served by
  another process: sent, as nothing tells the engine when the client took it);
* ``DURING_CLEAR_ERROR`` (restore): the first device to reach the end of its stream
  sent CLEAR_ERROR and the client took it, before the engine awaits its completion;
* ``BEFORE_CLOSE``: every command completed, no device closed yet.

The checks live in ``FaultySession``, the ``ServerSession`` an engine runs only when it
has a fail point (``session_for``): without one, no command pays for them.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Sequence
from typing import Any

import anyio

from vdistream.engines.base import EngineError
from vdistream.engines.session import DATA_COMMANDS, ServerSession
from vdistream.protocol import CommandCode
from vdistream.vdi import PendingCommand
from vdistream.vdi.contract import PendingResult

__all__ = ("Action", "FailPoint", "FaultySession", "InjectedFaultError", "Phase", "session_for")

#: How often a stalled engine looks whether the set was aborted: the server side offers
#: no "wait for abort" call, and a stall must end promptly when the client gives up.
STALL_POLL_SECONDS = 0.005
#: How long a DURING_* fault waits for the client to take the commands it is "during".
TAKE_WAIT_SECONDS = 1.0


class Phase(enum.Enum):
    BEFORE_CONFIGURATION = "before_configuration"
    AFTER_CONFIGURATION = "after_configuration"
    MID_STREAM = "mid_stream"
    DURING_FLUSH = "during_flush"
    DURING_CLEAR_ERROR = "during_clear_error"
    BEFORE_CLOSE = "before_close"


class Action(enum.Enum):
    SIGNAL_ABORT = "signal_abort"
    RAISE = "raise"
    STALL = "stall"


@dataclasses.dataclass(frozen=True, slots=True)
class FailPoint:
    """Where (``phase``) and how (``action``) the engine fails; see the module docstring."""

    phase: Phase
    action: Action = Action.RAISE
    after_commands: int = 0
    after_bytes: int = 0

    def __post_init__(self) -> None:
        if self.after_commands < 0 or self.after_bytes < 0:
            raise ValueError("after_commands and after_bytes must not be negative")


class InjectedFaultError(EngineError):
    """The failure a ``FailPoint`` asked for."""

    def __init__(
        self, point: FailPoint, *, set_name: str | None = None, device: str | None = None
    ) -> None:
        self.point = point
        super().__init__(
            f"injected fault: {point.action.value} at {point.phase.value}",
            set_name=set_name,
            device=device,
        )


def _taken(pending: PendingResult) -> bool:
    """Whether the client took ``pending`` (or it completed). Only an in-process set
    can tell when the client took a command; a command sent to a set in another process
    counts as taken once sent (its record is on the way)."""
    if pending.done():
        return True
    return not isinstance(pending, PendingCommand) or pending.command is not None


def session_for(set_name: str, fail_at: FailPoint | None, **options: Any) -> ServerSession:
    """The session of one run: a plain ``ServerSession`` unless there is a fail point."""
    if fail_at is None:
        return ServerSession(set_name, **options)
    return FaultySession(set_name, fail_at, **options)


class FaultySession(ServerSession):
    """A ``ServerSession`` that fires ``point`` where the module docstring says."""

    def __init__(self, set_name: str, point: FailPoint, **options: Any) -> None:
        super().__init__(set_name, **options)
        self.point = point
        self.data_commands = 0
        self.data_bytes = 0
        self._fired = False
        self._stalled = False

    async def send(
        self,
        index: int,
        code: CommandCode,
        size: int = 0,
        position: int = 0,
        buffer: memoryview | None = None,
    ) -> PendingResult:
        """Send (joining a stall in progress); a data command may fire MID_STREAM."""
        if self._stalled:
            await self.stall()
        pending = await super().send(index, code, size, position, buffer)
        if code in DATA_COMMANDS:
            self.data_commands += 1
            self.data_bytes += size
            point = self.point
            if (
                point.phase is Phase.MID_STREAM
                and not self._fired
                and self.data_commands >= point.after_commands
                and self.data_bytes >= point.after_bytes
                and all(self.outstanding(i) for i in range(self.device_count))
            ):
                await self.fault(Phase.MID_STREAM)
        return pending

    async def fault(
        self, phase: Phase, device: int | None = None, *, sent: Sequence[PendingResult] = ()
    ) -> None:
        """Fire the fail point if it names ``phase`` and has not fired yet.

        ``sent`` are the commands the phase is "during" (FLUSH, CLEAR_ERROR): the fault
        waits (briefly, bounded) until the client has taken them, so that it really
        strikes while the client holds them.
        """
        point = self.point
        if point.phase is not phase or self._fired:
            return
        self._fired = True
        with anyio.move_on_after(TAKE_WAIT_SECONDS):
            while not all(_taken(p) for p in sent):  # noqa: ASYNC110
                await anyio.sleep(STALL_POLL_SECONDS)
        self.log.info("fault_injected", phase=phase.value, action=point.action.value)
        if point.action is Action.STALL:
            await self.stall()
        error = InjectedFaultError(point, set_name=self.set_name, device=self.device_label(device))
        self.record_failure(error)
        if point.action is Action.SIGNAL_ABORT:
            self.sds.signal_abort()
        raise error

    async def stall(self) -> None:
        """Send nothing more; wait until the set is aborted, then raise."""
        self._stalled = True
        while self.sds.abort_reason is None:  # noqa: ASYNC110 - no event to wait on (see above)
            await anyio.sleep(STALL_POLL_SECONDS)
        raise self.aborted_error()
