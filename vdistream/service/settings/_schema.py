"""The settings file's shape as pydantic models: strict types, unknown keys forbidden,
and the rules of each value (``vdistream.service.settings`` documents every key).

A rule raises ``ValueError`` with the text the user sees; ``_load`` puts the file, the
line and the key in front of it. The URL rules (``database_url``, ``destination_url``)
need the directory relative paths start from, which depends on the source of the
value, so ``_load`` calls them when it builds the settings.
"""

from __future__ import annotations

import ipaddress
import re
import shlex
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, TypeVar
from urllib.parse import parse_qsl, urlsplit, urlunsplit

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, PlainValidator, model_validator

from vdistream.errors import VdistreamError
from vdistream.pipeline.spec import CompressionSpec, parse_compression
from vdistream.service.schedule import CronExpr, resolve_timezone
from vdistream.service.settings import (
    WEBHOOK_EVENTS,
    DatabaseKind,
    LogFormat,
    LogLevel,
    parse_duration,
)
from vdistream.throttle import parse_rate

__all__ = (
    "BLANK",
    "TABLES",
    "TEXT",
    "DatabaseIn",
    "DestinationIn",
    "FileIn",
    "RetentionIn",
    "ServiceIn",
    "WebhookIn",
    "database_url",
    "destination_url",
    "given",
    "mask",
    "show",
    "type_name",
    "webhook_url",
)

_T = TypeVar("_T")

#: In a field's metadata: the key wants a string, so ``""`` means "not set" (the key's
#: default) and an environment variable's raw text is the value, whatever it parses as.
TEXT = "text"
#: In a field's metadata: ``""`` means "not set", but the variable's value is parsed as
#: TOML like any other (``listen = 8470`` from the environment is an integer: an error).
BLANK = "blank"


def type_name(value: object) -> str:
    return {
        bool: "a boolean",
        int: "an integer",
        float: "a float",
        str: "a string",
        dict: "a table",
        list: "an array",
    }.get(type(value), type(value).__name__)


def show(value: object) -> str:
    if isinstance(value, dict | list):
        return type_name(value)
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _rule(check: Callable[[Any], _T]) -> Callable[[Any], _T]:
    """``check`` with our errors as ``ValueError``, the only kind pydantic reports."""

    def run(value: Any) -> _T:
        try:
            return check(value)
        except (TypeError, VdistreamError) as exc:
            raise ValueError(str(exc)) from None

    return run


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
        raise ValueError(f"expected a file mode, got {type_name(value)}; {hint}")
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
        raise ValueError(f"expected 'HOST:PORT', got {type_name(value)}")
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


def _seconds(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError("expected seconds (a number) or a duration like '90s'")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        seconds = parse_duration(value).total_seconds()
    else:
        raise ValueError(f"expected seconds or a duration, got {type_name(value)}")
    if not 0 <= seconds <= 86400:
        raise ValueError(f"expected 0 to 86400 seconds, got {value!r}")
    return seconds


def _connect_timeout(value: Any) -> float:
    seconds = _seconds(value)
    if seconds <= 0:
        raise ValueError(f"expected more than 0 seconds, got {value!r}")
    return seconds


def _positive_seconds(value: Any) -> float:
    # one message for both ends (``_seconds``' own says "0 to", and 0 is refused here)
    problem = f"expected more than 0 and at most 86400 seconds, got {value!r}"
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if number and not 0 < value <= 86400:
        raise ValueError(problem)
    seconds = _seconds(value)
    if seconds <= 0:
        raise ValueError(problem)
    return seconds


def _events(value: Any) -> frozenset[str]:
    known = ", ".join(WEBHOOK_EVENTS)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"expected an array of event names ({known}), got {show(value)}")
    unknown = [v for v in value if v not in WEBHOOK_EVENTS]
    if unknown:
        raise ValueError(f"unknown event {unknown[0]!r} (known: {known})")
    if not value:
        raise ValueError(f"name at least one event ({known}), or leave events out for all")
    return frozenset(value)


