"""The daemon's commands on the command line.

::

    vdistream serve [--config PATH] [--check]
    vdistream status [--socket PATH] [--json]
    vdistream jobs [--socket PATH] [--json] [--state S[,S]] [--database NAME] [--kind K] [--limit N]
    vdistream job ID [--socket PATH] [--json] [--follow]
    vdistream abort ID [--socket PATH] [--reason TEXT] [--json]
    vdistream submit backup DATABASE [--id ID] [--no-verify] [--wait] [--json]
    vdistream submit restore DATABASE TARGET [--backup ID] [--overwrite] [--create] [--owner U]
    vdistream submit verify DATABASE [--backup ID] [--no-content] [--wait] [--json]
    vdistream prune DEST [--keep-last N] [--keep-within 14d] [--database NAME] [--verify]
                         [--dry-run] [--json] [--config PATH]

The client commands talk to the daemon over its Unix socket: ``--socket``, else
``$VDISTREAM_SOCKET``, else the settings' ``service.socket`` (``--config``,
``$VDISTREAM_CONFIG`` or ``/etc/vdistream/vdistream.toml``), else
``/run/vdistream/vdistream.sock``; ``--url http://127.0.0.1:PORT`` uses the TCP
listener with the token of ``$VDISTREAM_API_TOKEN``. A relative path sent to the
daemon (``submit restore``'s TARGET) is resolved against this process's directory
first: the daemon's own directory is not the user's.

Exit codes: 0 success (for ``--wait``/``--follow``: the job succeeded); 1 the job
failed or was aborted, the daemon refused for lack of room or because it is shutting
down, or cannot be reached; 2 bad usage or an invalid request (unknown database or
job); 128 + N after signal N (``submit --wait`` then aborts the job in the daemon,
``job --follow`` only stops following). ``prune`` works on a destination directly,
without the daemon (module ``vdistream.service.backups``); it exits 1 when a deletion
failed. Progress lines of ``--wait``/``--follow`` appear on stderr only when it is a
terminal.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import click

from vdistream.cli.framework import logging_options, run
from vdistream.cli.local import existing_destination
from vdistream.cli.output import job_bytes
from vdistream.cli.params import DURATION, JOB_LIMIT, KEEP_LAST, Duration, format_duration

if TYPE_CHECKING:
    from vdistream.service.settings import Settings

__all__ = ("register_commands",)


def _write(text: str, *, err: bool = False) -> None:
    stream = sys.stderr if err else sys.stdout
    stream.write(text if text.endswith("\n") else text + "\n")
    stream.flush()


def _progress_stream() -> Any:
    """Where progress lines go: stderr when it is a terminal, else nowhere."""
    return sys.stderr if sys.stderr.isatty() else None


def _client_options(f: Callable[..., Any]) -> Callable[..., Any]:
    f = click.option("--json", "json_output", is_flag=True, help="Print JSON on stdout.")(f)
    f = click.option("--config", help="The settings file to find the socket in.")(f)
    f = click.option(
        "--url", help="The daemon's TCP listener instead (token: $VDISTREAM_API_TOKEN)."
    )(f)
    f = click.option(
        "--socket", help="The daemon's socket (default: see `vdistream serve --help`)."
    )(f)
    return logging_options(f)


_DAEMON_GONE_ON = "the job goes on in the daemon"


def register_commands(group: click.Group) -> None:
    """Add the daemon's commands to the ``vdistream`` group."""
    for command in (serve, status, jobs, job, abort, submit, prune):
        group.add_command(command)


# --- serve ------------------------------------------------------------------------------


@click.command("serve", short_help="Run the daemon.")
@click.option(
    "--config",
    help="The settings file (default: $VDISTREAM_CONFIG or /etc/vdistream/vdistream.toml).",
)
@click.option("--check", is_flag=True, help="Check the settings, print them, exit.")
def serve(config: str | None, check: bool) -> int:
    """Run the daemon: schedules, job manager, control API. It installs its own signal
    handlers (SIGTERM/SIGINT: abort running jobs and exit 0; SIGHUP: re-read the
    settings) and logs as its settings say."""
    from vdistream.service.serve import serve as run_daemon

    return run_daemon(config, check=check)


