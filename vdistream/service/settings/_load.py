"""``load_settings``'s work: read the file, overlay the environment, validate with the
pydantic models of ``_schema``, say where each problem is, and build the frozen
settings (``vdistream.service.settings`` module doc: the contract)."""

from __future__ import annotations

import dataclasses
import difflib
import functools
import os
import re
import stat
import tomllib
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any, NoReturn, TypeVar
from urllib.parse import urlsplit, urlunsplit

from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo
from pydantic_core import ErrorDetails

from vdistream.engines.databases import POSTGRES_MODES
from vdistream.errors import VdistreamError
from vdistream.pipeline.keys import load_key
from vdistream.service.settings import (
    TOKEN_ENV,
    DatabaseSettings,
    DestinationSettings,
    RetentionPolicy,
    Secret,
    ServiceSettings,
    Settings,
    SettingsError,
    WebhookSettings,
)
from vdistream.service.settings._lines import KeyPath, Locator
from vdistream.service.settings._schema import (
    TABLES,
    TEXT,
    DatabaseIn,
    DestinationIn,
    FileIn,
    ServiceIn,
    WebhookIn,
    database_url,
    destination_url,
    given,
    mask,
    show,
    type_name,
)
from vdistream.sqlserver.url import PASSWORD_VARIABLES, MssqlURL

__all__ = ("load",)

_T = TypeVar("_T")
_M = TypeVar("_M", bound=BaseModel)
_PREFIX = "VDISTREAM_"
_SECTIONS = tuple(FileIn.model_fields)
_SUN_PATH_MAX = 107  # bytes, not counting the terminating NUL
_MIN_TOKEN = 16


def load(file: Path | None, env: Mapping[str, str], *, check_passwords: bool = True) -> Settings:
    text = ""
    raw: dict[str, Any] = {}
    if file is not None:

        def fail(problem: str, line: int | None = None) -> NoReturn:
            where = f"{file}, line {line}" if line else str(file)
            raise SettingsError(f"{where}: {problem}", key="", source=str(file), line=line)

        try:
            text = file.read_text(encoding="utf-8")
        except FileNotFoundError:
            fail("the settings file does not exist")
        except (OSError, UnicodeDecodeError) as exc:
            fail(f"cannot read the settings file: {exc}")
        try:
            raw = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            match = re.search(r"line (\d+)", str(exc))
            fail(f"not valid TOML: {exc}", int(match[1]) if match else None)
    where = _Where(file, text)
    # Without the check, a stand-in password: no variable or file is looked at.
    where.password_env = env if check_passwords else {PASSWORD_VARIABLES[0]: "-"}
    where.environ = env
    where.read_secrets = check_passwords  # webhooks' secrets likewise
    applied = _overlay(raw, env, where)
    try:
        parsed = FileIn.model_validate(raw)
    except ValidationError as exc:
        raise _all_problems(raw, exc.errors(), where, env) from None
    service = _service(parsed.service, where, env)
    destinations = {n: _destination(n, d, where) for n, d in parsed.destinations.items()}
    databases = {
        n: _database(n, d, where, destinations, service) for n, d in parsed.databases.items()
    }
    return Settings(
        service=service,
        databases=MappingProxyType(databases),
        destinations=MappingProxyType(destinations),
        source=file,
        env_overrides=applied,
    )


# --- where a value came from, and what is wrong with it ---------------------------------


