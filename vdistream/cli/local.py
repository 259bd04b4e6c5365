"""The commands that run in this process: backup, restore, verify, list, storage
audit, keygen, demo. The work lives in :mod:`vdistream.operations`; this module parses,
checks and presents (the contract of stdout, stderr and exit codes is in
:mod:`vdistream.cli.app`).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import click
from click.core import ParameterSource

from vdistream.catalog import CatalogError
from vdistream.catalog.chain import chain_labels
from vdistream.cli.framework import CommandError, Params, logging_options, options, run, runs, say
from vdistream.cli.output import byte_counts, emit, with_progress
from vdistream.cli.params import (
    BLOCK_SIZE,
    BUFFER_COUNT,
    COMPRESSION,
    DEVICES,
    MAX_TRANSFER_SIZE,
    MIN_AGE,
    MOVE,
    POINT_IN_TIME,
    RATE,
    SECONDS,
    TIME_OR_LATEST,
    Duration,
)
from vdistream.operations import KeySource
from vdistream.sqlserver.tsql import BACKUP_MODES
from vdistream.sqlserver.url import MssqlURL, is_sqlserver_url, with_trigger

if TYPE_CHECKING:
    from vdistream.catalog import Manifest
    from vdistream.engines.external import ExternalOptions
    from vdistream.storage import Storage

__all__ = (
    "backup",
    "backups_in",
    "demo",
    "destination",
    "keygen",
    "list_",
    "restore",
    "shown",
    "storage",
    "verify",
)

_ABORTED_IN_DAEMON = "the job was aborted in the daemon"
#: exit code of ``storage audit`` when it found debris and did not remove it
_AUDIT_DEBRIS = 3

#: ``backup`` options the daemon takes from its settings, not from the command line
_DAEMON_OWNS = (
    "devices",
    "max_transfer_size",
    "buffer_count",
    "block_size",
    "stall_timeout",
    "compress",
    "encrypt_key_file",
    "encrypt_key_env",
    "encrypt_passphrase_env",
    "runtime_dir",
    "wait",
    "mirror",
    "encrypt_recipients",
    "max_rate",
)

_JSON = click.option(
    "--json",
    "json_output",
    is_flag=True,
    help="Print one JSON object on stdout at the end instead of text.",
)
_TRIGGER = click.option(
    "--trigger",
    type=click.Choice(["tds", "sqlcmd"]),
    help="SQL Server: run the statement over TDS (python-tds, the default) or with "
    "sqlcmd (the one on PATH or VDISTREAM_SQLCMD); the URL's ?trigger= says the same.",
)
_SQLVDI = click.option(
    "--sqlvdi",
    metavar="PATH",
    help="SQL Server: Microsoft's libsqlvdi.so. [default: VDISTREAM_SQLVDI, else "
    "/opt/mssql/lib/libsqlvdi.so]",
)


def shown(target: str) -> str:
    """A restore target as it may be printed: a SQL Server URL without its password."""
    return MssqlURL.parse(target).display if is_sqlserver_url(target) else target


#: restore options of the other engines, refused for a SQL Server target
_NOT_FOR_SQLSERVER = ("overwrite", "create", "owner", "delta")
#: SQL Server restore options that need a SQL Server target
_SQLSERVER_ONLY = (
    "replace",
    "norecovery",
    "moves",
    "stopat",
    "to",
    "chain_database",
    "trigger",
    "sqlvdi",
)


_BACKUP = click.argument("backup", help="DEST/ID, or the location of the backup's manifest.json.")

#: ``external:NAME`` sources and targets: where the set is published, how long it waits
_RUNTIME_DIR = click.option(
    "--runtime-dir",
    metavar="DIR",
    type=click.Path(file_okay=False),
    help="external:NAME: the runtime directory the set is published in. [default: "
    "VDISTREAM_RUNTIME_DIR, else $XDG_RUNTIME_DIR/vdistream, else /tmp/vdistream-UID]",
)
_WAIT = click.option(
    "--wait",
    "wait",
    type=SECONDS,
    help="external:NAME: how long the set waits for an engine to open it (seconds, or "
    "90s, 5m). [default: 60]",
)
_EXTERNAL_ONLY = ("runtime_dir", "wait")


def _external_options(params: Params, url: str) -> ExternalOptions | None:
    """The ``external:`` options, refused (exit 2) for any other source or target."""
    from vdistream.engines.external import (
        DEFAULT_CONNECT_TIMEOUT,
        ExternalOptions,
        check_socket_path,
        external_name,
    )

    if not url.lower().startswith("external:"):
        given = ["--" + n.replace("_", "-") for n in _EXTERNAL_ONLY if params[n] is not None]
        if given:
            raise click.UsageError(
                f"{', '.join(given)} {'goes' if len(given) == 1 else 'go'} with an "
                "external:NAME source or target"
            )
        return None
    directory = params["runtime_dir"]
    options = ExternalOptions(
        directory=Path(directory).absolute() if directory is not None else None,
        connect_timeout=params["wait"] if params["wait"] is not None else DEFAULT_CONNECT_TIMEOUT,
    )
    # a bad name or a socket path too long for its directory: a usage error (exit 2),
    # told before anything is created
    check_socket_path(external_name(url), options.directory)
    return options


_DEST = click.argument("dest", help="A directory or a storage URL.")


_KEYS = (
    ("--encrypt-key-file", "PATH", "the 32-byte key in this file (`vdistream keygen` makes one)."),
    ("--encrypt-key-env", "VAR", "the key in this environment variable (hex or base64)."),
    (
        "--encrypt-passphrase-env",
        "VAR",
        "a passphrase in this environment variable (stretched with scrypt).",
    ),
)


_RECIPIENT = click.option(
    "--encrypt-recipient",
    "encrypt_recipients",
    metavar="FILE",
    multiple=True,
    help="Also (or only) encrypt for this X25519 public key (PEM; `vdistream key generate` "
    "makes a pair); repeatable. Whoever holds the private key can restore; this host "
    "need not.",
)
_IDENTITY = click.option(
    "--decrypt-identity",
    "decrypt_identity",
    metavar="FILE",
    help="The key of an encrypted backup: the X25519 private key of one of its recipients.",
)
_MAX_RATE = click.option(
    "--max-rate",
    type=RATE,
    default=None,
    metavar="RATE",
    help="Bandwidth limit for the whole job, bytes per second shared by its devices: "
    "200M, 1.5G, 500K (powers of 1024; MB = 10^6), or off. [default: off]",
)


def _key_options(what: str) -> Callable[[Any], Any]:
    """The three ways to give a key; ``what`` starts each option's help."""
    return options(*(click.option(o, metavar=m, help=f"{what} {text}") for o, m, text in _KEYS))


