"""The daemon's settings: a TOML file, overridden by ``VDISTREAM_*`` environment variables.

``load_settings(path, env=os.environ) -> Settings`` reads, merges, validates and
returns frozen dataclasses. Every key, its default and its meaning are in
``config/vdistream.toml``. Any problem raises ``SettingsError`` (a ``ConfigError``)
whose message starts with where the value came from and names the key::

    /etc/vdistream/vdistream.toml, line 14: databases.app.devices: expected an integer
    from 1 to 64, got 'eight'
    environment variable VDISTREAM_SERVICE__MAX_JOBS: service.max_jobs: expected ...

Decisions
---------

* **Unknown keys are errors**, everywhere (with a "did you mean" when one is close),
  so a typo never passes silently. Wrong types are errors; ``true`` is not an integer.
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
  plain string (``0 3 * * *``, ``/var/backups``), and for a key that wants a string
  the variable's raw text is used whatever it parses as. An **empty value removes**
  the key (back to its default). Variables are applied in sorted order, after the
  file. ``VDISTREAM_`` variables without ``__`` are not overrides (``VDISTREAM_CONFIG``,
  ``VDISTREAM_API_TOKEN``, test knobs) except that ``VDISTREAM_SERVICE_MAX_JOBS``-like
  names (a table name and a single underscore) are refused as typos; a ``__``
  variable whose first part is not a table is refused too.
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
  the key itself is not kept); ``compress`` is parsed by ``vdistream.pipeline.spec``.
"""

from __future__ import annotations

import difflib
import hmac
import ipaddress
import os
import re
import shlex
import stat
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta, tzinfo
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal, NoReturn, TypeVar, cast
from urllib.parse import urlsplit, urlunsplit

from vdistream.errors import ConfigError, VdistreamError
from vdistream.pipeline.keys import load_key
from vdistream.pipeline.spec import CompressionSpec, parse_compression
from vdistream.service.retention import RetentionPolicy
from vdistream.service.schedule import CronExpr, resolve_timezone

__all__ = (
    "DEFAULT_SETTINGS_PATH",
    "TOKEN_ENV",
    "DatabaseSettings",
    "DestinationSettings",
    "RetentionPolicy",
    "Secret",
    "ServiceSettings",
    "Settings",
    "SettingsError",
    "load_settings",
    "parse_duration",
    "settings_summary",
)

DEFAULT_SETTINGS_PATH = Path("/etc/vdistream/vdistream.toml")
#: The environment variable that carries the API bearer token (wins over token_file).
TOKEN_ENV = "VDISTREAM_API_TOKEN"
ENV_PREFIX = "VDISTREAM_"

LogFormat = Literal["json", "console", "auto"]
LogLevel = Literal["debug", "info", "warning", "error"]
DatabaseKind = Literal["sqlite", "postgresql", "cmd"]

_T = TypeVar("_T")
_KeyPath = tuple[str, ...]


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
    #: ``basebackup`` or ``dump`` for ``postgresql``, ``None`` otherwise
    mode: str | None = None
    devices: int = 4
    #: the pipeline's compression (``vdistream.pipeline.spec``); ``none`` by default
    compress: CompressionSpec = field(default_factory=lambda: CompressionSpec("none"))
    encrypt_key_file: Path | None = None
    max_jobs: int = 1
    schedule: CronExpr | None = None
    retention: RetentionPolicy = field(default_factory=RetentionPolicy)
    verify_after_backup: bool = True


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
    seconds = 0.0
    pos = 0
    while pos < len(text):
        match = _DURATION.match(text, pos)
        if match is None:
            raise ValueError(
                f"{text!r} is not a duration: write a number and a unit "
                "(s, m, h, d, w), e.g. '14d', '36h', '90m', '1d12h'"
            )
        seconds += float(match[1]) * _UNITS[match[2]]
        pos = match.end()
    return timedelta(seconds=seconds)


