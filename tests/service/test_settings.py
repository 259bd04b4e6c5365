"""Settings: the TOML file, environment overrides, and errors that say where."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest

from vdistream.errors import ConfigError
from vdistream.pipeline.spec import CompressionSpec
from vdistream.service import (
    CronExpr,
    RetentionPolicy,
    Secret,
    ServiceSettings,
    SettingsError,
    load_settings,
    parse_duration,
    settings_summary,
)
from vdistream.service.settings import _schema

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "config" / "vdistream.toml"
TOKEN = "s3cr3t-t0ken-value-0123456789"
PASSWORD = "pg-Pa55word"


def write(tmp_path: Path, text: str, name: str = "vdistream.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def marked_line(text: str) -> int:
    """The 1-based line that carries the ``# <--`` marker."""
    for number, line in enumerate(text.splitlines(), start=1):
        if "# <--" in line:
            return number
    raise AssertionError("no marker")


MINIMAL = """\
[destinations.local]
url = "/var/backups/x"

[databases.app]
url = "sqlite:///srv/app.db"
destination = "local"
"""


@pytest.fixture
def secrets_dir(tmp_path: Path) -> Path:
    token = tmp_path / "token"
    token.write_text(TOKEN + "\n")
    token.chmod(0o600)
    key = tmp_path / "app.key"
    key.write_bytes(os.urandom(32))
    return tmp_path


def full_text(base: Path) -> str:
    return f"""\
# every key, with values other than the defaults
[service]
state_dir = "{base}/state"
socket = "run/api.sock"
socket_mode = 0o660
listen = "127.0.0.1:8470"
token_file = "{base}/token"
max_jobs = 6
max_queued = 50
grace_period = "2m"
log_format = "json"
log_level = "debug"
timezone = "Europe/Berlin"

[destinations.local]
url = "/var/backups/vdistream"

[destinations.offsite]
url = "s3://bucket/prefix"

[databases.app]
url = "sqlite:///srv/app/app.db"
devices = 8
compress = "zstd:5"
encrypt_key_file = "{base}/app.key"
max_jobs = 2
destination = "local"
schedule = "15 3 * * mon-fri"
retention = {{ keep_last = 7, keep_within = "14d" }}
verify_after_backup = false

[databases.billing]
url = "postgresql://backup:{PASSWORD}@db.example:5432/billing"
mode = "dump"
destination = "offsite"
compress = "lz4"
schedule = "@hourly"

[databases.billing.retention]
keep_within = "36h"

[databases.tool]
url = "cmd:pg_dumpall --clean"
destination = "local"
"""


# --- valid files -------------------------------------------------------------------------


def test_a_full_file_is_read_into_typed_settings(secrets_dir: Path) -> None:
    path = write(secrets_dir, full_text(secrets_dir))
    settings = load_settings(path, env={})

    service = settings.service
    assert service.state_dir == secrets_dir / "state"
    assert service.socket == secrets_dir / "run" / "api.sock"  # relative to the file
    assert service.socket_path == service.socket
    assert service.socket_mode == 0o660
    assert service.listen == ("127.0.0.1", 8470)
    assert service.token_file == secrets_dir / "token"
    assert service.token is not None
    assert service.token.reveal() == TOKEN
    assert (service.max_jobs, service.max_queued) == (6, 50)
    assert service.grace_period == 120.0
    assert (service.log_format, service.log_level) == ("json", "debug")
    assert service.timezone == "Europe/Berlin"
    assert str(service.tzinfo()) == "Europe/Berlin"
    assert service.state_db == secrets_dir / "state" / "state.db"

    assert set(settings.destinations) == {"local", "offsite"}
    assert settings.destinations["offsite"].url == "s3://bucket/prefix"

    app = settings.databases["app"]
    assert app.kind == "sqlite"
    assert app.url == "sqlite:///srv/app/app.db"
    assert app.mode is None
    assert app.devices == 8
    assert app.compress == CompressionSpec("zstd", 5)
    assert app.encrypt_key_file == secrets_dir / "app.key"
    assert app.max_jobs == 2
    assert app.destination == "local"
    assert app.schedule == CronExpr.parse("15 3 * * 1-5")
    assert app.retention == RetentionPolicy(keep_last=7, keep_within=timedelta(days=14))
    assert app.verify_after_backup is False

    billing = settings.databases["billing"]
    assert billing.kind == "postgresql"
    assert billing.mode == "dump"
    assert billing.compress == CompressionSpec("lz4")
    assert billing.schedule is not None
    assert billing.schedule.text == "@hourly"
    assert billing.retention == RetentionPolicy(keep_within=timedelta(hours=36))
    assert billing.verify_after_backup is True
    assert billing.display_url == "postgresql://backup:***@db.example:5432/billing"

    tool = settings.databases["tool"]
    assert (tool.kind, tool.devices, tool.max_jobs) == ("cmd", 4, 1)
    assert not tool.compress.enabled
    assert tool.retention == RetentionPolicy()
    assert not tool.retention.enabled
    assert settings.source == path
    assert settings.env_overrides == ()


