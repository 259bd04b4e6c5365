"""The ``vdistream`` command line: backup, restore, verify, list, demo.

Parsing and presentation live here; the work lives in :mod:`vdistream.operations`, so
an embedding program can do everything the command line does. Exit codes: 0 only for
a complete, committed backup, a complete restore, a verified backup or a listing; 1
when the operation failed; 2 for bad usage (a wrong URL, a missing option). Errors are
one line on stderr naming what failed and where. ``--json`` prints one JSON object on
stdout at the end (an array for ``list``). Ctrl-C aborts the job cleanly (the set is
aborted, the device streams drained and removed) and exits with 130.

The command line configures no logging: it prints its own progress on stderr, a
refreshed line on a terminal and a plain line every few seconds otherwise.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import sys
from collections.abc import Sequence
from typing import Any, TextIO

import anyio

from vdistream import __version__
from vdistream.catalog import CatalogError
from vdistream.coordinator import Job
from vdistream.errors import ConfigError, StorageURLError, VdistreamError
from vdistream.operations import (
    BackupSettings,
    KeySource,
    list_backups,
    run_backup,
    run_restore,
    run_verify,
)
from vdistream.pipeline.keys import generate_key_file
from vdistream.pipeline.spec import parse_compression

__all__ = ["main"]

MIB = 1024 * 1024


def _size(text: str) -> int:
    """``1048576``, ``1M``, ``64K``, ``4MiB`` -> bytes."""
    units = {"k": 1024, "kib": 1024, "m": MIB, "mib": MIB, "g": 1024 * MIB, "gib": 1024 * MIB}
    raw = text.strip().lower()
    for unit, factor in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if raw.endswith(unit):
            return int(float(raw[: -len(unit)]) * factor)
    return int(raw)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vdistream",
        description="Stream database backups through virtual devices, the way SQL Server's "
        "VDI does.",
    )
    parser.add_argument("--version", action="version", version=f"vdistream {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    b = sub.add_parser("backup", help="back up a database into a destination")
    b.add_argument(
        "source",
        help="sqlite:///path/app.db, postgresql://..., cmd:COMMAND; with --daemon also the "
        "name of a configured database",
    )
    b.add_argument(
        "dest",
        nargs="?",
        help="a directory or a storage URL (file://, s3://, memory://, null://); with "
        "--daemon and a database name, leave it out",
    )
    b.add_argument("--mode", choices=["basebackup", "dump"], help="PostgreSQL: what to take")
    b.add_argument("--devices", type=int, default=4, help="virtual devices (default 4)")
    b.add_argument("--max-transfer-size", type=_size, default=MIB, help="default 1M")
    b.add_argument("--buffer-count", type=int, default=None, help="default 2 per device")
    b.add_argument("--block-size", type=_size, default=65536, help="default 64K")
    b.add_argument("--stall-timeout", type=float, default=60.0, help="seconds (default 60)")
    b.add_argument("--id", dest="backup_id", help="the backup id (default: time + random)")
    b.add_argument(
        "--compress",
        default="none",
        help="none (default), zstd, zstd:LEVEL (1..19, default 3) or lz4",
    )
    _key_arguments(b, "encrypt with")
    b.add_argument("--json", action="store_true", help="print one JSON object at the end")
    b.add_argument(
        "--daemon",
        action="store_true",
        help="have the running daemon do it (a database of its settings) instead of "
        "running it in this process",
    )
    b.add_argument("--socket", help="with --daemon: the daemon's socket")
    b.add_argument(
        "--no-wait",
        dest="wait",
        action="store_false",
        help="with --daemon: return once the job is queued",
    )
    # The parser's own defaults: --daemon refuses any option set away from them.
    b.set_defaults(daemon_owned_defaults={name: b.get_default(name) for name in _DAEMON_OWNS})

    r = sub.add_parser("restore", help="restore a backup into a target")
    r.add_argument("backup", help="DEST/ID or the location of the backup's manifest.json")
    r.add_argument(
        "target",
        help="sqlite: a database file; postgresql basebackup: an empty data directory; "
        "dump: a database URL; cmd: a command reading the stream on stdin",
    )
    r.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing SQLite file; PostgreSQL dump: drop objects first (--clean)",
    )
    r.add_argument(
        "--create", action="store_true", help="PostgreSQL dump: create the target database"
    )
    r.add_argument(
        "--owner", help="PostgreSQL basebackup: give the restored directory to this user"
    )
    _key_arguments(r, "the key of an encrypted backup:")
    r.add_argument("--json", action="store_true")

    v = sub.add_parser("verify", help="re-read and check a backup without touching the source")
    v.add_argument("backup", help="DEST/ID or the location of the backup's manifest.json")
    v.add_argument("--no-content", action="store_true", help="check streams only")
    _key_arguments(v, "the key of an encrypted backup:")
    v.add_argument("--json", action="store_true")

    st = sub.add_parser("storage", help="look after a destination")
    st_sub = st.add_subparsers(dest="storage_command", required=True, metavar="COMMAND")
    au = st_sub.add_parser(
        "audit", help="list (and with --clean remove) what no committed manifest references"
    )
    au.add_argument("dest")
    au.add_argument("--clean", action="store_true", help="remove the orphans found")
    au.add_argument(
        "--min-age",
        default="1h",
        help="leave debris younger than this alone: a running job's (default 1h; 0 for all)",
    )
    au.add_argument("--json", action="store_true")
    au.set_defaults(handler=_audit)

    k = sub.add_parser("keygen", help="write a new random encryption key file (mode 0600)")
    k.add_argument("path")

    ls = sub.add_parser("list", help="list the backups in a destination")
    ls.add_argument("dest")
    ls.add_argument("--json", action="store_true")

    d = sub.add_parser("demo", help="create a SQLite database, back it up, verify it, restore it")
    d.add_argument("--dir", default="vdistream-demo", help="where (default ./vdistream-demo)")
    d.add_argument("--db", help="an existing SQLite database to use instead")
    for name, handler in _COMMANDS.items():
        sub.choices[name].set_defaults(handler=handler)
    _register_service_commands(sub)
    return parser


def _register_service_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The daemon's commands (serve, jobs, job, abort, prune) add themselves here."""
    from vdistream.service.commands import register_commands

    register_commands(sub)


