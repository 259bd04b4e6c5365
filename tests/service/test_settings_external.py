"""Settings of ``external:NAME`` databases: the set's name, where the daemon publishes
it (``service.runtime_dir``, ``service.runtime_group``), how long it waits
(``connect_timeout``), and the errors that say where."""

from __future__ import annotations

import grp
import os
from pathlib import Path

import pytest

from vdistream.engines.databases import resolve_source
from vdistream.service import SettingsError, load_settings, settings_summary
from vdistream.service.settings import DAEMON_RUNTIME_DIR

BASE = """\
[destinations.local]
url = "backups"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "vdistream.toml"
    path.write_text(BASE + text)
    return path


def test_an_external_database_waits_in_the_daemons_runtime_directory(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
[databases.feed]
url = "external:nightly"
destination = "local"
devices = 8
connect_timeout = "5m"
""",
    )
    settings = load_settings(path, env={})
    database = settings.databases["feed"]
    assert (database.kind, database.url, database.external_name) == (
        "external",
        "external:nightly",
        "nightly",
    )
    assert database.connect_timeout == 300.0
    assert database.devices == 8
    assert settings.service.runtime_dir == DAEMON_RUNTIME_DIR == Path("/run/vdistream")
    assert settings.service.runtime_group is None
    summary = settings_summary(settings)
    assert summary["databases"]["feed"]["kind"] == "external"
    assert summary["databases"]["feed"]["connect_timeout"] == 300.0
    assert summary["service"]["runtime_dir"] == "/run/vdistream"
    # the operations resolve the same URL to the same source
    source = resolve_source(database.url)
    assert (source.kind, source.mode, source.display) == ("external", None, "external:nightly")


def test_the_runtime_directory_and_group_are_configurable(tmp_path: Path) -> None:
    group = grp.getgrgid(os.getgid()).gr_name
    path = write(
        tmp_path,
        f"""
[service]
runtime_dir = "run"
runtime_group = "{group}"

[databases.feed]
url = "external:nightly"
destination = "local"
""",
    )
    settings = load_settings(path, env={})
    assert settings.service.runtime_dir == tmp_path / "run"  # relative to the file
    assert settings.service.runtime_group == group
    assert settings.databases["feed"].connect_timeout == 60.0  # the default
    from_env = load_settings(
        path, env={"VDISTREAM_DATABASES__FEED__CONNECT_TIMEOUT": "2.5"}
    ).databases["feed"]
    assert from_env.connect_timeout == 2.5


@pytest.mark.parametrize(
    ("text", "key", "problem"),
    [
        (
            '[databases.a]\nurl = "external:"\ndestination = "local"\n',
            "databases.a.url",
            "names no set",
        ),
        (
            '[databases.a]\nurl = "external:a/b"\ndestination = "local"\n',
            "databases.a.url",
            "no '/'",
        ),
        (
            '[databases.a]\nurl = "cmd:cat x"\ndestination = "local"\nconnect_timeout = 5\n',
            "databases.a.connect_timeout",
            "only external:NAME databases wait for an engine",
        ),
        (
            '[databases.a]\nurl = "external:n"\ndestination = "local"\nconnect_timeout = 0\n',
            "databases.a.connect_timeout",
            "more than 0 seconds",
        ),
        (
            '[service]\nruntime_group = "no-such-group-here"\n',
            "service.runtime_group",
            "no group 'no-such-group-here'",
        ),
        (
            f'[service]\nruntime_dir = "/{"d" * 100}"\n'
            '[databases.a]\nurl = "external:n"\ndestination = "local"\n',
            "databases.a.url",
            "longer than 107 bytes",
        ),
    ],
)
def test_bad_external_settings_name_the_key(
    tmp_path: Path, text: str, key: str, problem: str
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(SettingsError) as caught:
        load_settings(path, env={})
    assert caught.value.key == key, str(caught.value)
    assert problem in str(caught.value)
    assert str(caught.value).startswith(f"{path}, line ")
