"""The daemon's settings: a TOML file, overridden by ``VDISTREAM_*`` environment variables.

``load_settings(path, env=os.environ) -> Settings`` reads, merges, validates and
returns frozen dataclasses (this module, free of pydantic so that importing it costs
nothing). The file's shape and values are checked by pydantic models (``_schema``,
imported only when settings are loaded); ``_load`` reads, overlays the environment,
turns pydantic's errors into the messages below and builds the dataclasses;
``_lines`` finds a key's line. Every key, its default and its meaning are in
``config/vdistream.toml``. Any problem raises ``SettingsError`` (a ``ConfigError``)
whose message starts with where the value came from and names the key::

    /etc/vdistream/vdistream.toml, line 14: databases.app.devices: expected an integer
    from 1 to 64, got 'eight'
    environment variable VDISTREAM_SERVICE__MAX_JOBS: service.max_jobs: expected ...

Decisions
---------

* **Unknown keys are errors**, everywhere (with a "did you mean" when one is close),
  so a typo never passes silently. Wrong types are errors (pydantic's strict mode):
  ``true`` is not an integer, ``"8"`` is not a number. Every problem found is one line
  of the message, in a fixed order: unknown top-level keys, the sections' types,
  ``[service]``, every destination's then every database's name, type and unknown keys,
  then each one's values in a fixed key order. The first line gives ``key``,
  ``source`` and ``line``.
* **Lines.** ``tomllib`` gives no positions, so the file's text is scanned for table
  headers (``[databases.app]``), ``key =`` lines, dotted keys and inline tables
  (``retention = { keep_last = 7 }``). The message says "line N" for the key, or for
  its nearest enclosing table when the key is missing; it says only the file when
  nothing is found (values inside multi-line strings or arrays are not scanned).
* **Environment overrides.** ``VDISTREAM_<TABLE>__<KEY>`` for ``[service]``
  (``VDISTREAM_SERVICE__MAX_JOBS=4``) and ``VDISTREAM_<TABLE>__<NAME>__<KEY>[__<SUBKEY>]``
  for ``[databases.NAME]`` and ``[destinations.NAME]``
  (``VDISTREAM_DATABASES__APP__DEVICES=8``,
  ``VDISTREAM_DATABASES__APP__RETENTION__KEEP_LAST=3``). A double underscore is one
  level of nesting; keys are matched lowercase; NAME matches an existing table
  case-insensitively (``-`` in a name is ``_`` in the variable), or creates a new
  one named in lowercase. The value is parsed as a TOML value (``8``, ``true``,
  ``0.5``, ``"text"``, ``{ keep_last = 3 }``); text that is not valid TOML is taken as a
  plain string (``0 3 * * *``, ``/var/backups``), and for a key that is plain text (a
  path, URL, name, time zone, ``mode``, ``log_*``) the variable's raw text is used
  whatever it parses as (``listen``, ``schedule``, ``compress`` and durations are not:
  ``VDISTREAM_SERVICE__LISTEN=8470`` is an integer, an error). An **empty value removes**
  the key (back to its default). Variables are applied in sorted order, after the
  file. ``VDISTREAM_`` variables without ``__`` are not overrides (``VDISTREAM_CONFIG``,
  ``VDISTREAM_API_TOKEN``, test knobs) except that ``VDISTREAM_SERVICE_MAX_JOBS``-like
  names (a table name and a single underscore) are refused as typos; a ``__``
  variable whose first part is not a table is refused too. (pydantic-settings' own
  environment source cannot express these rules, TOML values, name matching, removal
  or the variable's name in errors, so the overlay is ours and feeds pydantic a dict.)
* **Paths.** Relative paths in the file are relative to the file's directory; relative
  paths from the environment (or with no file) to the current directory. A relative
  ``sqlite:`` URL is made absolute the same way.
* **Empty strings** mean "not set" for optional keys (``listen = ""``).
* **Secrets.** The API bearer token is never written in the file: it comes from
  ``VDISTREAM_API_TOKEN`` (wins) or from ``service.token_file`` (first line, stripped;
  the file must not be accessible to "others"; at least 16 characters). It is held in
  a ``Secret`` whose ``repr`` and ``str`` are masked. A database URL may hold a
  PostgreSQL password: ``DatabaseSettings.url`` is left out of ``repr`` and
  ``display_url`` masks the password; destination URLs with a password likewise.
  ``dataclasses.asdict`` does reveal the URL: do not log its output. A ``cmd:`` URL
  is shown as written: give a command its secrets through its environment or a file,
  not its arguments. ``settings_summary(settings)`` is the secret-free form to log.
* **Checks at load** (fail at start, not at 3 am): a database's destination exists;
  durations (``"14d"``, ``"36h"``, ``"90m"``, ``"1d12h"``; units s m h d w) and
  cron expressions parse (and can fire); the time zone exists; the TCP listen address
  is loopback and comes with a token; the socket mode grants nothing to "others" and
  fits in 0o777; the socket path fits in ``sun_path``; ``encrypt_key_file`` and
  ``token_file`` exist, and the key file holds a key (``vdistream.pipeline.keys``;
  the key itself is not kept); ``compress`` is parsed by ``vdistream.pipeline.spec``;
  each ``encrypt_recipients`` file holds an X25519 public key
  (``vdistream.pipeline.keys.load_public_key``) and ``decrypt_identity_file`` exists;
  a ``mirror`` names a destination other than ``destination``; a webhook's secret is
  found (see Webhooks).
* **Arrays of tables** (``[[service.webhooks]]``): an element's keys are named with
  its 0-based index, ``service.webhooks[1].url``, at the line of the key, else of the
  element's ``[[...]]`` header.

Throttling, mirrors, recipients, Azure
---------------------------------------

``max_rate`` (``[service]``: all running jobs together; ``[databases.NAME]``: each
job of the database, shared by its devices) is bytes per second as
``vdistream.throttle.parse_rate`` reads it: an integer, or ``"200M"``, ``"1.5G"``,
``"10MB"`` (K M G T: powers of 1024; KB MB GB TB: of 1000; optional ``/s``); ``0``,
``"off"`` and ``""`` are no limit (``None``). The job manager puts them in effect
(``vdistream throttle`` changes a running job's). ``mirror = "NAME"`` names a
second ``[destinations.NAME]`` every backup of the database is written to in the
same pass (``BackupSettings.mirror``: its URL). ``encrypt_recipients = ["a.pub",
...]`` (paths relative to the file, duplicates dropped) encrypts each backup's data
key for those X25519 public keys too, so the host can write backups it cannot read;
``decrypt_identity_file`` is the private key restores and verifications read them
with (recipients without it, nor an ``encrypt_key_file``, are refused at load unless
``verify_after_backup = false``: the verification after each backup could not open
it; verify where the private key is).
A destination URL may be ``azure://ACCOUNT/CONTAINER/PREFIX`` (account and container
required; credentials never in the file).

Webhooks
--------

``[[service.webhooks]]`` (every database's events) and ``[[databases.NAME.webhooks]]``
(that database's, besides the service's) are arrays of tables (or ``webhooks = [{...}]``)
with ``url`` (``http://`` or ``https://``, required; shown with its password and
query masked), ``events`` (an array of ``WEBHOOK_EVENTS``, default all), the HMAC key
from exactly one of ``secret_file`` (first line, stripped; not accessible to others; at
least 16 characters; relative to the file) or ``secret_env`` (the name of an
environment variable of ``env`` holding it, at least 16 characters), ``timeout``
(seconds or a duration per attempt, default 10), ``attempts`` (1 to 20, default 5) and
``deadline`` (seconds or a duration after the event when retrying stops, default 300).
The secret is read at load (and reload), kept in a ``Secret``; with
``check_passwords=False`` it is not looked for. ``vdistream.service.notify`` says what
is sent and how a receiver checks it.

SQL Server
----------

``url = "mssql://user@host:port/db"`` (or ``sqlserver://``; ``?trigger=sqlcmd``,
``?password_file=/abs/path``) is parsed by ``vdistream.sqlserver.url.MssqlURL``
at load, password included: a URL whose password cannot be found (in the URL,
``VDISTREAM_MSSQL_PASSWORD`` or ``SQLCMDPASSWORD`` of ``env``, or the password file)
fails at start. Each job looks the password up again the same way (a rotated password
file is read by the next job; that lookup is in the process's environment, ``env``
only serves the check at load). ``display_url`` is ``MssqlURL.display``: never the
password. A SQL Server database has one schedule per backup type: ``schedule`` (full),
``schedule_diff`` (differential) and ``schedule_log`` (log), each a cron expression
like ``schedule``; the other engines have ``schedule`` only, and a ``schedule_diff`` or
``schedule_log`` on them is an error naming the key. ``mode`` stays PostgreSQL's
(the schedules say which SQL Server backup runs when). ``sqlvdi`` names Microsoft's
``libsqlvdi.so``, per database or under ``[service]`` for every SQL Server database
(the database's wins; neither: ``VDISTREAM_SQLVDI``, then
``/opt/mssql/lib/libsqlvdi.so``); relative to the file, checked to exist at load, and
refused on a database of another engine.

External engines
----------------

``url = "external:NAME"`` is a database whose engine runs in another process: each
backup publishes a set named NAME in ``service.runtime_dir`` (default
``/run/vdistream``; the daemon's user must be able to create it) and waits
``connect_timeout`` seconds (default 60; a number or a duration like ``"5m"``, at most
a day; only on such databases) for an engine to open it (``vdistream feed NAME
--runtime-dir /run/vdistream``, run by whatever produces the data). ``service.runtime_group``
(a group name or number, which must exist) lets its members open the daemon's sets
(sockets 0660, directory 0710); otherwise only the daemon's user and root may. The
socket path ``runtime_dir/NAME.sock`` must fit in ``sun_path``: checked at load. A
restore of any database (but SQL Server's) to ``external:NAME`` is served the same way.
"""