def test_the_example_file_loads_and_documents_every_key() -> None:
    settings = load_settings(EXAMPLE, env={})
    assert settings.service == ServiceSettings(token=None)
    app = settings.databases["app"]
    assert app.retention == RetentionPolicy(keep_last=7, keep_within=timedelta(days=14))
    text = EXAMPLE.read_text()
    for key in (
        *_schema.ServiceIn.model_fields,
        *_schema.DatabaseIn.model_fields,
        *_schema.RetentionIn.model_fields,
        *_schema.DestinationIn.model_fields,
    ):
        assert re.search(rf"^#?\s*(retention = {{ )?{key} =|{key} = ", text, re.M), key


def test_no_file_gives_the_defaults() -> None:
    settings = load_settings(None, env={})
    assert settings.service == ServiceSettings()
    assert settings.service.socket_path == Path("/var/lib/vdistream/vdistream.sock")
    assert dict(settings.databases) == {}
    assert settings.source is None


@pytest.mark.parametrize(
    ("value", "expected"),
    [('"30d"', timedelta(days=30)), ('"forever"', None), ('""', timedelta(days=90))],
)
def test_job_history(tmp_path: Path, value: str, expected: timedelta | None) -> None:
    """How long ended jobs are kept: a duration, "forever", or (empty) the default."""
    settings = load_settings(write(tmp_path, f"[service]\njob_history = {value}\n"), env={})
    assert settings.service.job_history == expected


def test_defaults_of_a_minimal_database(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, MINIMAL), env={})
    app = settings.databases["app"]
    assert (app.devices, app.max_jobs, app.schedule) == (4, 1, None)
    assert app.compress == CompressionSpec("none")
    assert app.verify_after_backup is True
    assert app.retention == RetentionPolicy()
    assert app.encrypt_key_file is None


def test_relative_paths_are_relative_to_the_file(tmp_path: Path) -> None:
    text = MINIMAL.replace('"/var/backups/x"', '"backups"').replace(
        "sqlite:///srv/app.db", "sqlite:data/app.db"
    )
    settings = load_settings(write(tmp_path, text), env={})
    assert settings.destinations["local"].url == str(tmp_path / "backups")
    assert settings.databases["app"].url == f"sqlite://{tmp_path}/data/app.db"