# --- finding the line of a key ----------------------------------------------------------

_PART = r"""(?:[A-Za-z0-9_-]+|"(?:[^"\\]|\\.)*"|'[^']*')"""
_DOTTED = rf"{_PART}(?:\s*\.\s*{_PART})*"
_HEADER = re.compile(rf"^\s*\[\s*({_DOTTED})\s*\]")
_KEY = re.compile(rf"^\s*({_DOTTED})\s*=")
_INLINE = re.compile(rf"(\{{)|(\}})|({_DOTTED})\s*=")
_STRING = re.compile(r""""(?:[^"\\]|\\.)*"|'[^']*'""")


def _split_key(dotted: str) -> _KeyPath:
    parts = []
    for match in re.finditer(_PART, dotted):
        text = match.group()
        if text[0] in "\"'":
            text = tomllib.loads(f"k = {text}")["k"]
        parts.append(text)
    return tuple(parts)


class _Locator:
    """Line numbers of table headers and keys in a TOML text (module doc: Lines)."""

    def __init__(self, text: str) -> None:
        self._lines: dict[_KeyPath, int] = {}
        table: _KeyPath = ()
        in_multiline: str | None = None
        for number, line in enumerate(text.splitlines(), start=1):
            if in_multiline is not None:
                if line.count(in_multiline) % 2 == 1:
                    in_multiline = None
                continue
            header = _HEADER.match(line)
            if header and not line.lstrip().startswith("[["):
                table = _split_key(header[1])
                self._lines.setdefault(table, number)
                continue
            key = _KEY.match(line)
            if key is None:
                continue
            path = table + _split_key(key[1])
            self._lines.setdefault(path, number)
            rest = line[key.end() :]
            for quote in ('"""', "'''"):
                if rest.count(quote) % 2 == 1:
                    in_multiline = quote
                    break
            else:
                self._inline(rest, table, path, number)

    def _inline(self, rest: str, table: _KeyPath, path: _KeyPath, number: int) -> None:
        blank = _STRING.sub(lambda m: '"' + " " * (len(m.group()) - 2) + '"', rest)
        blank = blank.split("#", 1)[0]
        stack = [table]
        last = path
        for match in _INLINE.finditer(blank):
            if match[1]:
                stack.append(last)
            elif match[2]:
                if len(stack) > 1:
                    stack.pop()
            else:
                last = stack[-1] + _split_key(match[3])
                self._lines.setdefault(last, number)

    def line_of(self, path: _KeyPath) -> int | None:
        """The line of ``path``, else of its nearest ancestor, else of a descendant."""
        for end in range(len(path), 0, -1):
            if path[:end] in self._lines:
                return self._lines[path[:end]]
        for known, number in self._lines.items():
            if known[: len(path)] == path:
                return number
        return None


# --- reading with provenance -----------------------------------------------------------


class _Context:
    def __init__(self, file: Path | None, text: str) -> None:
        self.file = file
        self.locator = _Locator(text)
        self.env: dict[_KeyPath, str] = {}  # key path -> variable that set it
        self.env_raw: dict[_KeyPath, str] = {}  # key path -> the variable's raw text

    def from_env(self, path: _KeyPath) -> str | None:
        for end in range(len(path), 0, -1):
            if path[:end] in self.env:
                return self.env[path[:end]]
        return None

    def base_dir(self, path: _KeyPath) -> Path:
        if self.file is None or self.from_env(path) is not None:
            return Path.cwd()
        return self.file.parent.absolute()  # a relative --config must not leave relative paths

    def fail(self, path: _KeyPath, problem: str) -> NoReturn:
        key = ".".join(path)
        variable = self.from_env(path)
        if variable is not None:
            raise SettingsError(
                f"environment variable {variable}: {key}: {problem}", key=key, source=variable
            )
        line = self.locator.line_of(path) if self.file is not None else None
        if line is not None:
            raise SettingsError(
                f"{self.file}, line {line}: {key}: {problem}",
                key=key,
                source=str(self.file),
                line=line,
            )
        # not in the file: a table made by environment variables, or a default
        for end in range(len(path), 0, -1):
            below = sorted(v for p, v in self.env.items() if p[:end] == path[:end])
            if below:
                where = f"environment variable{'s' if len(below) > 1 else ''} {', '.join(below)}"
                raise SettingsError(f"{where}: {key}: {problem}", key=key, source=below[0])
        where = str(self.file) if self.file is not None else "settings (no file)"
        raise SettingsError(
            f"{where}: {key}: {problem}",
            key=key,
            source=None if self.file is None else str(self.file),
        )


