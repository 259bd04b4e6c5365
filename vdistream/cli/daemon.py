"""The daemon's commands on the command line: ``serve``, ``status``, ``jobs``, ``job``,
``abort``, ``throttle``, ``submit backup|restore|verify`` and ``backup --daemon``
(:func:`submit_backup_to_daemon`).

``throttle JOB RATE`` changes a queued or running job's bandwidth limit, ``throttle
--global RATE`` the daemon's global one (all running jobs together, until its next
reload), ``throttle --global`` shows it; RATE is bytes per second as
``vdistream.throttle.parse_rate`` reads it (``200M``, ``1.5G``, ``10MB``, ``off``).

The client commands talk to the daemon over its Unix socket: ``--socket``, else
``$VDISTREAM_SOCKET``, else the settings' ``service.socket`` (``--config``,
``$VDISTREAM_CONFIG`` or ``/etc/vdistream/vdistream.toml``), else
``/run/vdistream/vdistream.sock``; ``--url http://127.0.0.1:PORT`` uses the TCP
listener with the token of ``$VDISTREAM_API_TOKEN``. A relative path sent to the
daemon (``submit restore``'s TARGET, ``backup --daemon``'s SOURCE and DEST) is
resolved against this process's directory first: the daemon's own directory is not
the user's.

Exit codes: 0 success (for ``--wait``/``--follow``: the job succeeded); 1 the job
failed or was aborted, the daemon refused for lack of room or because it is shutting
down, or cannot be reached; 2 bad usage or an invalid request (unknown database or
job); 128 + N after signal N (``submit --wait`` then aborts the job in the daemon,
``job --follow`` only stops following). Progress lines of ``--wait``/``--follow``
appear on stderr only when it is a terminal.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import anyio
import click

from vdistream.cli.framework import Params, logging_options, options, runs, say
from vdistream.cli.output import byte_counts, emit, job_details, job_row, progress_line
from vdistream.cli.params import JOB_LIMIT

if TYPE_CHECKING:
    from vdistream.cli.client import ApiClient

__all__ = (
    "abort",
    "absolute_target",
    "job",
    "jobs",
    "serve",
    "status",
    "submit",
    "submit_backup_to_daemon",
    "throttle",
)

#: HTTP statuses of an invalid request (exit 2): bad body, unknown job or database,
#: a job already finished, a value the API does not take
_INVALID = (400, 404, 409, 422)
#: ``vdistream.service.jobs.SQLSERVER_MODES``, not imported: the client stays light
_SQLSERVER_MODES = ("full", "diff", "log", "copy-only")
_GOES_ON = "the job goes on in the daemon"
_ABORTED = "the job was aborted in the daemon"


# --- the daemon and its client ----------------------------------------------------------


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


async def _with_client(
    client: ApiClient,
    work: Callable[[ApiClient], Awaitable[int]],
    err: TextIO | None = None,
    invalid: tuple[int, ...] = _INVALID,
) -> int:
    """``work(client)`` with the client open; a refusal is one line on stderr (or
    ``err``) and exit 2 for an invalid request (a status in ``invalid``), 1 otherwise."""
    from vdistream.cli.client import DaemonError

    try:
        async with client:
            return await work(client)
    except DaemonError as exc:
        say(f"vdistream: {exc}", err=True, to=err)
        return 2 if exc.status in invalid else 1


def _client(params: Params) -> ApiClient:
    from vdistream.cli.client import ApiClient, default_socket_path

    if params["url"]:
        return ApiClient(base_url=params["url"], token=os.environ.get("VDISTREAM_API_TOKEN"))
    return ApiClient(params["socket"] or default_socket_path(params["config"]))


def _client_command(
    interrupted: str | Callable[[Params], str],
) -> Callable[[Callable[[ApiClient, Params], Awaitable[int]]], Callable[..., int]]:
    """Make ``async def work(client, params)`` a command's callback with the options
    that find the daemon (module doc)."""

    def decorate(work: Callable[[ApiClient, Params], Awaitable[int]]) -> Callable[..., int]:
        @runs(interrupted)
        @functools.wraps(work)
        async def command(params: Params) -> int:
            return await _with_client(_client(params), lambda client: work(client, params))

        return _client_options(command)

    return decorate


_client_options = options(
    logging_options,
    click.option("--socket", help="The daemon's socket (default: see `vdistream serve --help`)."),
    click.option("--url", help="The daemon's TCP listener instead (token: $VDISTREAM_API_TOKEN)."),
    click.option("--config", help="The settings file to find the socket in."),
    click.option("--json", "json_output", is_flag=True, help="Print JSON on stdout."),
)


def _progress(json_output: bool, err: TextIO) -> Callable[[dict[str, Any]], None] | None:
    """Where ``--wait`` shows a job's progress lines: ``err`` when it is a terminal."""
    if json_output or not err.isatty():
        return None
    return lambda job: say(progress_line(job), to=err)


