"""``mssql://`` URLs: parts, the password's sources, and the password never shown."""

from __future__ import annotations

from pathlib import Path

import pytest

from vdistream.errors import ConfigError
from vdistream.sqlserver.url import MssqlURL, MssqlURLError, redact_secret

NO_ENV: dict[str, str] = {}
SECRET = "S3cret/p@ss wörd"
ENCODED = "S3cret%2Fp%40ss%20w%C3%B6rd"


def parse(url: str, env: dict[str, str] | None = None) -> MssqlURL:
    return MssqlURL.parse(url, password_env=NO_ENV if env is None else env)


def test_parts_and_defaults() -> None:
    url = parse("mssql://sa:pw@db.example:14333/sales")
    assert (url.scheme, url.user, url.host, url.port, url.database) == (
        "mssql",
        "sa",
        "db.example",
        14333,
        "sales",
    )
    assert url.trigger == "tds"
    assert url.password == "pw"
    assert url.password_source == "the URL"
    assert url.display == "mssql://sa@db.example:14333/sales"
    assert str(url) == url.display
    default = parse("SQLServer://sa:pw@host/db")
    assert default.port == 1433
    assert default.scheme == "sqlserver"
    assert default.display == "sqlserver://sa@host:1433/db"


def test_any_database_name_percent_decoded() -> None:
    url = parse("mssql://sa:pw@h/x%5D%3B%20DROP%20DATABASE%20y%3B%20--")
    assert url.database == "x]; DROP DATABASE y; --"
    assert url.display == "mssql://sa@h:1433/x%5D%3B%20DROP%20DATABASE%20y%3B%20--"
    # A name with "/", "?", "#", "%", "+" and non-ASCII round-trips through display.
    name = "a/b?c#d%e+f ü'"
    shown = parse("mssql://sa:pw@h/db").with_database(name)
    assert shown.database == name
    again = parse(shown.display, {"SQLCMDPASSWORD": "pw"})
    assert again.database == name
    assert again == shown  # every field but the password (not compared) is the same


def test_raw_semicolon_and_bracket_in_path_are_part_of_the_name() -> None:
    assert parse("mssql://sa:pw@h/x];y").database == "x];y"


def test_query_parameters(tmp_path: Path) -> None:
    secret_file = tmp_path / "pw"
    secret_file.write_text("from-file\nsecond line\n")
    url = parse(f"mssql://sa@h:1/db?trigger=sqlcmd&password_file={secret_file}")
    assert url.trigger == "sqlcmd"
    assert url.password == "from-file"
    assert url.password_file == str(secret_file)
    assert url.password_source == f"password_file {secret_file}"
    assert url.display == f"mssql://sa@h:1/db?trigger=sqlcmd&password_file={secret_file}"
    assert parse("mssql://sa:x@h/db?trigger=TDS").trigger == "tds"


def test_ipv6_host() -> None:
    url = parse("mssql://sa:pw@[::1]:1500/db")
    assert (url.host, url.port) == ("::1", 1500)
    assert url.display == "mssql://sa@[::1]:1500/db"


def test_password_sources_in_order(tmp_path: Path) -> None:
    secret_file = tmp_path / "pw"
    secret_file.write_text("file-pw\r\n")
    file_url = f"mssql://sa@h/db?password_file={secret_file}"
    both = {"VDISTREAM_MSSQL_PASSWORD": "ours", "SQLCMDPASSWORD": "sqlcmds"}
    assert parse("mssql://sa:url@h/db", both).password == "url"
    url = parse(file_url, both)
    assert (url.password, url.password_source) == ("ours", "VDISTREAM_MSSQL_PASSWORD")
    url = parse(file_url, {"SQLCMDPASSWORD": "sqlcmds", "VDISTREAM_MSSQL_PASSWORD": ""})
    assert (url.password, url.password_source) == ("sqlcmds", "SQLCMDPASSWORD")
    assert parse(file_url).password == "file-pw"  # \r\n stripped, nothing else
    assert parse(f"mssql://sa:{ENCODED}@h/db").password == SECRET


def test_password_from_the_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VDISTREAM_MSSQL_PASSWORD", "env-pw")
    assert MssqlURL.parse("mssql://sa@h/db").password == "env-pw"


def test_no_password_says_where_to_put_it() -> None:
    with pytest.raises(MssqlURLError) as caught:
        parse("mssql://sa@h/db")
    message = str(caught.value)
    assert "mssql://sa@h/db" in message
    for where in ("VDISTREAM_MSSQL_PASSWORD", "SQLCMDPASSWORD", "password_file"):
        assert where in message
    assert "\n" not in message


