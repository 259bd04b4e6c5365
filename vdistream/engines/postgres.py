"""PostgreSQL through its own tools: ``pg_basebackup`` and ``pg_dump`` streamed into the
devices, restored with ``tarfile`` + ``pg_verifybackup`` or ``pg_restore``.

Connections are given the way PostgreSQL users give them: a libpq URL
(``postgresql://user@host:5432/db``, ``postgresql:///db?host=/run/postgresql``, or just
``postgresql://``) completed by the ``PG*`` environment variables (``PGHOST``,
``PGPORT``, ``PGUSER``, ``PGPASSFILE``, ... are passed through to every tool).
``PostgresURL`` splits the password off: it never appears on a command line (where
``ps`` shows it), in a log, in ``display`` or in ``describe()``; the tools get it as
``PGPASSWORD`` in their environment. Every tool runs with ``-w``: it never prompts, a
missing password is an error with libpq's own words.

Modes:

* ``PostgresBaseBackup`` (``basebackup``): ``pg_basebackup -D - -Ft -X fetch
  --checkpoint=fast --manifest-checksums=SHA256 -w``: the whole cluster as one tar
  stream on stdout, with the WAL needed to make it consistent (``pg_wal/``) and, since
  PostgreSQL 15, the ``backup_manifest`` inside the stream. The stream is striped into
  the devices while it is produced; the backup succeeds only if ``pg_basebackup``
  exits 0 after its output ended. ``--checkpoint=fast`` is the default because a
  spread checkpoint keeps the devices idle for minutes (the job's stall watchdog
  would abort). The manifest option is passed to tools that know it (13 and later).
  Clusters with tablespaces cannot be written to stdout by ``pg_basebackup``; it says
  so, and that text is the job's error. With ``-X fetch`` the server must keep the
  WAL written during the backup (``wal_keep_size``) or the tool fails at the end.
* ``PostgresBaseRestore``: the stream is extracted (``TarExtractConsumer``: Python's
  ``tarfile``, stream mode, ``data`` filter) into an EMPTY (or absent) data
  directory, mode 0700, owned by the user running vdistream, or by ``owner`` (root
  only; e.g. ``"postgres"``: the server refuses a data directory that is not its
  user's); then ``pg_verifybackup`` must accept it (it checks every file against the
  manifest and parses the WAL in ``pg_wal/``). A failed restore leaves the directory
  as it was found. Starting a server on it is the caller's business (the backup label
  makes it recover to a consistent state first).
* ``PostgresDump`` (``dump``): ``pg_dump -Fc -w`` to stdout: one database, custom
  format (compressed, restorable selectively).
* ``PostgresDumpRestore``: ``pg_restore -d URL -w --exit-on-error --single-transaction``
  with the stream on its stdin; ``create=True`` first creates the database named in
  the URL (``createdb``; dropped again if the restore fails), ``no_owner=True`` adds
  ``--no-owner``, ``clean=True`` adds ``--clean --if-exists``. Its exit status decides.
  A restore into a live database cannot be taken back once committed, so it is ONE
  transaction: when the stream fails a check (vdistream's, at its end) or the tool
  fails, ``pg_restore`` is stopped before it commits and the database is as it was
  (``--clean`` included). ``pg_restore`` commits once it has read the archive's last
  byte, so the consumer holds the stream's last ``HOLD_BACK`` bytes back until the
  engine's ``finish()``, which comes only after every stream passed every check: the
  commit can never precede the checks.
  A dump can also be restored to a FILE (``PostgresDumpFile``): the archive, checked
  for the custom format's signature, for ``pg_restore`` later.

Tools are looked up in ``bindir`` if given, else on ``PATH``, else in the newest
``/usr/lib/postgresql/*/bin`` (Debian's layout, where ``pg_verifybackup`` is not on
``PATH``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import os
import re
import shutil
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Unpack
from urllib.parse import quote, unquote, urlsplit

import anyio
import anyio.to_thread

from vdistream.engines.faults import FailPoint
from vdistream.engines.files import AtomicFileConsumer
from vdistream.engines.process import (
    ConsumerFailedError,
    ProcessConsumer,
    ProcessFailedError,
    ProcessOptions,
    ProcessProducer,
    ProducerFailedError,
    ToolFailedError,
    run_tool,
)
from vdistream.engines.scoped import EndpointError, ScopedBackup, ScopedRestore
from vdistream.engines.striping import StripingOptions
from vdistream.engines.tarstream import TarExtractConsumer
from vdistream.errors import ConfigError
from vdistream.log import get_logger

__all__ = (
    "DUMP_SIGNATURE",
    "PostgresBaseBackup",
    "PostgresBaseRestore",
    "PostgresDump",
    "PostgresDumpFile",
    "PostgresDumpRestore",
    "PostgresError",
    "PostgresURL",
    "check_dump_archive",
    "describe_control_data",
    "describe_postgres",
    "find_tool",
    "tool_major_version",
    "verify_base_backup",
)

SCHEMES = ("postgresql", "postgres")
#: The first bytes of a custom-format archive (``pg_dump -Fc``).
DUMP_SIGNATURE = b"PGDMP"
#: Bound of the quick helper calls (version queries, createdb, dropdb).
QUICK_TOOL_SECONDS = 60.0
#: How much of the end of a dump ``pg_restore`` gets only at ``finish()``: any amount
#: keeps it from reaching the end of the archive, and so from committing.
HOLD_BACK = 64 * 1024
_SECRET_PARAMETERS = frozenset({"password"})
_HIDDEN_PARAMETERS = frozenset({"password", "sslpassword"})

_log = get_logger(__name__)


class PostgresError(EndpointError):
    """A PostgreSQL backup or restore failed outside the tools' own exit status."""