from __future__ import annotations

import hmac
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta, tzinfo
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

from vdistream.errors import ConfigError
from vdistream.pipeline.spec import CompressionSpec
from vdistream.service.retention import RetentionPolicy
from vdistream.service.schedule import CronExpr, resolve_timezone

__all__ = (
    "DAEMON_RUNTIME_DIR",
    "DEFAULT_SETTINGS_PATH",
    "SCHEDULE_KINDS",
    "TOKEN_ENV",
    "WEBHOOK_EVENTS",
    "DatabaseSettings",
    "DestinationSettings",
    "RetentionPolicy",
    "Secret",
    "ServiceSettings",
    "Settings",
    "SettingsError",
    "WebhookSettings",
    "load_settings",
    "parse_duration",
    "settings_summary",
)

DEFAULT_SETTINGS_PATH = Path("/etc/vdistream/vdistream.toml")
#: The daemon's runtime directory for published sets (``service.runtime_dir``); the
#: value of ``vdistream.transport.DAEMON_RUNTIME_DIR``, which this module does not import.
DAEMON_RUNTIME_DIR = Path("/run/vdistream")
#: The environment variable that carries the API bearer token (wins over token_file).
TOKEN_ENV = "VDISTREAM_API_TOKEN"

LogFormat = Literal["json", "console", "auto"]
LogLevel = Literal["debug", "info", "warning", "error"]
DatabaseKind = Literal["sqlite", "postgresql", "cmd", "mssql", "external"]
#: The job events a webhook may be told of (``vdistream.service.notify``), in the
#: order ``events`` lists them by default.
WEBHOOK_EVENTS = ("finished", "failed", "verify_failed", "retention_pruned")
#: The backup kinds a database may have a schedule for, in the order they run when
#: several fire at once (``DatabaseSettings.schedules``).
SCHEDULE_KINDS = ("full", "diff", "log")


