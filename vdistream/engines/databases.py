"""Databases by URL: the bridge the command line and the catalog call.

* ``resolve_source(url, mode=None) -> DatabaseSource``: what to back up.

  =====================================  ===========  ==================================
  URL                                    kind         mode
  =====================================  ===========  ==================================
  ``sqlite:///abs/path/app.db``          ``sqlite``   ``None``
  ``sqlite:relative/path.db``            ``sqlite``   ``None`` (made absolute at once)
  ``postgresql://user@host:5432/db``     ``postgresql`` ``basebackup`` (default), ``dump``
                                                     or ``files`` (``vdistream.engines.pgfiles``)
  ``postgres://...`` (libpq's alias)     ``postgresql`` as above
  ``cmd:<command line>``                 ``cmd``      ``None`` (split with shlex, no shell)
  ``external:NAME``                      ``external`` ``None`` (an engine in another process
                                                     opens the set NAME:
                                                     ``vdistream.engines.external``)
  =====================================  ===========  ==================================

  An unknown scheme, a malformed URL or a mode that does not fit raises
  ``vdistream.errors.ConfigError`` naming the URL (its password removed) and the known
  schemes.
* ``DatabaseSource``: ``kind``, ``mode``, ``display`` (the URL without credentials: this
  is what may be stored and shown), ``backup_engine(options)`` (a new ``Engine`` per
  call: an engine serves one job), ``await describe()`` (tool and server versions, no
  secrets). The password of a PostgreSQL URL is kept only inside the object, for the
  tools' environment; it is in no field that is printed, compared or stored.
* ``restore_engine(kind, mode, target, options, *, overwrite=False)``: where a backup
  goes back to. ``target`` is, by kind: ``sqlite`` a database file path (never replaced
  unless ``overwrite``); ``postgresql``/``basebackup`` a data directory (absent or
  empty); ``postgresql``/``files`` a data directory (absent or empty; or, with
  ``delta=True``, a stopped cluster's directory that only the files that differ from the
  backup's ``expected`` list are written into); ``postgresql``/``dump`` a database URL
  (``pg_restore``; ``overwrite`` adds ``--clean --if-exists``; ``create=True`` creates
  it first) or, when it is not a URL, a file path that receives the archive; ``cmd`` a
  command line whose standard input gets the stream, or ``DISCARD_TARGET`` (``"null:"``)
  to verify the stream and keep nothing; ``external`` (a backup an engine in another
  process wrote) a ``cmd:`` target as for ``cmd`` (``vdistream feed`` writes that
  stream format). Any backup but SQL Server's may also go to ``external:NAME``: the
  set published under NAME serves the stored streams to the engine that opens it
  (``vdistream drain NAME``), which reads them in its own format.
* ``external`` options (``ExternalOptions``: runtime directory, group, connect timeout)
  are given to ``backup_engine`` and ``restore_engine`` as ``external=``.
* ``await content_check(kind, mode, workdir) -> (target, check)``: for ``verify``: a
  restore target inside ``workdir`` (a temporary directory the caller owns and
  removes), and a coroutine function to await once the restore into that target
  succeeded. It returns a short text of what was checked and raises ``EngineError``
  with the tool's message when the content is bad. ``external`` backups have no
  content check here (the stream's format is the external engine's): ``ConfigError``.
"""

from __future__ import annotations

import dataclasses
import shutil
import stat
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

import anyio.lowlevel
import anyio.to_thread

from vdistream.engines.base import Engine
from vdistream.engines.command import (
    CommandBackup,
    CommandRestore,
    DiscardConsumer,
    parse_command,
)
from vdistream.engines.external import SCHEME as EXTERNAL_SCHEME
from vdistream.engines.external import (
    ExternalBackup,
    ExternalOptions,
    ExternalRestore,
    external_name,
)
from vdistream.engines.pgfiles.layout import FileRecord
from vdistream.engines.postgres import (
    PostgresBaseBackup,
    PostgresBaseRestore,
    PostgresDump,
    PostgresDumpFile,
    PostgresDumpRestore,
    PostgresURL,
    check_dump_archive,
    describe_control_data,
    describe_postgres,
    verify_base_backup,
)
from vdistream.engines.scoped import ScopedRestore
from vdistream.engines.sqlite import SQLiteBackup, SQLiteRestore, database_info, integrity_check
from vdistream.engines.striping import StripingOptions
from vdistream.errors import ConfigError

__all__ = (
    "DISCARD_TARGET",
    "EXTERNAL_SCHEME",
    "KINDS",
    "KNOWN_SCHEMES",
    "POSTGRES_MODES",
    "DatabaseSource",
    "content_check",
    "resolve_source",
    "restore_engine",
)