async def _submitted(
    client: ApiClient, body: dict[str, Any], *, wait: bool, json_output: bool, err: TextIO
) -> dict[str, Any]:
    """Submit ``body``; with ``wait`` follow the job until it ends, and abort it in the
    daemon if this command is interrupted meanwhile. The job as last seen."""
    job = await client.submit(body)
    if not wait:
        return job
    try:
        return await client.wait(job["id"], on_update=_progress(json_output, err))
    except anyio.get_cancelled_exc_class():
        with anyio.CancelScope(shield=True), anyio.move_on_after(5):
            await client.abort(job["id"], "the client was interrupted")
        raise


# --- client commands --------------------------------------------------------------------


@click.command("status", short_help="Is the daemon up and ready?")
@_client_command("nothing was changed")
async def status(client: ApiClient, params: Params) -> int:
    """Is the daemon up and ready? Exit 0 when ready, 1 otherwise."""
    from vdistream.cli.client import DaemonError

    health = await client.health()
    try:
        ready = await client.ready()
    except DaemonError as exc:
        emit(
            params["json_output"],
            {"health": health, "ready": False, "reason": exc.message},
            f"vdistream daemon at {client.where}: up, NOT ready: {exc.message}",
        )
        return 1
    jobs = ready["jobs"]
    # The next scheduled backups, by database and kind (full, diff, log)
    upcoming = {
        d["name"]: d["next_backups"] for d in await client.databases() if d.get("next_backups")
    }
    lines = [
        f"  next backups of {name}: " + ", ".join(f"{kind} {when}" for kind, when in fires.items())
        for name, fires in upcoming.items()
    ]
    emit(
        params["json_output"],
        {"health": health, "ready": True, "jobs": jobs, "next_backups": upcoming},
        "\n".join(
            [
                f"vdistream daemon {health['version']} at {client.where}: ready, "
                f"{jobs['running']} running, {jobs['queued']} queued",
                *lines,
            ]
        ),
    )
    return 0


@click.command("jobs", short_help="List the daemon's jobs, newest first.")
@_client_command("nothing was changed")
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
async def jobs(client: ApiClient, params: Params) -> int:
    """List the daemon's jobs, newest first."""
    filters = ("state", "database", "kind", "limit")
    found = await client.jobs(**{f: str(params[f]) for f in filters if params[f] is not None})
    emit(params["json_output"], found, "\n".join(map(job_row, found)) or "no jobs")
    return 0


@click.command("job", short_help="Show one job of the daemon.")
@click.argument("id", help="The job's id (from `vdistream jobs`).")
@_client_command(f"stopped following; {_GOES_ON}")
@click.option("--follow", is_flag=True, help="Follow the job's progress until it ends.")
async def job(client: ApiClient, params: Params) -> int:
    """Show one job of the daemon, with per-device progress."""
    if not params["follow"]:
        found = await client.job(params["id"])
        emit(params["json_output"], found, job_details(found))
        return 0
    final: dict[str, Any] | None = None
    show = _progress(params["json_output"], sys.stderr)
    async for event in client.events(params["id"]):
        final = event["job"]
        if params["json_output"]:
            emit(True, event, "")
        elif show is not None:
            show(final)
    if final is None:
        return 1
    if not params["json_output"]:
        say(job_details(final))
    return 0 if final["state"] == "succeeded" else 1


@click.command("abort", short_help="Abort a job of the daemon.")
@click.argument("id", help="The job's id (from `vdistream jobs`).")
@_client_command("the abort may or may not have been sent")
@click.option("--reason", help="Why; recorded with the job.")
async def abort(client: ApiClient, params: Params) -> int:
    """Abort a queued or running job of the daemon (signal_abort on its device set)."""
    found = await client.abort(params["id"], params["reason"])
    emit(
        params["json_output"],
        found,
        f"job {found['id']}: abort requested (state now {found['state']})",
    )
    return 0


def _rate(text: str) -> int | None:
    """RATE as typed, or a usage error (exit 2) naming it."""
    from vdistream.errors import ConfigError
    from vdistream.throttle import parse_rate

    try:
        return parse_rate(text, what="RATE")
    except ConfigError as exc:
        raise click.BadParameter(str(exc).removeprefix("RATE: "), param_hint="RATE") from None


def _throttle_args(params: Params) -> tuple[str | None, int | None]:
    """(job id or ``None`` for ``--global``, the rate) from ``throttle``'s arguments."""
    given = [a for a in (params["job_or_rate"], params["rate"]) if a is not None]
    if params["global_limit"]:
        if len(given) > 1:
            raise click.UsageError("throttle --global takes one RATE, not a job id")
        return None, _rate(given[0]) if given else None
    if len(given) != 2:
        raise click.UsageError("throttle needs a JOB and a RATE (or --global RATE)")
    return given[0], _rate(given[1])