def _type_name(value: object) -> str:
    return {
        bool: "a boolean",
        int: "an integer",
        float: "a float",
        str: "a string",
        dict: "a table",
        list: "an array",
    }.get(type(value), type(value).__name__)


def _show(value: object) -> str:
    if isinstance(value, dict | list):
        return _type_name(value)
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class _Table:
    """One TOML table being read: typed getters that fail with the key's location."""

    def __init__(
        self, ctx: _Context, path: _KeyPath, data: Mapping[str, Any], known: tuple[str, ...]
    ) -> None:
        self.ctx = ctx
        self.path = path
        self.data = data
        for key in data:
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                where = f"in [{'.'.join(path)}]" if path else "at the top level"
                self.ctx.fail(
                    (*path, key),
                    f"unknown key {where}{hint} (known: {', '.join(known)})",
                )

    def fail(self, key: str, problem: str) -> NoReturn:
        self.ctx.fail((*self.path, key), problem)

    def has(self, key: str) -> bool:
        value = self.data.get(key)
        return value is not None and value != ""

    def raw(self, key: str) -> Any:
        return self.data.get(key)

    def string(self, key: str, default: str | None = None) -> str | None:
        value = self.data.get(key)
        if value is None:
            return default
        if not isinstance(value, str):
            env_text = self.ctx.env_raw.get((*self.path, key))
            if env_text is None:
                self.fail(key, f"expected a string, got {_type_name(value)} {_show(value)}")
            value = env_text
        return value if value != "" else default

    def required_string(self, key: str, what: str) -> str:
        value = self.string(key)
        if value is None:
            self.fail(key, f"missing: {what}")
        return value

    def choice(self, key: str, default: str, choices: tuple[str, ...]) -> str:
        value = self.string(key, default)
        assert value is not None
        if value not in choices:
            self.fail(key, f"expected one of {', '.join(choices)}, got {value!r}")
        return value

    def integer(self, key: str, default: int, low: int, high: int) -> int:
        value = self.data.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            self.fail(key, f"expected an integer from {low} to {high}, got {_show(value)}")
        return value

    def boolean(self, key: str, default: bool) -> bool:
        value = self.data.get(key, default)
        if not isinstance(value, bool):
            self.fail(key, f"expected true or false, got {_show(value)}")
        return value

    def path_value(self, key: str, default: Path | None = None) -> Path | None:
        value = self.string(key)
        if value is None:
            return default
        path = Path(value)
        return path if path.is_absolute() else self.ctx.base_dir((*self.path, key)) / path

    def table(self, key: str, known: tuple[str, ...]) -> _Table:
        value = self.data.get(key)
        if value is None:
            value = {}
        if not isinstance(value, dict):
            self.fail(key, f"expected a table, got {_type_name(value)} {_show(value)}")
        return _Table(self.ctx, (*self.path, key), value, known)

    def convert(self, key: str, fn: Callable[[Any], _T]) -> _T:
        """``fn(value)``; its ``ValueError``/``VdistreamError`` text becomes the problem."""
        try:
            return fn(self.data[key])
        except (ValueError, TypeError, VdistreamError) as exc:
            self.fail(key, str(exc))