def webhook_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{show(mask(url))} is not an http:// or https:// URL with a host")
    try:
        parts.port  # noqa: B018 -- raises for a bad port
    except ValueError as exc:
        raise ValueError(f"{show(mask(url))}: {exc}") from None
    return url


def _variable(name: str) -> str:
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        raise ValueError(f"{name!r} is not an environment variable name")
    return name


def _group(name: str) -> str:
    """A group that exists on this system (a name, or a number)."""
    import grp

    try:
        if name.strip().isdigit():
            grp.getgrgid(int(name))
        else:
            grp.getgrnam(name)
    except KeyError:
        raise ValueError(f"no group {name!r} on this system") from None
    return name.strip()


def _history(value: Any) -> timedelta | None:
    if value == "forever":
        return None
    if not isinstance(value, str):
        raise ValueError(f'expected a duration like "90d", or "forever", got {type_name(value)}')
    history = parse_duration(value)
    if history < timedelta(hours=1):
        raise ValueError(f"expected at least 1h, got {value!r}")
    return history


def _positive_duration(value: Any) -> timedelta:
    if not isinstance(value, str):
        raise ValueError(
            f'expected a duration string like "14d", got {type_name(value)} {show(value)}'
        )
    duration = parse_duration(value)
    if duration <= timedelta(0):
        raise ValueError("the duration must be longer than zero")
    return duration


def _compression(value: Any) -> CompressionSpec:
    if not isinstance(value, str):
        raise ValueError(f'expected a string like "zstd:3", got {type_name(value)}')
    return parse_compression(value, setting="compress")


def _timezone(name: str) -> str:
    resolve_timezone(name)
    return name


def _name(name: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9]+(?:[_-][A-Za-z0-9]+)*", name):
        raise ValueError(
            f"a name is letters and digits, joined by single '-' or '_' (got {name!r})"
        )
    return name


_DESTINATION_SCHEMES = ("file", "s3", "azure", "memory", "null")


#: where azure:// takes the credentials its URL must not carry (an s3:// URL with
#: them is still loaded, masked, as before issue 16; its storage refuses it per job)
_CREDENTIALS = {"azure": "set AZURE_STORAGE_CONNECTION_STRING or AZURE_STORAGE_KEY"}
#: azure:// URLs' query options (``vdistream.storage.azure.client._URL_OPTIONS``; a
#: test compares them)
_URL_OPTIONS = {"azure": frozenset({"endpoint"})}


def destination_url(url: str, base: Path) -> str:
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
    if name in _CREDENTIALS and "@" in parts.netloc:
        # refused at load, not by every job; the user info is not repeated (a key)
        shown = urlunsplit(parts._replace(netloc="***@" + parts.netloc.rpartition("@")[2]))
        raise ValueError(f"{shown}: an {name} URL must not carry credentials; {_CREDENTIALS[name]}")
    if name in _URL_OPTIONS:
        # an unknown option would fail every job; it may be a credential (a SAS's
        # "sig"), so neither its value nor the query is repeated
        given_names = [n for n, _ in parse_qsl(parts.query, keep_blank_values=True)]
        unknown = [n for n in given_names if n not in _URL_OPTIONS[name]]
        if unknown:
            shown = urlunsplit(parts._replace(query="***"))
            raise ValueError(
                f"{shown}: unknown {name} URL option {unknown[0]!r} (known: "
                f"{', '.join(sorted(_URL_OPTIONS[name]))})"
            )
    if name == "s3" and not parts.hostname:
        raise ValueError(f"{mask(url)} names no bucket: s3://BUCKET/PREFIX")
    if name == "azure" and (not parts.netloc or not parts.path.strip("/")):
        raise ValueError(
            f"{mask(url)} names no storage account and container: azure://ACCOUNT/CONTAINER/PREFIX"
        )
    if name == "file" and not parts.path.startswith("/"):
        raise ValueError(f"{url!r}: a file URL needs an absolute path (file:///dir)")
    return url