@click.command("throttle", short_help="Change a job's bandwidth limit, or the daemon's.")
@click.argument(
    "job_or_rate",
    metavar="[JOB]",
    required=False,
    help="The job's id (from `vdistream jobs`); with --global, the RATE.",
)
@click.argument(
    "rate",
    metavar="RATE",
    required=False,
    help="Bytes per second: 200M, 1.5G, 500K (powers of 1024), 10MB (powers of 1000), or off.",
)
@click.option(
    "--global",
    "global_limit",
    is_flag=True,
    help="The daemon's global limit (all running jobs together) instead of a job's; "
    "without RATE: show it.",
)
@_client_command("the change may or may not have been made")
async def throttle(client: ApiClient, params: Params) -> int:
    """Set the bandwidth limit of a queued or running job (JOB RATE), or the daemon's
    global one (--global RATE), at once. RATE is bytes per second: 200M, 1.5G, 500K
    (powers of 1024), 10MB (powers of 1000), or off."""
    from vdistream.throttle import format_rate

    job_id, rate = _throttle_args(params)
    if job_id is not None:
        found = await client.throttle(job_id, rate)
        line = (
            f"job {found['id']}: bandwidth limit {format_rate(found['max_rate'])} "
            f"(state {found['state']})"
        )
        emit(params["json_output"], found, line)
        return 0
    change = params["job_or_rate"] is not None
    answer = await client.global_rate(rate, change=change)
    emit(
        params["json_output"],
        answer,
        f"global bandwidth limit {format_rate(answer['max_rate'])}",
    )
    return 0


# --- submit -----------------------------------------------------------------------------


@click.group("submit", short_help="Ask the daemon to run a backup, restore or verify.")
@logging_options
def submit() -> None:
    """Ask the daemon to run a backup, restore or verify of a configured database."""


def _submit_command(work: Callable[[ApiClient, Params], Awaitable[int]]) -> Callable[..., int]:
    """``submit KIND``'s callback: ``work``, with the daemon's options and ``--wait``."""
    wait = click.option(
        "--wait", is_flag=True, help="Follow the job until it ends; exit 0 only if it succeeded."
    )
    return _client_command(lambda params: _ABORTED if params["wait"] else _GOES_ON)(wait(work))


_DATABASE = click.argument(
    "database", help="A database of the daemon's settings ([databases.NAME])."
)
_BACKUP = click.option(
    "--backup", "backup_id", default="latest", show_default=True, help="The backup's id."
)


@submit.command("backup", short_help="Back up a configured database.")
@_DATABASE
@click.option("--id", "backup_id", help="The new backup's id (DATABASE.something).")
@click.option(
    "--mode",
    type=click.Choice(_SQLSERVER_MODES),
    help="SQL Server databases only: full (the default), diff, log or copy-only.",
)
@click.option(
    "--no-verify",
    "verify",
    flag_value=False,
    default=None,
    help="Do not verify it afterwards (default: the database's verify_after_backup).",
)
@_submit_command
async def _submit_backup(client: ApiClient, params: Params) -> int:
    """Back up a configured database."""
    return await _submit("backup", client, params)


@submit.command("restore", short_help="Restore one of a database's backups.")
@_DATABASE
@click.argument(
    "target",
    help="As for `vdistream restore` (a file, a directory, a URL, cmd:...); a relative "
    "path is taken from this directory.",
)
@_BACKUP
@click.option(
    "--overwrite", is_flag=True, help="Replace an existing SQLite file; dump: drop objects first."
)
@click.option("--create", is_flag=True, help="PostgreSQL dump: create the target database.")
@click.option(
    "--owner", metavar="USER", help="PostgreSQL basebackup or files: the directory's owner."
)
@click.option(
    "--delta",
    is_flag=True,
    help="PostgreSQL files: over a stopped cluster's directory, write only what differs.",
)
@_submit_command
async def _submit_restore(client: ApiClient, params: Params) -> int:
    """Restore one of a database's backups into TARGET."""
    return await _submit("restore", client, {**params, "target": absolute_target(params["target"])})


@submit.command("verify", short_help="Verify one of a database's backups.")
@_DATABASE
@_BACKUP
@click.option(
    "--no-content", "content", flag_value=False, default=True, help="Check the streams only."
)
@_submit_command
async def _submit_verify(client: ApiClient, params: Params) -> int:
    """Verify one of a database's backups."""
    return await _submit("verify", client, params)


_NOT_SENT = ("wait", "json_output", "socket", "url", "config")