# --- the environment --------------------------------------------------------------------

_SECTIONS = ("service", "databases", "destinations")


def _env_value(text: str) -> Any:
    try:
        parsed = tomllib.loads(f"v = {text}")
    except tomllib.TOMLDecodeError:
        return text
    return parsed["v"] if list(parsed) == ["v"] else text


def _env_key(name: str) -> str:
    return name.lower()


def _apply_env(raw: dict[str, Any], env: Mapping[str, str], ctx: _Context) -> tuple[str, ...]:
    applied = []
    for variable in sorted(env):
        if not variable.startswith(ENV_PREFIX):
            continue
        rest = variable[len(ENV_PREFIX) :]

        def refuse(problem: str, variable: str = variable) -> NoReturn:
            raise SettingsError(
                f"environment variable {variable}: {problem}", key="", source=variable
            )

        if "__" not in rest:
            for section in _SECTIONS:
                if rest.startswith(section.upper() + "_"):
                    refuse(
                        f"looks like an override but has no double underscore: nesting is "
                        f"written with '__', e.g. VDISTREAM_{section.upper()}__<KEY>"
                    )
            continue
        parts = rest.split("__")
        section = parts[0].lower()
        if section not in _SECTIONS or parts[0] != parts[0].upper():
            refuse(
                f"{parts[0]!r} is not a settings table; overrides are "
                "VDISTREAM_SERVICE__<KEY>, VDISTREAM_DATABASES__<NAME>__<KEY>, "
                "VDISTREAM_DESTINATIONS__<NAME>__<KEY>"
            )
        if any(not p for p in parts):
            refuse("empty part between double underscores")
        if section == "service":
            if len(parts) < 2:
                refuse("name a key: VDISTREAM_SERVICE__<KEY>")
            path: _KeyPath = ("service", *(_env_key(p) for p in parts[1:]))
        else:
            if len(parts) < 3:
                refuse(f"name a table and a key: VDISTREAM_{parts[0]}__<NAME>__<KEY>")
            tables = raw.get(section)
            existing = list(tables) if isinstance(tables, dict) else []
            wanted = parts[1].upper()
            matches = [n for n in existing if n.upper().replace("-", "_") == wanted]
            if len(matches) > 1:
                refuse(f"{parts[1]} matches several [{section}] tables: {', '.join(matches)}")
            name = matches[0] if matches else parts[1].lower()
            path = (section, name, *(_env_key(p) for p in parts[2:]))
        text = env[variable]
        _set_path(raw, path, None if text.strip() == "" else _env_value(text.strip()), refuse)
        ctx.env[path] = variable
        ctx.env_raw[path] = text.strip()
        applied.append(variable)
    return tuple(applied)


def _set_path(
    raw: dict[str, Any], path: _KeyPath, value: Any, refuse: Callable[[str], NoReturn]
) -> None:
    node = raw
    for i, part in enumerate(path[:-1]):
        child = node.get(part)
        if child is None:
            if value is None:
                return
            child = node[part] = {}
        if not isinstance(child, dict):
            refuse(f"{'.'.join(path[: i + 1])} is not a table, it cannot have keys")
        node = child
    if value is None:
        node.pop(path[-1], None)
    else:
        node[path[-1]] = value


# --- building and checking --------------------------------------------------------------

_NAME = re.compile(r"[A-Za-z0-9]+(?:[_-][A-Za-z0-9]+)*")
_SERVICE_KEYS = (
    "state_dir",
    "socket",
    "socket_mode",
    "listen",
    "token_file",
    "max_jobs",
    "max_queued",
    "grace_period",
    "job_history",
    "log_format",
    "log_level",
    "timezone",
)
_DATABASE_KEYS = (
    "url",
    "mode",
    "devices",
    "compress",
    "encrypt_key_file",
    "max_jobs",
    "destination",
    "schedule",
    "retention",
    "verify_after_backup",
)
_RETENTION_KEYS = ("keep_last", "keep_within")
_DESTINATION_KEYS = ("url",)
_SUN_PATH_MAX = 107  # bytes, not counting the terminating NUL
_MIN_TOKEN = 16


