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
listener with the token of ``$VDISTREAM_API_TOKEN``.

Exit codes: 0 success (for ``--wait``/``--follow``: the job succeeded); 1 the job
failed or was aborted, the daemon refused for lack of room or because it is shutting
down, or cannot be reached; 2 bad usage or an invalid request (unknown database or
job). ``prune`` works on a destination directly, without the daemon (module
``vdistream.service.backups``); it exits 1 when a deletion failed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vdistream.service.settings import Settings

__all__ = ["register_commands"]


def _write(text: str, *, err: bool = False) -> None:
    stream = sys.stderr if err else sys.stdout
    stream.write(text if text.endswith("\n") else text + "\n")
    stream.flush()


def register_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the daemon's subcommands to the ``vdistream`` parser."""
    s = sub.add_parser("serve", help="run the daemon: schedules, job manager, control API")
    s.add_argument(
        "--config",
        help="the settings file (default: $VDISTREAM_CONFIG or /etc/vdistream/vdistream.toml)",
    )
    s.add_argument("--check", action="store_true", help="check the settings, print them, exit")
    s.set_defaults(handler=_serve)

    st = sub.add_parser("status", help="is the daemon up and ready?")
    _client_options(st)
    st.set_defaults(handler=_status)

    j = sub.add_parser("jobs", help="list the daemon's jobs, newest first")
    _client_options(j)
    j.add_argument("--state", help="queued, running, succeeded, failed, aborted (comma list)")
    j.add_argument("--database", help="only this database's jobs")
    j.add_argument("--kind", choices=["backup", "restore", "verify"])
    j.add_argument("--limit", type=int, default=50, help="at most this many (default 50)")
    j.set_defaults(handler=_jobs)

    one = sub.add_parser("job", help="show one job of the daemon, with per-device progress")
    _client_options(one)
    one.add_argument("id")
    one.add_argument("--follow", action="store_true", help="print its progress until it ends")
    one.set_defaults(handler=_job)

    a = sub.add_parser("abort", help="abort a job of the daemon")
    _client_options(a)
    a.add_argument("id")
    a.add_argument("--reason", help="recorded with the job")
    a.set_defaults(handler=_abort)

    sb = sub.add_parser("submit", help="ask the daemon to run a backup, restore or verify")
    kinds = sb.add_subparsers(dest="kind", required=True, metavar="KIND")
    b = kinds.add_parser("backup", help="back up a configured database")
    b.add_argument("database")
    b.add_argument("--id", dest="backup_id", help="the new backup's id (DATABASE.something)")
    b.add_argument(
        "--no-verify",
        dest="verify",
        action="store_false",
        default=None,
        help="do not verify it afterwards (default: the database's verify_after_backup)",
    )
    r = kinds.add_parser("restore", help="restore one of a database's backups")
    r.add_argument("database")
    r.add_argument("target", help="as for `vdistream restore` (a file, a directory, a URL)")
    r.add_argument("--backup", dest="backup_id", default="latest", help="id (default: latest)")
    r.add_argument("--overwrite", action="store_true")
    r.add_argument("--create", action="store_true")
    r.add_argument("--owner")
    v = kinds.add_parser("verify", help="verify one of a database's backups")
    v.add_argument("database")
    v.add_argument("--backup", dest="backup_id", default="latest", help="id (default: latest)")
    v.add_argument("--no-content", dest="content", action="store_false", help="checksums only")
    for kind in (b, r, v):
        _client_options(kind)
        kind.add_argument("--wait", action="store_true", help="follow the job until it ends")
        kind.set_defaults(handler=_submit)

    p = sub.add_parser(
        "prune", help="apply retention to a destination's backups (without the daemon)"
    )
    p.add_argument("dest", help="a destination's name (from the settings), a directory or URL")
    p.add_argument("--keep-last", type=int, help="keep the N newest verified backups")
    p.add_argument("--keep-within", help="keep every backup younger than this (14d, 36h)")
    p.add_argument("--database", help="only this database's backups")
    p.add_argument(
        "--verify", action="store_true", help="verify the backups not known to be verified"
    )
    p.add_argument("--dry-run", action="store_true", help="show what would go, delete nothing")
    p.add_argument("--json", action="store_true")
    p.add_argument("--config", help="the settings file (policies, state database)")
    p.set_defaults(handler=_prune)


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


