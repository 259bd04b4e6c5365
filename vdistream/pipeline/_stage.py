"""Pieces the transforming stages (compression, encryption) share.

A stage is a ``Sink`` wrapping a sink, or a ``Source`` wrapping a source, that changes
the bytes in between. They all follow the cancellation rule of
``vdistream.storage.base``: one checkpoint on entry, then the whole transfer shielded,
because a compressor or cipher that consumed part of a buffer cannot be rolled back.
"""

from __future__ import annotations

import enum

from vdistream.errors import PipelineError
from vdistream.storage import Source

__all__ = (
    "StageState",
    "byte_view",
    "check_sequential",
    "read_full",
    "require_state",
    "where",
)


class StageState(enum.Enum):
    """Where a transforming sink is in its life."""

    OPEN = "open"
    #: the frame or stream trailer is written; only the inner commit remains
    FINISHED = "finished"
    COMMITTED = "committed"
    ABORTED = "aborted"
    #: a write, flush or finish failed half-way: only abort() is still allowed
    FAILED = "failed"


def where(url: str, device: str | None = None) -> str:
    """The ``(device 'x', url)`` suffix every stage error ends with."""
    return f"(device {device!r}, {url})" if device is not None else f"({url})"


def byte_view(view: memoryview) -> memoryview:
    """``view`` as flat unsigned bytes, so lengths count bytes."""
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


def require_state(
    state: StageState, allowed: StageState, *, what: str, url: str, device: str | None
) -> None:
    """Refuse ``what`` unless the stage is in ``allowed``; the message says why not."""
    if state is allowed:
        return
    reason = {
        StageState.FINISHED: "the stream was already finished by commit",
        StageState.COMMITTED: "the stream is committed",
        StageState.ABORTED: "the stream was aborted",
        StageState.FAILED: "an earlier write, flush or commit failed",
    }.get(state, f"the stream is {state.value}")
    raise PipelineError(f"cannot {what}: {reason} {where(url, device)}")


def check_sequential(
    position: int | None, current: int, *, stage: str, url: str, device: str | None = None
) -> None:
    """Refuse a ``position=`` other than the current one: a stream cannot seek."""
    if position is not None and position != current:
        raise PipelineError(
            f"cannot access byte {position}: a {stage} stream is sequential and its next "
            f"byte is {current} {where(url, device)}"
        )


async def read_full(source: Source, view: memoryview) -> int:
    """Fill ``view`` from ``source``; fewer bytes only at the end of the object."""
    done = 0
    while done < view.nbytes:
        with view[done:] as rest:
            count = await source.readinto(rest)
        if not count:
            break
        done += count
    return done
