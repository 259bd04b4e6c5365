"""Where a SQL Server database is: ``mssql://user[:password]@host[:port]/database``.

``MssqlURL.parse`` splits such a URL (``sqlserver://`` is the same thing) into its
parts, with the port defaulting to 1433 and the database name percent-decoded (any
name SQL Server allows can be written: ``%5D`` for ``]``, ``%20`` for a space, ``%2F``
for ``/``). The query may choose how statements reach the server (``trigger=tds``, the
default, or ``trigger=sqlcmd``) and name a file holding the password
(``password_file=/path``).

The password is looked for, in this order: in the URL, in the environment variables
``VDISTREAM_MSSQL_PASSWORD`` then ``SQLCMDPASSWORD`` (sqlcmd's own), then on the first
line of the password file. It is never part of ``display`` (the URL stored in the
catalog and shown in logs), of ``repr`` or of an error message; ``redact`` removes it
(also percent-encoded) from any text before it is shown.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from urllib.parse import quote, quote_plus, unquote, urlsplit

from vdistream.errors import ConfigError

__all__ = (
    "DEFAULT_PORT",
    "PASSWORD_VARIABLES",
    "SCHEMES",
    "TRIGGERS",
    "MssqlURL",
    "MssqlURLError",
    "is_sqlserver_url",
    "redact_secret",
    "with_trigger",
)

SCHEMES = ("mssql", "sqlserver")
DEFAULT_PORT = 1433
TRIGGERS = ("tds", "sqlcmd")
#: The environment variables holding the password, in the order they are read.
PASSWORD_VARIABLES = ("VDISTREAM_MSSQL_PASSWORD", "SQLCMDPASSWORD")
_PARAMETERS = ("trigger", "password_file")
_SHAPE = "mssql://user[:password]@host[:port]/database[?trigger=tds|sqlcmd&password_file=/path]"
_MASK = "***"


class MssqlURLError(ConfigError):
    """A SQL Server URL is malformed, or no password can be found for it."""


def is_sqlserver_url(url: str) -> bool:
    """Whether ``url`` names a SQL Server database (its scheme; nothing is parsed)."""
    return url.partition(":")[0].lower() in SCHEMES and "://" in url


def with_trigger(url: str, trigger: str | None) -> str:
    """``url`` with ``?trigger=`` set to ``trigger`` (replacing the URL's own; any
    other part, a password included, kept as written); ``url`` itself when
    ``trigger`` is ``None`` or ``url`` is not a SQL Server URL."""
    if trigger is None or not is_sqlserver_url(url):
        return url
    head, _, query = url.partition("?")
    kept = [p for p in query.split("&") if p and not p.startswith("trigger=")]
    return f"{head}?{'&'.join([*kept, f'trigger={trigger}'])}"


def redact_secret(text: str, secret: str | None) -> str:
    """``text`` with ``secret`` (as is, and percent-encoded as in a URL or a form)
    replaced by ``***``."""
    if not secret:
        return text
    forms = {secret, quote(secret, safe=""), quote(secret), quote_plus(secret)}
    for form in sorted(forms, key=len, reverse=True):  # longest first: no partial leftovers
        text = text.replace(form, _MASK)
    return text


def _scrub(url: str) -> str:
    """``url`` with whatever stands where a password would be masked (error messages)."""
    # Greedy to the last "@": a password with a raw "/" or "@" is masked too (a database
    # name holding "@" may be masked with it: safe).
    return re.sub(r"(://[^/?#@:]*):.*@", r"\1:" + _MASK + "@", url, flags=re.DOTALL)


def _fail(url: str, why: str) -> MssqlURLError:
    return MssqlURLError(f"SQL Server URL {_scrub(url)!r}: {why} (expected {_SHAPE})")


@dataclasses.dataclass(frozen=True)
class MssqlURL:
    """A parsed SQL Server URL (module docstring). ``display`` is the URL without its
    password, normalised (port always written): what is stored and shown.
    ``password_source`` says where the password was found (for messages; never the
    password itself)."""

    scheme: str
    user: str
    host: str
    port: int
    database: str
    trigger: str
    password_file: str | None
    display: str
    password_source: str = dataclasses.field(compare=False)
    password: str = dataclasses.field(repr=False, compare=False)

    @classmethod
    def parse(cls, url: str, *, password_env: Mapping[str, str] | None = None) -> MssqlURL:
        """Split ``url``; ``password_env`` replaces ``os.environ`` for the password
        variables. ``MssqlURLError`` (a ``ConfigError``) naming the URL, without its
        password, if it is malformed or no password can be found."""
        scheme, sep, _ = url.partition("://")
        if scheme.lower() not in SCHEMES or not sep:
            raise _fail(url, "not a SQL Server URL")
        if any(ch.isspace() for ch in url):
            raise _fail(url, "it contains white space (write %20)")
        try:
            parts = urlsplit(url)
        except ValueError as exc:
            raise _fail(url, str(exc)) from None
        if parts.fragment:
            raise _fail(url, "it has a #fragment (write # in a name as %23)")
        userinfo, at, hostport = parts.netloc.rpartition("@")
        if not at or not userinfo:
            raise _fail(url, "it names no user")
        user_text, colon, password_text = userinfo.partition(":")
        user = unquote(user_text)
        if not user:
            raise _fail(url, "it names no user")
        host, port = _host_port(url, hostport)
        path = parts.path
        database = unquote(path[1:]) if path.startswith("/") else ""
        if not database:
            raise _fail(url, "it names no database")
        trigger, password_file = _query(url, parts.query)
        password, source = _find_password(
            url,
            unquote(password_text) if colon else "",
            os.environ if password_env is None else password_env,
            password_file,
        )
        return cls(
            scheme=scheme.lower(),
            user=user,
            host=host,
            port=port,
            database=database,
            trigger=trigger,
            password_file=password_file,
            display=_display(scheme.lower(), user, host, port, database, trigger, password_file),
            password_source=source,
            password=password,
        )

    def __str__(self) -> str:
        return self.display

    def with_database(self, name: str) -> MssqlURL:
        """The same server and credentials, another database."""
        if not name:
            raise MssqlURLError(f"{self.display}: the database name is empty")
        display = _display(
            self.scheme, self.user, self.host, self.port, name, self.trigger, self.password_file
        )
        return dataclasses.replace(self, database=name, display=display)

    def redact(self, text: str) -> str:
        """``text`` with this URL's password removed (also percent-encoded)."""
        return redact_secret(text, self.password)