def test_empty_strings_mean_not_set(tmp_path: Path) -> None:
    text = '[service]\nlisten = ""\ntoken_file = ""\ntimezone = ""\n' + MINIMAL.replace(
        'destination = "local"', 'destination = "local"\nschedule = ""\ncompress = ""'
    )
    settings = load_settings(write(tmp_path, text), env={})
    assert settings.service.listen is None
    assert settings.service.timezone is None
    assert settings.databases["app"].schedule is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("14d", timedelta(days=14)),
        ("36h", timedelta(hours=36)),
        ("90m", timedelta(minutes=90)),
        ("30s", timedelta(seconds=30)),
        ("2w", timedelta(weeks=2)),
        ("1d12h", timedelta(days=1, hours=12)),
        ("1d 12h", timedelta(days=1, hours=12)),
        ("1.5h", timedelta(minutes=90)),
    ],
)
def test_durations(text: str, expected: timedelta) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize("text", ["", "14", "14 days", "d", "-1d", "1y", "1d,2h"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


@pytest.mark.parametrize(
    ("value", "mode"), [('"0600"', 0o600), ('"600"', 0o600), ('"0o640"', 0o640), ("0o600", 0o600)]
)
def test_socket_mode_spellings(tmp_path: Path, value: str, mode: int) -> None:
    settings = load_settings(write(tmp_path, f"[service]\nsocket_mode = {value}\n"), env={})
    assert settings.service.socket_mode == mode


@pytest.mark.parametrize("listen", ["127.0.0.1:1", "[::1]:8470", "localhost:8470", "127.5.5.5:80"])
def test_loopback_listen_addresses(tmp_path: Path, listen: str) -> None:
    path = write(tmp_path, f'[service]\nlisten = "{listen}"\n')
    settings = load_settings(path, env={"VDISTREAM_API_TOKEN": TOKEN})
    assert settings.service.listen is not None
    assert settings.service.listen[1] == int(listen.rsplit(":", 1)[1])


# --- environment overrides ---------------------------------------------------------------


def test_env_overrides_are_nested_and_typed(tmp_path: Path) -> None:
    text = MINIMAL + 'retention = { keep_last = 7, keep_within = "14d" }\nschedule = "@daily"\n'
    env = {
        "VDISTREAM_SERVICE__MAX_JOBS": "4",
        "VDISTREAM_SERVICE__GRACE_PERIOD": "2.5",
        "VDISTREAM_SERVICE__LOG_FORMAT": "console",
        "VDISTREAM_DATABASES__APP__DEVICES": "8",
        "VDISTREAM_DATABASES__APP__VERIFY_AFTER_BACKUP": "false",
        "VDISTREAM_DATABASES__APP__RETENTION__KEEP_LAST": "3",
        "VDISTREAM_DATABASES__APP__SCHEDULE": "0 4 * * *",
        "VDISTREAM_DESTINATIONS__LOCAL__URL": "/mnt/backups",
        "HOME": "/root",
        "VDISTREAM_TEST_SOMETHING": "ignored: not an override",
    }
    settings = load_settings(write(tmp_path, text), env=env)
    assert settings.service.max_jobs == 4
    assert settings.service.grace_period == 2.5
    assert settings.service.log_format == "console"
    app = settings.databases["app"]
    assert app.devices == 8
    assert app.verify_after_backup is False
    # the inline table is merged, not replaced
    assert app.retention == RetentionPolicy(keep_last=3, keep_within=timedelta(days=14))
    assert app.schedule == CronExpr.parse("0 4 * * *")
    assert settings.destinations["local"].url == "/mnt/backups"
    assert settings.env_overrides == tuple(
        sorted(k for k in env if "__" in k and k.startswith("VDISTREAM_"))
    )


def test_env_creates_tables_and_matches_names_case_insensitively(tmp_path: Path) -> None:
    text = MINIMAL.replace("[databases.app]", "[databases.My-App]")
    env = {
        "VDISTREAM_DATABASES__MY_APP__DEVICES": "2",
        "VDISTREAM_DESTINATIONS__SPARE__URL": "spare",
        "VDISTREAM_DATABASES__EXTRA__URL": "cmd:echo hi",
        "VDISTREAM_DATABASES__EXTRA__DESTINATION": "spare",
        "VDISTREAM_DATABASES__EXTRA__RETENTION": "{ keep_last = 2 }",
    }
    settings = load_settings(write(tmp_path, text), env=env)
    assert settings.databases["My-App"].devices == 2
    assert settings.destinations["spare"].url == str(Path.cwd() / "spare")  # env: cwd
    extra = settings.databases["extra"]
    assert (extra.kind, extra.destination) == ("cmd", "spare")
    assert extra.retention == RetentionPolicy(keep_last=2)


def test_env_empty_value_removes_a_key(tmp_path: Path) -> None:
    text = MINIMAL + 'schedule = "@daily"\ndevices = 9\n'
    env = {"VDISTREAM_DATABASES__APP__SCHEDULE": "", "VDISTREAM_DATABASES__APP__DEVICES": " "}
    app = load_settings(write(tmp_path, text), env=env).databases["app"]
    assert app.schedule is None
    assert app.devices == 4


def test_env_string_keys_take_the_raw_text(tmp_path: Path) -> None:
    text = MINIMAL.replace("local", "2024")
    env = {"VDISTREAM_DATABASES__APP__DESTINATION": "2024", "VDISTREAM_SERVICE__TIMEZONE": "UTC"}
    settings = load_settings(write(tmp_path, text), env=env)
    assert settings.databases["app"].destination == "2024"
    assert settings.service.timezone == "UTC"


def test_env_without_a_file(tmp_path: Path) -> None:
    env = {
        "VDISTREAM_SERVICE__STATE_DIR": str(tmp_path),
        "VDISTREAM_DESTINATIONS__D__URL": "null://",
        "VDISTREAM_DATABASES__DB__URL": "sqlite:///x.db",
        "VDISTREAM_DATABASES__DB__DESTINATION": "d",
    }
    settings = load_settings(None, env=env)
    assert settings.service.state_dir == tmp_path
    assert settings.databases["db"].destination == "d"


# --- errors name the key, the file and the line --------------------------------------------

BAD_FILES = [
    pytest.param(
        "[service]\nmax_jobs = 2\nmax_job = 4  # <--\n",
        "service.max_job",
        "did you mean 'max_jobs'",
        id="unknown-service-key",
    ),
    pytest.param(
        MINIMAL + "devics = 4  # <--\n",
        "databases.app.devics",
        "unknown key in [databases.app]",
        id="unknown-database-key",
    ),
    pytest.param(
        "[servce]  # <--\nmax_jobs = 1\n",
        "servce",
        "unknown key at the top level",
        id="unknown-table",
    ),
    pytest.param(
        MINIMAL + "retention = { keep_lst = 3 }  # <--\n",
        "databases.app.retention.keep_lst",
        "did you mean 'keep_last'",
        id="unknown-retention-key",
    ),
    pytest.param(
        MINIMAL + "\n[databases.app.retention]\nkeep_last = 3\nkeep_within = 14  # <--\n",
        "databases.app.retention.keep_within",
        "duration",
        id="retention-subtable-wrong-type",
    ),
    pytest.param(
        MINIMAL + 'devices = "eight"  # <--\n',
        "databases.app.devices",
        "expected an integer from 1 to 64, got 'eight'",
        id="wrong-type-string-for-int",
    ),
    pytest.param(
        "[service]\n\nmax_jobs = true  # <--\n",
        "service.max_jobs",
        "expected an integer",
        id="wrong-type-bool-for-int",
    ),
    pytest.param(
        MINIMAL + 'verify_after_backup = "yes"  # <--\n',
        "databases.app.verify_after_backup",
        "expected true or false",
        id="wrong-type-bool",
    ),
    pytest.param(
        MINIMAL + "devices = 65  # <--\n",
        "databases.app.devices",
        "from 1 to 64",
        id="out-of-range",
    ),
    pytest.param(
        "[service]\nmax_queued = 1.5  # <--\n",
        "service.max_queued",
        "expected an integer",
        id="float-for-int",
    ),
    pytest.param(
        "[service]\nlog_format = 'xml'  # <--\n",
        "service.log_format",
        "json, console, auto",
        id="bad-choice",
    ),
    pytest.param(
        MINIMAL + 'retention = { keep_within = "14 days" }  # <--\n',
        "databases.app.retention.keep_within",
        "is not a duration",
        id="bad-duration",
    ),
    pytest.param(
        MINIMAL + "retention = { keep_last = 0 }  # <--\n",
        "databases.app.retention.keep_last",
        "from 1",
        id="keep-last-zero",
    ),
    pytest.param(
        "[service]\njob_history = '30m'  # <--\n",
        "service.job_history",
        "at least 1h",
        id="job-history-too-short",
    ),
    pytest.param(
        "[service]\ngrace_period = 'soon'  # <--\n",
        "service.grace_period",
        "is not a duration",
        id="bad-grace-period",
    ),
    pytest.param(
        MINIMAL + 'schedule = "61 * * * *"  # <--\n',
        "databases.app.schedule",
        "minute field: 61 is out of range 0-59",
        id="bad-cron-range",
    ),
    pytest.param(
        MINIMAL + 'schedule = "0 3 * *"  # <--\n',
        "databases.app.schedule",
        "expected 5",
        id="bad-cron-fields",
    ),
    pytest.param(
        MINIMAL + 'schedule = "0 0 30 feb *"  # <--\n',
        "databases.app.schedule",
        "never fires",
        id="cron-never-fires",
    ),
    pytest.param(
        MINIMAL.replace('destination = "local"', 'destination = "nowhere"  # <--'),
        "databases.app.destination",
        "no [destinations.nowhere] table (defined: local)",
        id="missing-destination",
    ),
    pytest.param(
        '[destinations.local]\nurl = "/x"\n\n[databases.app]  # <--\nurl = "sqlite:///a.db"\n',
        "databases.app.destination",
        "missing",
        id="destination-not-given",
    ),
    pytest.param(
        '[destinations.local]  # <--\n\n[databases.app]\nurl = "sqlite:///a.db"\n',
        "destinations.local.url",
        "missing",
        id="destination-url-missing",
    ),
    pytest.param(
        "[service]\nlisten = '0.0.0.0:8470'  # <--\n",
        "service.listen",
        "not a loopback address",
        id="listen-any",
    ),
    pytest.param(
        "[service]\nlisten = '192.168.1.10:8470'  # <--\n",
        "service.listen",
        "not a loopback address",
        id="listen-lan",
    ),
    pytest.param(
        "[service]\nlisten = 'example.com:8470'  # <--\n",
        "service.listen",
        "not an IP address",
        id="listen-hostname",
    ),
    pytest.param(
        "[service]\nlisten = '127.0.0.1'  # <--\n",
        "service.listen",
        "HOST:PORT",
        id="listen-no-port",
    ),
    pytest.param(
        "[service]\nlisten = '127.0.0.1:70000'  # <--\n",
        "service.listen",
        "outside 1..65535",
        id="listen-bad-port",
    ),
    pytest.param(
        "[service]\nsocket_mode = '0666'  # <--\n",
        "service.socket_mode",
        "every local user",
        id="socket-mode-world",
    ),
    pytest.param(
        "[service]\nsocket_mode = 600  # <--\n",
        "service.socket_mode",
        "write it in octal",
        id="socket-mode-decimal",
    ),
    pytest.param(
        "[service]\nsocket_mode = '0o1770'  # <--\n",
        "service.socket_mode",
        "outside",
        id="socket-mode-too-big",
    ),
    pytest.param(
        "[service]\nsocket_mode = 'rw'  # <--\n",
        "service.socket_mode",
        "not an octal mode",
        id="socket-mode-text",
    ),
    pytest.param(
        "[service]\nsocket_mode = '0060'  # <--\n",
        "service.socket_mode",
        "owner",
        id="socket-mode-owner-cannot-connect",
    ),
    pytest.param(
        "[service]\nsocket = '/" + "s" * 120 + "'  # <--\n",
        "service.socket",
        "longer than 107 bytes",
        id="socket-path-too-long",
    ),
    pytest.param(
        MINIMAL + 'mode = "dump"  # <--\n',
        "databases.app.mode",
        "only PostgreSQL",
        id="mode-for-sqlite",
    ),
    pytest.param(
        MINIMAL.replace("sqlite:///srv/app.db", "postgresql://h/db") + 'mode = "logical"  # <--\n',
        "databases.app.mode",
        "basebackup, dump",
        id="bad-postgres-mode",
    ),
    pytest.param(
        MINIMAL.replace('"sqlite:///srv/app.db"', '"mysql://h/db"  # <--'),
        "databases.app.url",
        "unknown database URL scheme 'mysql'",
        id="unknown-database-scheme",
    ),
    pytest.param(
        MINIMAL.replace('"sqlite:///srv/app.db"', '"cmd:echo \'unbalanced"  # <--'),
        "databases.app.url",
        "cannot be split",
        id="bad-cmd",
    ),
    pytest.param(
        MINIMAL.replace('"/var/backups/x"', '"ftp://host/x"  # <--'),
        "destinations.local.url",
        "unknown storage scheme 'ftp'",
        id="unknown-destination-scheme",
    ),
    pytest.param(
        MINIMAL.replace('"/var/backups/x"', '"s3:///prefix"  # <--'),
        "destinations.local.url",
        "names no bucket",
        id="s3-without-bucket",
    ),
    pytest.param(
        MINIMAL + 'compress = "gzip"  # <--\n',
        "databases.app.compress",
        "unknown algorithm 'gzip'",
        id="bad-compression",
    ),
    pytest.param(
        MINIMAL + 'compress = "zstd:20"  # <--\n',
        "databases.app.compress",
        "zstd levels are 1..19",
        id="bad-compression-level",
    ),
    pytest.param(
        MINIMAL + 'compress = "lz4:3"  # <--\n',
        "databases.app.compress",
        "lz4 takes no level",
        id="lz4-with-level",
    ),
    pytest.param(
        MINIMAL + "compress = 3  # <--\n",
        "databases.app.compress",
        "expected a string",
        id="compress-not-a-string",
    ),
    pytest.param(
        "[service]\ntimezone = 'Mars/Olympus_Mons'  # <--\n",
        "service.timezone",
        "unknown time zone",
        id="bad-timezone",
    ),
    pytest.param(
        MINIMAL + '\n[databases."my app"]  # <--\nurl = "sqlite:///b.db"\ndestination = "local"\n',
        "databases.my app",
        "a name is letters and digits",
        id="bad-name",
    ),
    pytest.param(
        MINIMAL + 'encrypt_key_file = "/nonexistent/key"  # <--\n',
        "databases.app.encrypt_key_file",
        "does not exist",
        id="missing-key-file",
    ),
    pytest.param(
        "service = 3  # <--\n",
        "service",
        "expected a table",
        id="service-not-a-table",
    ),
    pytest.param(
        MINIMAL + "retention = 7  # <--\n",
        "databases.app.retention",
        "expected a table",
        id="retention-not-a-table",
    ),
]


@pytest.mark.parametrize(("text", "key", "problem"), BAD_FILES)
def test_bad_files_name_key_file_and_line(
    tmp_path: Path, text: str, key: str, problem: str
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_settings(path, env={})
    message = str(caught.value)
    line = marked_line(text)
    assert message.startswith(f"{path}, line {line}: {key}: "), message
    assert problem in message
    assert isinstance(caught.value, SettingsError)
    assert (caught.value.key, caught.value.source, caught.value.line) == (key, str(path), line)


def test_every_problem_is_one_line_the_first_as_the_checks_meet_them(tmp_path: Path) -> None:
    # [service]'s unknown keys are checked before its values, whatever their lines
    text = "[service]\nlog_level = 'loud'\nmax_job = 4\n" + MINIMAL + "devices = 0\n"
    path = write(tmp_path, text)
    with pytest.raises(SettingsError) as caught:
        load_settings(path, env={})
    assert str(caught.value).splitlines() == [
        f"{path}, line 3: service.max_job: unknown key in [service]; did you mean 'max_jobs'? "
        "(known: state_dir, socket, socket_mode, listen, token_file, max_jobs, max_queued, "
        "grace_period, job_history, log_format, log_level, timezone, sqlvdi, runtime_dir, "
        "runtime_group, max_rate, webhooks)",
        f"{path}, line 2: service.log_level: expected one of debug, info, warning, error, "
        "got 'loud'",
        f"{path}, line 10: databases.app.devices: expected an integer from 1 to 64, got 0",
    ]
    assert (caught.value.key, caught.value.line) == ("service.max_job", 3)


POSTGRES = MINIMAL.replace("sqlite:///srv/app.db", "postgresql://db.example/app")

#: (file text, key, line, the first line's problem): the first problem is the one the
#: checks meet first (sections, names, types and unknown keys, then each table's values
#: in a fixed order), also when pydantic refuses other keys, and also when it is found
#: after pydantic (URL, mode, destination).
FIRST_PROBLEMS = [
    (
        "foo = 1\n",
        "foo",
        1,
        "unknown key at the top level (known: service, databases, destinations)",
    ),
    ("service = 5\n", "service", 1, "expected a table, got an integer"),
    ("destinations = []\n", "destinations", 1, "expected a table, got an array"),
    (
        "[databases]\napp = 'x'\n",
        "databases.app",
        2,
        "expected a table [databases.app], got a string",
    ),
    (
        MINIMAL + "mode = 'foo'\n",
        "databases.app.mode",
        7,
        "only PostgreSQL databases have a mode; this one is sqlite",
    ),
    (
        MINIMAL + "mode = 5\n",
        "databases.app.mode",
        7,
        "only PostgreSQL databases have a mode; this one is sqlite",
    ),
    (
        POSTGRES + "mode = 'foo'\n",
        "databases.app.mode",
        7,
        "expected one of basebackup, dump, files, got 'foo'",
    ),
    (POSTGRES + "mode = 5\n", "databases.app.mode", 7, "expected a string, got an integer 5"),
    (
        MINIMAL + "\n[databases.b]\nurl = 'mysql://x'\ndestination = 'local'\ndevices = 0\n",
        "databases.b.url",
        9,
        "unknown database URL scheme 'mysql' (known: sqlite:, postgresql: (postgres:), "
        "mssql: (sqlserver:), cmd:, external:)",
    ),
    (
        MINIMAL + "[databases.b]\nurl = 'x'\ndevices = 0\n",
        "databases.b.url",
        8,
        "'x' is not a database URL (known schemes: sqlite:, postgresql: (postgres:), "
        "mssql: (sqlserver:), cmd:, external:)",
    ),
    (
        MINIMAL + "\n[databases.b]\nurl = 'sqlite:///b'\ndestination = 'local'\nmode = 'dump'\n"
        "devices = 0\n",
        "databases.b.mode",
        11,
        "only PostgreSQL databases have a mode; this one is sqlite",
    ),
    (
        "[databases.app]\ndevices = 'x'\nmode = 'y'\nurl = 'sqlite:///a'\ndestination = 'z'\n",
        "databases.app.mode",
        3,
        "only PostgreSQL databases have a mode; this one is sqlite",
    ),
    (
        MINIMAL + "retention = { keep_last = 0, keep_within = 'x' }\n",
        "databases.app.retention.keep_within",
        7,
        "'x' is not a duration: write a number and a unit (s, m, h, d, w), e.g. '14d', '36h', "
        "'90m', '1d12h'",
    ),
    (
        "[destinations.local]\nurl = '/b'\n[databases.app]\nurl = 'sqlite:///a'\n"
        "destination = 'nope'\ndevices = 0\n",
        "databases.app.destination",
        5,
        "no [destinations.nope] table (defined: local)",
    ),
]


@pytest.mark.parametrize(("text", "key", "line", "problem"), FIRST_PROBLEMS)
def test_the_first_problem_is_the_one_the_checks_meet_first(
    tmp_path: Path, text: str, key: str, line: int, problem: str
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(SettingsError) as caught:
        load_settings(path, env={})
    assert str(caught.value).splitlines()[0] == f"{path}, line {line}: {key}: {problem}"
    assert (caught.value.key, caught.value.source, caught.value.line) == (key, str(path), line)


@pytest.mark.parametrize(
    ("variable", "value", "problem"),
    [
        ("SERVICE__LISTEN", "8470", "expected 'HOST:PORT', got an integer"),
        (
            "SERVICE__JOB_HISTORY",
            "90",
            'expected a duration like "90d", or "forever", got an integer',
        ),
        ("DATABASES__APP__SCHEDULE", "5", "a cron expression is a string, not int"),
        ("DATABASES__APP__SCHEDULE", "2024-01-01", "a cron expression is a string, not date"),
        ("DATABASES__APP__COMPRESS", "3", 'expected a string like "zstd:3", got an integer'),
        (
            "DATABASES__APP__RETENTION__KEEP_WITHIN",
            "14",
            'expected a duration string like "14d", got an integer 14',
        ),
    ],
)
def test_env_values_of_keys_that_parse_text_are_toml(
    tmp_path: Path, variable: str, value: str, problem: str
) -> None:
    """Only keys that are plain strings take a variable's raw text; these parse it as TOML."""
    path = write(tmp_path, MINIMAL)
    name = f"VDISTREAM_{variable}"
    with pytest.raises(SettingsError) as caught:
        load_settings(path, env={name: value})
    key = variable.lower().replace("__", ".")
    assert str(caught.value) == f"environment variable {name}: {key}: {problem}"
    assert (caught.value.key, caught.value.source, caught.value.line) == (key, name, None)


def test_env_blank_values_of_those_keys_mean_not_set(tmp_path: Path) -> None:
    path = write(
        tmp_path, "[service]\nlisten = '127.0.0.1:1'\n" + MINIMAL + "schedule = '@daily'\n"
    )
    env = {f"VDISTREAM_{v}": "" for v in ("SERVICE__LISTEN", "DATABASES__APP__SCHEDULE")}
    settings = load_settings(path, env=env)
    assert settings.service.listen is None
    assert settings.databases["app"].schedule is None


def test_a_url_from_the_environment_is_checked_before_a_missing_destination() -> None:
    name = "VDISTREAM_DATABASES__APP__URL"
    with pytest.raises(SettingsError) as caught:
        load_settings(None, env={name: "5"})
    assert str(caught.value).splitlines()[0] == (
        f"environment variable {name}: databases.app.url: '5' is not a database URL "
        "(known schemes: sqlite:, postgresql: (postgres:), mssql: (sqlserver:), cmd:, "
        "external:)"
    )
    assert (caught.value.key, caught.value.source) == ("databases.app.url", name)


def test_only_loading_imports_pydantic() -> None:
    """The settings' types cost no pydantic import; ``load_settings`` brings it."""
    code = (
        "import sys\n"
        "import vdistream.service\n"
        "assert not [m for m in sys.modules if m.startswith('pydantic')]\n"
        "vdistream.service.load_settings(None, env={})\n"
        "assert 'pydantic' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_listen_needs_a_token(tmp_path: Path) -> None:
    path = write(tmp_path, "[service]\n\nlisten = '127.0.0.1:8470'\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}, line 3: service.listen: "):
        load_settings(path, env={})


def test_invalid_toml_names_the_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, "[service]\nmax_jobs = = 3\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}, line 2: not valid TOML"):
        load_settings(path, env={})


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "nope.toml", env={})


def test_token_file_must_be_private(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text(TOKEN)
    token.chmod(0o644)
    path = write(tmp_path, f"[service]\n# comment\ntoken_file = '{token}'\n")
    with pytest.raises(ConfigError, match=r"line 3: service.token_file: .*accessible to others"):
        load_settings(path, env={})
    token.chmod(0o600)
    assert load_settings(path, env={}).service.token == Secret(TOKEN)


def test_token_must_be_long_enough(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("short\n")
    token.chmod(0o600)
    path = write(tmp_path, f"[service]\ntoken_file = '{token}'\n")
    with pytest.raises(ConfigError, match=r"line 2: service\.token_file: .*at least 16"):
        load_settings(path, env={})
    with pytest.raises(ConfigError, match="VDISTREAM_API_TOKEN: the token must have"):
        load_settings(None, env={"VDISTREAM_API_TOKEN": "short"})


def test_the_key_file_must_hold_a_key(tmp_path: Path) -> None:
    key = tmp_path / "app.key"
    key.write_text("not a key, but a secret-looking text\n")
    text = MINIMAL + f'# the key\nencrypt_key_file = "{key}"\n'
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_settings(path, env={})
    message = str(caught.value)
    assert message.startswith(f"{path}, line {len(text.splitlines())}: ")
    assert "databases.app.encrypt_key_file: key file" in message
    assert "not a key" in message
    assert "secret-looking" not in message  # the content is never quoted
    key.write_text(os.urandom(32).hex())
    assert load_settings(path, env={}).databases["app"].encrypt_key_file == key


def test_token_from_env_wins_over_the_file(secrets_dir: Path) -> None:
    path = write(secrets_dir, f"[service]\ntoken_file = '{secrets_dir}/token'\n")
    other = "another-token-from-the-env"
    settings = load_settings(path, env={"VDISTREAM_API_TOKEN": other})
    assert settings.service.token == Secret(other)


def test_line_found_with_dotted_keys_quotes_and_comments(tmp_path: Path) -> None:
    text = (
        '# a comment mentioning devices = 1\n[databases."app"]\nurl = "sqlite:///a.db"\n'
        'destination = "local"\nnote = """\ndevices = 2\n"""\n'
    )
    path = write(tmp_path, MINIMAL.replace("[databases.app]", "[databases.other]") + text)
    with pytest.raises(ConfigError) as caught:
        load_settings(path, env={})
    # "note" is the unknown key; the multi-line string's content is not a key
    assert caught.value.line == len(MINIMAL.splitlines()) + 5  # type: ignore[attr-defined]
    assert "databases.app.note" in str(caught.value)
    text2 = MINIMAL.replace("[databases.app]\n", "[databases]\napp.devices = 'x'  # <--\n")
    text2 = text2.replace('url = "sqlite', 'app.url = "sqlite').replace(
        'destination = "local"', 'app.destination = "local"'
    )
    path = write(tmp_path, text2)
    with pytest.raises(ConfigError, match=rf"line {marked_line(text2)}: databases.app.devices"):
        load_settings(path, env={})


# --- errors from the environment -----------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"VDISTREAM_SERVICE__MAX_JOBS": "four"},
            "environment variable VDISTREAM_SERVICE__MAX_JOBS: service.max_jobs: "
            "expected an integer",
        ),
        (
            {"VDISTREAM_SERVICE__MAX_JOB": "4"},
            "environment variable VDISTREAM_SERVICE__MAX_JOB: service.max_job: unknown key",
        ),
        (
            {"VDISTREAM_SERVICE_MAX_JOBS": "4"},
            "VDISTREAM_SERVICE_MAX_JOBS: looks like an override but has no double underscore",
        ),
        ({"VDISTREAM_SERVIC__MAX_JOBS": "4"}, "'SERVIC' is not a settings table"),
        ({"VDISTREAM_DATABASES__APP": "4"}, "name a table and a key"),
        ({"VDISTREAM_SERVICE____X": "4"}, "empty part"),
        ({"VDISTREAM_DATABASES__APP__URL__X": "4"}, "databases.app.url is not a table"),
        (
            {"VDISTREAM_SERVICE__MAX_JOBS__X": "4"},
            "VDISTREAM_SERVICE__MAX_JOBS__X: service.max_jobs: expected an integer",
        ),
        (
            {"VDISTREAM_DATABASES__APP__SCHEDULE": "0 25 * * *"},
            "VDISTREAM_DATABASES__APP__SCHEDULE: databases.app.schedule: hour field: 25",
        ),
        (
            {"VDISTREAM_DATABASES__APP__DESTINATION": "elsewhere"},
            "VDISTREAM_DATABASES__APP__DESTINATION: databases.app.destination: no "
            "[destinations.elsewhere]",
        ),
        (
            {"VDISTREAM_SERVICE__LISTEN": "10.1.1.1:80"},
            "VDISTREAM_SERVICE__LISTEN: service.listen: 10.1.1.1 is not a loopback",
        ),
        (
            {"VDISTREAM_SERVICE__SOCKET_MODE": "0777"},
            "VDISTREAM_SERVICE__SOCKET_MODE: service.socket_mode: mode 0o777",
        ),
        (
            {"VDISTREAM_DATABASES__NEW__DEVICES": "3"},
            "environment variable VDISTREAM_DATABASES__NEW__DEVICES: databases.new.url: missing",
        ),
    ],
)
def test_bad_env_names_the_variable(tmp_path: Path, env: dict[str, str], message: str) -> None:
    path = write(tmp_path, MINIMAL)
    with pytest.raises(ConfigError) as caught:
        load_settings(path, env=env)
    assert message in str(caught.value)


# --- secrets -------------------------------------------------------------------------------


def test_secrets_stay_out_of_repr_str_and_summary(secrets_dir: Path) -> None:
    path = write(secrets_dir, full_text(secrets_dir))
    settings = load_settings(path, env={})
    for text in (
        repr(settings),
        str(settings),
        repr(settings.service),
        str(settings_summary(settings)),
    ):
        assert TOKEN not in text
        assert PASSWORD not in text
    assert repr(settings.service.token) == "Secret('********')"
    assert str(settings.service.token) == "Secret('********')"
    billing = settings.databases["billing"]
    assert PASSWORD in billing.url  # the engine needs it
    assert PASSWORD not in repr(billing)
    assert settings_summary(settings)["service"]["token"] == "set"


def test_secret_destination_url_is_masked(tmp_path: Path) -> None:
    text = MINIMAL.replace('"/var/backups/x"', '"s3://AKIAKEY:very-secret@bucket/x"')
    settings = load_settings(write(tmp_path, text), env={})
    local = settings.destinations["local"]
    assert local.display_url == "s3://AKIAKEY:***@bucket/x"
    assert "very-secret" not in repr(settings)
    assert "very-secret" not in str(settings_summary(settings))


def test_settings_are_frozen(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, MINIMAL), env={})
    with pytest.raises(AttributeError):
        settings.service = ServiceSettings()  # type: ignore[misc]
    with pytest.raises(TypeError):
        settings.databases["x"] = settings.databases["app"]  # type: ignore[index]


def test_postgres_files_mode_is_a_setting(tmp_path: Path) -> None:
    text = MINIMAL.replace("sqlite:///srv/app.db", "postgresql://h/db") + 'mode = "files"\n'
    settings = load_settings(write(tmp_path, text), env={})
    assert settings.databases["app"].mode == "files"