def test_unreadable_password_file_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(MssqlURLError, match=f"cannot read password_file '{missing}'"):
        parse(f"mssql://sa@h/db?password_file={missing}")
    empty = tmp_path / "empty"
    empty.write_text("\nsecond\n")
    with pytest.raises(MssqlURLError, match=r"first line of password_file .* is empty"):
        parse(f"mssql://sa@h/db?password_file={empty}")


def test_password_never_shown() -> None:
    url = parse(f"mssql://sa:{ENCODED}@h/db")
    for text in (repr(url), str(url), url.display):
        assert SECRET not in text
        assert ENCODED not in text
    plus, slash = "S3cret%2Fp%40ss+w%C3%B6rd", "S3cret/p%40ss%20w%C3%B6rd"
    text = f"login with {SECRET} or {ENCODED} or {plus} or {slash} failed"
    assert url.redact(text) == "login with *** or *** or *** or *** failed"
    assert redact_secret("nothing", None) == "nothing"
    assert redact_secret("abcabc", "") == "abcabc"


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("postgresql://sa:pw@h/db", "not a SQL Server URL"),
        ("mssql:/sa@h/db", "not a SQL Server URL"),
        ("mssql://h/db", "names no user"),
        ("mssql://:pw@h/db", "names no user"),
        ("mssql://sa:pw@/db", "names no host"),
        ("mssql://sa:pw@h", "names no database"),
        ("mssql://sa:pw@h/", "names no database"),
        ("mssql://sa:pw@h:0/db", "port '0' is not a number in 1..65535"),
        ("mssql://sa:pw@h:99999/db", "port '99999'"),
        ("mssql://sa:pw@h:x/db", "port 'x'"),
        ("mssql://sa:pw@[::1/db", "Invalid IPv6 URL"),
        ("mssql://sa:pw@h/db#x", "#fragment"),
        ("mssql://sa:pw@h/my db", "white space"),
        ("mssql://sa:pw@h/db?trigger=odbc", "trigger='odbc' is not one of tds, sqlcmd"),
        ("mssql://sa:pw@h/db?user=x", "unknown parameter 'user'"),
        ("mssql://sa:pw@h/db?password=x", "unknown parameter 'password'"),
        ("mssql://sa:pw@h/db?trigger=", "'trigger' has no value"),
        ("mssql://sa:pw@h/db?trigger=tds&trigger=sqlcmd", "'trigger' is given twice"),
    ],
)
def test_bad_urls(url: str, reason: str) -> None:
    with pytest.raises(MssqlURLError) as caught:
        parse(url)
    message = str(caught.value)
    assert reason in message
    assert message.startswith("SQL Server URL '")
    assert "\n" not in message
    assert ":pw@" not in message  # the password is masked in the URL shown
    assert isinstance(caught.value, ConfigError)


def test_bad_url_with_an_odd_password_is_masked() -> None:
    with pytest.raises(MssqlURLError) as caught:
        parse("mssql://sa:p/w@rd@h:bad/db")
    assert "p/w" not in str(caught.value)
    assert "rd@" not in str(caught.value)


def test_with_database_keeps_the_connection() -> None:
    url = parse("mssql://sa:pw@h:2000/db?trigger=sqlcmd")
    other = url.with_database("new]db")
    assert (other.host, other.port, other.user, other.trigger) == ("h", 2000, "sa", "sqlcmd")
    assert other.password == "pw"
    assert other.display == "mssql://sa@h:2000/new%5Ddb?trigger=sqlcmd"
    with pytest.raises(MssqlURLError, match="database name is empty"):
        url.with_database("")


def test_with_trigger_replaces_the_urls_own_and_keeps_the_rest() -> None:
    from vdistream.sqlserver.url import with_trigger

    assert (
        with_trigger("mssql://sa:p@h:1/db?trigger=sqlcmd&password_file=/f", "tds")
        == "mssql://sa:p@h:1/db?password_file=/f&trigger=tds"
    )
    assert with_trigger("mssql://sa@h:1/db", "sqlcmd") == "mssql://sa@h:1/db?trigger=sqlcmd"
    assert with_trigger("mssql://sa@h:1/db?trigger=tds", None) == "mssql://sa@h:1/db?trigger=tds"
    assert with_trigger("sqlite:///a.db", "sqlcmd") == "sqlite:///a.db"
    # what verify --engine --trigger does with a manifest's source: one query, parsable
    parsed = MssqlURL.parse(
        with_trigger("mssql://sa@h:1/db?trigger=sqlcmd", "tds"),
        password_env={"SQLCMDPASSWORD": "x"},
    )
    assert parsed.trigger == "tds"