def mask(url: str) -> str:
    """``url`` with the password of its user info replaced by ``***``."""
    # (a webhook's query, which may hold a token, is masked by ``_load``)
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        user = parts.username or ""
        host = parts.netloc.rsplit("@", 1)[1]
        return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))
    except ValueError:
        return url


def database_url(url: str, base: Path) -> tuple[DatabaseKind, str]:
    """The URL's kind and the URL (a relative SQLite path made absolute). A SQL Server
    URL is only recognised here: ``_load`` parses it (it needs the environment)."""
    scheme, sep, rest = url.partition(":")
    scheme = scheme.lower()
    known = "sqlite:, postgresql: (postgres:), mssql: (sqlserver:), cmd:, external:"
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
            raise ValueError(f"{mask(url)!r} is not postgresql://[user@]host[:port]/dbname")
        try:
            parts.port  # noqa: B018 -- raises for a bad port
        except ValueError as exc:
            raise ValueError(f"{mask(url)!r}: {exc}") from None
        return "postgresql", url
    if scheme in ("mssql", "sqlserver"):
        return "mssql", url
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
    if scheme == "external":
        name = rest
        if not name or name != name.strip() or name.startswith(".") or "/" in name:
            raise ValueError(
                f"{url!r} names no set: write external:NAME (NAME: the set's name, no '/', "
                "not starting with '.'), e.g. external:nightly"
            )
        if len(name.encode()) > 100 or any(c in name for c in "\\\0"):
            raise ValueError(f"{url!r}: a set name is 1 to 100 bytes without '\\' or NUL")
        return "external", f"external:{name}"
    raise ValueError(f"unknown database URL scheme {scheme!r} (known: {known})")


def given(table: BaseModel | None) -> dict[str, Any]:
    """The keys a table sets, with their values (``model_dump`` would convert them)."""
    return {} if table is None else {k: getattr(table, k) for k in table.model_fields_set}