def _key_source(params: Params) -> KeySource | None:
    source = KeySource(
        key_file=params["encrypt_key_file"],
        env=params["encrypt_key_env"],
        passphrase_env=params["encrypt_passphrase_env"],
        recipients=tuple(params.get("encrypt_recipients") or ()),
        identity_file=params.get("decrypt_identity"),
    )
    return source if source.given else None


@contextlib.asynccontextmanager
async def destination(given: str) -> AsyncIterator[Storage]:
    """The storage ``given`` names, open. A directory destination that is missing or no
    directory is an error: a typo must not read as "no backups" (object stores answer
    for themselves)."""
    from vdistream.operations import opened_storage
    from vdistream.storage.file import FileStorage

    async with opened_storage(given) as storage:
        if isinstance(storage, FileStorage):
            path = anyio.Path(storage.path)
            if not await path.exists():
                raise CommandError(f"{given}: no such directory")
            if not await path.is_dir():
                raise CommandError(f"{given}: is not a directory")
        yield storage


async def backups_in(storage: Storage) -> list[Manifest]:
    """The complete backups in ``storage``, oldest first; a warning line on stderr for
    each manifest that could not be read."""
    from vdistream.catalog import list_manifests

    manifests, problems = await list_manifests(storage)
    for problem in problems:
        say(f"vdistream: warning: {problem}", err=True)
    return manifests


# --- backup -----------------------------------------------------------------------------