KINDS = ("sqlite", "postgresql", "cmd", "external")
KNOWN_SCHEMES = ("sqlite:", "postgresql:", "postgres:", "cmd:", EXTERNAL_SCHEME)
POSTGRES_MODES = ("basebackup", "dump", "files")
#: The ``cmd`` restore target that keeps nothing (the stream is still verified).
DISCARD_TARGET = "null:"


def _known() -> str:
    return ", ".join(KNOWN_SCHEMES)


@dataclasses.dataclass(frozen=True)
class _SQLiteSpec:
    path: Path


@dataclasses.dataclass(frozen=True)
class _CommandSpec:
    argv: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class _ExternalSpec:
    name: str


_Spec = _SQLiteSpec | PostgresURL | _CommandSpec | _ExternalSpec


@dataclasses.dataclass(frozen=True)
class DatabaseSource:
    """What to back up (module docstring). Build it with ``resolve_source``.

    Its fields are exactly what may be shown and stored (``dataclasses.asdict`` gives
    them); how to connect, password included, is kept outside the fields.
    """

    kind: str
    mode: str | None
    display: str
    spec: dataclasses.InitVar[_Spec | None] = None

    def __post_init__(self, spec: _Spec | None) -> None:
        if spec is None:
            raise ConfigError(f"{self.display!r}: build a DatabaseSource with resolve_source")
        object.__setattr__(self, "_spec", spec)

    def backup_engine(
        self,
        options: StripingOptions | None = None,
        *,
        tempdir: Path | None = None,
        external: ExternalOptions | None = None,
        job: str = "",
    ) -> Engine:
        """A new backup engine for this source (an engine serves one job); ``tempdir``:
        where an engine that stages data (SQLite's snapshot) puts it (default: the
        system's temporary directory); ``external``: where and how long an
        ``external:`` source's set waits for its engine, ``job`` the label the engine
        is told (the backup id)."""
        spec: _Spec = self._spec  # type: ignore[attr-defined]
        if isinstance(spec, _ExternalSpec):
            return ExternalBackup(spec.name, external, job=job)
        if isinstance(spec, _SQLiteSpec):
            return SQLiteBackup(spec.path, options, tempdir=tempdir)
        if isinstance(spec, PostgresURL):
            if self.mode == "dump":
                return PostgresDump(spec, options)
            if self.mode == "files":
                # imported here: psycopg is needed by this mode only (start-up cost)
                from vdistream.engines.pgfiles.backup import PgFilesBackup

                return PgFilesBackup(spec, options)
            return PostgresBaseBackup(spec, options)
        return CommandBackup(list(spec.argv), options)

    async def file_mode(self) -> int | None:
        """The permission bits of the source's file (SQLite), None for other sources:
        the restored file follows them (within the umask of the restoring process)."""
        spec: _Spec = self._spec  # type: ignore[attr-defined]
        if not isinstance(spec, _SQLiteSpec):
            return None
        try:
            return stat.S_IMODE((await anyio.Path(spec.path).stat()).st_mode)
        except OSError:
            return None

    async def describe(self) -> dict[str, str]:
        """Tool and server versions for this source; never a secret.

        Raises ``EngineError`` when the source cannot be reached or read.
        """
        spec: _Spec = self._spec  # type: ignore[attr-defined]
        if isinstance(spec, _SQLiteSpec):
            info = await anyio.to_thread.run_sync(database_info, spec.path)
            return {"kind": "sqlite", "source": self.display, **info}
        if isinstance(spec, PostgresURL):
            assert self.mode is not None
            return await describe_postgres(spec, self.mode)
        if isinstance(spec, _ExternalSpec):
            await anyio.lowlevel.checkpoint()
            return {"kind": "external", "source": self.display}
        program = shutil.which(spec.argv[0]) or spec.argv[0]
        return {"kind": "cmd", "source": self.display, "program": program}