# --- connections ---------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PostgresURL:
    """A libpq URL with its password split off (module docstring).

    ``url`` is the URL without the password (what goes on a tool's command line),
    ``display`` the same without other secret parameters either (for logs, the
    catalog, ``describe``), ``dbname`` the database it names (``None``: libpq's
    default, the user name), ``password`` the secret, given to tools as ``PGPASSWORD``
    only (``env()``). Build one with ``PostgresURL.parse``.
    """

    url: str
    display: str
    dbname: str | None
    password: str | None = dataclasses.field(default=None, repr=False, compare=False)

    @classmethod
    def parse(cls, url: str) -> PostgresURL:
        """Split ``url``; ``ConfigError`` naming it (without its password) if malformed."""
        scheme, sep, _ = url.partition("://")
        if scheme.lower() not in SCHEMES or not sep:
            raise ConfigError(
                f"{_scrub(url)!r} is not a PostgreSQL URL (postgresql://[user@][host]"
                "[:port][/dbname][?param=value&...])"
            )
        try:
            parts = urlsplit(url)
        except ValueError as exc:
            raise ConfigError(f"malformed PostgreSQL URL {_scrub(url)!r}: {exc}") from exc
        if parts.fragment:
            raise ConfigError(f"malformed PostgreSQL URL {_scrub(url)!r}: it has a #fragment")
        userinfo, at, hosts = parts.netloc.rpartition("@")
        user, colon, password_text = userinfo.partition(":")
        password = unquote(password_text) if colon else None
        _check_hosts(hosts, url)
        kept: list[str] = []
        shown: list[str] = []
        for item in parts.query.split("&") if parts.query else []:
            key_text, equals, value = item.partition("=")
            key = unquote(key_text)
            if not key or not equals:
                raise ConfigError(
                    f"malformed PostgreSQL URL {_scrub(url)!r}: query item {key_text!r} is "
                    "not param=value"
                )
            if key in _SECRET_PARAMETERS:
                password = unquote(value)
                continue
            kept.append(item)
            if key not in _HIDDEN_PARAMETERS:
                shown.append(item)
        path = parts.path
        dbname = unquote(path[1:]) if path.startswith("/") and len(path) > 1 else None
        if path and not path.startswith("/"):
            raise ConfigError(f"malformed PostgreSQL URL {_scrub(url)!r}")
        authority = (user + "@" if at else "") + hosts
        base = f"{parts.scheme}://{authority}{path}"
        return cls(
            url=base + ("?" + "&".join(kept) if kept else ""),
            display=base + ("?" + "&".join(shown) if shown else ""),
            dbname=dbname,
            password=password,
        )

    def env(self) -> dict[str, str]:
        """What a tool needs in its environment for this connection."""
        return {"PGPASSWORD": self.password} if self.password is not None else {}

    def with_dbname(self, dbname: str) -> PostgresURL:
        """The same connection to another database."""

        def swap(text: str) -> str:
            head, question, query = text.partition("?")
            scheme, _, rest = head.partition("://")
            authority = rest.split("/", 1)[0]
            return f"{scheme}://{authority}/{quote(dbname, safe='')}{question}{query}"

        return dataclasses.replace(
            self, url=swap(self.url), display=swap(self.display), dbname=dbname
        )