# --- client commands --------------------------------------------------------------------


@click.command("status", short_help="Is the daemon up and ready?")
@_client_options
def status(**params: Any) -> int:
    """Is the daemon up and ready? Exit 0 when ready, 1 otherwise."""
    return run(lambda: _status(params), interrupted="nothing was changed")


@click.command("jobs", short_help="List the daemon's jobs, newest first.")
@_client_options
@click.option(
    "--state",
    help="Only jobs in these states: queued, running, succeeded, failed, aborted (comma list).",
)
@click.option("--database", help="Only this database's jobs.")
@click.option(
    "--kind", type=click.Choice(["backup", "restore", "verify"]), help="Only jobs of this kind."
)
@click.option(
    "--limit", type=JOB_LIMIT, default=50, show_default=True, help="At most this many (1 to 1000)."
)
def jobs(**params: Any) -> int:
    """List the daemon's jobs, newest first."""
    return run(lambda: _jobs(params), interrupted="nothing was changed")


@click.command("job", short_help="Show one job of the daemon.")
@click.argument("id", help="The job's id (from `vdistream jobs`).")
@_client_options
@click.option("--follow", is_flag=True, help="Follow the job's progress until it ends.")
def job(**params: Any) -> int:
    """Show one job of the daemon, with per-device progress."""
    return run(lambda: _job(params), interrupted=f"stopped following; {_DAEMON_GONE_ON}")


@click.command("abort", short_help="Abort a job of the daemon.")
@click.argument("id", help="The job's id (from `vdistream jobs`).")
@_client_options
@click.option("--reason", help="Why; recorded with the job.")
def abort(**params: Any) -> int:
    """Abort a queued or running job of the daemon (signal_abort on its device set)."""
    return run(lambda: _abort(params), interrupted="the abort may or may not have been sent")


@click.group("submit", short_help="Ask the daemon to run a backup, restore or verify.")
@logging_options
def submit() -> None:
    """Ask the daemon to run a backup, restore or verify of a configured database."""


def _submit_options(f: Callable[..., Any]) -> Callable[..., Any]:
    f = click.option(
        "--wait", is_flag=True, help="Follow the job until it ends; exit 0 only if it succeeded."
    )(f)
    return _client_options(f)


_DATABASE_HELP = "A database of the daemon's settings ([databases.NAME])."


@submit.command("backup", short_help="Back up a configured database.")
@click.argument("database", help=_DATABASE_HELP)
@click.option("--id", "backup_id", help="The new backup's id (DATABASE.something).")
@click.option(
    "--no-verify",
    "verify",
    flag_value=False,
    default=None,
    help="Do not verify it afterwards (default: the database's verify_after_backup).",
)
@_submit_options
def submit_backup(**params: Any) -> int:
    """Back up a configured database."""
    return _submit("backup", params)


@submit.command("restore", short_help="Restore one of a database's backups.")
@click.argument("database", help=_DATABASE_HELP)
@click.argument(
    "target",
    help="As for `vdistream restore` (a file, a directory, a URL, cmd:...); a relative "
    "path is taken from this directory.",
)
@click.option("--backup", "backup_id", default="latest", show_default=True, help="The backup's id.")
@click.option(
    "--overwrite", is_flag=True, help="Replace an existing SQLite file; dump: drop objects first."
)
@click.option("--create", is_flag=True, help="PostgreSQL dump: create the target database.")
@click.option("--owner", metavar="USER", help="PostgreSQL basebackup: the directory's owner.")
@_submit_options
def submit_restore(**params: Any) -> int:
    """Restore one of a database's backups into TARGET."""
    return _submit("restore", params)