@click.command(
    "backup",
    short_help="Back up a database into a destination.",
    epilog="Prints the backup's id on stdout (with --json one JSON object); the summary "
    "goes to stderr. Exit 0 only when the backup is complete and its manifest written.",
)
@click.argument(
    "source",
    help="What to back up: sqlite:///path/app.db, postgresql://..., "
    "mssql://user@host:port/db (SQL Server), cmd:COMMAND, external:NAME (a set published "
    "as NAME that an engine in another process opens, e.g. `vdistream feed NAME`); with "
    "--daemon also the name of a configured database.",
)
@click.argument(
    "dest",
    required=False,
    help="Where: a directory or a storage URL (file://, s3://, memory://, null://); with "
    "--daemon and a database name, leave it out.",
)
@click.option(
    "--mode",
    type=click.Choice(["basebackup", "dump", "files", *BACKUP_MODES]),
    help="PostgreSQL: physical through pg_basebackup (basebackup, the default), physical "
    "with the data directory read by vdistream itself, in parallel over the devices "
    "(files; same host), or logical (dump). SQL Server: full (the default), diff, log or "
    "copy-only.",
)
@_TRIGGER
@_SQLVDI
@click.option(
    "--devices",
    type=DEVICES,
    default=4,
    show_default=True,
    help="Virtual devices the stream is striped over, 1 to 64.",
)
@click.option(
    "--max-transfer-size",
    type=MAX_TRANSFER_SIZE,
    default="1M",
    show_default=True,
    help="Largest transfer (MAXTRANSFERSIZE): a multiple of 64K from 64K to 4M.",
)
@click.option(
    "--buffer-count",
    type=BUFFER_COUNT,
    help="Buffers shared by all devices (BUFFERCOUNT), 1 to 4096; memory is count x "
    "max transfer size. [default: 2 per device]",
)
@click.option(
    "--block-size",
    type=BLOCK_SIZE,
    default="64K",
    show_default=True,
    help="BLOCKSIZE: a power of two from 512 to 64K; every transfer is a multiple.",
)
@click.option(
    "--stall-timeout",
    type=SECONDS,
    default=60.0,
    show_default=True,
    help="Abort when no device moved a byte for this many seconds (or 90s, 5m).",
)
@click.option("--id", "backup_id", help="The backup's id in DEST. [default: time + random]")
@click.option(
    "--mirror",
    "mirror",
    metavar="DEST2",
    help="Write the same backup to DEST2 too, in the same pass (its own manifest); it is "
    "complete only when both destinations committed, a failure of either leaves nothing in "
    "either, and restore and verify read from either alone.",
)
@_MAX_RATE
@click.option(
    "--compress",
    type=COMPRESSION,
    default="none",
    show_default=True,
    help="none, zstd (level 3), zstd:1 .. zstd:19, or lz4.",
)
@_key_options("Encrypt with")
@_RECIPIENT
@_RUNTIME_DIR
@_WAIT
@_JSON
@click.option(
    "--daemon",
    is_flag=True,
    help="Have the running daemon do it (a database of its settings) instead of this process.",
)
@click.option("--socket", help="With --daemon: the daemon's socket.")
@click.option(
    "--no-wait",
    "no_wait",
    is_flag=True,
    help="With --daemon: return once the job is queued.",
)
@logging_options
@click.pass_context
def backup(ctx: click.Context, /, **params: Any) -> int:
    """Back up SOURCE into DEST through virtual devices."""
    if params["daemon"]:
        given = [
            "--" + name.replace("_", "-")
            for name in _DAEMON_OWNS
            if ctx.get_parameter_source(name) is not ParameterSource.DEFAULT
        ]
        if given:
            raise click.UsageError(
                f"{', '.join(given)} cannot be used with --daemon: the daemon takes them "
                "from its settings ([databases.NAME])"
            )
        return run(lambda: _backup_by_daemon(params), interrupted=_ABORTED_IN_DAEMON)
    if params["dest"] is None:
        raise click.UsageError("backup needs a destination (DEST)")
    if params["socket"] is not None or params["no_wait"]:
        raise click.UsageError("--socket and --no-wait go with --daemon")
    return run(lambda: _backup(params), interrupted="the backup was aborted and nothing was kept")