def _scrub(url: str) -> str:
    """``url`` with anything that looks like a password replaced, for error messages."""
    url = re.sub(r"(://[^/?#@:]*):[^/?#@]*@", r"\1:***@", url)
    return re.sub(r"([?&](?:ssl)?password=)[^&#]*", r"\1***", url)


def _check_hosts(hosts: str, url: str) -> None:
    """libpq's host list: ``host[:port]`` items separated by commas, ports numeric."""
    for item in hosts.split(",") if hosts else []:
        if item.startswith("["):
            close = item.find("]")
            if close < 0:
                raise ConfigError(f"malformed PostgreSQL URL {_scrub(url)!r}: unclosed [")
            port = item[close + 1 :]
            if port and not port.startswith(":"):
                raise ConfigError(f"malformed PostgreSQL URL {_scrub(url)!r}: {item!r}")
            port = port[1:]
        else:
            _, _, port = item.rpartition(":") if ":" in item else ("", "", "")
        if port and not (port.isdigit() and 0 < int(port) < 65536):
            raise ConfigError(
                f"malformed PostgreSQL URL {_scrub(url)!r}: port {port!r} is not a number "
                "in 1..65535"
            )


# --- tools ---------------------------------------------------------------------------


def _version_key(path: str) -> tuple[int, ...]:
    match = re.search(r"/postgresql/(\d+(?:\.\d+)*)/bin/", path)
    return tuple(int(p) for p in match.group(1).split(".")) if match else (0,)


def find_tool(name: str, bindir: str | os.PathLike[str] | None = None) -> str:
    """The path of PostgreSQL tool ``name`` (module docstring); the bare name if none
    is found, so that starting it fails with the system's own "not found"."""
    if bindir is not None:
        return str(Path(bindir) / name)
    found = shutil.which(name)
    if found is not None:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), key=_version_key)
    return candidates[-1] if candidates else name


def tool_major_version(version_text: str) -> int | None:
    """15 for ``"pg_basebackup (PostgreSQL) 15.5 (Debian ...)"``; ``None`` if unknown."""
    match = re.search(r"\(PostgreSQL\)\s+(\d+)(?:\.(\d+))?", version_text)
    if match is None:
        return None
    major = int(match.group(1))
    return major


async def _version(
    tool: str,
    *,
    env: Mapping[str, str] | None = None,
    error_class: type[ProcessFailedError] = ToolFailedError,
) -> str:
    output = await run_tool(
        [tool, "--version"], env=env, timeout=QUICK_TOOL_SECONDS, error_class=error_class
    )
    return output.stdout.strip()


async def verify_base_backup(
    directory: str | os.PathLike[str], *, bindir: str | os.PathLike[str] | None = None
) -> str:
    """``pg_verifybackup DIRECTORY``: its verdict (``"backup successfully verified"``).

    Raises ``ToolFailedError`` with the tool's findings when the backup is damaged.
    """
    output = await run_tool(
        [find_tool("pg_verifybackup", bindir), os.fspath(directory)],
        what=f"verifying the base backup in {os.fspath(directory)}",
    )
    return output.stdout.strip() or "backup successfully verified"


