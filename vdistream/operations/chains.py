"""Restore a SQL Server database to a point in time from a chain of backups.

``run_chain_restore(dest, target, to=...)`` reads every manifest in ``dest``, lets
``vdistream.catalog.chain.plan_restore`` choose the full backup, the latest usable
differential and the log backups in LSN order (refusing with ``ChainGapError`` when
the chain has a gap), and restores them one job after the other: ``NORECOVERY`` until
the last, which gets ``RECOVERY`` (and ``STOPAT`` when the point lies inside it). The
first failing step ends the chain; a database that did not exist before is dropped
again, so a failed restore leaves no target.
"""

from __future__ import annotations

import dataclasses
import datetime

from vdistream.catalog import list_manifests
from vdistream.catalog.chain import RestorePlan, RestoreStep, plan_restore
from vdistream.coordinator import JobResult
from vdistream.operations.core import JobHook, opened_storage, restore_sqlserver
from vdistream.operations.keys import KeySource
from vdistream.operations.sqlserver import (
    SqlRestoreOptions,
    check_target,
    database_state,
    drop_after_failure,
)
from vdistream.sqlserver.url import MssqlURL

__all__ = ("ChainOutcome", "run_chain_restore")


@dataclasses.dataclass(frozen=True)
class ChainOutcome:
    """The plan and each step's job result, in order (up to the first failure)."""

    plan: RestorePlan
    steps: tuple[tuple[RestoreStep, JobResult], ...]

    @property
    def ok(self) -> bool:
        return len(self.steps) == len(self.plan.steps) and all(r.ok for _, r in self.steps)

    @property
    def error(self) -> BaseException | None:
        return next((r.error for _, r in self.steps if not r.ok), None)

    @property
    def bytes(self) -> int:
        return sum(r.bytes for _, r in self.steps)


async def run_chain_restore(
    dest: str,
    target: str,
    *,
    to: datetime.datetime | None,
    database: str | None = None,
    replace: bool = False,
    norecovery: bool = False,
    moves: tuple[tuple[str, str], ...] = (),
    sqlvdi: str | None = None,
    keys: KeySource | None = None,
    on_job: JobHook | None = None,
) -> ChainOutcome:
    """Restore ``database`` (default: the target's name) as it was at ``to`` (aware;
    ``None``: the latest the backups in ``dest`` reach) into ``target``; with
    ``norecovery`` the last step too leaves it RESTORING, for more logs to follow."""
    url = MssqlURL.parse(target)
    async with opened_storage(dest) as storage:
        manifests, _problems = await list_manifests(storage)
        plan = plan_restore(manifests, database or url.database, to)
        by_id = {m.backup_id: m for m in manifests}
        state = await database_state(url)
        check_target(by_id[plan.steps[0].manifest_id], url, state, replace)
        existed = state is not None
        done: list[tuple[RestoreStep, JobResult]] = []
        outcome = None
        try:
            for index, step in enumerate(plan.steps):
                options = SqlRestoreOptions(
                    replace=replace and index == 0,
                    recovery=step.recovery and not norecovery,
                    moves=moves if index == 0 else (),
                    stopat=step.stopat,
                    sqlvdi=sqlvdi,
                )
                manifest = by_id[step.manifest_id].relocated(storage.url)
                result = await restore_sqlserver(
                    storage, manifest, target, options, keys=keys, on_job=on_job, existed=True
                )
                done.append((step, result))
                if not result.ok:
                    break
            outcome = ChainOutcome(plan, tuple(done))
            return outcome
        finally:
            # failed, or interrupted (Ctrl-C, SIGTERM): what the chain made goes again
            if (outcome is None or not outcome.ok) and not existed:
                await drop_after_failure(url)