@submit.command("verify", short_help="Verify one of a database's backups.")
@click.argument("database", help=_DATABASE_HELP)
@click.option("--backup", "backup_id", default="latest", show_default=True, help="The backup's id.")
@click.option(
    "--no-content", "content", flag_value=False, default=True, help="Check the streams only."
)
@_submit_options
def submit_verify(**params: Any) -> int:
    """Verify one of a database's backups."""
    return _submit("verify", params)


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
def prune(**params: Any) -> int:
    """Apply retention to DEST's backups: never an unverified one, never the newest
    verified one, never one a daemon's job is using."""
    return run(lambda: _prune(params), interrupted="deletions already made stay made")


async def _in_use_by_daemon(settings: Settings | None) -> set[str]:
    """The backups that the daemon of ``settings`` has queued or running jobs on (so
    that a prune by hand never deletes one under it); empty when it is not running."""
    if settings is None or not settings.service.socket_path.exists():
        return set()
    import anyio

    from vdistream.service.client import ApiClient, DaemonError

    try:
        with anyio.fail_after(5):
            async with ApiClient(settings.service.socket_path) as client:
                jobs = await client.jobs(state="queued,running", limit="1000")
    except (DaemonError, TimeoutError, OSError):
        return set()
    used = {job.get("backup_id") for job in jobs}
    used |= {(job.get("params") or {}).get("backup_id") for job in jobs}
    return {b for b in used if isinstance(b, str) and b and b != "latest"}


async def _with_client(params: dict[str, Any], work: Callable[[Any], Awaitable[int]]) -> int:
    from vdistream.service.client import ApiClient, DaemonError, default_socket_path

    if params["url"]:
        client = ApiClient(base_url=params["url"], token=os.environ.get("VDISTREAM_API_TOKEN"))
    else:
        client = ApiClient(params["socket"] or default_socket_path(params["config"]))
    try:
        async with client:
            return await work(client)
    except DaemonError as exc:
        _write(f"vdistream: {exc}", err=True)
        return 2 if exc.status in (400, 404, 409, 422) else 1


def _emit(params: dict[str, Any], payload: Any, text: str) -> None:
    if params["json_output"]:
        _write(json.dumps(payload, default=str))
    elif text:
        _write(text)


async def _status(params: dict[str, Any]) -> int:
    from vdistream.service.client import DaemonError

    async def work(client: Any) -> int:
        health = await client.health()
        try:
            ready = await client.ready()
        except DaemonError as exc:
            _emit(params, {"health": health, "ready": False, "reason": exc.message}, "")
            if not params["json_output"]:
                _write(f"vdistream daemon at {client.where}: up, NOT ready: {exc.message}")
            return 1
        jobs = ready["jobs"]
        _emit(
            params,
            {"health": health, "ready": True, "jobs": jobs},
            f"vdistream daemon {health['version']} at {client.where}: ready, "
            f"{jobs['running']} running, {jobs['queued']} queued",
        )
        return 0

    return await _with_client(params, work)


def _row(job: dict[str, Any]) -> str:
    progress = job.get("progress") or {}
    result = job.get("result") or {}
    amount = job_bytes(result) if result else job_bytes(progress)
    tail = job.get("error") or job.get("backup_id") or ""
    return (
        f"{job['id']}  {job['kind']:<7} {job['database']:<16} {job['state']:<9} "
        f"{amount or '-'}  {tail}"
    )


async def _jobs(params: dict[str, Any]) -> int:
    filters = {
        name: str(params[name])
        for name in ("state", "database", "kind", "limit")
        if params[name] is not None
    }

    async def work(client: Any) -> int:
        jobs = await client.jobs(**filters)
        _emit(params, jobs, "\n".join(_row(j) for j in jobs) or "no jobs")
        return 0

    return await _with_client(params, work)


