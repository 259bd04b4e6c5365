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
  taken by the client, before the engine awaits its completion;
* ``DURING_CLEAR_ERROR`` (restore): the first device to reach the end of its stream
  sent CLEAR_ERROR and the client took it, before the engine awaits its completion;
* ``BEFORE_CLOSE``: every command completed, no device closed yet.
"""

from __future__ import annotations

import dataclasses
import enum

from vdistream.engines.base import EngineError

__all__ = ("Action", "FailPoint", "InjectedFaultError", "Phase")


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