async def _backup_by_daemon(params: Params) -> int:
    from vdistream.cli.daemon import submit_backup_to_daemon

    source, dest = params["source"], params["dest"]
    return await submit_backup_to_daemon(
        params["socket"],
        source if dest is None else None,  # a database's name
        None if dest is None else source,
        dest,
        backup_id=params["backup_id"],
        mode=params["mode"],
        wait=not params["no_wait"],
        json_output=params["json_output"],
    )


async def _backup(params: Params) -> int:
    from vdistream.operations import BackupSettings, run_backup

    as_given = ("devices", "block_size", "max_transfer_size", "buffer_count", "stall_timeout")
    settings = BackupSettings(
        **{
            name: params[name]
            for name in (*as_given, "mode", "backup_id", "sqlvdi", "mirror", "max_rate")
        },
        compression=params["compress"],
        encryption=_key_source(params),
        external=_external_options(params, params["source"]),
    )
    source, dest = with_trigger(params["source"], params["trigger"]), params["dest"]
    outcome = await with_progress(
        "backup", lambda hook: run_backup(source, dest, settings, on_job=hook)
    )
    result = outcome.result
    manifest = outcome.manifest
    if not (outcome.ok and manifest is not None):
        emit(params["json_output"], outcome.summary(), "")
        say(f"vdistream: backup failed ({result.status.value}): {result.error}", err=True)
        return 1
    emit(params["json_output"], outcome.summary(), result.backup_id)
    say(
        f"backup {result.backup_id} complete: "
        f"{byte_counts(manifest.stream_bytes, manifest.stored_bytes)} on "
        f"{len(result.devices)} devices in {result.duration:.1f} s; "
        f"manifest {outcome.manifest_url}"
        + (f", mirror {outcome.mirror_manifest_url}" if outcome.mirror_manifest_url else ""),
        err=True,
    )
    return 0


# --- restore, verify ----------------------------------------------------------------------


@click.command(
    "restore",
    short_help="Restore a backup into a target.",
    epilog="A restore publishes its target only after every stream passed every check; a "
    "cmd: consumer cannot be undone, so --verify-first reads and checks everything "
    "before feeding it.",
)
@_BACKUP
@click.argument(
    "target",
    help="SQLite: a database file; PostgreSQL basebackup: an empty data directory; dump: "
    "a database URL or a file; SQL Server: mssql://user@host:port/db; cmd:COMMAND: a "
    "command reading the stream on stdin; external:NAME: a set published as NAME that an "
    "engine in another process opens and reads (e.g. `vdistream drain NAME`).",
)
@click.option(
    "--to",
    "to",
    type=TIME_OR_LATEST,
    help="SQL Server: BACKUP is a destination (DEST), and the database is restored from "
    "its chain (full, latest differential, logs) as it was at this UTC time, or latest.",
)
@click.option(
    "--database",
    "chain_database",
    metavar="NAME",
    help="SQL Server with --to: whose backups to restore. [default: the target's name]",
)
@click.option("--replace", is_flag=True, help="SQL Server: restore over an existing database.")
@click.option(
    "--norecovery",
    is_flag=True,
    help="SQL Server: leave the database restoring, for more backups to follow.",
)
@click.option(
    "--move",
    "moves",
    type=MOVE,
    multiple=True,
    help="SQL Server: LOGICAL=PATH, where a file of the backup goes (repeatable). "
    "[default: beside the original, named after the target database]",
)
@click.option(
    "--stopat",
    type=POINT_IN_TIME,
    help="SQL Server log backup: stop at this UTC time (STOPAT).",
)
@_TRIGGER
@_SQLVDI
@click.option(
    "--overwrite",
    is_flag=True,
    help="Replace an existing SQLite file; PostgreSQL dump: drop objects first (--clean).",
)
@click.option("--create", is_flag=True, help="PostgreSQL dump: create the target database.")
@click.option(
    "--owner",
    metavar="USER",
    help="PostgreSQL basebackup or files: give the restored directory to this user.",
)
@click.option(
    "--delta",
    is_flag=True,
    help="PostgreSQL files: restore over a STOPPED cluster's data directory, writing only "
    "the files whose size or checksum differ from the backup and removing the others.",
)
@click.option(
    "--verify-first",
    is_flag=True,
    help="Read and check every stream completely before the engine gets a byte "
    "(for cmd: consumers, which cannot be undone). Reads the backup twice.",
)
@_key_options("The key of an encrypted backup:")
@_IDENTITY
@_MAX_RATE
@_RUNTIME_DIR
@_WAIT
@_JSON
@logging_options
@runs("the restore was aborted")
async def restore(params: Params) -> int:
    """Restore BACKUP into TARGET."""
    from vdistream.operations import run_restore

    backup_ref, target = params["backup"], with_trigger(params["target"], params["trigger"])
    _check_restore_options(params, target)
    external = _external_options(params, target)
    if params["to"] is not None or params["chain_database"] is not None:
        return await _restore_chain(params, backup_ref, target)
    flags = {
        name: params[name] for name in ("overwrite", "create", "owner", "verify_first", "delta")
    }
    from vdistream.operations import SqlRestoreOptions

    sqlserver = SqlRestoreOptions(
        replace=params["replace"],
        recovery=not params["norecovery"],
        moves=tuple(params["moves"]),
        stopat=params["stopat"],
        sqlvdi=params["sqlvdi"],
    )
    result = await with_progress(
        "restore",
        lambda hook: run_restore(
            backup_ref,
            target,
            keys=_key_source(params),
            on_job=hook,
            sqlserver=sqlserver,
            external=external,
            max_rate=params["max_rate"],
            **flags,
        ),
    )
    summary = {
        "id": result.backup_id,
        "status": result.status.value,
        "target": shown(target),
        "bytes": result.bytes,
        "seconds": round(result.duration, 3),
        "error": None if result.ok else str(result.error),
    }
    # a files-mode restore says what it wrote, kept and removed (delta)
    files = {
        name: getattr(result.engine_result, name)
        for name in ("written_files", "skipped_files", "removed_paths")
        if hasattr(result.engine_result, name)
    }
    summary.update(files)
    emit(params["json_output"], summary, "")
    if result.ok:
        counts = (
            f"; {files['written_files']:,} files written, {files['skipped_files']:,} unchanged, "
            f"{files['removed_paths']:,} removed"
            if files
            else ""
        )
        say(
            f"restored {result.backup_id} into {shown(target)}: logical {result.bytes:,} bytes "
            f"in {result.duration:.1f} s{counts}",
            err=True,
        )
        return 0
    say(f"vdistream: restore failed: {result.error}", err=True)
    return 1


