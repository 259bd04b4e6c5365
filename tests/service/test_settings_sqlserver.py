"""SQL Server databases in the settings: the URL (its password found, never shown), one
schedule per backup kind, ``sqlvdi``, and errors that name the key and the line."""

from __future__ import annotations

from pathlib import Path

import pytest

from vdistream.service import CronExpr, SettingsError, load_settings, settings_summary
from vdistream.service.settings import SCHEDULE_KINDS
from vdistream.sqlserver.engine import BACKUP_MODES

PASSWORD = "Mssql-Pa55:word@x"
ENV = {"VDISTREAM_MSSQL_PASSWORD": PASSWORD}

BASE = """\
[destinations.local]
url = "/var/backups/x"

[databases.sql]
url = "mssql://backup@db.example:1433/erp?trigger=sqlcmd"
destination = "local"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "vdistream.toml"
    path.write_text(text)
    return path


def refused(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> SettingsError:
    path = write(tmp_path, text)
    with pytest.raises(SettingsError) as caught:
        load_settings(path, env=ENV if env is None else env)
    return caught.value


def marked(text: str) -> int:
    return next(n for n, line in enumerate(text.splitlines(), start=1) if "# <--" in line)


def test_a_sql_server_database_with_a_schedule_per_backup_kind(tmp_path: Path) -> None:
    library = tmp_path / "lib" / "libsqlvdi.so"
    library.parent.mkdir()
    library.write_bytes(b"\x7fELF")
    text = (
        '[service]\nsqlvdi = "lib/libsqlvdi.so"\n\n'
        + BASE
        + 'schedule = "0 2 * * *"\nschedule_diff = "0 */6 * * *"\n'
        'schedule_log = "*/15 * * * *"\nretention = { keep_last = 3 }\n'
    )
    settings = load_settings(write(tmp_path, text), env=ENV)
    assert settings.service.sqlvdi == library  # relative to the file
    sql = settings.databases["sql"]
    assert sql.kind == "mssql"
    assert sql.mode is None  # the schedules say which backup runs
    assert sql.url == "mssql://backup@db.example:1433/erp?trigger=sqlcmd"
    assert sql.display_url == "mssql://backup@db.example:1433/erp?trigger=sqlcmd"
    assert sql.sqlvdi == library  # the service's, for every SQL Server database
    assert sql.schedules == {
        "full": CronExpr.parse("0 2 * * *"),
        "diff": CronExpr.parse("0 */6 * * *"),
        "log": CronExpr.parse("*/15 * * * *"),
    }
    assert list(sql.schedules) == list(SCHEDULE_KINDS)
    summary = settings_summary(settings)
    assert summary["databases"]["sql"]["kind"] == "mssql"
    assert summary["databases"]["sql"]["schedule_log"] == "*/15 * * * *"
    assert summary["databases"]["sql"]["schedule_diff"] == "0 */6 * * *"
    assert summary["service"]["sqlvdi"] == str(library)


def test_only_some_kinds_scheduled_and_the_database_library_wins(tmp_path: Path) -> None:
    own, shared = tmp_path / "own.so", tmp_path / "shared.so"
    own.write_bytes(b"")
    shared.write_bytes(b"")
    text = (
        f'[service]\nsqlvdi = "{shared}"\n\n' + BASE + f'schedule_log = "*/5 * * * *"\n'
        f'sqlvdi = "{own}"\n'
    )
    sql = load_settings(write(tmp_path, text), env=ENV).databases["sql"]
    assert sql.sqlvdi == own
    assert sql.schedule is None
    assert sql.schedules == {"log": CronExpr.parse("*/5 * * * *")}


def test_the_other_engines_list_their_schedule_as_full(tmp_path: Path) -> None:
    text = BASE.replace("mssql://backup@db.example:1433/erp?trigger=sqlcmd", "sqlite:///srv/app.db")
    app = load_settings(write(tmp_path, text + 'schedule = "@daily"\n'), env={}).databases["sql"]
    assert app.schedules == {"full": CronExpr.parse("@daily")}
    assert app.sqlvdi is None


@pytest.mark.parametrize(
    ("env", "query"),
    [
        ({"VDISTREAM_MSSQL_PASSWORD": PASSWORD}, ""),
        ({"SQLCMDPASSWORD": PASSWORD}, ""),
        ({}, "&password_file={file}"),
    ],
)
def test_the_password_is_found_and_never_shown(
    tmp_path: Path, env: dict[str, str], query: str
) -> None:
    secret = tmp_path / "erp.password"
    secret.write_text(PASSWORD + "\n")
    text = BASE.replace("trigger=sqlcmd", "trigger=sqlcmd" + query.format(file=secret))
    settings = load_settings(write(tmp_path, text), env=env)
    sql = settings.databases["sql"]
    for shown in (repr(settings), str(settings_summary(settings)), sql.display_url):
        assert PASSWORD not in shown
        assert "Pa55" not in shown


def test_a_password_in_the_url_stays_in_the_url_only(tmp_path: Path) -> None:
    text = BASE.replace("backup@", "backup:s3cret-pw@")
    settings = load_settings(write(tmp_path, text), env={})
    sql = settings.databases["sql"]
    assert "s3cret-pw" in sql.url  # the job needs it
    assert sql.display_url == "mssql://backup@db.example:1433/erp?trigger=sqlcmd"
    assert "s3cret-pw" not in repr(settings)
    assert "s3cret-pw" not in str(settings_summary(settings))


def test_no_password_fails_at_start_naming_the_key_and_the_line(tmp_path: Path) -> None:
    error = refused(tmp_path, BASE, env={})
    message = str(error)
    assert message.startswith(f"{tmp_path / 'vdistream.toml'}, line 5: databases.sql.url: ")
    assert "no password for SQL Server URL" in message
    assert "VDISTREAM_MSSQL_PASSWORD" in message
    assert (error.key, error.line) == ("databases.sql.url", 5)


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("mssql://backup@db.example:1433/", "it names no database"),
        ("mssql://db.example/erp", "it names no user"),
        ("mssql://backup@db.example:99999/erp", "port '99999' is not a number"),
        ("mssql://backup@db.example/erp?trigger=odbc", "trigger='odbc' is not one of"),
        (
            "mssql://backup@db.example/erp?password_file=erp.password",
            "password_file must be an absolute path",
        ),
    ],
)
def test_a_bad_url_names_the_key(tmp_path: Path, url: str, problem: str) -> None:
    (tmp_path / "erp.password").write_text("pw\n")
    text = BASE.replace('"mssql://backup@db.example:1433/erp?trigger=sqlcmd"', f'"{url}"  # <--')
    env = {} if "password_file" in url else ENV
    error = refused(tmp_path, text, env=env)
    assert str(error).startswith(
        f"{tmp_path / 'vdistream.toml'}, line {marked(text)}: databases.sql.url: "
    ), error
    assert problem in str(error)


SQLITE = BASE.replace("mssql://backup@db.example:1433/erp?trigger=sqlcmd", "sqlite:///srv/a.db")
POSTGRES = BASE.replace("mssql://backup@db.example:1433/erp?trigger=sqlcmd", "postgresql://h/a")


@pytest.mark.parametrize(
    ("text", "key", "problem"),
    [
        (
            SQLITE + 'schedule_log = "*/15 * * * *"  # <--\n',
            "databases.sql.schedule_log",
            "only SQL Server databases have a schedule_log (log backups); this one is "
            "sqlite: use schedule",
        ),
        (
            POSTGRES + 'schedule_diff = "0 * * * *"  # <--\n',
            "databases.sql.schedule_diff",
            "only SQL Server databases have a schedule_diff (differential backups); this "
            "one is postgresql: use schedule",
        ),
        (
            BASE + 'schedule_log = "61 * * * *"  # <--\n',
            "databases.sql.schedule_log",
            "minute field: 61 is out of range 0-59",
        ),
        (
            BASE + 'schedule_diff = "0 0 30 feb *"  # <--\n',
            "databases.sql.schedule_diff",
            "'0 0 30 feb *' never fires: no date matches its day and month fields",
        ),
        (
            BASE + 'mode = "log"  # <--\n',
            "databases.sql.mode",
            "only PostgreSQL databases have a mode; this one is mssql (a SQL Server "
            "database's schedule, schedule_diff and schedule_log say which backup runs when)",
        ),
        (
            SQLITE + 'sqlvdi = "/opt/mssql/lib/libsqlvdi.so"  # <--\n',
            "databases.sql.sqlvdi",
            "only SQL Server databases use sqlvdi (libsqlvdi.so); this one is sqlite",
        ),
        (
            BASE + 'sqlvdi = "/nonexistent/libsqlvdi.so"  # <--\n',
            "databases.sql.sqlvdi",
            "/nonexistent/libsqlvdi.so does not exist: name Microsoft's libsqlvdi.so (SQL "
            "Server installs it as /opt/mssql/lib/libsqlvdi.so)",
        ),
        (
            '[service]\nsqlvdi = "/"  # <--\n' + BASE,
            "service.sqlvdi",
            "/ is not a file: name Microsoft's libsqlvdi.so (SQL Server installs it as "
            "/opt/mssql/lib/libsqlvdi.so)",
        ),
        (
            BASE + "schedule_log = 15  # <--\n",
            "databases.sql.schedule_log",
            "a cron expression is a string, not int",
        ),
    ],
)
def test_errors_name_the_key_and_the_line(
    tmp_path: Path, text: str, key: str, problem: str
) -> None:
    error = refused(tmp_path, text)
    path = tmp_path / "vdistream.toml"
    assert str(error).splitlines()[0] == f"{path}, line {marked(text)}: {key}: {problem}"
    assert (error.key, error.source, error.line) == (key, str(path), marked(text))


def test_environment_overrides_the_sql_server_keys(tmp_path: Path) -> None:
    library = tmp_path / "libsqlvdi.so"
    library.write_bytes(b"")
    env = {
        **ENV,
        "VDISTREAM_DATABASES__SQL__SCHEDULE_LOG": "*/5 * * * *",
        "VDISTREAM_DATABASES__SQL__SCHEDULE_DIFF": "0 * * * *",
        "VDISTREAM_SERVICE__SQLVDI": str(library),
    }
    settings = load_settings(write(tmp_path, BASE), env=env)
    sql = settings.databases["sql"]
    assert sql.schedule_log == CronExpr.parse("*/5 * * * *")
    assert sql.schedule_diff == CronExpr.parse("0 * * * *")
    assert sql.sqlvdi == library
    bad = {**ENV, "VDISTREAM_DATABASES__SQL__SCHEDULE_LOG": "0 25 * * *"}
    with pytest.raises(SettingsError) as caught:
        load_settings(write(tmp_path, BASE), env=bad)
    assert str(caught.value) == (
        "environment variable VDISTREAM_DATABASES__SQL__SCHEDULE_LOG: "
        "databases.sql.schedule_log: hour field: 25 is out of range 0-23"
    )


def test_the_request_modes_are_the_engines() -> None:
    from vdistream.cli.daemon import _SQLSERVER_MODES
    from vdistream.service.jobs import SQLSERVER_MODES

    assert SQLSERVER_MODES == BACKUP_MODES == _SQLSERVER_MODES


def test_readers_that_connect_to_no_database_need_no_password(tmp_path: Path) -> None:
    """A client finding the socket, or ``prune``, has not the daemon's environment:
    ``check_passwords=False`` checks the URL's shape only and reads no password file."""
    unreadable = tmp_path / "erp.password"  # the daemon's user's file
    text = BASE.replace("trigger=sqlcmd", f"trigger=sqlcmd&password_file={unreadable}")
    path = write(tmp_path, text)
    with pytest.raises(SettingsError, match="cannot read password_file"):
        load_settings(path, env={})
    settings = load_settings(path, env={}, check_passwords=False)
    assert settings.databases["sql"].kind == "mssql"
    bad = write(tmp_path, BASE.replace("/erp?", "/?"))
    with pytest.raises(SettingsError, match="it names no database"):
        load_settings(bad, env={}, check_passwords=False)


def test_serve_check_warns_when_the_library_is_not_there(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from vdistream.service.serve import serve

    missing = tmp_path / "nowhere" / "libsqlvdi.so"
    monkeypatch.setenv("VDISTREAM_SQLVDI", str(missing))
    for name, value in ENV.items():
        monkeypatch.setenv(name, value)
    assert serve(str(write(tmp_path, BASE)), check=True) == 0
    err = capsys.readouterr().err
    assert (
        f"vdistream serve: warning: [databases.sql]: no SQL Server VDI library at {missing}" in err
    )