def _details(job: dict[str, Any]) -> str:
    lines = [
        f"job {job['id']}: {job['kind']} of {job['database']}, {job['state']}",
        f"  created {job['created']}, started {job['started']}, ended {job['ended']}",
    ]
    if job.get("backup_id"):
        lines.append(f"  backup {job['backup_id']} in {job.get('storage_url')}")
    if job.get("queue_position") is not None:
        lines.append(f"  position {job['queue_position'] + 1} in the queue")
    result = job.get("result") or {}
    if result and job_bytes(result):
        lines.append(f"  {job_bytes(result)}")
    progress = job.get("progress") or {}
    lines.extend(
        f"  device {device['index']}: {device['bytes']:,} bytes, "
        f"{device['commands']} commands, {device['rate'] / 1e6:.1f} MB/s"
        for device in progress.get("devices") or []
    )
    if job.get("error"):
        lines.append(f"  error: {job['error']}")
    return "\n".join(lines)


async def _job(params: dict[str, Any]) -> int:
    from vdistream.service.client import progress_line

    async def work(client: Any) -> int:
        if not params["follow"]:
            job = await client.job(params["id"])
            _emit(params, job, _details(job))
            return 0
        final: dict[str, Any] | None = None
        shown = _progress_stream()
        async for event in client.events(params["id"]):
            final = event["job"]
            if params["json_output"]:
                _write(json.dumps(event, default=str))
            elif shown is not None:
                _write(progress_line(final), err=True)
        if final is None:
            return 1
        if not params["json_output"]:
            _write(_details(final))
        return 0 if final["state"] == "succeeded" else 1

    return await _with_client(params, work)


async def _abort(params: dict[str, Any]) -> int:
    async def work(client: Any) -> int:
        job = await client.abort(params["id"], params["reason"])
        _emit(params, job, f"job {job['id']}: abort requested (state now {job['state']})")
        return 0

    return await _with_client(params, work)


def _submit(kind: str, params: dict[str, Any]) -> int:
    note = "the job was aborted in the daemon" if params["wait"] else _DAEMON_GONE_ON
    return run(lambda: _submit_job(kind, params), interrupted=note)


async def _submit_job(kind: str, params: dict[str, Any]) -> int:
    import anyio

    from vdistream.service.client import absolute_target

    body: dict[str, Any] = {"kind": kind, "database": params["database"]}
    for name in ("backup_id", "verify", "target", "owner"):
        value = params.get(name)
        if value is not None:
            body[name] = value
    if kind == "restore":
        body["target"] = absolute_target(params["target"])
        body["overwrite"] = params["overwrite"]
        body["create"] = params["create"]
    if kind == "verify":
        body["content"] = params["content"]

    async def work(client: Any) -> int:
        job = await client.submit(body)
        if not params["wait"]:
            _emit(params, job, f"job {job['id']} accepted ({job['state']})")
            return 0
        try:
            final = await client.wait(
                job["id"], progress=None if params["json_output"] else _progress_stream()
            )
        except anyio.get_cancelled_exc_class():
            with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                await client.abort(job["id"], "the client was interrupted")
            raise
        _emit(params, final, _details(final))
        return 0 if final["state"] == "succeeded" else 1

    return await _with_client(params, work)


# --- prune ------------------------------------------------------------------------------