def _client_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--socket", help="the daemon's socket (default: see `vdistream serve`)")
    parser.add_argument("--url", help="the TCP listener instead (token: $VDISTREAM_API_TOKEN)")
    parser.add_argument("--config", help="settings file to find the socket in")
    parser.add_argument("--json", action="store_true", help="print JSON")


# --- serve ------------------------------------------------------------------------------


def _serve(args: argparse.Namespace) -> int:
    from vdistream.service.serve import serve

    return serve(args.config, check=args.check)


# --- client commands --------------------------------------------------------------------


async def _with_client(args: argparse.Namespace, work: Callable[[Any], Awaitable[int]]) -> int:
    from vdistream.service.client import ApiClient, DaemonError, default_socket_path

    if args.url:
        client = ApiClient(base_url=args.url, token=os.environ.get("VDISTREAM_API_TOKEN"))
    else:
        client = ApiClient(args.socket or default_socket_path(args.config))
    try:
        async with client:
            return await work(client)
    except DaemonError as exc:
        _write(f"vdistream: {exc}", err=True)
        return 2 if exc.status in (400, 404, 409, 422) else 1


def _emit(args: argparse.Namespace, payload: Any, text: str) -> None:
    if args.json:
        _write(json.dumps(payload, default=str))
    elif text:
        _write(text)


async def _status(args: argparse.Namespace) -> int:
    from vdistream.service.client import DaemonError

    async def work(client: Any) -> int:
        health = await client.health()
        try:
            ready = await client.ready()
        except DaemonError as exc:
            _emit(args, {"health": health, "ready": False, "reason": exc.message}, "")
            if not args.json:
                _write(f"vdistream daemon at {client.where}: up, NOT ready: {exc.message}")
            return 1
        jobs = ready["jobs"]
        _emit(
            args,
            {"health": health, "ready": True, "jobs": jobs},
            f"vdistream daemon {health['version']} at {client.where}: ready, "
            f"{jobs['running']} running, {jobs['queued']} queued",
        )
        return 0

    return await _with_client(args, work)


def _row(job: dict[str, Any]) -> str:
    progress = job.get("progress") or {}
    result = job.get("result") or {}
    size = progress.get("bytes", result.get("bytes"))
    amount = f"{size:>14,} B" if isinstance(size, int) else " " * 16
    tail = job.get("error") or job.get("backup_id") or ""
    return f"{job['id']}  {job['kind']:<7} {job['database']:<16} {job['state']:<9} {amount}  {tail}"


async def _jobs(args: argparse.Namespace) -> int:
    filters = {
        name: str(getattr(args, name))
        for name in ("state", "database", "kind", "limit")
        if getattr(args, name) is not None
    }

    async def work(client: Any) -> int:
        jobs = await client.jobs(**filters)
        _emit(args, jobs, "\n".join(_row(j) for j in jobs) or "no jobs")
        return 0

    return await _with_client(args, work)


def _details(job: dict[str, Any]) -> str:
    lines = [
        f"job {job['id']}: {job['kind']} of {job['database']}, {job['state']}",
        f"  created {job['created']}, started {job['started']}, ended {job['ended']}",
    ]
    if job.get("backup_id"):
        lines.append(f"  backup {job['backup_id']} in {job.get('storage_url')}")
    if job.get("queue_position") is not None:
        lines.append(f"  position {job['queue_position'] + 1} in the queue")
    progress = job.get("progress") or {}
    lines.extend(
        f"  device {device['index']}: {device['bytes']:,} bytes, "
        f"{device['commands']} commands, {device['rate'] / 1e6:.1f} MB/s"
        for device in progress.get("devices") or []
    )
    if job.get("error"):
        lines.append(f"  error: {job['error']}")
    return "\n".join(lines)


async def _job(args: argparse.Namespace) -> int:
    import anyio

    from vdistream.service.client import progress_line

    async def work(client: Any) -> int:
        if not args.follow:
            job = await client.job(args.id)
            _emit(args, job, _details(job))
            return 0
        final: dict[str, Any] | None = None
        try:
            async for event in client.events(args.id):
                final = event["job"]
                if args.json:
                    _write(json.dumps(event, default=str))
                else:
                    _write(progress_line(final), err=True)
        except anyio.get_cancelled_exc_class():
            _write("vdistream: stopped following; the job goes on in the daemon", err=True)
            raise
        if final is None:
            return 1
        if not args.json:
            _write(_details(final))
        return 0 if final["state"] == "succeeded" else 1

    return await _with_client(args, work)