def resolve_source(url: str, *, mode: str | None = None) -> DatabaseSource:
    """The ``DatabaseSource`` for ``url`` (module docstring); ``ConfigError`` if unusable."""
    if not isinstance(url, str) or not url.strip():
        raise ConfigError(f"no database URL given (known schemes: {_known()})")
    scheme, colon, rest = url.partition(":")
    scheme = scheme.lower()
    if not colon or not scheme:
        raise ConfigError(
            f"{url!r} is not a database URL: it has no scheme (known schemes: {_known()})"
        )
    if scheme == "sqlite":
        _no_mode(url, "sqlite", mode)
        path = _sqlite_path(url)
        return DatabaseSource("sqlite", None, f"sqlite://{quote(str(path))}", _SQLiteSpec(path))
    if scheme in ("postgresql", "postgres"):
        chosen = mode or "basebackup"
        if chosen not in POSTGRES_MODES:
            raise ConfigError(
                f"mode {mode!r} for {PostgresURL.parse(url).display!r}: a PostgreSQL source "
                f"is backed up with mode {' or '.join(POSTGRES_MODES)}"
            )
        parsed = PostgresURL.parse(url)
        return DatabaseSource("postgresql", chosen, parsed.display, parsed)
    if scheme == "cmd":
        _no_mode(url, "cmd", mode)
        try:
            argv = parse_command(rest)
        except ConfigError as exc:
            raise ConfigError(f"{url!r}: {exc}") from exc
        return DatabaseSource("cmd", None, f"cmd:{rest}", _CommandSpec(tuple(argv)))
    if scheme == "external":
        _no_mode(url, "external", mode)
        name = external_name(url)
        return DatabaseSource("external", None, f"{EXTERNAL_SCHEME}{name}", _ExternalSpec(name))
    raise ConfigError(
        f"{_shown(url)!r} has an unknown scheme {scheme!r} (known schemes: {_known()})"
    )


def _shown(url: str) -> str:
    """``url`` for an error message: a password-looking part of it hidden."""
    head, at, tail = url.partition("@")
    if at and ":" in head.partition("://")[2]:
        scheme, sep, userinfo = head.partition("://")
        return f"{scheme}{sep}{userinfo.split(':', 1)[0]}:***@{tail}"
    return url


def _no_mode(url: str, kind: str, mode: str | None) -> None:
    if mode is not None:
        raise ConfigError(f"mode {mode!r} for {url!r}: a {kind} source has no modes")


def _sqlite_path(url: str) -> Path:
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        raise ConfigError(f"malformed SQLite URL {url!r}: {exc}") from exc
    if parts.query or parts.fragment:
        raise ConfigError(
            f"malformed SQLite URL {url!r}: no ?query or #fragment is understood "
            "(sqlite:///absolute/path.db or sqlite:relative/path.db)"
        )
    if parts.netloc:
        raise ConfigError(
            f"malformed SQLite URL {url!r}: {parts.netloc!r} is read as a host; write "
            "sqlite:///absolute/path.db (three slashes) or sqlite:relative/path.db"
        )
    text = unquote(parts.path)
    if not text or text.endswith("/"):
        raise ConfigError(
            f"malformed SQLite URL {url!r}: it names no database file "
            "(sqlite:///absolute/path.db or sqlite:relative/path.db)"
        )
    return Path(text).absolute()


# --- restore ---------------------------------------------------------------------------


