"""``load_settings``'s work: read the file, overlay the environment, validate with the
pydantic models of ``_schema``, say where each problem is, and build the frozen
settings (``vdistream.service.settings`` module doc: the contract)."""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import stat
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any, NoReturn, TypeVar

from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo
from pydantic_core import ErrorDetails

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
)
from vdistream.service.settings._lines import KeyPath, Locator
from vdistream.service.settings._schema import (
    TABLES,
    TEXT,
    DatabaseIn,
    DestinationIn,
    FileIn,
    ServiceIn,
    database_url,
    destination_url,
    given,
    mask,
    show,
    type_name,
)

__all__ = ("load",)

_T = TypeVar("_T")
_PREFIX = "VDISTREAM_"
_SECTIONS = tuple(FileIn.model_fields)
_SUN_PATH_MAX = 107  # bytes, not counting the terminating NUL
_MIN_TOKEN = 16


def load(file: Path | None, env: Mapping[str, str]) -> Settings:
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
    applied = _overlay(raw, env, where)
    try:
        parsed = FileIn.model_validate(raw)
    except ValidationError as exc:
        raise where.all(exc.errors()) from None
    service = _service(parsed.service, where, env)
    destinations = {n: _destination(n, d, where) for n, d in parsed.destinations.items()}
    databases = {n: _database(n, d, where, destinations) for n, d in parsed.databases.items()}
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
        key = ".".join(path)
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

    def all(self, errors: list[ErrorDetails]) -> SettingsError:
        """One line per problem pydantic found; the first names the key and the line."""
        found = [self.error(path, _problem(path, e)) for e in errors for path in [_path(e)]]
        found.sort(key=lambda e: e.line or 0)  # in the file's order, the environment's first
        first = found[0]
        text = "\n".join(dict.fromkeys(str(e) for e in found))
        return SettingsError(text, key=first.key, source=first.source, line=first.line)


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
        where = f"in [{'.'.join(path[:-1])}]" if len(path) > 1 else "at the top level"
        return f"unknown key {where}{hint} (known: {', '.join(known)})"
    if kind == "missing" and field is not None:
        return f"missing: {field.description}"
    if kind in ("model_type", "dict_type"):
        return f"expected a table, got {type_name(value)} {show(value)}"
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
    for key in ("state_dir", "socket", "token_file"):
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
    return dataclasses.replace(service, token=token)


def _read_token(path: Path) -> Secret:
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
        raise ValueError(f"the token in {path} must have at least {_MIN_TOKEN} characters")
    return Secret(token)


def _destination(name: str, d: DestinationIn, where: _Where) -> DestinationSettings:
    at = ("destinations", name, "url")
    url = where.check(at, lambda: destination_url(d.url, where.base_dir(at)))
    return DestinationSettings(name=name, url=url, display_url=mask(url))


def _database(
    name: str, d: DatabaseIn, where: _Where, destinations: Mapping[str, DestinationSettings]
) -> DatabaseSettings:
    def at(key: str) -> KeyPath:
        return ("databases", name, key)

    fields = given(d)
    kind, url = where.check(at("url"), lambda: database_url(d.url, where.base_dir(at("url"))))
    if kind == "postgresql":
        fields.setdefault("mode", "basebackup")
    elif d.mode is not None:
        raise where.error(at("mode"), f"only PostgreSQL databases have a mode; this one is {kind}")
    if d.destination not in destinations:
        defined = ", ".join(sorted(destinations)) or "none"
        raise where.error(
            at("destination"), f"no [destinations.{d.destination}] table (defined: {defined})"
        )
    if d.encrypt_key_file is not None:
        key_file = fields["encrypt_key_file"] = where.path(
            at("encrypt_key_file"), d.encrypt_key_file
        )
        where.check(at("encrypt_key_file"), lambda: load_key(key_file=key_file))  # then dropped
    if d.retention is not None:
        fields["retention"] = RetentionPolicy(**given(d.retention))
    fields.update(url=url, name=name, kind=kind, display_url=mask(url))
    return DatabaseSettings(**fields)