def _check_restore_options(params: Params, target: str) -> None:
    """Refuse options that would be silently ignored (usage errors, exit 2)."""

    def given(name: str) -> bool:
        return params[name] not in (None, False, ())

    def flag(name: str) -> str:
        return {"moves": "--move", "chain_database": "--database"}.get(
            name, "--" + name.replace("_", "-")
        )

    if is_sqlserver_url(target):
        wrong = [flag(n) for n in _NOT_FOR_SQLSERVER if given(n)]
        if wrong:
            raise click.UsageError(
                f"{', '.join(wrong)} {'does' if len(wrong) == 1 else 'do'} not apply to a "
                "SQL Server restore "
                "(--replace restores over an existing database)"
            )
        if given("to") or given("chain_database"):
            if not given("to"):
                raise click.UsageError("--database goes with --to (a chain restore)")
            clash = [flag(n) for n in ("stopat", "verify_first") if given(n)]
            if clash:
                raise click.UsageError(
                    f"{', '.join(clash)} cannot be used with --to (--to TIME is the point "
                    "the chain stops at)"
                )
        return
    wrong = [flag(n) for n in _SQLSERVER_ONLY if given(n)]
    if wrong:
        raise click.UsageError(
            f"{', '.join(wrong)} {'applies' if len(wrong) == 1 else 'apply'} only to a "
            "SQL Server target (mssql://...)"
        )