class SettingsError(ConfigError):
    """A setting is invalid. ``key`` is the dotted key, ``source`` the file or the
    environment variable, ``line`` the file's line (1-based) when found."""

    def __init__(
        self, message: str, *, key: str, source: str | None = None, line: int | None = None
    ) -> None:
        self.key = key
        self.source = source
        self.line = line
        super().__init__(message)


class Secret:
    """A string that does not show itself: ``repr``/``str`` are masked, ``reveal()``
    returns it. Equality is constant-time."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('********')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Secret):
            return NotImplemented
        return hmac.compare_digest(self._value.encode(), other._value.encode())

    def __hash__(self) -> int:
        return hash(self._value)


# --- the settings -----------------------------------------------------------------------


@dataclass(frozen=True)
class WebhookSettings:
    """One ``[[service.webhooks]]`` or ``[[databases.NAME.webhooks]]``: where job events
    are POSTed (``vdistream.service.notify``), signed with ``secret``."""

    #: ``http://`` or ``https://``; may carry a token in its query, so not in ``repr``
    url: str = field(repr=False)
    #: the HMAC-SHA256 key (from ``secret_file`` or the variable ``secret_env``)
    secret: Secret = field(repr=False)
    #: the ``WEBHOOK_EVENTS`` this receiver wants (default: all)
    events: frozenset[str] = frozenset(WEBHOOK_EVENTS)
    #: seconds one attempt (connect, send, answer) may take
    timeout: float = 10.0
    #: attempts at most per notification (the first one and the retries)
    attempts: int = 5
    #: seconds from the event after which a notification is given up, retries or not
    deadline: float = 300.0
    #: ``url`` with any password and query masked: what may be logged and shown
    display_url: str = ""
    #: where the secret came from, for the summary (the file, or ``$NAME``)
    secret_source: str = ""


@dataclass(frozen=True)
class ServiceSettings:
    """``[service]``: the daemon itself. Defaults are those of ``config/vdistream.toml``."""

    state_dir: Path = Path("/var/lib/vdistream")
    #: ``None`` means ``state_dir / "vdistream.sock"`` (see ``socket_path``)
    socket: Path | None = None
    socket_mode: int = 0o600
    #: loopback ``(host, port)`` for the TCP API, or ``None`` (Unix socket only)
    listen: tuple[str, int] | None = None
    token_file: Path | None = None
    token: Secret | None = field(default=None, repr=False)
    max_jobs: int = 2
    max_queued: int = 16
    grace_period: float = 30.0
    #: how long ended jobs stay in the state database (``None``: forever)
    job_history: timedelta | None = timedelta(days=90)
    log_format: LogFormat = "auto"
    log_level: LogLevel = "info"
    #: a zoneinfo key; ``None`` is the system's local zone
    timezone: str | None = None
    #: ``libsqlvdi.so`` for the SQL Server databases that name none (``None``:
    #: ``VDISTREAM_SQLVDI``, then ``/opt/mssql/lib/libsqlvdi.so``)
    sqlvdi: Path | None = None
    #: where the sets of ``external:NAME`` databases (and restores to ``external:NAME``)
    #: are published (``vdistream.transport.DAEMON_RUNTIME_DIR``)
    runtime_dir: Path = DAEMON_RUNTIME_DIR
    #: a group (name or number) whose members may open those sets too (sockets 0660);
    #: ``None``: the daemon's user (and root) only
    runtime_group: str | None = None
    #: bytes per second for all running jobs together (``None``: no limit)
    max_rate: int | None = None
    #: receivers of every database's job events
    webhooks: tuple[WebhookSettings, ...] = ()

    @property
    def socket_path(self) -> Path:
        return self.socket if self.socket is not None else self.state_dir / "vdistream.sock"

    @property
    def state_db(self) -> Path:
        """The job state database (``vdistream.service.state``)."""
        return self.state_dir / "state.db"

    @property
    def work_dir(self) -> Path:
        """Where jobs stage data (SQLite snapshots, verification restores); emptied at
        every start, so what a killed job left there does not pile up."""
        return self.state_dir / "work"

    def tzinfo(self) -> tzinfo:
        """The zone schedules are read in."""
        return resolve_timezone(self.timezone)


@dataclass(frozen=True)
class DestinationSettings:
    """``[destinations.NAME]``: where backups are stored."""

    name: str
    url: str = field(repr=False)
    #: ``url`` with any password masked: what may be logged and shown
    display_url: str = ""


@dataclass(frozen=True)
class DatabaseSettings:
    """``[databases.NAME]``: one database to back up."""

    name: str
    url: str = field(repr=False)
    destination: str
    kind: DatabaseKind
    #: ``url`` with any password masked: what may be logged and shown
    display_url: str = ""
    #: ``basebackup``, ``dump`` or ``files`` for ``postgresql``, ``None`` otherwise
    mode: str | None = None
    devices: int = 4
    #: the pipeline's compression (``vdistream.pipeline.spec``); ``none`` by default
    compress: CompressionSpec = field(default_factory=lambda: CompressionSpec("none"))
    encrypt_key_file: Path | None = None
    #: X25519 public key files: a backup is readable by the private key of any of them
    encrypt_recipients: tuple[Path, ...] = ()
    #: the X25519 private key file that reads backups made for recipients (restore,
    #: verify); usually absent on a database host: that is the point of recipients
    decrypt_identity_file: Path | None = None
    max_jobs: int = 1
    #: when to back up (SQL Server: a full backup)
    schedule: CronExpr | None = None
    #: SQL Server only: when to take a differential backup
    schedule_diff: CronExpr | None = None
    #: SQL Server only: when to take a log backup
    schedule_log: CronExpr | None = None
    retention: RetentionPolicy = field(default_factory=RetentionPolicy)
    verify_after_backup: bool = True
    #: SQL Server only: ``libsqlvdi.so`` (the database's ``sqlvdi``, else the service's;
    #: ``None``: ``VDISTREAM_SQLVDI``, then the default path)
    sqlvdi: Path | None = None
    #: ``external:NAME`` only: seconds the published set waits for its engine
    connect_timeout: float = 60.0
    #: bytes per second for one job of this database (``None``: no limit of its own)
    max_rate: int | None = None
    #: a second destination's name: every backup is written to both in one pass
    mirror: str | None = None
    #: receivers of this database's job events (besides ``service.webhooks``)
    webhooks: tuple[WebhookSettings, ...] = ()

    @property
    def encrypted(self) -> bool:
        """Whether backups are encrypted (a key file or recipients)."""
        return self.encrypt_key_file is not None or bool(self.encrypt_recipients)

    @property
    def external_name(self) -> str | None:
        """The set name of an ``external:NAME`` database, else ``None``."""
        return self.url.partition(":")[2] if self.kind == "external" else None

    @property
    def schedules(self) -> dict[str, CronExpr]:
        """Backup kind (``full``, ``diff``, ``log``; ``SCHEDULE_KINDS`` order) -> its
        schedule, for the kinds that have one. The other engines' ``schedule`` is
        listed as ``full``: their one kind of backup."""
        crons = (self.schedule, self.schedule_diff, self.schedule_log)
        return {k: c for k, c in zip(SCHEDULE_KINDS, crons, strict=True) if c is not None}


@dataclass(frozen=True)
class Settings:
    """Everything ``load_settings`` read. ``source`` is the file (``None``: none read);
    ``env_overrides`` the names (never the values) of the variables applied."""

    service: ServiceSettings = ServiceSettings()
    databases: Mapping[str, DatabaseSettings] = field(default_factory=lambda: MappingProxyType({}))
    destinations: Mapping[str, DestinationSettings] = field(
        default_factory=lambda: MappingProxyType({})
    )
    source: Path | None = None
    env_overrides: tuple[str, ...] = ()


# --- durations --------------------------------------------------------------------------

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*")


def parse_duration(text: str) -> timedelta:
    """``"14d"``, ``"36h"``, ``"90m"``, ``"30s"``, ``"2w"``, or sums like ``"1d12h"``.
    A number needs its unit. ``ValueError`` otherwise."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError("expected a duration like '14d', '36h', '90m'")
    if not re.fullmatch(f"(?:{_DURATION.pattern})+", text):
        raise ValueError(
            f"{text!r} is not a duration: write a number and a unit "
            "(s, m, h, d, w), e.g. '14d', '36h', '90m', '1d12h'"
        )
    return timedelta(seconds=sum(float(n) * _UNITS[u] for n, u in _DURATION.findall(text)))