class _Where:
    """The provenance of every key: the file's line, or the variable that set it."""

    def __init__(self, file: Path | None, text: str) -> None:
        self.file = file
        self.locator = Locator(text)
        self.env: dict[KeyPath, str] = {}  # key path -> variable that set it
        #: where SQL Server URLs' passwords are looked for (``load``'s ``check_passwords``)
        self.password_env: Mapping[str, str] = {}
        #: the environment (webhooks' ``secret_env``)
        self.environ: Mapping[str, str] = {}
        #: whether webhooks' secrets are read (``load``'s ``check_passwords``)
        self.read_secrets = True

    def from_env(self, path: KeyPath) -> str | None:
        """The variable that set ``path`` or a table above it."""
        return next(
            (self.env[path[:e]] for e in range(len(path), 0, -1) if path[:e] in self.env), None
        )

    def base_dir(self, path: KeyPath) -> Path:
        if self.file is None or self.from_env(path) is not None:
            return Path.cwd()
        return self.file.parent.absolute()  # a relative --config must not leave relative paths

    def path(self, path: KeyPath, text: str) -> Path:
        value = Path(text)
        return value if value.is_absolute() else self.base_dir(path) / value

    def error(self, path: KeyPath, problem: str) -> SettingsError:
        key = _dotted(path)
        variable = self.from_env(path)
        variables = [variable] if variable is not None else []
        line = self.locator.line_of(path) if self.file is not None and not variables else None
        if not variables and line is None:  # not in the file: a table made by variables?
            for end in range(len(path), 0, -1):
                variables = sorted(v for p, v in self.env.items() if p[:end] == path[:end])
                if variables:
                    break
        if variables:
            where = (
                f"environment variable{'s' if len(variables) > 1 else ''} {', '.join(variables)}"
            )
            return SettingsError(f"{where}: {key}: {problem}", key=key, source=variables[0])
        source = None if self.file is None else str(self.file)
        where = f"{source}, line {line}" if line is not None else source or "settings (no file)"
        return SettingsError(f"{where}: {key}: {problem}", key=key, source=source, line=line)

    def check(self, path: KeyPath, rule: Callable[[], _T]) -> _T:
        """``rule()``; its ``ValueError``/``VdistreamError`` text is the problem at ``path``."""
        try:
            return rule()
        except (ValueError, TypeError, VdistreamError) as exc:
            raise self.error(path, str(exc)) from None


def _all_problems(
    raw: dict[str, Any], errors: list[ErrorDetails], where: _Where, env: Mapping[str, str]
) -> SettingsError:
    """One line per problem: pydantic's, then the builders' on what pydantic accepted
    (``_later_checks``), in the order the checks met them before pydantic (``_rank``), so
    that the first, which gives ``key``, ``source`` and ``line``, is the one they gave."""
    found = [
        (_rank(raw, p, "[key]" in e["loc"]), where.error(p, _problem(p, e)))
        for e in errors
        for p in [_path(e)]
    ]
    refused = {_path(e) for e in errors}
    for error in _later_checks(raw, refused, where, env):
        path = _key_path(error.key)
        if path not in refused:  # a refused key's stand-in: its problem is known
            found.append((_rank(raw, path, False), error))
    found.sort(key=lambda f: f[0])
    first = found[0][1]
    text = "\n".join(dict.fromkeys(str(e) for _, e in found))
    return SettingsError(text, key=first.key, source=first.source, line=first.line)


#: The order the checks before pydantic read each table's keys in (``token``: the token
#: file's or the variable's token, after ``token_file``).
_ORDER = {
    "service": (
        *("state_dir", "socket", "socket_mode", "listen", "token_file", "token"),
        *("grace_period", "job_history", "timezone", "max_jobs", "max_queued"),
        *("log_format", "log_level", "sqlvdi", "runtime_dir", "runtime_group"),
        *("max_rate", "webhooks"),
    ),
    "destinations": ("url",),
    "databases": (
        *("url", "mode", "destination", "mirror", "compress", "encrypt_key_file"),
        *("encrypt_recipients", "decrypt_identity_file", "sqlvdi"),
        *("schedule", "schedule_diff", "schedule_log"),
        *("retention", "devices", "max_jobs", "verify_after_backup", "connect_timeout"),
        *("max_rate", "webhooks"),
    ),
    "retention": ("keep_within", "keep_last"),
    "webhooks": (
        *("url", "events", "secret_file", "secret_env", "timeout", "attempts", "deadline"),
    ),
}