async def _submit(kind: str, client: ApiClient, params: Params) -> int:
    body = {"kind": kind} | {
        name: value for name, value in params.items() if value is not None and name not in _NOT_SENT
    }
    job = await _submitted(
        client, body, wait=params["wait"], json_output=params["json_output"], err=sys.stderr
    )
    if not params["wait"]:
        emit(params["json_output"], job, f"job {job['id']} accepted ({job['state']})")
        return 0
    emit(params["json_output"], job, job_details(job))
    return 0 if job["state"] == "succeeded" else 1


# --- backup --daemon --------------------------------------------------------------------


async def submit_backup_to_daemon(
    socket_path: str | None,
    database: str | None,
    source: str | None,
    dest: str | None,
    *,
    backup_id: str | None = None,
    verify: bool | None = None,
    mode: str | None = None,
    wait: bool = True,
    json_output: bool = False,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    """``vdistream backup --daemon``: have the daemon back up a configured database.

    ``database`` names it; or ``source`` and ``dest`` (as given to ``vdistream
    backup``) must match one configured database's URL and destination (relative
    paths are taken from the current directory). ``socket_path`` ``None`` is
    ``default_socket_path()``. With ``wait`` the job is followed until it ends
    (progress on ``stderr`` when it is a terminal) and an interruption aborts it in the
    daemon; on success ``stdout`` gets the bare backup id and ``stderr`` the summary
    (logical and stored bytes). Without ``wait`` ``stdout`` gets the job's id and the
    command returns at once. ``json_output``: the job as one JSON object on ``stdout``.
    ``mode``: a SQL Server database's kind of backup (``full``, the default, ``diff``,
    ``log``, ``copy-only``); the daemon refuses it for the other engines (exit 2).

    Exit code: 0 when the backup succeeded (or, without ``wait``, was accepted); 1 when
    it failed or was aborted, the queue is full, the daemon is shutting down or cannot
    be reached; 2 when the request is invalid (an unknown database, no configured
    database for that source and destination).
    """
    from vdistream.cli.client import ApiClient, default_socket_path

    out, err = stdout or sys.stdout, stderr or sys.stderr
    body: dict[str, Any] = {"kind": "backup"}
    if database:
        body["database"] = database
    elif not source or not dest:
        say("vdistream: give a database name, or the source and the destination", to=err)
        return 2
    else:
        body["source"] = _absolute_source(source)
        body["destination"] = _absolute_dest(dest)
    body |= {"backup_id": backup_id or None, "verify": verify, "mode": mode}
    body = {name: value for name, value in body.items() if value is not None}

    async def work(client: ApiClient) -> int:
        job = await _submitted(client, body, wait=wait, json_output=json_output, err=err)
        if not wait:
            emit(json_output, job, job["id"], to=out)
            say(f"job {job['id']} queued for database {job.get('database')}", to=err)
            return 0
        if job["state"] != "succeeded":
            emit(json_output, job, "", to=out)
            say(f"vdistream: backup failed ({job['state']}): {job.get('error')}", to=err)
            return 1
        result = job.get("result") or {}
        emit(json_output, job, str(job["backup_id"]), to=out)
        say(
            f"backup {job['backup_id']} complete: "
            f"{byte_counts(result.get('logical_bytes'), result.get('bytes'))} on "
            f"{len(result.get('devices') or [])} devices in {result.get('seconds', 0):.1f} s "
            f"(job {job['id']}); manifest {result.get('manifest')}",
            to=err,
        )
        return 0

    # `backup --daemon`: a 409 can only answer the abort sent when the command was
    # interrupted as the job ended; the command itself was valid (exit 1, not 2).
    client = ApiClient(socket_path or default_socket_path())
    return await _with_client(client, work, err, invalid=(400, 404, 422))


def _absolute_source(source: str) -> str:
    if source.startswith("sqlite:"):
        rest = source[len("sqlite:") :]
        path = rest[2:] if rest.startswith("//") else rest
        return f"sqlite://{os.path.abspath(path)}"
    return source


def absolute_target(target: str) -> str:
    """A restore target as the daemon must receive it: a relative path resolved against
    this process's directory; a URL (``postgresql://...``, ``sqlite:...``), a ``cmd:``
    command or an ``external:NAME`` set unchanged, except a relative ``sqlite:`` path."""
    if target.startswith("sqlite:"):
        return _absolute_source(target)
    if "://" in target or target.startswith(("cmd:", "postgresql:", "postgres:", "external:")):
        return target
    return os.path.abspath(target)


def _absolute_dest(dest: str) -> str:
    if "://" in dest or ("/" not in dest and not Path(dest).exists()):
        return dest  # a URL, or a destination's name
    return os.path.abspath(dest)
