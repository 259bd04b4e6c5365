"""``vdistream prune``: retention applied to a destination by hand, without the daemon.

The rules come from the flags, else from the settings' ``[databases.NAME.retention]``
tables of the databases backed up to DEST. Never deleted: an unverified backup (the
state database of the settings says which are verified; ``--verify`` verifies the
others first), the newest verified one, one that a running daemon's job is using. Exit
1 when a deletion failed, 2 when no rule applies or the settings are invalid.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import anyio
import click

from vdistream.cli.framework import Params, logging_options, runs, say
from vdistream.cli.local import backups_in, destination
from vdistream.cli.output import emit
from vdistream.cli.params import DURATION, KEEP_LAST, Duration, format_duration

if TYPE_CHECKING:
    from vdistream.catalog import Manifest
    from vdistream.service.retention import RetentionPolicy
    from vdistream.service.settings import Settings

__all__ = ("prune",)


@click.command(
    "prune",
    short_help="Apply retention to a destination's backups (without the daemon).",
)
@click.argument("dest", help="A destination's name (from the settings), a directory or a URL.")
@click.option("--keep-last", type=KEEP_LAST, help="Keep the N newest verified backups.")
@click.option(
    "--keep-within", type=DURATION, help="Keep every backup younger than this (14d, 36h)."
)
@click.option("--database", help="Only this database's backups.")
@click.option("--verify", is_flag=True, help="Verify the backups not known to be verified first.")
@click.option("--dry-run", is_flag=True, help="Show what would go; delete nothing.")
@click.option("--json", "json_output", is_flag=True, help="Print one JSON object on stdout.")
@click.option("--config", help="The settings file (retention policies, state database).")
@logging_options
@runs("deletions already made stay made")
async def prune(params: Params) -> int:
    """Apply retention to DEST's backups: never an unverified one, never the newest
    verified one, never one a daemon's job is using."""
    from vdistream.service.backups import apply_retention, group_of
    from vdistream.service.retention import RetentionPolicy
    from vdistream.service.serve import config_path
    from vdistream.service.settings import SettingsError, load_settings

    settings: Settings | None = None
    path = config_path(params["config"])
    if params["config"] or path.is_file():
        try:
            settings = load_settings(path, check_passwords=False)
        except SettingsError as exc:
            say(f"vdistream: {exc}", err=True)
            return 2
    dest, dest_name = await _destination(settings, params["dest"])
    keep_within: Duration | None = params["keep_within"]
    flags: RetentionPolicy | None = None
    if params["keep_last"] is not None or keep_within is not None:
        within = keep_within.delta if keep_within is not None else None
        flags = RetentionPolicy(keep_last=params["keep_last"], keep_within=within)

    async with destination(dest) as storage:
        manifests = await backups_in(storage)
        groups = (
            [params["database"]]
            if params["database"]
            else sorted({group_of(m.backup_id) for m in manifests})
        )
        policies: dict[str, RetentionPolicy] = {}
        for group in groups:
            if flags is not None:
                policies[group] = flags
            elif settings is not None and group in settings.databases:
                database = settings.databases[group]
                if dest_name is None or database.destination == dest_name:
                    policies[group] = database.retention
        if not any(p.enabled for p in policies.values()):
            say(
                "vdistream: prune: no retention rule: give --keep-last/--keep-within, or "
                "--config with databases that have a retention table for this destination",
                err=True,
            )
            return 2
        verified = await _verified(settings, groups, manifests)
        if params["verify"]:
            await _verify_the_others(settings, dest, manifests, policies, verified)
        in_use = await _in_use_by_daemon(settings)
        summaries = [
            (
                await apply_retention(
                    storage,
                    manifests,
                    group,
                    policy,
                    verified[group],
                    dry_run=params["dry_run"],
                    in_use=in_use,
                )
            ).summary()
            for group, policy in policies.items()
        ]

    text = "" if params["json_output"] else _text(summaries, keep_within, params["dry_run"])
    emit(params["json_output"], {"destination": storage.url, "groups": summaries}, text)
    failed = [e for s in summaries for e in s["errors"].values()]
    # a database whose chains cannot be read had nothing deleted: say why, and fail
    failed += [s["problem"] for s in summaries if s.get("problem")]
    for error in failed:
        say(f"vdistream: prune: {error}", err=True)
    return 1 if failed else 0