async def _prune(params: dict[str, Any]) -> int:
    import anyio

    from vdistream.catalog import list_manifests
    from vdistream.operations import KeySource, run_verify
    from vdistream.service.backups import apply_retention, group_of, verified_ids
    from vdistream.service.retention import RetentionPolicy
    from vdistream.service.serve import config_path
    from vdistream.service.settings import SettingsError, load_settings
    from vdistream.service.state import JobStore, StateError
    from vdistream.storage import open_storage

    settings: Settings | None = None
    path = config_path(params["config"])
    if params["config"] or path.is_file():
        try:
            settings = load_settings(path)
        except SettingsError as exc:
            _write(f"vdistream: {exc}", err=True)
            return 2
    dest = params["dest"]
    dest_name: str | None = None
    if settings is not None and dest in settings.destinations:
        dest_name, dest = dest, settings.destinations[dest].url
    elif settings is not None:
        absolute = str(await anyio.Path(dest).absolute()).rstrip("/")
        for destination in settings.destinations.values():
            if destination.url.rstrip("/") == absolute:
                dest_name = destination.name

    flags: RetentionPolicy | None = None
    keep_within: Duration | None = params["keep_within"]
    if params["keep_last"] is not None or keep_within is not None:
        within = keep_within.delta if keep_within is not None else None
        flags = RetentionPolicy(keep_last=params["keep_last"], keep_within=within)

    async with open_storage(dest) as storage:
        await existing_destination(storage, dest)
        manifests, problems = await list_manifests(storage)
        for problem in problems:
            _write(f"vdistream: warning: {problem}", err=True)
        groups = sorted({group_of(m.backup_id) for m in manifests})
        if params["database"]:
            groups = [params["database"]]

        policies: dict[str, RetentionPolicy] = {}
        for group in groups:
            if flags is not None:
                policies[group] = flags
            elif settings is not None and group in settings.databases:
                database = settings.databases[group]
                if dest_name is None or database.destination == dest_name:
                    policies[group] = database.retention
        if not any(p.enabled for p in policies.values()):
            _write(
                "vdistream: prune: no retention rule: give --keep-last/--keep-within, or "
                "--config with databases that have a retention table for this destination",
                err=True,
            )
            return 2

        verified: dict[str, set[str]] = {group: set() for group in groups}
        state_db = settings.service.state_db if settings is not None else None
        if state_db is not None and state_db.exists():
            try:
                store = await JobStore.open(state_db)
                async with store:
                    for group in groups:
                        if group:
                            present = [
                                m.backup_id for m in manifests if group_of(m.backup_id) == group
                            ]
                            verified[group] = await verified_ids(store, group, present)
            except StateError as exc:
                _write(f"vdistream: warning: {exc}; backups count as unverified", err=True)
        if params["verify"]:
            for manifest in manifests:
                group = group_of(manifest.backup_id)
                if group in policies and manifest.backup_id not in verified[group]:
                    keys = None
                    if settings is not None and group in settings.databases:
                        key_file = settings.databases[group].encrypt_key_file
                        if key_file is not None:
                            keys = KeySource(key_file=str(key_file))
                    report = await run_verify(f"{dest.rstrip('/')}/{manifest.backup_id}", keys=keys)
                    _write(
                        f"verify {manifest.backup_id}: {'ok' if report.ok else 'FAILED'}",
                        err=True,
                    )
                    if report.ok:
                        verified[group].add(manifest.backup_id)

        in_use = await _in_use_by_daemon(settings)
        outcomes = []
        for group, policy in policies.items():
            outcomes.append(
                await apply_retention(
                    storage,
                    manifests,
                    group,
                    policy,
                    verified[group],
                    dry_run=params["dry_run"],
                    in_use=in_use,
                )
            )

    summaries = [o.summary() for o in outcomes]
    if params["json_output"]:
        _write(json.dumps({"destination": storage.url, "groups": summaries}, default=str))
    else:
        lines = []
        for summary in summaries:
            name = summary["database"] or "(backups made by hand)"
            policy = summary["policy"]
            lines.append(
                f"database {name}: keep_last={policy['keep_last'] or '-'}, "
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
        count = sum(len(s["delete"]) for s in summaries)
        if params["dry_run"]:
            lines.append(f"dry run: {count} backup(s) would be deleted, nothing was")
        else:
            lines.append(f"{sum(len(s['deleted']) for s in summaries)} backup(s) deleted")
        _write("\n".join(lines))
    failed = [e for s in summaries for e in s["errors"].values()]
    for error in failed:
        _write(f"vdistream: prune: {error}", err=True)
    return 1 if failed else 0


def _shown_within(seconds: float | None, given: Duration | None) -> str:
    """``keep_within`` as the user wrote it (``14d``), ``-`` when the rule is off."""
    if seconds is None:
        return "-"
    if given is not None and given.seconds == seconds:
        return given.text
    return format_duration(seconds)