def load_settings(path: str | Path | None, env: Mapping[str, str] = os.environ) -> Settings:
    """Read ``path`` (``None``: no file, defaults and environment only), apply the
    ``VDISTREAM_*`` overrides from ``env``, validate, and return the settings.
    Raises ``SettingsError`` (module doc) for anything wrong."""
    file = Path(path) if path is not None else None
    text = ""
    raw: dict[str, Any] = {}
    if file is not None:
        try:
            text = file.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise SettingsError(
                f"{file}: the settings file does not exist", key="", source=str(file)
            ) from None
        except (OSError, UnicodeDecodeError) as exc:
            raise SettingsError(
                f"{file}: cannot read the settings file: {exc}", key="", source=str(file)
            ) from exc
        try:
            raw = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            match = re.search(r"line (\d+)", str(exc))
            raise SettingsError(
                f"{file}{', line ' + match[1] if match else ''}: not valid TOML: {exc}",
                key="",
                source=str(file),
                line=int(match[1]) if match else None,
            ) from exc
    ctx = _Context(file, text)
    applied = _apply_env(raw, env, ctx)
    top = _Table(ctx, (), raw, _SECTIONS)
    for section in _SECTIONS:
        if section in raw and not isinstance(raw[section], dict):
            top.fail(section, f"expected a table, got {_type_name(raw[section])}")

    service = _service(top.table("service", _SERVICE_KEYS), env)
    destinations = {name: _destination(table) for name, table in _named_tables(top, "destinations")}
    databases = {
        name: _database(table, destinations) for name, table in _named_tables(top, "databases")
    }
    return Settings(
        service=service,
        databases=MappingProxyType(databases),
        destinations=MappingProxyType(destinations),
        source=file,
        env_overrides=applied,
    )


def _named_tables(top: _Table, section: str) -> list[tuple[str, _Table]]:
    data = top.raw(section) or {}
    out = []
    for name, value in data.items():
        path = (section, name)
        if not _NAME.fullmatch(name):
            top.ctx.fail(
                path,
                f"a name is letters and digits, joined by single '-' or '_' (got {name!r})",
            )
        if not isinstance(value, dict):
            top.ctx.fail(path, f"expected a table [{section}.{name}], got {_type_name(value)}")
        known = _DATABASE_KEYS if section == "databases" else _DESTINATION_KEYS
        out.append((name, _Table(top.ctx, path, value, known)))
    return out


def _service(t: _Table, env: Mapping[str, str]) -> ServiceSettings:
    state_dir = t.path_value("state_dir", ServiceSettings.state_dir)
    assert state_dir is not None
    socket = t.path_value("socket")
    socket_path = socket if socket is not None else state_dir / "vdistream.sock"
    if len(os.fsencode(socket_path)) > _SUN_PATH_MAX:
        t.fail(
            "socket" if socket is not None else "state_dir",
            f"the socket path {socket_path} is longer than {_SUN_PATH_MAX} bytes, "
            "the limit of a Unix socket address",
        )
    mode = t.convert("socket_mode", _socket_mode) if "socket_mode" in t.data else 0o600
    listen = t.convert("listen", _listen) if t.has("listen") else None
    token_file = t.path_value("token_file")
    token: Secret | None = None
    if env.get(TOKEN_ENV):
        token = Secret(env[TOKEN_ENV].strip())
        if len(token.reveal()) < _MIN_TOKEN:
            raise SettingsError(
                f"environment variable {TOKEN_ENV}: the token must have at least "
                f"{_MIN_TOKEN} characters",
                key="service.token",
                source=TOKEN_ENV,
            )
    elif token_file is not None:
        token = _read_token(t, token_file)
    if listen is not None and token is None:
        t.fail(
            "listen",
            f"a TCP listener needs a bearer token: set service.token_file or {TOKEN_ENV}",
        )
    grace = t.convert("grace_period", _seconds) if "grace_period" in t.data else 30.0
    history: timedelta | None = ServiceSettings.job_history
    if "job_history" in t.data:
        history = t.convert("job_history", _history)
    timezone = t.string("timezone")
    if timezone is not None:
        t.convert("timezone", lambda v: resolve_timezone(timezone))
    return ServiceSettings(
        state_dir=state_dir,
        socket=socket,
        socket_mode=mode,
        listen=listen,
        token_file=token_file,
        token=token,
        max_jobs=t.integer("max_jobs", 2, 1, 1024),
        max_queued=t.integer("max_queued", 16, 0, 100_000),
        grace_period=grace,
        job_history=history,
        log_format=cast(LogFormat, t.choice("log_format", "auto", ("json", "console", "auto"))),
        log_level=cast(
            LogLevel, t.choice("log_level", "info", ("debug", "info", "warning", "error"))
        ),
        timezone=timezone,
    )