def _rank(raw: dict[str, Any], path: KeyPath, name: bool) -> tuple[int, ...]:
    """When the checks before pydantic met a problem at ``path`` (``name``: the table's
    name is wrong): the top level's unknown keys, each section's type, [service]'s
    unknown keys then values; every destination's name, type and unknown keys, then
    each one's values; the same for databases. Values in ``_ORDER``'s order."""

    def at(table: Any, key: str, order: tuple[str, ...]) -> tuple[int, int]:
        if key in order:
            return 1, order.index(key)
        return 0, list(table).index(key) if isinstance(table, dict) and key in table else 0

    def element(hooks: Any, rest: KeyPath) -> tuple[int, ...]:
        """A webhook's problem: by element, its unknown keys first, then its values."""
        if not rest or not rest[0].isdigit():
            return ()
        i = int(rest[0])
        table = hooks[i] if isinstance(hooks, list) and i < len(hooks) else None
        return i, *(at(table, rest[1], _ORDER["webhooks"]) if len(rest) > 1 else ())

    section = path[0]
    if section not in _SECTIONS:
        return 0, *at(raw, section, ())
    if len(path) == 1:
        return 1, _SECTIONS.index(section)
    tables = raw.get(section)
    if section == "service":
        hooks = tables.get("webhooks") if isinstance(tables, dict) else None
        return 2, *at(tables, path[1], _ORDER[section]), *element(hooks, path[2:])
    group = 3 if section == "destinations" else 4
    names = list(tables) if isinstance(tables, dict) else []
    i = names.index(path[1]) if path[1] in names else 0
    if len(path) == 2:
        return group, 0, i, int(not name)
    table = tables[path[1]] if isinstance(tables, dict) else None
    known, slot = at(table, path[2], _ORDER[section])
    if not known:  # checked with the table's name and type, before any table's values
        return group, 0, i, 2, slot
    if len(path) == 3:
        return group, 1, i, slot
    inner = table.get(path[2]) if isinstance(table, dict) else None  # retention's keys
    if path[2] == "webhooks":
        return group, 1, i, slot, *element(inner, path[3:])
    return group, 1, i, slot, *at(inner, path[3], _ORDER["retention"])


def _later_checks(
    raw: dict[str, Any], refused: set[KeyPath], where: _Where, env: Mapping[str, str]
) -> list[SettingsError]:
    """The builders' checks (URLs, the destination named, files, the token) on each
    table pydantic accepted, but for its refused keys: one that takes any text (a path, a
    URL, a name) is replaced by a stand-in (its name), any other left out. A builder
    stops at its first problem."""
    found: list[SettingsError] = []

    def accepted(path: KeyPath, model: type[_M]) -> _M | None:
        table: Any = raw
        for part in path:
            table = table.get(part, {}) if isinstance(table, dict) else None
        if not isinstance(table, dict) or any(path[: len(p)] == p for p in refused):
            return None
        bad = {p[len(path)] for p in refused if len(p) > len(path) and p[: len(path)] == path}
        data = {k: v for k, v in table.items() if k not in bad}
        fields = model.model_fields
        plain = {
            k
            for k, f in fields.items()
            if f.annotation in (str, str | None) and f.metadata == [TEXT]
        }
        data |= {k: k for k in bad & plain}
        try:
            return model.model_validate(data)
        except ValidationError:
            return None

    def run(check: Callable[[], object]) -> None:
        try:
            check()
        except SettingsError as exc:
            found.append(exc)

    service: ServiceSettings | None = None
    if (service_in := accepted(("service",), ServiceIn)) is not None:
        try:
            service = _service(service_in, where, env)
        except SettingsError as exc:
            found.append(exc)
    destinations, databases = (raw.get(s) for s in ("destinations", "databases"))
    destinations = destinations if isinstance(destinations, dict) else {}
    for name in destinations:
        if (d := accepted(("destinations", name), DestinationIn)) is not None:
            run(functools.partial(_destination, name, d, where))
    targets = [n for n, t in destinations.items() if isinstance(t, dict)]
    for name in databases if isinstance(databases, dict) else {}:
        if (db := accepted(("databases", name), DatabaseIn)) is not None:
            run(functools.partial(_database, name, db, where, targets, service))
    return found


def _got(value: object) -> str:
    """What a value is, once: "an integer 3", "a table" (not "a table a table")."""
    return show(value) if isinstance(value, dict | list) else f"{type_name(value)} {show(value)}"


def _dotted(path: KeyPath) -> str:
    """A key as the user reads it: ``databases.app.webhooks[0].url``."""
    return "".join(f"[{p}]" if p.isdigit() and i else f".{p}" for i, p in enumerate(path))[1:]


def _key_path(key: str) -> KeyPath:
    """``_dotted``'s inverse (a valid name has no dot and no bracket)."""
    return tuple(re.findall(r"[^.\[\]]+", key))