def load_settings(
    path: str | Path | None, env: Mapping[str, str] = os.environ, *, check_passwords: bool = True
) -> Settings:
    """Read ``path`` (``None``: no file, defaults and environment only), apply the
    ``VDISTREAM_*`` overrides from ``env``, validate, and return the settings.
    Raises ``SettingsError`` (module doc) for anything wrong. ``check_passwords``
    False: a SQL Server URL's password is not looked for (its shape is checked), for
    readers that connect to no database (a client finding the socket, ``prune``),
    whose environment may not hold the daemon's password."""
    from vdistream.service.settings._load import load  # pydantic: only when loading

    return load(Path(path) if path is not None else None, env, check_passwords=check_passwords)


def settings_summary(settings: Settings) -> dict[str, Any]:
    """The settings as JSON-ready data without secrets (for ``serve --check``, the
    startup log line and the API): URLs masked, the token only as "set"."""
    service = settings.service
    listen = service.listen
    return {
        "source": None if settings.source is None else str(settings.source),
        "env_overrides": list(settings.env_overrides),
        "service": {
            "state_dir": str(service.state_dir),
            "socket": str(service.socket_path),
            "socket_mode": f"{service.socket_mode:#o}",
            "listen": None if listen is None else f"{listen[0]}:{listen[1]}",
            "token": "set" if service.token is not None else None,
            "max_jobs": service.max_jobs,
            "max_queued": service.max_queued,
            "grace_period": service.grace_period,
            "job_history": _seconds(service.job_history),
            "log_format": service.log_format,
            "log_level": service.log_level,
            "timezone": service.timezone,
            "sqlvdi": None if service.sqlvdi is None else str(service.sqlvdi),
            "runtime_dir": str(service.runtime_dir),
            "runtime_group": service.runtime_group,
            "max_rate": service.max_rate,
            "webhooks": [_webhook(w) for w in service.webhooks],
        },
        "destinations": {n: d.display_url for n, d in settings.destinations.items()},
        "databases": {
            n: {
                "url": d.display_url,
                "kind": d.kind,
                "mode": d.mode,
                "destination": d.destination,
                "devices": d.devices,
                "compress": str(d.compress),
                "encrypted": d.encrypted,
                "encrypt_recipients": [str(p) for p in d.encrypt_recipients],
                "max_jobs": d.max_jobs,
                "schedule": None if d.schedule is None else d.schedule.text,
                "schedule_diff": None if d.schedule_diff is None else d.schedule_diff.text,
                "schedule_log": None if d.schedule_log is None else d.schedule_log.text,
                "sqlvdi": None if d.sqlvdi is None else str(d.sqlvdi),
                "keep_last": d.retention.keep_last,
                "keep_within": _seconds(d.retention.keep_within),
                "verify_after_backup": d.verify_after_backup,
                **({"connect_timeout": d.connect_timeout} if d.kind == "external" else {}),
                "max_rate": d.max_rate,
                "mirror": d.mirror,
                "webhooks": [_webhook(w) for w in d.webhooks],
            }
            for n, d in settings.databases.items()
        },
    }


def _webhook(webhook: WebhookSettings) -> dict[str, Any]:
    return {
        "url": webhook.display_url,
        "events": [e for e in WEBHOOK_EVENTS if e in webhook.events],
        "secret": webhook.secret_source,
        "timeout": webhook.timeout,
        "attempts": webhook.attempts,
        "deadline": webhook.deadline,
    }


def _seconds(duration: timedelta | None) -> float | None:
    return None if duration is None else duration.total_seconds()