def _socket_mode(value: Any) -> int:
    hint = 'write it in octal: 0o600 or "0600"'
    if isinstance(value, bool):
        raise ValueError(f"expected a file mode, {hint}")
    if isinstance(value, str):
        digits = value.strip().removeprefix("0o")
        if not digits or any(c not in "01234567" for c in digits):
            raise ValueError(f"{value!r} is not an octal mode; {hint}")
        mode = int(digits, 8)
    elif isinstance(value, int):
        mode = value
    else:
        raise ValueError(f"expected a file mode, got {_type_name(value)}; {hint}")
    if not 0 <= mode <= 0o777:
        raise ValueError(f"mode {mode:#o} is outside 0o000..0o777 ({hint})")
    if mode & 0o007:
        raise ValueError(
            f"mode {mode:#o} lets every local user control the daemon; "
            "give nothing to others (e.g. 0o600 or 0o660)"
        )
    if not mode & 0o200:
        raise ValueError(f"mode {mode:#o} does not let the owner connect (needs 0o200)")
    return mode


def _listen(value: Any) -> tuple[str, int]:
    if not isinstance(value, str):
        raise ValueError(f"expected 'HOST:PORT', got {_type_name(value)}")
    match = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d+)|([^:\[\]]+):(\d+)", value.strip())
    if match is None:
        raise ValueError(f"{value!r} is not HOST:PORT (IPv6: [::1]:PORT)")
    host = match[1] or match[3]
    port = int(match[2] or match[4])
    if not 1 <= port <= 65535:
        raise ValueError(f"port {port} is outside 1..65535")
    if host.lower() != "localhost":
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            raise ValueError(
                f"{host!r} is not an IP address; the API listens only on loopback "
                "(127.0.0.1, ::1 or localhost)"
            ) from None
        if not loopback:
            raise ValueError(
                f"{host} is not a loopback address: the API listens only on loopback "
                "(127.0.0.1, ::1 or localhost); use the Unix socket or a proxy otherwise"
            )
    return host, port


def _read_token(t: _Table, path: Path) -> Secret:
    try:
        info = path.stat()
        if info.st_mode & 0o007:
            t.fail(
                "token_file",
                f"{path} is accessible to others (mode {stat.S_IMODE(info.st_mode):#o}); "
                "chmod o-rwx it",
            )
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        t.fail("token_file", f"cannot read {path}: {exc.strerror or exc}")
    lines = text.splitlines()
    token = lines[0].strip() if lines else ""
    if len(token) < _MIN_TOKEN:
        t.fail("token_file", f"the token in {path} must have at least {_MIN_TOKEN} characters")
    return Secret(token)