def _key_arguments(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--encrypt-key-file", metavar="PATH", help=f"{what} a key file")
    parser.add_argument(
        "--encrypt-key-env", metavar="VAR", help=f"{what} the key in an environment variable"
    )
    parser.add_argument(
        "--encrypt-passphrase-env",
        metavar="VAR",
        help=f"{what} a passphrase in an environment variable (stretched with scrypt)",
    )


def _key_source(args: argparse.Namespace) -> KeySource | None:
    source = KeySource(
        key_file=args.encrypt_key_file,
        env=args.encrypt_key_env,
        passphrase_env=args.encrypt_passphrase_env,
    )
    return source if source.given else None


class Progress:
    """Shows a job's progress on stderr while it runs."""

    def __init__(self, stream: TextIO, label: str) -> None:
        self.stream = stream
        self.label = label
        self.tty = stream.isatty()
        self.job: Job | None = None

    def attach(self, job: Job) -> None:
        self.job = job

    async def run(self) -> None:
        interval = 0.5 if self.tty else 5.0
        while True:
            await anyio.sleep(interval)
            if self.job is None:
                continue
            snap = self.job.progress.snapshot()
            devices = " ".join(f"{d.bytes / MIB:.0f}" for d in snap.devices)
            line = (
                f"{self.label}: {snap.bytes / MIB:,.1f} MiB at {snap.rate / 1e6:,.1f} MB/s "
                f"(MiB per device: {devices})"
            )
            if self.tty:
                self.stream.write("\r\x1b[K" + line)
            else:
                self.stream.write(line + "\n")
            self.stream.flush()

    def done(self) -> None:
        if self.tty and self.job is not None:
            self.stream.write("\r\x1b[K")
            self.stream.flush()


def _emit(args: argparse.Namespace, payload: Any, text: str) -> None:
    if getattr(args, "json", False):
        print(json.dumps(payload, indent=None, default=str))
    elif text:
        print(text)


async def _with_progress(label: str, work: Any) -> Any:
    progress = Progress(sys.stderr, label)
    result: list[Any] = []
    failure: list[Exception] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(progress.run)
        try:
            result.append(await work(progress.attach))
        except Exception as exc:  # re-raised below, outside the group: not an ExceptionGroup
            failure.append(exc)
        finally:
            tg.cancel_scope.cancel()
    progress.done()
    if failure:
        raise failure[0]
    return result[0]


#: ``backup`` options the daemon takes from its settings, not from the command line
_DAEMON_OWNS = (
    "mode",
    "devices",
    "max_transfer_size",
    "buffer_count",
    "block_size",
    "stall_timeout",
    "compress",
    "encrypt_key_file",
    "encrypt_key_env",
    "encrypt_passphrase_env",
)


async def _backup_by_daemon(args: argparse.Namespace) -> int:
    from vdistream.service.client import submit_backup_to_daemon

    # The daemon backs up its configured databases as configured: an option given
    # here would be silently ignored there, so it is refused instead.
    given = [
        "--" + name.replace("_", "-")
        for name, default in args.daemon_owned_defaults.items()
        if getattr(args, name) != default
    ]
    if given:
        print(
            f"vdistream: {', '.join(given)} cannot be used with --daemon: the daemon takes "
            "them from its settings ([databases.NAME])",
            file=sys.stderr,
        )
        return 2
    name_only = args.dest is None
    return await submit_backup_to_daemon(
        args.socket,
        args.source if name_only else None,
        None if name_only else args.source,
        args.dest,
        backup_id=args.backup_id,
        wait=args.wait,
        json_output=args.json,
    )


async def _backup(args: argparse.Namespace) -> int:
    if args.daemon:
        return await _backup_by_daemon(args)
    if args.dest is None:
        print("vdistream: backup needs a destination (DEST)", file=sys.stderr)
        return 2
    if args.socket is not None or not args.wait:
        print("vdistream: --socket and --no-wait go with --daemon", file=sys.stderr)
        return 2
    settings = BackupSettings(
        devices=args.devices,
        block_size=args.block_size,
        max_transfer_size=args.max_transfer_size,
        buffer_count=args.buffer_count,
        stall_timeout=args.stall_timeout,
        mode=args.mode,
        backup_id=args.backup_id,
        compression=parse_compression(args.compress, setting="--compress"),
        encryption=_key_source(args),
    )
    outcome = await _with_progress(
        "backup", lambda hook: run_backup(args.source, args.dest, settings, on_job=hook)
    )
    result = outcome.result
    if outcome.ok:
        _emit(
            args,
            outcome.summary(),
            f"backup {result.backup_id} complete: {result.bytes:,} bytes on "
            f"{len(result.devices)} devices in {result.duration:.1f} s\n"
            f"manifest: {outcome.manifest_url}",
        )
        return 0
    _emit(args, outcome.summary(), "")
    print(f"vdistream: backup failed ({result.status.value}): {result.error}", file=sys.stderr)
    return 1


async def _restore(args: argparse.Namespace) -> int:
    result = await _with_progress(
        "restore",
        lambda hook: run_restore(
            args.backup,
            args.target,
            overwrite=args.overwrite,
            create=args.create,
            owner=args.owner,
            keys=_key_source(args),
            on_job=hook,
        ),
    )
    summary = {
        "id": result.backup_id,
        "status": result.status.value,
        "target": args.target,
        "bytes": result.bytes,
        "seconds": round(result.duration, 3),
        "error": None if result.ok else str(result.error),
    }
    if result.ok:
        _emit(args, summary, f"restored {result.backup_id} into {args.target}")
        return 0
    _emit(args, summary, "")
    print(f"vdistream: restore failed: {result.error}", file=sys.stderr)
    return 1


async def _verify(args: argparse.Namespace) -> int:
    report = await run_verify(args.backup, content=not args.no_content, keys=_key_source(args))
    lines = [f"{'ok ' if c.ok else 'BAD'} {c.name}: {c.detail}" for c in report.checks]
    lines.append(f"backup {report.backup_id}: {'verified' if report.ok else 'FAILED'}")
    _emit(args, report.summary(), "\n".join(lines))
    if not report.ok and args.json:
        bad = next(c for c in report.checks if not c.ok)
        print(f"vdistream: verify failed: {bad.name}: {bad.detail}", file=sys.stderr)
    return 0 if report.ok else 1


async def _list(args: argparse.Namespace) -> int:
    manifests, problems = await list_backups(args.dest)
    for problem in problems:
        print(f"vdistream: warning: {problem}", file=sys.stderr)
    rows = [m.summary() for m in manifests]
    text = "\n".join(
        f"{r['id']}  {r['engine']}{'/' + r['mode'] if r['mode'] else ''}  {r['ended']}  "
        f"{r['bytes']:>14,} bytes  {r['devices']} devices  {r['source']}"
        for r in rows
    )
    _emit(args, rows, text or f"no backups in {args.dest}")
    return 0


async def _audit(args: argparse.Namespace) -> int:
    from vdistream.catalog.audit import audit
    from vdistream.operations import opened_storage

    min_age = datetime.timedelta(seconds=_duration(args.min_age))
    async with opened_storage(args.dest) as storage:
        report = await audit(storage, clean=args.clean, min_age=min_age or None)
    payload = dataclasses.asdict(report)
    lines = [f"{len(report.backups)} backups, {len(report.referenced)} objects referenced"]
    lines += [f"orphan object: {key}" for key in report.orphan_objects]
    lines += [
        f"orphan upload: {upload.key} ({upload.upload_id})" for upload in report.orphan_uploads
    ]
    lines += [f"temporary: {key}" for key in report.temporaries]
    lines += [f"kept (unreadable manifest): {key}" for key in report.unverifiable]
    lines += [f"missing (named by a manifest): {key}" for key in report.missing]
    lines += [f"too young to judge: {key}" for key in report.too_young]
    if args.clean:
        removed = len(report.removed_objects) + len(report.aborted_uploads)
        removed += len(report.removed_temporaries)
        lines.append(f"removed {removed}")
    lines += [f"FAILED: {failure}" for failure in report.failures]
    _emit(args, payload, "\n".join(lines))
    return 1 if report.failures else 0


def _duration(text: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    raw = text.strip().lower()
    if raw and raw[-1] in units:
        return float(raw[:-1]) * units[raw[-1]]
    return float(raw)


async def _keygen(args: argparse.Namespace) -> int:
    key = await anyio.to_thread.run_sync(generate_key_file, args.path)
    print(f"wrote a new key to {args.path} (mode 0600), fingerprint {key.fingerprint}")
    return 0


async def _demo(args: argparse.Namespace) -> int:
    from vdistream.demo import run_demo

    return await run_demo(args.dir, args.db)


_COMMANDS = {
    "backup": _backup,
    "restore": _restore,
    "verify": _verify,
    "list": _list,
    "demo": _demo,
    "keygen": _keygen,
}


def asyncio_handler(handler: object) -> bool:
    import inspect

    return inspect.iscoroutinefunction(handler)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        handler = args.handler
        if not asyncio_handler(handler):
            return int(handler(args))  # e.g. serve: runs its own event loop
        code: int = anyio.run(handler, args, backend="asyncio")
        return code
    except KeyboardInterrupt:
        print("vdistream: interrupted; the job was aborted and cleaned up", file=sys.stderr)
        return 130
    except (ConfigError, StorageURLError) as exc:
        print(f"vdistream: error: {exc}", file=sys.stderr)
        return 2
    except (CatalogError, VdistreamError, OSError) as exc:
        print(f"vdistream: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