async def _restore_chain(params: Params, dest: str, target: str) -> int:
    """``restore DEST mssql://... --to TIME|latest``: a SQL Server chain."""
    from vdistream.operations import run_chain_restore

    outcome = await with_progress(
        "restore",
        lambda hook: run_chain_restore(
            dest,
            target,
            to=None if params["to"] == "latest" else params["to"],
            database=params["chain_database"],
            replace=params["replace"],
            norecovery=params["norecovery"],
            moves=tuple(params["moves"]),
            sqlvdi=params["sqlvdi"],
            keys=_key_source(params),
            on_job=hook,
        ),
    )
    steps = [
        {
            "id": result.backup_id,
            "kind": step.kind,
            "recovery": step.recovery,
            "stopat": step.stopat.isoformat() if step.stopat else None,
            "status": result.status.value,
            "bytes": result.bytes,
        }
        for step, result in outcome.steps
    ]
    summary = {
        "target": MssqlURL.parse(target).display,
        "status": "succeeded" if outcome.ok else "failed",
        "steps": steps,
        "bytes": outcome.bytes,
        "error": None if outcome.ok else str(outcome.error),
    }
    emit(params["json_output"], summary, "")
    for step, result in outcome.steps:
        say(
            f"{step.kind} {result.backup_id}: {result.status.value}"
            + (f" (STOPAT {step.stopat.isoformat()})" if step.stopat else ""),
            err=True,
        )
    if outcome.ok:
        say(f"restored {summary['target']} from {len(steps)} backups", err=True)
        return 0
    say(f"vdistream: restore failed: {outcome.error}", err=True)
    return 1


@click.command("verify", short_help="Re-read and check a backup.")
@_BACKUP
@click.option(
    "--no-content",
    is_flag=True,
    help="Check the streams only; skip the test restore the database checks.",
)
@click.option(
    "--engine",
    is_flag=True,
    help="SQL Server: after vdistream's own checks, have SQL Server check the backup "
    "(RESTORE VERIFYONLY through the devices).",
)
@click.option(
    "--server",
    metavar="URL",
    help="SQL Server with --engine: the server that checks it. [default: the backup's own]",
)
@_TRIGGER
@_SQLVDI
@_key_options("The key of an encrypted backup:")
@_IDENTITY
@_MAX_RATE
@_JSON
@logging_options
@runs("the verification was stopped")
async def verify(params: Params) -> int:
    """Re-read every stream of BACKUP and check it, then let the database check a test
    restore, without touching the source. Prints one line per check on stdout."""
    from vdistream.operations import run_verify

    if params["engine"] and params["no_content"]:
        raise click.UsageError("--engine is SQL Server's content check: leave out --no-content")
    if not params["engine"] and (params["server"] or params["trigger"] or params["sqlvdi"]):
        raise click.UsageError("--server, --trigger and --sqlvdi go with --engine")
    report = await run_verify(
        params["backup"],
        content=not params["no_content"],
        keys=_key_source(params),
        engine=params["engine"],
        server=with_trigger(params["server"], params["trigger"]) if params["server"] else None,
        sqlvdi=params["sqlvdi"],
        trigger=params["trigger"],
        max_rate=params["max_rate"],
    )
    lines = [f"{'ok ' if c.ok else 'BAD'} {c.name}: {c.detail}" for c in report.checks]
    lines.append(f"backup {report.backup_id}: {'verified' if report.ok else 'FAILED'}")
    emit(params["json_output"], report.summary(), "\n".join(lines))
    if report.ok:
        return 0
    bad = next((c for c in report.checks if not c.ok), None)
    detail = f"{bad.name}: {bad.detail}" if bad is not None else "no checks ran"
    say(f"vdistream: verify failed: {detail}", err=True)
    return 1


# --- list, storage audit ----------------------------------------------------------------


@click.command("list", short_help="List the backups in a destination.")
@_DEST
@click.option("--json", "json_output", is_flag=True, help="Print one JSON array on stdout instead.")
@logging_options
@runs("the listing was stopped")
async def list_(params: Params) -> int:
    """List the complete backups in DEST (those with a committed manifest), oldest
    first. A missing DEST, or one that is not a directory, is an error."""
    dest = params["dest"]
    async with destination(dest) as storage:
        manifests = await backups_in(storage)
    rows = [manifest.summary() for manifest in manifests]
    try:
        labels = chain_labels(manifests)
    except CatalogError as exc:  # a damaged SQL Server record: list anyway, say why
        say(f"vdistream: warning: chains not shown: {exc}", err=True)
        labels = {}
    for row in rows:
        if labels.get(row["id"]):
            row["chain"] = labels[row["id"]]
    lines = [
        f"{row['id']}  {row['engine']}{'/' + row['mode'] if row['mode'] else ''}  "
        f"{row['ended']}  {byte_counts(m.stream_bytes, m.stored_bytes)}  "
        f"{row['devices']} devices  {row['source']}"
        + (f"  [{row['chain']}]" if row.get("chain") else "")
        for row, m in zip(rows, manifests, strict=True)
    ]
    emit(params["json_output"], rows, "\n".join(lines))
    if not rows and not params["json_output"]:
        say(f"no backups in {dest}", err=True)
    return 0