async def _abort(args: argparse.Namespace) -> int:
    async def work(client: Any) -> int:
        job = await client.abort(args.id, args.reason)
        _emit(args, job, f"job {job['id']}: abort requested (state now {job['state']})")
        return 0

    return await _with_client(args, work)


async def _submit(args: argparse.Namespace) -> int:
    import anyio

    body: dict[str, Any] = {"kind": args.kind, "database": args.database}
    for name in ("backup_id", "verify", "target", "owner"):
        value = getattr(args, name, None)
        if value is not None:
            body[name] = value
    if args.kind == "restore":
        body["overwrite"] = args.overwrite
        body["create"] = args.create
    if args.kind == "verify":
        body["content"] = args.content

    async def work(client: Any) -> int:
        job = await client.submit(body)
        if not args.wait:
            _emit(args, job, f"job {job['id']} accepted ({job['state']})")
            return 0
        try:
            final = await client.wait(job["id"], progress=None if args.json else sys.stderr)
        except anyio.get_cancelled_exc_class():
            with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                await client.abort(job["id"], "the client was interrupted (Ctrl-C)")
            raise
        _emit(args, final, _details(final))
        return 0 if final["state"] == "succeeded" else 1

    return await _with_client(args, work)


# --- prune ------------------------------------------------------------------------------


async def _prune(args: argparse.Namespace) -> int:
    from datetime import timedelta

    import anyio

    from vdistream.catalog import list_manifests
    from vdistream.operations import KeySource, run_verify
    from vdistream.service.backups import apply_retention, group_of, verified_ids
    from vdistream.service.retention import RetentionPolicy
    from vdistream.service.serve import config_path
    from vdistream.service.settings import SettingsError, load_settings, parse_duration
    from vdistream.service.state import JobStore, StateError
    from vdistream.storage import open_storage

    settings: Settings | None = None
    path = config_path(args.config)
    if args.config or path.is_file():
        try:
            settings = load_settings(path)
        except SettingsError as exc:
            _write(f"vdistream: {exc}", err=True)
            return 2
    dest = args.dest
    dest_name: str | None = None
    if settings is not None and dest in settings.destinations:
        dest_name, dest = dest, settings.destinations[dest].url
    elif settings is not None:
        absolute = str(await anyio.Path(dest).absolute()).rstrip("/")
        for destination in settings.destinations.values():
            if destination.url.rstrip("/") == absolute:
                dest_name = destination.name

    flags: RetentionPolicy | None = None
    if args.keep_last is not None or args.keep_within is not None:
        try:
            within: timedelta | None = (
                parse_duration(args.keep_within) if args.keep_within else None
            )
            flags = RetentionPolicy(keep_last=args.keep_last, keep_within=within)
        except ValueError as exc:
            _write(f"vdistream: prune: {exc}", err=True)
            return 2

    async with open_storage(dest) as storage:
        manifests, problems = await list_manifests(storage)
        for problem in problems:
            _write(f"vdistream: warning: {problem}", err=True)
        groups = sorted({group_of(m.backup_id) for m in manifests})
        if args.database:
            groups = [args.database]

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
        if args.verify:
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
                    dry_run=args.dry_run,
                    in_use=in_use,
                )
            )

    summaries = [o.summary() for o in outcomes]
    if args.json:
        _write(json.dumps({"destination": storage.url, "groups": summaries}, default=str))
    else:
        lines = []
        for summary in summaries:
            name = summary["database"] or "(backups made by hand)"
            policy = summary["policy"]
            within = policy["keep_within"]
            lines.append(
                f"database {name}: keep_last={policy['keep_last'] or '-'}, "
                f"keep_within={'-' if within is None else f'{within:g}s'}"
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
        if args.dry_run:
            lines.append(f"dry run: {count} backup(s) would be deleted, nothing was")
        else:
            lines.append(f"{sum(len(s['deleted']) for s in summaries)} backup(s) deleted")
        _write("\n".join(lines))
    failed = [e for s in summaries for e in s["errors"].values()]
    for error in failed:
        _write(f"vdistream: prune: {error}", err=True)
    return 1 if failed else 0