class _Table(BaseModel):
    """A TOML table: strict (``true`` is not an integer), no unknown keys."""

    model_config = ConfigDict(extra="forbid", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _empty_is_unset(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        blank = {n for n, f in cls.model_fields.items() if {TEXT, BLANK} & set(f.metadata)}
        return {k: v for k, v in data.items() if not (v == "" and k in blank)}


# A key left out is not set (``model_fields_set``): its default is the one of the
# settings' dataclasses, which document every key; the ``None`` here only means that.


def _rate(value: Any) -> int | None:
    """``vdistream.throttle.parse_rate``: "200M", "1.5G", an integer; 0 or "off": none."""
    try:
        return parse_rate(value, what="max_rate")
    except VdistreamError as exc:  # the key is named in front already
        raise ValueError(str(exc).removeprefix("max_rate: ")) from None


_Rate = Annotated[int | None, BLANK, PlainValidator(_rate)]


class WebhookIn(_Table):
    """``[[service.webhooks]]``, ``[[databases.NAME.webhooks]]``."""

    url: Annotated[str, TEXT, AfterValidator(webhook_url)] = Field(
        description='the receiver\'s URL, e.g. url = "https://hooks.example.com/vdistream"'
    )
    events: Annotated[frozenset[str] | None, PlainValidator(_events)] = None
    secret_file: Annotated[str | None, TEXT] = None
    secret_env: Annotated[str | None, TEXT, AfterValidator(_variable)] = None
    timeout: Annotated[float | None, PlainValidator(_positive_seconds)] = None
    attempts: Annotated[int | None, Field(ge=1, le=20)] = None
    deadline: Annotated[float | None, PlainValidator(_positive_seconds)] = None


class ServiceIn(_Table):
    state_dir: Annotated[str | None, TEXT] = None
    socket: Annotated[str | None, TEXT] = None
    socket_mode: Annotated[int | None, PlainValidator(_socket_mode)] = None
    listen: Annotated[tuple[str, int] | None, BLANK, PlainValidator(_listen)] = None
    token_file: Annotated[str | None, TEXT] = None
    max_jobs: Annotated[int | None, Field(ge=1, le=1024)] = None
    max_queued: Annotated[int | None, Field(ge=0, le=100_000)] = None
    grace_period: Annotated[float | None, PlainValidator(_seconds)] = None
    job_history: Annotated[timedelta | None, BLANK, PlainValidator(_history)] = None
    log_format: Annotated[LogFormat | None, TEXT] = None
    log_level: Annotated[LogLevel | None, TEXT] = None
    timezone: Annotated[str | None, TEXT, AfterValidator(_rule(_timezone))] = None
    sqlvdi: Annotated[str | None, TEXT] = None
    runtime_dir: Annotated[str | None, TEXT] = None
    runtime_group: Annotated[str | None, TEXT, AfterValidator(_group)] = None
    max_rate: _Rate = None
    webhooks: list[WebhookIn] | None = None


class DestinationIn(_Table):
    url: Annotated[str, TEXT] = Field(
        description='the destination\'s URL, e.g. url = "/var/backups/vdistream"'
    )


class RetentionIn(_Table):
    keep_last: Annotated[int | None, Field(ge=1, le=100_000)] = None
    keep_within: Annotated[timedelta | None, BLANK, PlainValidator(_positive_duration)] = None


_Cron = Annotated[CronExpr | None, BLANK, PlainValidator(_rule(CronExpr.parse))]


class DatabaseIn(_Table):
    url: Annotated[str, TEXT] = Field(
        description='the database to back up, e.g. url = "sqlite:///srv/app/app.db"'
    )
    #: any value: only PostgreSQL has a mode, and the URL tells (``_load`` checks it)
    mode: Annotated[Any, TEXT] = None
    devices: Annotated[int | None, Field(ge=1, le=64)] = None
    compress: Annotated[CompressionSpec | None, BLANK, PlainValidator(_rule(_compression))] = None
    encrypt_key_file: Annotated[str | None, TEXT] = None
    encrypt_recipients: list[str] | None = None
    decrypt_identity_file: Annotated[str | None, TEXT] = None
    max_jobs: Annotated[int | None, Field(ge=1, le=64)] = None
    destination: Annotated[str, TEXT] = Field(
        description='the name of a [destinations.NAME] table, e.g. destination = "local"'
    )
    mirror: Annotated[str | None, TEXT] = None
    schedule: _Cron = None
    #: SQL Server only, like ``mode`` (``_load`` checks the URL's kind)
    schedule_diff: _Cron = None
    schedule_log: _Cron = None
    retention: RetentionIn | None = None
    verify_after_backup: bool | None = None
    sqlvdi: Annotated[str | None, TEXT] = None
    #: external:NAME only, like ``mode`` (``_load`` checks the URL's kind)
    connect_timeout: Annotated[float | None, PlainValidator(_connect_timeout)] = None
    max_rate: _Rate = None
    webhooks: list[WebhookIn] | None = None


_Name = Annotated[str, AfterValidator(_name)]


class FileIn(_Table):
    """The whole file, its tables in the order error messages list them."""

    service: ServiceIn | None = None
    databases: dict[_Name, DatabaseIn] = {}
    destinations: dict[_Name, DestinationIn] = {}


#: Each table's model by its path; ``*`` stands for a table's name.
TABLES: dict[tuple[str, ...], type[BaseModel]] = {
    (): FileIn,
    ("service",): ServiceIn,
    ("destinations", "*"): DestinationIn,
    ("databases", "*"): DatabaseIn,
    ("databases", "*", "retention"): RetentionIn,
    ("service", "webhooks", "*"): WebhookIn,
    ("databases", "*", "webhooks", "*"): WebhookIn,
}