async def describe_control_data(
    directory: str | os.PathLike[str], *, bindir: str | os.PathLike[str] | None = None
) -> str:
    """``pg_controldata DIRECTORY``: the cluster state and checkpoint location it reads
    from ``global/pg_control`` (whose own CRC it checks).

    Raises ``ToolFailedError`` with the tool's words when the control file is missing or
    damaged.
    """
    output = await run_tool(
        [find_tool("pg_controldata", bindir), os.fspath(directory)],
        what=f"reading the control file of {os.fspath(directory)}",
    )
    wanted = ("Database cluster state", "Latest checkpoint location")
    found = [
        line.split(":", 1)[1].strip()
        for line in output.stdout.splitlines()
        if line.split(":", 1)[0].strip() in wanted
    ]
    return ", ".join(found) or "control file read"


async def check_dump_archive(
    path: str | os.PathLike[str], *, bindir: str | os.PathLike[str] | None = None
) -> tuple[int, str]:
    """Check a custom-format archive: its table of contents, then every data block.

    ``pg_restore --list`` reads the table of contents (the number of entries is
    returned); ``pg_restore -f /dev/null`` then reads and decompresses the whole archive
    as a restore would, without touching any database. Raises ``ToolFailedError`` with
    ``pg_restore``'s own words if either fails.
    """
    pg_restore = find_tool("pg_restore", bindir)
    listing = await run_tool(
        [pg_restore, "--list", os.fspath(path)],
        what=f"reading the archive {os.fspath(path)}",
    )
    entries = sum(
        1 for line in listing.stdout.splitlines() if line.strip() and not line.startswith(";")
    )
    await run_tool(
        [pg_restore, "-f", os.devnull, os.fspath(path)],
        what=f"reading every data block of the archive {os.fspath(path)}",
    )
    return entries, f"pg_restore --list: {entries} entries; every data block read"


async def describe_postgres(
    url: PostgresURL, mode: str, *, bindir: str | os.PathLike[str] | None = None
) -> dict[str, str]:
    """Server and tool versions for ``url`` in ``mode`` (``basebackup``, ``dump``, ``files``).

    No secret is in it: the source is ``url.display``. Raises ``ToolFailedError``
    (with psql's words) when the server cannot be reached.
    """
    tools = {
        "basebackup": ("pg_basebackup", "pg_verifybackup"),
        "dump": ("pg_dump", "pg_restore"),
    }.get(mode, ())  # files mode reads the data directory itself: no tool
    info = {"kind": "postgresql", "mode": mode, "source": url.display}
    for tool in tools:
        info[tool] = await _version(find_tool(tool, bindir))
    server = await run_tool(
        [
            find_tool("psql", bindir),
            "-X",
            "-w",
            "-A",
            "-t",
            "-d",
            url.url,
            "-c",
            "SELECT version()",
            "-c",
            "SHOW server_version_num",
        ],
        extra_env=url.env(),
        timeout=QUICK_TOOL_SECONDS,
        what=f"querying the server at {url.display}",
    )
    lines = [line for line in server.stdout.splitlines() if line.strip()]
    if lines:
        info["server_version"] = lines[0].strip()
    if len(lines) > 1:
        info["server_version_num"] = lines[1].strip()
    return info


def _url(url: str | PostgresURL) -> PostgresURL:
    return url if isinstance(url, PostgresURL) else PostgresURL.parse(url)


# --- basebackup ----------------------------------------------------------------------


class _BaseBackupProducer(ProcessProducer):
    """``pg_basebackup`` whose options depend on its version, asked before it starts."""

    def __init__(
        self,
        argv: Sequence[str],
        *,
        manifest_checksums: str | None,
        **options: Unpack[ProcessOptions],
    ) -> None:
        super().__init__(argv, **options)
        self.manifest_checksums = manifest_checksums
        self.tool_version: str | None = None

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        if self.manifest_checksums:
            self.tool_version = await _version(
                self.argv[0], env=self.env, error_class=ProducerFailedError
            )
            major = tool_major_version(self.tool_version)
            if major is not None and major >= 13:
                self.argv.append(f"--manifest-checksums={self.manifest_checksums}")
        async with super().running():
            yield