def _history(value: Any) -> timedelta | None:
    if value == "":  # "not set", as for every optional key: the default
        return ServiceSettings.job_history
    if value == "forever":
        return None
    if not isinstance(value, str):
        raise ValueError(f'expected a duration like "90d", or "forever", got {_type_name(value)}')
    history = parse_duration(value)
    if history < timedelta(hours=1):
        raise ValueError(f"expected at least 1h, got {value!r}")
    return history


def _seconds(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError("expected seconds (a number) or a duration like '90s'")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        seconds = parse_duration(value).total_seconds()
    else:
        raise ValueError(f"expected seconds or a duration, got {_type_name(value)}")
    if not 0 <= seconds <= 86400:
        raise ValueError(f"expected 0 to 86400 seconds, got {value!r}")
    return seconds


def _destination(t: _Table) -> DestinationSettings:
    url = t.required_string("url", 'the destination\'s URL, e.g. url = "/var/backups/vdistream"')
    url = t.convert("url", lambda v: _destination_url(url, t.ctx.base_dir((*t.path, "url"))))
    return DestinationSettings(name=t.path[-1], url=url, display_url=_mask(url))


_DESTINATION_SCHEMES = ("file", "s3", "memory", "null")


def _destination_url(url: str, base: Path) -> str:
    scheme = re.match(r"([A-Za-z][A-Za-z0-9+.-]*):", url)
    if scheme is None:  # a plain path
        path = Path(url)
        return str(path if path.is_absolute() else base / path)
    name = scheme[1].lower()
    if name not in _DESTINATION_SCHEMES:
        raise ValueError(
            f"unknown storage scheme {name!r} (known: a path, "
            f"{', '.join(s + '://' for s in _DESTINATION_SCHEMES)})"
        )
    parts = urlsplit(url)
    if name == "s3" and not parts.hostname:
        raise ValueError(f"{_mask(url)} names no bucket: s3://BUCKET/PREFIX")
    if name == "file" and not parts.path.startswith("/"):
        raise ValueError(f"{url!r}: a file URL needs an absolute path (file:///dir)")
    return url


def _mask(url: str) -> str:
    """``url`` with the password of its user info replaced by ``***``."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        user = parts.username or ""
        host = parts.netloc.rsplit("@", 1)[1]
        return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))
    except ValueError:
        return url


def _database(t: _Table, destinations: Mapping[str, DestinationSettings]) -> DatabaseSettings:
    url = t.required_string("url", 'the database to back up, e.g. url = "sqlite:///srv/app/app.db"')
    kind, url = t.convert("url", lambda v: _database_url(url, t.ctx.base_dir((*t.path, "url"))))
    mode: str | None = None
    if kind == "postgresql":
        mode = t.choice("mode", "basebackup", ("basebackup", "dump"))
    elif t.has("mode"):
        t.fail("mode", f"only PostgreSQL databases have a mode; this one is {kind}")
    destination = t.required_string(
        "destination", 'the name of a [destinations.NAME] table, e.g. destination = "local"'
    )
    if destination not in destinations:
        defined = ", ".join(sorted(destinations)) or "none"
        t.fail("destination", f"no [destinations.{destination}] table (defined: {defined})")
    compress = t.convert("compress", _compression) if t.has("compress") else CompressionSpec("none")
    key_file = t.path_value("encrypt_key_file")
    if key_file is not None:
        t.convert("encrypt_key_file", lambda v: load_key(key_file=key_file))  # checked, dropped
    schedule = t.convert("schedule", CronExpr.parse) if t.has("schedule") else None
    retention = t.table("retention", _RETENTION_KEYS)
    keep_within = (
        retention.convert("keep_within", _positive_duration)
        if retention.has("keep_within")
        else None
    )
    keep_last = (
        retention.integer("keep_last", 1, 1, 100_000) if "keep_last" in retention.data else None
    )
    return DatabaseSettings(
        name=t.path[-1],
        url=url,
        destination=destination,
        kind=kind,
        display_url=_mask(url),
        mode=mode,
        devices=t.integer("devices", 4, 1, 64),
        compress=compress,
        encrypt_key_file=key_file,
        max_jobs=t.integer("max_jobs", 1, 1, 64),
        schedule=schedule,
        retention=RetentionPolicy(keep_last=keep_last, keep_within=keep_within),
        verify_after_backup=t.boolean("verify_after_backup", True),
    )


def _database_url(url: str, base: Path) -> tuple[DatabaseKind, str]:
    scheme, sep, rest = url.partition(":")
    scheme = scheme.lower()
    known = "sqlite:, postgresql: (postgres:), cmd:"
    if not sep:
        raise ValueError(f"{url!r} is not a database URL (known schemes: {known})")
    if scheme == "sqlite":
        path_text = rest[2:] if rest.startswith("//") else rest
        if not path_text or path_text in ("/", ":memory:"):
            raise ValueError(f"{url!r} names no database file (sqlite:///path/to/app.db)")
        path = Path(path_text)
        return "sqlite", f"sqlite://{path if path.is_absolute() else base / path}"
    if scheme in ("postgresql", "postgres"):
        parts = urlsplit(url)
        if not rest.startswith("//"):
            raise ValueError(f"{_mask(url)!r} is not postgresql://[user@]host[:port]/dbname")
        try:
            parts.port  # noqa: B018 -- raises for a bad port
        except ValueError as exc:
            raise ValueError(f"{_mask(url)!r}: {exc}") from None
        return "postgresql", url
    if scheme == "cmd":
        try:
            words = shlex.split(rest)
        except ValueError as exc:
            raise ValueError(f"cmd: command line cannot be split: {exc}") from None
        if not words:
            raise ValueError(
                "cmd: needs a command line, e.g. cmd:mysqldump --single-transaction db"
            )
        return "cmd", url
    raise ValueError(f"unknown database URL scheme {scheme!r} (known: {known})")


def _compression(value: Any) -> CompressionSpec:
    if not isinstance(value, str):
        raise ValueError(f'expected a string like "zstd:3", got {_type_name(value)}')
    return parse_compression(value, setting="compress")


def _positive_duration(value: Any) -> timedelta:
    if not isinstance(value, str):
        raise ValueError(
            f'expected a duration string like "14d", got {_type_name(value)} {_show(value)}'
        )
    duration = parse_duration(value)
    if duration <= timedelta(0):
        raise ValueError("the duration must be longer than zero")
    return duration


def settings_summary(settings: Settings) -> dict[str, Any]:
    """The settings as JSON-ready data without secrets (for ``serve --check``, the
    startup log line and the API): URLs masked, the token only as "set"."""
    service = settings.service
    body = {
        "source": None if settings.source is None else str(settings.source),
        "env_overrides": list(settings.env_overrides),
        "service": {
            "state_dir": str(service.state_dir),
            "socket": str(service.socket_path),
            "socket_mode": f"{service.socket_mode:#o}",
            "listen": None
            if service.listen is None
            else f"{service.listen[0]}:{service.listen[1]}",
            "token": "set" if service.token is not None else None,
            "max_jobs": service.max_jobs,
            "max_queued": service.max_queued,
            "grace_period": service.grace_period,
            "job_history": None
            if service.job_history is None
            else service.job_history.total_seconds(),
            "log_format": service.log_format,
            "log_level": service.log_level,
            "timezone": service.timezone,
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
                "encrypted": d.encrypt_key_file is not None,
                "max_jobs": d.max_jobs,
                "schedule": None if d.schedule is None else d.schedule.text,
                "keep_last": d.retention.keep_last,
                "keep_within": None
                if d.retention.keep_within is None
                else d.retention.keep_within.total_seconds(),
                "verify_after_backup": d.verify_after_backup,
            }
            for n, d in settings.databases.items()
        },
    }
    return body