def _path(error: ErrorDetails) -> KeyPath:
    return tuple(str(p) for p in error["loc"] if p != "[key]")  # "[key]": a table's name


def _problem(path: KeyPath, error: ErrorDetails) -> str:
    """Today's wording for one of pydantic's errors."""
    kind, value = error["type"], error.get("input")
    field = _field(path)
    if kind == "extra_forbidden":
        model = _model(path[:-1])
        known = tuple(model.model_fields) if model is not None else ()
        close = difflib.get_close_matches(path[-1], known, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        where = f"in [{_dotted(path[:-1])}]" if len(path) > 1 else "at the top level"
        return f"unknown key {where}{hint} (known: {', '.join(known)})"
    if kind == "missing" and field is not None:
        return f"missing: {field.description}"
    if kind in ("model_type", "dict_type"):
        if len(path) == 1:  # a section
            return f"expected a table, got {type_name(value)}"
        if len(path) == 2:  # a named table
            return f"expected a table [{'.'.join(path)}], got {type_name(value)}"
        return f"expected a table, got {_got(value)}"
    if kind == "list_type":
        return f"expected an array, got {_got(value)}"
    if kind == "string_type" or (kind == "literal_error" and not isinstance(value, str)):
        return f"expected a string, got {type_name(value)} {show(value)}"
    if kind == "bool_type":
        return f"expected true or false, got {show(value)}"
    if kind in ("int_type", "greater_than_equal", "less_than_equal") and field is not None:
        low, high = (getattr(m, a) for a in ("ge", "le") for m in field.metadata if hasattr(m, a))
        return f"expected an integer from {low} to {high}, got {show(value)}"
    if kind == "literal_error":
        choices = re.findall(r"'([^']*)'", str(error.get("ctx", {}).get("expected", "")))
        return f"expected one of {', '.join(choices)}, got {value!r}"
    if kind == "value_error":
        return str(error.get("ctx", {}).get("error", error["msg"]))
    return error["msg"]


def _model(path: KeyPath) -> type[BaseModel] | None:
    """The model of the table at ``path``."""
    if path[:1] in (("databases",), ("destinations",)) and len(path) > 1:
        path = (path[0], "*", *path[2:])  # a named table
    # an element of an array of tables ([[service.webhooks]])
    path = tuple("*" if p.isdigit() and i else p for i, p in enumerate(path))
    return TABLES.get(path)


def _field(path: KeyPath) -> FieldInfo | None:
    model = _model(path[:-1]) if path else None
    return model.model_fields.get(path[-1]) if model is not None else None


# --- the environment --------------------------------------------------------------------


def _env_value(text: str) -> Any:
    try:
        parsed = tomllib.loads(f"v = {text}")
    except tomllib.TOMLDecodeError:
        return text
    return parsed["v"] if list(parsed) == ["v"] else text


def _overlay(raw: dict[str, Any], env: Mapping[str, str], where: _Where) -> tuple[str, ...]:
    """Apply the ``VDISTREAM_*`` overrides to ``raw`` (module doc: Environment)."""
    applied = []
    for variable in sorted(env):
        if not variable.startswith(_PREFIX):
            continue
        rest = variable[len(_PREFIX) :]

        def refuse(problem: str, variable: str = variable) -> NoReturn:
            raise SettingsError(
                f"environment variable {variable}: {problem}", key="", source=variable
            )

        if "__" not in rest:
            typo = next((t.upper() for t in _SECTIONS if rest.startswith(t.upper() + "_")), None)
            if typo is not None:
                refuse(
                    "looks like an override but has no double underscore: nesting is "
                    f"written with '__', e.g. VDISTREAM_{typo}__<KEY>"
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
            path: KeyPath = ("service", *(p.lower() for p in parts[1:]))
        else:
            if len(parts) < 3:
                refuse(f"name a table and a key: VDISTREAM_{parts[0]}__<NAME>__<KEY>")
            tables = raw.get(section)
            names = list(tables) if isinstance(tables, dict) else []
            matches = [n for n in names if n.upper().replace("-", "_") == parts[1].upper()]
            if len(matches) > 1:
                refuse(f"{parts[1]} matches several [{section}] tables: {', '.join(matches)}")
            name = matches[0] if matches else parts[1].lower()
            path = (section, name, *(p.lower() for p in parts[2:]))
        text = env[variable].strip()
        value = _env_value(text) if text else None
        field = _field(path)
        if field is not None and TEXT in field.metadata and not isinstance(value, str | None):
            value = text  # a key that wants a string takes the variable's text as written
        _set_path(raw, path, value, refuse)
        where.env[path] = variable
        applied.append(variable)
    return tuple(applied)


def _set_path(
    raw: dict[str, Any], path: KeyPath, value: Any, refuse: Callable[[str], NoReturn]
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


# --- building, with the checks that need more than one value ----------------------------


def _service(s: ServiceIn | None, where: _Where, env: Mapping[str, str]) -> ServiceSettings:
    fields = given(s)
    for key in ("state_dir", "socket", "token_file", "sqlvdi", "runtime_dir"):
        if key in fields:
            fields[key] = where.path(("service", key), fields[key])
    service = ServiceSettings(**fields)
    if len(os.fsencode(service.socket_path)) > _SUN_PATH_MAX:
        raise where.error(
            ("service", "socket" if service.socket is not None else "state_dir"),
            f"the socket path {service.socket_path} is longer than {_SUN_PATH_MAX} bytes, "
            "the limit of a Unix socket address",
        )
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
    elif (token_file := service.token_file) is not None:
        token = where.check(("service", "token_file"), lambda: _read_token(token_file))
    if service.listen is not None and token is None:
        raise where.error(
            ("service", "listen"),
            f"a TCP listener needs a bearer token: set service.token_file or {TOKEN_ENV}",
        )
    if (library := service.sqlvdi) is not None:
        where.check(("service", "sqlvdi"), lambda: _check_library(library))
    hooks = _webhooks(("service", "webhooks"), s.webhooks if s is not None else None, where)
    return dataclasses.replace(service, token=token, webhooks=hooks)


def _check_library(path: Path) -> None:
    """``ValueError`` unless ``path`` is a file (loading it is the job's business)."""
    if not path.is_file():
        missing = "is not a file" if path.exists() else "does not exist"
        raise ValueError(
            f"{path} {missing}: name Microsoft's libsqlvdi.so (SQL Server installs it "
            "as /opt/mssql/lib/libsqlvdi.so)"
        )


def _webhooks(
    at: KeyPath, tables: list[WebhookIn] | None, where: _Where
) -> tuple[WebhookSettings, ...]:
    return tuple(_webhook((*at, str(i)), w, where) for i, w in enumerate(tables or ()))


def _webhook(at: KeyPath, w: WebhookIn, where: _Where) -> WebhookSettings:
    """One webhook: its secret found (module doc: Secrets), its URL masked."""
    fields = given(w)
    fields.pop("secret_file", None)
    fields.pop("secret_env", None)
    secret = Secret("")
    if w.secret_file is not None and w.secret_env is not None:
        raise where.error(
            (*at, "secret_env"), "give secret_file or secret_env, not both (the HMAC key)"
        )
    if w.secret_file is not None:
        path = where.path((*at, "secret_file"), w.secret_file)
        source = str(path)
        if where.read_secrets:
            secret = where.check((*at, "secret_file"), lambda: _read_token(path, "webhook secret"))
    elif w.secret_env is not None:
        name, source = w.secret_env, f"${w.secret_env}"
        if where.read_secrets:
            value = where.environ.get(name, "").strip()
            if len(value) < _MIN_TOKEN:
                problem = "is not set" if not value else f"is shorter than {_MIN_TOKEN} characters"
                raise where.error(
                    (*at, "secret_env"),
                    f"the environment variable {name} {problem}: it holds the webhook's "
                    f"HMAC key (at least {_MIN_TOKEN} characters)",
                )
            secret = Secret(value)
    else:
        raise where.error(
            at,
            "missing: secret_file or secret_env, the key every request is signed with "
            '(HMAC-SHA256), e.g. secret_file = "/etc/vdistream/webhook.secret"',
        )
    parts = urlsplit(mask(w.url))
    display = urlunsplit(parts._replace(query="***" if parts.query else ""))
    return WebhookSettings(secret=secret, secret_source=source, display_url=display, **fields)


def _read_token(path: Path, what: str = "token") -> Secret:
    try:
        info = path.stat()
        if info.st_mode & 0o007:
            raise ValueError(
                f"{path} is accessible to others (mode {stat.S_IMODE(info.st_mode):#o}); "
                "chmod o-rwx it"
            )
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from None
    token = next(iter(text.splitlines()), "").strip()
    if len(token) < _MIN_TOKEN:
        raise ValueError(f"the {what} in {path} must have at least {_MIN_TOKEN} characters")
    return Secret(token)


def _destination(name: str, d: DestinationIn, where: _Where) -> DestinationSettings:
    at = ("destinations", name, "url")
    url = where.check(at, lambda: destination_url(d.url, where.base_dir(at)))
    return DestinationSettings(name=name, url=url, display_url=mask(url))


def _check_public_key(path: Path) -> None:
    """``ValueError`` unless ``path`` holds an X25519 public key (then dropped)."""
    from vdistream.pipeline.keys import load_public_key

    load_public_key(path)


def _public(path: Path) -> bytes:
    from vdistream.pipeline.keys import load_public_key

    return load_public_key(path).public_key


def _check_identity(path: Path) -> bytes:
    """The raw public key of the X25519 private key in ``path`` (``ValueError`` or
    ``VdistreamError`` if it holds none: a public key, another kind, a passphrase)."""
    from vdistream.pipeline.envelope import load_identity

    if not path.is_file():
        raise ValueError(f"{path} {'is not a file' if path.exists() else 'does not exist'}")
    return load_identity(path).recipient.public_key


def _place(url: str) -> tuple[str, ...]:
    """Where a destination URL stores: two URLs of one place compare equal
    (``/b``, ``file:///b/``; ``s3://bucket/p`` whatever its query)."""
    parts = urlsplit(url)
    if not re.match(r"[A-Za-z][A-Za-z0-9+.-]*:", url) or parts.scheme.lower() == "file":
        path = url if not parts.scheme else parts.path
        return ("file", os.path.normpath(path))
    return (parts.scheme.lower(), parts.netloc.lower(), parts.path.strip("/"))


def _database(
    name: str,
    d: DatabaseIn,
    where: _Where,
    destinations: Mapping[str, DestinationSettings] | Collection[str],
    service: ServiceSettings | None = None,
) -> DatabaseSettings:
    def at(key: str) -> KeyPath:
        return ("databases", name, key)

    fields = given(d)
    kind, url = where.check(at("url"), lambda: database_url(d.url, where.base_dir(at("url"))))
    display = mask(url)
    if kind == "mssql":
        # The shape first (a stand-in password: no file read), then the real password.
        shape = where.check(
            at("url"), lambda: MssqlURL.parse(url, password_env={PASSWORD_VARIABLES[0]: "-"})
        )
        if shape.password_file is not None and not Path(shape.password_file).is_absolute():
            raise where.error(
                at("url"),
                f"{shape.display!r}: password_file must be an absolute path "
                f"(got {shape.password_file!r})",
            )
        display = where.check(
            at("url"), lambda: MssqlURL.parse(url, password_env=where.password_env)
        ).display
    if kind == "postgresql":
        mode = fields.setdefault("mode", "basebackup")
        if not isinstance(mode, str):
            raise where.error(at("mode"), f"expected a string, got {type_name(mode)} {show(mode)}")
        if mode not in POSTGRES_MODES:
            raise where.error(
                at("mode"), f"expected one of {', '.join(POSTGRES_MODES)}, got {mode!r}"
            )
    elif d.mode is not None:
        hint = (
            " (a SQL Server database's schedule, schedule_diff and schedule_log say which "
            "backup runs when)"
            if kind == "mssql"
            else ""
        )
        raise where.error(
            at("mode"), f"only PostgreSQL databases have a mode; this one is {kind}{hint}"
        )
    if d.destination not in destinations:
        defined = ", ".join(sorted(destinations)) or "none"
        raise where.error(
            at("destination"), f"no [destinations.{d.destination}] table (defined: {defined})"
        )
    if d.mirror is not None:
        if d.mirror not in destinations:
            defined = ", ".join(sorted(destinations)) or "none"
            raise where.error(
                at("mirror"), f"no [destinations.{d.mirror}] table (defined: {defined})"
            )
        if d.mirror == d.destination:
            raise where.error(
                at("mirror"),
                f"the mirror is the database's destination itself ({d.mirror}): name another "
                "[destinations.NAME]",
            )
        if isinstance(destinations, Mapping):  # (the later checks know only the names)
            main, mirror = destinations[d.destination], destinations[d.mirror]
            if _place(main.url) == _place(mirror.url):
                # every backup would be refused when it starts (one copy, not two)
                raise where.error(
                    at("mirror"),
                    f"[destinations.{d.mirror}] is the same place as the database's "
                    f"destination [destinations.{d.destination}] ({mirror.display_url}): "
                    "a mirror needs another place",
                )
    if d.encrypt_key_file is not None:
        key_file = fields["encrypt_key_file"] = where.path(
            at("encrypt_key_file"), d.encrypt_key_file
        )
        where.check(at("encrypt_key_file"), lambda: load_key(key_file=key_file))  # then dropped
    if d.encrypt_recipients is not None:
        recipients = []
        for i, text in enumerate(d.encrypt_recipients):
            spot = (*at("encrypt_recipients"), str(i))
            recipient = where.path(spot, text)
            where.check(spot, functools.partial(_check_public_key, recipient))
            recipients.append(recipient)
        fields["encrypt_recipients"] = tuple(dict.fromkeys(recipients))
    if d.decrypt_identity_file is not None:
        identity = fields["decrypt_identity_file"] = where.path(
            at("decrypt_identity_file"), d.decrypt_identity_file
        )
        found = where.check(
            at("decrypt_identity_file"), functools.partial(_check_identity, identity)
        )  # the private key itself is dropped: read again by each job
        recipients_only = d.encrypt_recipients and d.encrypt_key_file is None
        if recipients_only and d.verify_after_backup is not False:
            publics = [
                where.check(at("encrypt_recipients"), functools.partial(_public, p))
                for p in fields["encrypt_recipients"]
            ]
            if found not in publics:
                raise where.error(
                    at("decrypt_identity_file"),
                    f"{identity} is the private key of none of encrypt_recipients: the "
                    "verification after each backup could not open it (give the private "
                    "key of one of them, or set verify_after_backup = false)",
                )
    if (
        d.encrypt_recipients
        and d.encrypt_key_file is None
        and d.decrypt_identity_file is None
        and d.verify_after_backup is not False
    ):
        # refused here rather than failing every verification after a backup
        raise where.error(
            at("encrypt_recipients"),
            "backups encrypted only for recipients cannot be verified after each backup "
            "without a private key: give decrypt_identity_file (or encrypt_key_file), or "
            "set verify_after_backup = false and verify where the private key is",
        )
    fields["webhooks"] = _webhooks(at("webhooks"), d.webhooks, where)
    if d.sqlvdi is not None:
        if kind != "mssql":
            raise where.error(
                at("sqlvdi"),
                f"only SQL Server databases use sqlvdi (libsqlvdi.so); this one is {kind}",
            )
        library = fields["sqlvdi"] = where.path(at("sqlvdi"), d.sqlvdi)
        where.check(at("sqlvdi"), lambda: _check_library(library))
    elif kind == "mssql" and service is not None and service.sqlvdi is not None:
        fields["sqlvdi"] = service.sqlvdi
    for key, backup in (("schedule_diff", "differential"), ("schedule_log", "log")):
        if kind != "mssql" and getattr(d, key) is not None:
            raise where.error(
                at(key),
                f"only SQL Server databases have a {key} ({backup} backups); this one is "
                f"{kind}: use schedule",
            )
    if d.connect_timeout is not None and kind != "external":
        raise where.error(
            at("connect_timeout"),
            f"only external:NAME databases wait for an engine to connect; this one is {kind}",
        )
    if kind == "external" and service is not None:
        socket = service.runtime_dir / f"{url.partition(':')[2]}.sock"
        if len(os.fsencode(socket)) > _SUN_PATH_MAX:
            raise where.error(
                at("url"),
                f"the set's socket {socket} is longer than {_SUN_PATH_MAX} bytes, the limit "
                "of a Unix socket address: a shorter name or service.runtime_dir",
            )
    if d.retention is not None:
        fields["retention"] = RetentionPolicy(**given(d.retention))
    fields.update(url=url, name=name, kind=kind, display_url=display)
    return DatabaseSettings(**fields)