class PostgresBaseBackup(ScopedBackup):
    """``pg_basebackup`` of the cluster at ``url`` (module docstring).

    ``checkpoint`` is ``"fast"`` or ``"spread"``; ``manifest_checksums`` the manifest's
    algorithm (``None``: the tool's default); ``extra_args`` are appended as given.
    """

    def __init__(
        self,
        url: str | PostgresURL = "postgresql://",
        options: StripingOptions | None = None,
        *,
        bindir: str | os.PathLike[str] | None = None,
        checkpoint: str = "fast",
        manifest_checksums: str | None = "SHA256",
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        terminate_timeout: float = 10.0,
        fail_at: FailPoint | None = None,
        backup_id: uuid.UUID | None = None,
    ) -> None:
        if checkpoint not in ("fast", "spread"):
            raise ConfigError(f"checkpoint={checkpoint!r}: it is 'fast' or 'spread'")
        self.url = _url(url)
        argv = [
            find_tool("pg_basebackup", bindir),
            "-d",
            self.url.url,
            "-w",
            "-D",
            "-",
            "-F",
            "t",
            "-X",
            "fetch",
            f"--checkpoint={checkpoint}",
            *extra_args,
        ]
        self.process = _BaseBackupProducer(
            argv,
            manifest_checksums=manifest_checksums,
            env=env,
            extra_env=self.url.env(),
            terminate_timeout=terminate_timeout,
        )
        super().__init__(self.process, options, fail_at=fail_at, backup_id=backup_id)