def restore_engine(
    kind: str,
    mode: str | None,
    target: str,
    options: StripingOptions | None = None,
    *,
    overwrite: bool = False,
    create: bool = False,
    no_owner: bool = False,
    owner: str | int | None = None,
    file_mode: int | None = None,
    delta: bool = False,
    expected: Sequence[FileRecord] | None = None,
    tablespaces_under: Path | None = None,
    external: ExternalOptions | None = None,
    job: str = "",
) -> Engine:
    """A restore engine for a backup of ``kind``/``mode`` into ``target`` (module docstring).

    ``create`` and ``no_owner`` apply to PostgreSQL dumps restored into a database,
    ``owner`` to base backups (the restored data directory's user; root only),
    ``file_mode`` to SQLite (the source file's mode recorded in the manifest),
    ``delta``, ``expected`` (the manifest's file list) and ``tablespaces_under`` (a
    directory that receives the tablespaces instead of their recorded locations: what
    ``verify`` uses) to PostgreSQL's files mode; ``external`` and ``job`` to an
    ``external:NAME`` target (any kind: the engine that opens NAME reads the streams as
    they are). ``ConfigError`` when the combination makes no sense.
    """
    if target.lower().startswith(EXTERNAL_SCHEME):
        if overwrite or create or delta or owner is not None:
            raise ConfigError(
                f"{target!r}: an external target is an engine in another process; "
                "--overwrite, --create, --owner and --delta do not apply to it"
            )
        return ExternalRestore(external_name(target), external, job=job)
    if delta and (kind != "postgresql" or mode != "files"):
        raise ConfigError(
            "a delta restore is for PostgreSQL backups in files mode; this backup is "
            f"{kind}{'/' + mode if mode else ''}"
        )
    if kind == "sqlite":
        _no_mode(target, "sqlite", mode)
        return SQLiteRestore(
            _target_path(target, "sqlite"), options, overwrite=overwrite, file_mode=file_mode
        )
    if kind == "postgresql":
        chosen = mode or "basebackup"
        if chosen == "files":
            if overwrite:
                raise ConfigError(
                    f"a files-mode backup is restored into an empty data directory, or over "
                    f"a stopped cluster with --delta; {target!r} is never overwritten as a whole"
                )
            from vdistream.engines.pgfiles.restore import PgFilesRestore

            return PgFilesRestore(
                _target_path(target, "data directory"),
                options,
                delta=delta,
                expected=expected,
                owner=owner,
                tablespaces_under=tablespaces_under,
            )
        if chosen == "basebackup":
            if overwrite:
                raise ConfigError(
                    f"a base backup is restored into an empty data directory only; empty "
                    f"{target!r} yourself instead of asking to overwrite it"
                )
            return PostgresBaseRestore(_target_path(target, "data directory"), options, owner=owner)
        if chosen == "dump":
            if target.partition(":")[0].lower() in ("postgresql", "postgres"):
                return PostgresDumpRestore(
                    target, options, create=create, no_owner=no_owner, clean=overwrite
                )
            return PostgresDumpFile(
                _target_path(target, "archive file"), options, overwrite=overwrite
            )
        raise ConfigError(
            f"mode {mode!r}: a PostgreSQL backup has mode {' or '.join(POSTGRES_MODES)}"
        )
    if kind in ("cmd", "external"):
        _no_mode(target, kind, mode)
        if kind == "external" and not target.startswith(("cmd:", DISCARD_TARGET)):
            raise ConfigError(
                f"{target!r}: a backup an external engine wrote goes back to an external "
                "engine (external:NAME, e.g. read by `vdistream drain NAME`) or, when "
                "`vdistream feed` wrote it, to a command (cmd:COMMAND)"
            )
        if target == DISCARD_TARGET:
            return ScopedRestore(DiscardConsumer(), options)
        command = target.removeprefix("cmd:")
        return CommandRestore(command, options)
    raise ConfigError(f"unknown database kind {kind!r} (known kinds: {', '.join(KINDS)})")


def _target_path(target: str, what: str) -> Path:
    text = target
    if text.startswith("sqlite:"):
        text = str(_sqlite_path(text))
    elif text.startswith("file://"):
        text = unquote(urlsplit(text).path)
    if not text:
        raise ConfigError(f"no {what} given as the restore target")
    return Path(text).absolute()


# --- verify ----------------------------------------------------------------------------

Check = Callable[[], Awaitable[str]]


async def content_check(kind: str, mode: str | None, workdir: Path) -> tuple[str, Check]:
    """A restore target in ``workdir`` and the check of what lands there (module docstring)."""
    workdir = Path(workdir)
    if kind == "sqlite":
        database = workdir / "restored.db"

        async def check_sqlite() -> str:
            await anyio.to_thread.run_sync(lambda: integrity_check(database))
            return "integrity_check ok"

        return str(database), check_sqlite
    if kind == "postgresql":
        chosen = mode or "basebackup"
        if chosen == "basebackup":
            datadir = workdir / "pgdata"

            async def check_basebackup() -> str:
                verdict = await verify_base_backup(datadir)
                return f"pg_verifybackup: {verdict}"

            return str(datadir), check_basebackup
        if chosen == "files":
            datadir = workdir / "pgdata"

            async def check_files() -> str:
                # The restore itself checked every file's CRC-32 and the backup's index.
                control = await describe_control_data(datadir)
                return f"every file matched its CRC-32 and the index; pg_controldata: {control}"

            return str(datadir), check_files
        if chosen == "dump":
            archive = workdir / "dump.pgcustom"

            async def check_dump() -> str:
                _, text = await check_dump_archive(archive)
                return text

            return str(archive), check_dump
        raise ConfigError(
            f"mode {mode!r}: a PostgreSQL backup has mode {' or '.join(POSTGRES_MODES)}"
        )
    if kind == "cmd":

        async def check_stream() -> str:
            await anyio.lowlevel.checkpoint()
            return "stream reassembled and verified"

        return DISCARD_TARGET, check_stream
    if kind == "external":
        raise ConfigError(
            "an external engine's backup has no content check here: its stream's format "
            "is the engine's own (its streams' sizes and SHA-256 are checked)"
        )
    raise ConfigError(f"unknown database kind {kind!r} (known kinds: {', '.join(KINDS)})")