@click.group("storage", short_help="Look after a destination.")
@logging_options
def storage() -> None:
    """Look after a destination."""


@storage.command(
    "audit",
    short_help="Find (and with --clean remove) what no backup references.",
    epilog="Exit codes: 0 nothing to clean (or all of it removed); 3 debris found and "
    "not removed (run again with --clean); 1 the audit or a removal failed.",
)
@_DEST
@click.option("--clean", is_flag=True, help="Remove the debris found.")
@click.option(
    "--min-age",
    type=MIN_AGE,
    default="1h",
    show_default=True,
    help="Leave debris younger than this alone, it may be a running job's "
    "(30s, 90m, 14d; 0 for all).",
)
@_JSON
@logging_options
@runs("the audit was stopped")
async def _audit(params: Params) -> int:
    """List the objects, temporaries and multipart uploads under DEST that no committed
    manifest references: the debris of failed or killed jobs."""
    from vdistream.catalog.audit import audit as run_audit

    dest = params["dest"]
    min_age: Duration = params["min_age"]
    async with destination(dest) as opened:
        report = await run_audit(opened, clean=params["clean"], min_age=min_age.delta or None)
    lines = [f"{len(report.backups)} backups, {len(report.referenced)} objects referenced"]
    lines += [f"orphan object: {key}" for key in report.orphan_objects]
    lines += [f"orphan upload: {up.key} ({up.upload_id})" for up in report.orphan_uploads]
    lines += [f"temporary: {key}" for key in report.temporaries]
    lines += [f"kept (unreadable manifest): {key}" for key in report.unverifiable]
    lines += [f"missing (named by a manifest): {key}" for key in report.missing]
    lines += [f"too young to judge: {key}" for key in report.too_young]
    if params["clean"]:
        removed = len(report.removed_objects) + len(report.aborted_uploads)
        removed += len(report.removed_temporaries)
        lines.append(f"removed {removed}")
    lines += [f"FAILED: {failure}" for failure in report.failures]
    emit(params["json_output"], dataclasses.asdict(report), "\n".join(lines))
    if report.failures:
        say(f"vdistream: storage audit: {len(report.failures)} failure(s)", err=True)
        return 1
    debris = len(report.orphan_objects) + len(report.orphan_uploads) + len(report.temporaries)
    if debris and not params["clean"]:
        say(
            f"vdistream: storage audit: {debris} item(s) of debris in {dest}; "
            f"`vdistream storage audit {dest} --clean` removes them",
            err=True,
        )
        return _AUDIT_DEBRIS
    return 0


# --- keygen, demo -----------------------------------------------------------------------


@click.command("keygen", short_help="Write a new random encryption key file (mode 0600).")
@click.argument("path", help="The new key file; an existing file is never overwritten.")
@logging_options
@runs("no key was written")
async def keygen(params: Params) -> int:
    """Write a new random 32-byte key to PATH (mode 0600) and print its fingerprint."""
    from vdistream.pipeline.keys import generate_key_file

    key = await anyio.to_thread.run_sync(generate_key_file, params["path"])
    say(f"wrote a new key to {params['path']} (mode 0600), fingerprint {key.fingerprint}")
    return 0


@click.command("demo", short_help="Create a SQLite database, back it up, verify it, restore it.")
@click.option(
    "--dir",
    "directory",
    default="vdistream-demo",
    show_default=True,
    help="Where the database, the backups and the restored copy go.",
)
@click.option("--db", help="An existing SQLite database to use instead of a new one.")
@logging_options
@runs("the demo was stopped; its backup was aborted")
async def demo(params: Params) -> int:
    """A real backup, verify and restore of a SQLite database, each step printed."""
    from vdistream.demo import run_demo

    return await run_demo(params["directory"], params["db"])