def _host_port(url: str, hostport: str) -> tuple[str, int]:
    if hostport.startswith("["):  # IPv6 literal
        close = hostport.find("]")
        if close < 0:
            raise _fail(url, "unclosed [ in the host")
        host, rest = hostport[1:close], hostport[close + 1 :]
        if rest and not rest.startswith(":"):
            raise _fail(url, f"unexpected {rest!r} after the host")
        port_text = rest[1:] if rest else ""
        has_port = bool(rest)
    else:
        host, has_colon, port_text = hostport.partition(":")
        has_port = bool(has_colon)
    host = unquote(host)
    if not host:
        raise _fail(url, "it names no host")
    if not has_port:
        return host, DEFAULT_PORT
    if not (port_text.isdigit() and 0 < int(port_text) < 65536):
        raise _fail(url, f"port {port_text!r} is not a number in 1..65535")
    return host, int(port_text)


def _query(url: str, query: str) -> tuple[str, str | None]:
    values: dict[str, str] = {}
    for item in query.split("&") if query else []:
        key_text, equals, value = item.partition("=")
        key = unquote(key_text)
        if key not in _PARAMETERS:
            raise _fail(url, f"unknown parameter {key!r} (known: {', '.join(_PARAMETERS)})")
        if not equals or not value:
            raise _fail(url, f"parameter {key!r} has no value")
        if key in values:
            raise _fail(url, f"parameter {key!r} is given twice")
        values[key] = unquote(value)
    trigger = values.get("trigger", "tds").lower()
    if trigger not in TRIGGERS:
        raise _fail(url, f"trigger={values['trigger']!r} is not one of {', '.join(TRIGGERS)}")
    return trigger, values.get("password_file")


def _find_password(
    url: str, in_url: str, env: Mapping[str, str], password_file: str | None
) -> tuple[str, str]:
    """The password and where it came from (module docstring's order)."""
    if in_url:
        return in_url, "the URL"
    for variable in PASSWORD_VARIABLES:
        value = env.get(variable)
        if value:
            return value, variable
    if password_file is not None:
        try:
            with open(password_file, encoding="utf-8") as handle:
                line = handle.readline()
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise MssqlURLError(
                f"SQL Server URL {_scrub(url)!r}: cannot read password_file "
                f"{password_file!r}: {reason}"
            ) from None
        password = line.rstrip("\r\n")
        if not password:
            raise MssqlURLError(
                f"SQL Server URL {_scrub(url)!r}: the first line of password_file "
                f"{password_file!r} is empty"
            )
        return password, f"password_file {password_file}"
    raise MssqlURLError(
        f"no password for SQL Server URL {_scrub(url)!r}: set VDISTREAM_MSSQL_PASSWORD "
        "or SQLCMDPASSWORD, or put it in a file named by ?password_file=/path "
        "(first line), or in the URL as user:password@"
    )


def _display(
    scheme: str,
    user: str,
    host: str,
    port: int,
    database: str,
    trigger: str,
    password_file: str | None,
) -> str:
    shown_host = f"[{host}]" if ":" in host else quote(host, safe="")
    text = f"{scheme}://{quote(user, safe='')}@{shown_host}:{port}/{quote(database, safe='')}"
    query = []
    if trigger != "tds":
        query.append(f"trigger={trigger}")
    if password_file is not None:
        query.append(f"password_file={quote(password_file, safe='/')}")
    return text + ("?" + "&".join(query) if query else "")