async def _destination(settings: Settings | None, dest: str) -> tuple[str, str | None]:
    """The URL of ``dest`` (a destination's name, a directory or a URL) and the name
    the settings give it, if any."""
    if settings is None:
        return dest, None
    if dest in settings.destinations:
        return settings.destinations[dest].url, dest
    absolute = str(await anyio.Path(dest).absolute()).rstrip("/")
    named = [d.name for d in settings.destinations.values() if d.url.rstrip("/") == absolute]
    return dest, (named[-1] if named else None)


async def _verified(
    settings: Settings | None, groups: list[str], manifests: list[Manifest]
) -> dict[str, set[str]]:
    """Per group, the backups the settings' state database knows to be verified."""
    from vdistream.service.backups import group_of, verified_ids
    from vdistream.service.state import JobStore, StateError

    verified: dict[str, set[str]] = {group: set() for group in groups}
    state_db = settings.service.state_db if settings is not None else None
    if state_db is None or not state_db.exists():
        return verified
    try:
        store = await JobStore.open(state_db)
        async with store:
            for group in filter(None, groups):
                present = [m.backup_id for m in manifests if group_of(m.backup_id) == group]
                verified[group] = await verified_ids(store, group, present)
    except StateError as exc:
        say(f"vdistream: warning: {exc}; backups count as unverified", err=True)
    return verified


async def _verify_the_others(
    settings: Settings | None,
    dest: str,
    manifests: list[Manifest],
    policies: dict[str, RetentionPolicy],
    verified: dict[str, set[str]],
) -> None:
    """``--verify``: verify each backup a rule applies to and not known to be verified
    (adding it to ``verified`` when it passes)."""
    from vdistream.operations import KeySource, run_verify
    from vdistream.service.backups import group_of

    for manifest in manifests:
        group = group_of(manifest.backup_id)
        if group not in policies or manifest.backup_id in verified[group]:
            continue
        keys = None
        if settings is not None and group in settings.databases:
            key_file = settings.databases[group].encrypt_key_file
            if key_file is not None:
                keys = KeySource(key_file=str(key_file))
        report = await run_verify(f"{dest.rstrip('/')}/{manifest.backup_id}", keys=keys)
        say(f"verify {manifest.backup_id}: {'ok' if report.ok else 'FAILED'}", err=True)
        if report.ok:
            verified[group].add(manifest.backup_id)


async def _in_use_by_daemon(settings: Settings | None) -> set[str]:
    """The backups that the daemon of ``settings`` has queued or running jobs on (so
    that a prune by hand never deletes one under it); empty when it is not running."""
    if settings is None or not settings.service.socket_path.exists():
        return set()
    from vdistream.cli.client import ApiClient, DaemonError

    try:
        with anyio.fail_after(5):
            async with ApiClient(settings.service.socket_path) as client:
                jobs = await client.jobs(state="queued,running", limit="1000")
    except (DaemonError, TimeoutError, OSError):
        return set()
    used = {job.get("backup_id") for job in jobs}
    used |= {(job.get("params") or {}).get("backup_id") for job in jobs}
    return {b for b in used if isinstance(b, str) and b and b != "latest"}


def _text(summaries: list[dict[str, Any]], keep_within: Duration | None, dry_run: bool) -> str:
    """What ``prune`` prints without ``--json``: each database's rule and verdicts."""
    lines = []
    for summary in summaries:
        policy = summary["policy"]
        lines.append(
            f"database {summary['database'] or '(backups made by hand)'}: "
            f"keep_last={policy['keep_last'] or '-'}, "
            f"keep_within={_shown_within(policy['keep_within'], keep_within)}"
        )
        for verdict in ("keep", "delete"):
            for row in summary[verdict]:
                mark = "verified" if row["verified"] else "unverified"
                lines.append(
                    f"  {verdict:<6}  {row['id']}  {row['ended']}  {mark:<10}  "
                    f"{'; '.join(row['reasons'])}"
                )
        lines.extend(f"  kept (in use by a job): {b}" for b in summary["in_use"])
    if dry_run:
        count = sum(len(s["delete"]) for s in summaries)
        lines.append(f"dry run: {count} backup(s) would be deleted, nothing was")
    else:
        lines.append(f"{sum(len(s['deleted']) for s in summaries)} backup(s) deleted")
    return "\n".join(lines)


def _shown_within(seconds: float | None, given: Duration | None) -> str:
    """``keep_within`` as the user wrote it (``14d``), ``-`` when the rule is off."""
    if seconds is None:
        return "-"
    if given is not None and given.seconds == seconds:
        return given.text
    return format_duration(seconds)
