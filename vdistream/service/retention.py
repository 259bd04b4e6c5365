"""Which backups to keep and which to delete: a pure function, no I/O.

``plan_retention(backups, policy, now) -> RetentionPlan(keep, delete, reasons)``.

The rules, in the order they are applied
----------------------------------------

Backups are ordered newest first by ``(ended, id)``: ``ended`` decides, the id breaks
ties (ids are time + random, so they sort by creation). Duplicate ids are a
``ValueError``. ``ended`` must be aware.

1. **Future backups are left alone.** A backup whose ``ended`` is after ``now`` (clock
   skew, a clock that was wrong, or a backup that finished after ``now`` was read) is
   kept (``FUTURE``), is not counted by ``keep_last`` and cannot be the anchor below. A
   bad timestamp can therefore never push real backups out of ``keep_last``.
2. **Nothing is deleted until a backup is verified.** The *anchor* is the newest
   verified, non-future backup. Without one, everything is kept (``NO_VERIFIED``).
3. **The anchor is never deleted** (``NEWEST_VERIFIED``): the last good backup
   survives any policy, including one that would expire it by age.
4. **Only backups strictly older than the anchor may be deleted**: a backup whose
   ``ended`` is later than the anchor's is necessarily unverified and kept
   (``NEWER_THAN_VERIFIED``) until a newer backup is verified; one that ended at the
   very same instant as the anchor is kept too (``SAME_TIME_AS_VERIFIED``): "strictly
   older" compares ``ended`` only, the id tie-break never makes a backup deletable.
5. **An empty policy deletes nothing** (``RETENTION_OFF``).
6. Among the backups strictly older than the anchor, a backup is kept if **either** rule
   keeps it, otherwise deleted (``EXPIRED``):

   * ``keep_last = N`` keeps the N newest **verified** (non-future) backups, the anchor
     being the first of them (``KEEP_LAST``). Unverified backups neither count toward
     N nor are kept by this rule: an unverified backup older than the anchor (its
     verification failed, or never ran) is superseded by a verified newer one.
   * ``keep_within = D`` keeps every backup, verified or not, whose age ``now - ended``
     is at most D (``KEEP_WITHIN``; the boundary is inclusive).

7. **What a kept backup needs is kept** (``NEEDED``). Last, every backup that a kept
   backup (kept by any rule above, or by this one) lists in ``needs`` is kept too, in
   place of ``EXPIRED``: a SQL Server log backup needs its full and the log backups
   between them, a differential its full (``catalog.chain.dependencies``), so retention
   never deletes a full or a log that a kept backup needs to be restored. Ids in
   ``needs`` that are not among the backups given are ignored (already deleted, or
   another database's).

``reasons`` maps every backup id to the reasons that decided it (several when both
rules keep a backup, ``(EXPIRED,)`` for a deleted one). ``keep`` and ``delete`` are
newest first; every input backup is in exactly one of them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from types import MappingProxyType

__all__ = ("BackupInfo", "Reason", "RetentionPlan", "RetentionPolicy", "plan_retention")


@dataclass(frozen=True)
class RetentionPolicy:
    """``keep_last``: how many verified backups to keep (>= 1, or ``None``: rule off);
    ``keep_within``: keep every backup younger than this (> 0, or ``None``: rule off).
    With both off (the default) retention deletes nothing."""

    keep_last: int | None = None
    keep_within: timedelta | None = None

    def __post_init__(self) -> None:
        if self.keep_last is not None and (
            isinstance(self.keep_last, bool) or not isinstance(self.keep_last, int)
        ):
            raise TypeError("keep_last must be an int or None")
        if self.keep_last is not None and self.keep_last < 1:
            raise ValueError("keep_last must be >= 1 (or None to switch the rule off)")
        if self.keep_within is not None and self.keep_within <= timedelta(0):
            raise ValueError("keep_within must be > 0 (or None to switch the rule off)")

    @property
    def enabled(self) -> bool:
        """Whether any rule is set; a disabled policy keeps everything."""
        return self.keep_last is not None or self.keep_within is not None


@dataclass(frozen=True)
class BackupInfo:
    """One backup as retention sees it: its id, when it ended (aware), whether a
    verification (read back and checked) succeeded, and the ids of the backups it needs
    to be restored (its chain; empty for backups that stand alone)."""

    id: str
    ended: datetime
    verified: bool
    needs: frozenset[str] = frozenset()


class Reason(StrEnum):
    """Why a backup is kept or deleted; the value is the text for logs and the API."""

    FUTURE = "ended in the future (clock skew): kept and not counted"
    NO_VERIFIED = "no verified backup yet: nothing is deleted"
    NEWEST_VERIFIED = "newest verified backup: never deleted"
    NEWER_THAN_VERIFIED = "newer than the newest verified backup"
    SAME_TIME_AS_VERIFIED = "ended at the same time as the newest verified backup"
    RETENTION_OFF = "no retention rule set"
    KEEP_LAST = "among the keep_last newest verified backups"
    KEEP_WITHIN = "younger than keep_within"
    EXPIRED = "older than the newest verified backup and kept by no rule"
    NEEDED = "needed by a kept backup (its chain)"


@dataclass(frozen=True)
class RetentionPlan:
    """``keep`` and ``delete`` (newest first) partition the input; ``reasons`` maps
    each backup id to the reasons that decided it."""

    keep: tuple[BackupInfo, ...]
    delete: tuple[BackupInfo, ...]
    reasons: Mapping[str, tuple[Reason, ...]]


def plan_retention(
    backups: Sequence[BackupInfo], policy: RetentionPolicy, now: datetime
) -> RetentionPlan:
    """Decide which backups to keep and which to delete; the rules are in the module
    docstring. Pure: same inputs, same plan."""
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("now must be an aware datetime")
    seen: set[str] = set()
    for backup in backups:
        if backup.ended.tzinfo is None or backup.ended.utcoffset() is None:
            raise ValueError(f"backup {backup.id!r}: ended must be an aware datetime")
        if backup.id in seen:
            raise ValueError(f"backup id {backup.id!r} appears twice")
        seen.add(backup.id)

    ordered = sorted(backups, key=lambda b: (b.ended, b.id), reverse=True)
    reasons: dict[str, list[Reason]] = {b.id: [] for b in ordered}
    present = [b for b in ordered if b.ended <= now]
    for backup in ordered:
        if backup.ended > now:
            reasons[backup.id].append(Reason.FUTURE)

    verified = [b for b in present if b.verified]
    anchor = verified[0] if verified else None
    keep_last = set() if policy.keep_last is None else {b.id for b in verified[: policy.keep_last]}

    for backup in present:
        why = reasons[backup.id]
        if anchor is None:
            why.append(Reason.NO_VERIFIED)
            continue
        if backup is anchor:
            why.append(Reason.NEWEST_VERIFIED)
        elif backup.ended > anchor.ended:
            why.append(Reason.NEWER_THAN_VERIFIED)
        elif backup.ended == anchor.ended:
            why.append(Reason.SAME_TIME_AS_VERIFIED)
        if not policy.enabled:
            why.append(Reason.RETENTION_OFF)
            continue
        if backup.id in keep_last:
            why.append(Reason.KEEP_LAST)
        if policy.keep_within is not None and now - backup.ended <= policy.keep_within:
            why.append(Reason.KEEP_WITHIN)
        if not why:
            why.append(Reason.EXPIRED)

    _keep_needed(ordered, reasons)
    keep = tuple(b for b in ordered if reasons[b.id] != [Reason.EXPIRED])
    delete = tuple(b for b in ordered if reasons[b.id] == [Reason.EXPIRED])
    return RetentionPlan(
        keep=keep,
        delete=delete,
        reasons=MappingProxyType({k: tuple(v) for k, v in reasons.items()}),
    )


def _keep_needed(backups: Sequence[BackupInfo], reasons: dict[str, list[Reason]]) -> None:
    """Rule 7: what a kept backup needs, transitively, is kept (``NEEDED``)."""
    by_id = {b.id: b for b in backups}
    pending = [b for b in backups if reasons[b.id] != [Reason.EXPIRED]]
    while pending:
        for need in sorted(pending.pop().needs):
            if need in by_id and reasons[need] == [Reason.EXPIRED]:
                reasons[need] = [Reason.NEEDED]
                pending.append(by_id[need])