class PostgresBaseRestore(ScopedRestore):
    """A base backup extracted into the data directory ``directory`` and verified.

    ``verify=False`` skips ``pg_verifybackup`` (``verified`` then stays ``None``);
    ``owner`` gives the restored tree to that user (module docstring).
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        options: StripingOptions | None = None,
        *,
        owner: str | int | None = None,
        verify: bool = True,
        bindir: str | os.PathLike[str] | None = None,
        fail_at: FailPoint | None = None,
    ) -> None:
        self.directory = Path(directory).absolute()
        self.bindir = bindir
        self.verified: str | None = None
        self.tar = TarExtractConsumer(
            self.directory, owner=owner, verify=self._verify if verify else None
        )
        super().__init__(self.tar, options, fail_at=fail_at)

    async def _verify(self, directory: Path) -> None:
        self.verified = await verify_base_backup(directory, bindir=self.bindir)


# --- dump ----------------------------------------------------------------------------


class PostgresDump(ScopedBackup):
    """``pg_dump -Fc`` of the database at ``url`` (module docstring)."""

    def __init__(
        self,
        url: str | PostgresURL = "postgresql://",
        options: StripingOptions | None = None,
        *,
        bindir: str | os.PathLike[str] | None = None,
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        terminate_timeout: float = 10.0,
        fail_at: FailPoint | None = None,
        backup_id: uuid.UUID | None = None,
    ) -> None:
        self.url = _url(url)
        argv = [find_tool("pg_dump", bindir), "-d", self.url.url, "-w", "-F", "c", *extra_args]
        self.process = ProcessProducer(
            argv, env=env, extra_env=self.url.env(), terminate_timeout=terminate_timeout
        )
        super().__init__(self.process, options, fail_at=fail_at, backup_id=backup_id)


class _PgRestoreConsumer(ProcessConsumer):
    """``pg_restore`` reading stdin, after ``createdb`` when asked; the database it
    created is dropped again when the restore fails."""

    def __init__(
        self,
        argv: Sequence[str],
        *,
        url: PostgresURL,
        create: bool,
        maintenance_db: str,
        bindir: str | os.PathLike[str] | None,
        **options: Unpack[ProcessOptions],
    ) -> None:
        super().__init__(argv, **options)
        self.url = url
        self.create = create
        self.maintenance = url.with_dbname(maintenance_db)
        self.bindir = bindir
        self.created = False
        self.succeeded = False
        self._tail = b""  # the stream's last bytes so far, held back (module docstring)

    async def write(self, view: memoryview) -> None:
        if view.nbytes >= HOLD_BACK:
            if self._tail:
                await super().write(memoryview(self._tail))
            await super().write(view[: view.nbytes - HOLD_BACK])
            self._tail = bytes(view[view.nbytes - HOLD_BACK :])
            return
        combined = self._tail + bytes(view)
        if len(combined) > HOLD_BACK:
            await super().write(memoryview(combined)[: len(combined) - HOLD_BACK])
            combined = combined[len(combined) - HOLD_BACK :]
        self._tail = combined

    async def finish(self) -> None:
        tail, self._tail = self._tail, b""
        if tail:
            await super().write(memoryview(tail))
        await super().finish()
        self.succeeded = True

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        if self.create:
            await self._database("createdb")
            self.created = True
        try:
            async with super().running():
                yield
        finally:
            if self.created and not self.succeeded:
                with anyio.CancelScope(shield=True):
                    try:
                        await self._database("dropdb")
                    except Exception as exc:  # the restore's own error is the one to see
                        _log.warning("dropdb_failed", database=self.url.dbname, error=str(exc))

    async def _database(self, tool: str) -> None:
        assert self.url.dbname is not None
        argv = [find_tool(tool, self.bindir), "-w", f"--maintenance-db={self.maintenance.url}"]
        if tool == "dropdb":
            argv.append("--if-exists")
        argv.append(self.url.dbname)
        await run_tool(
            argv,
            env=self.env,
            extra_env=self.url.env(),
            timeout=QUICK_TOOL_SECONDS,
            what=f"{'creating' if tool == 'createdb' else 'dropping'} the database "
            f"{self.url.display}",
            error_class=ConsumerFailedError,
        )


class PostgresDumpRestore(ScopedRestore):
    """``pg_restore`` of a ``dump`` stream into the database at ``url`` (module docstring)."""

    def __init__(
        self,
        url: str | PostgresURL,
        options: StripingOptions | None = None,
        *,
        create: bool = False,
        no_owner: bool = False,
        clean: bool = False,
        maintenance_db: str = "postgres",
        bindir: str | os.PathLike[str] | None = None,
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        terminate_timeout: float = 10.0,
        fail_at: FailPoint | None = None,
    ) -> None:
        self.url = _url(url)
        if create and not self.url.dbname:
            raise ConfigError(
                f"create=True needs the database's name in the URL ({self.url.display})"
            )
        argv = [
            find_tool("pg_restore", bindir),
            "-d",
            self.url.url,
            "-w",
            "--exit-on-error",
            "--single-transaction",  # a failed restore is rolled back (module docstring)
        ]
        if no_owner:
            argv.append("--no-owner")
        if clean:
            argv += ["--clean", "--if-exists"]
        argv += list(extra_args)
        self.process = _PgRestoreConsumer(
            argv,
            url=self.url,
            create=create,
            maintenance_db=maintenance_db,
            bindir=bindir,
            env=env,
            extra_env=self.url.env(),
            terminate_timeout=terminate_timeout,
        )
        super().__init__(self.process, options, fail_at=fail_at)


def _check_signature(path: Path, shown: Path) -> None:
    with path.open("rb") as file:
        head = file.read(len(DUMP_SIGNATURE))
    if head != DUMP_SIGNATURE:
        raise PostgresError(
            f"the restored stream for {shown} is not a pg_dump custom-format archive"
        )


class PostgresDumpFile(ScopedRestore):
    """A ``dump`` stream restored to the archive file ``path`` (for ``pg_restore`` later).

    Written next to ``path`` and renamed into place only when complete, verified and
    starting with the custom format's signature; never replaces an existing file
    unless ``overwrite=True``.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        options: StripingOptions | None = None,
        *,
        overwrite: bool = False,
        fail_at: FailPoint | None = None,
    ) -> None:
        self.path = Path(path).absolute()
        self.file = AtomicFileConsumer(
            self.path,
            overwrite=overwrite,
            validate=lambda temp: _check_signature(temp, self.path),
            what="pg_dump archive",
        )
        super().__init__(self.file, options, fail_at=fail_at)
