"""SQL Server databases in the daemon without a server: requests carry a ``mode``, the
schedules fire one backup per kind (full before log), the jobs and the metrics say
which kind, and the API shows every schedule. (``test_sqlserver_daemon`` runs the same
against the stand-in SQL Server.)"""

from __future__ import annotations

import dataclasses
import functools
import io
import itertools
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import pytest
from prometheus_client import CollectorRegistry

from tests.daemon.conftest import Daemon, make_sqlite, wait_for
from vdistream.cli import main
from vdistream.cli.daemon import submit_backup_to_daemon
from vdistream.service import JobState, Service, Settings, load_settings
from vdistream.service.admission import Admission, _same_url
from vdistream.service.daemon import _schedules
from vdistream.service.jobs import InvalidRequestError, JobRequest
from vdistream.service.state import JobType

pytestmark = pytest.mark.timeout(60)

PASSWORD = "Sql-Pa55word"
#: Nothing listens on port 1 and this sqlcmd does not exist: every backup fails at once.
SQL_URL = "mssql://sa@127.0.0.1:1/erp?trigger=sqlcmd"


def settings_with_sql_server(tmp_path: Path, *, schedules: dict[str, str]) -> Settings:
    source = make_sqlite(tmp_path / "app.db", rows=100)
    lines = [
        "[service]",
        f'state_dir = "{tmp_path / "state"}"',
        'timezone = "UTC"',
        "[destinations.local]",
        f'url = "{tmp_path / "backups"}"',
        "[databases.app]",
        f'url = "sqlite://{source}"',
        'destination = "local"',
        "[databases.sql]",
        f'url = "{SQL_URL}"',
        'destination = "local"',
        "devices = 2",
        *(f'{key} = "{cron}"' for key, cron in schedules.items()),
    ]
    config = tmp_path / "vdistream.toml"
    config.write_text("\n".join(lines) + "\n")
    return load_settings(config, env={"VDISTREAM_MSSQL_PASSWORD": PASSWORD})


def no_sqlcmd(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The jobs find the password (in the process's environment, as ``vdistream
    serve``'s), and a sqlcmd and a libsqlvdi.so that do not exist: they fail before
    any set is made (``missing``)."""
    monkeypatch.setenv("VDISTREAM_MSSQL_PASSWORD", PASSWORD)
    monkeypatch.setenv("VDISTREAM_SQLCMD", str(tmp_path / "no-sqlcmd"))
    monkeypatch.setenv("VDISTREAM_SQLVDI", str(tmp_path / "no-libsqlvdi.so"))


def missing(error: str | None, tmp_path: Path) -> bool:
    """Whether ``error`` names the missing sqlcmd or library of ``no_sqlcmd``."""
    return any(str(tmp_path / name) in str(error) for name in ("no-sqlcmd", "no-libsqlvdi.so"))


# --- requests ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"kind": "backup", "database": "sql", "mode": "weekly"}, "mode 'weekly' is not a SQL"),
        ({"kind": "backup", "database": "sql", "mode": 3}, "'mode' must be a string"),
        ({"kind": "verify", "database": "sql", "mode": "log"}, "unknown field 'mode'"),
        ({"kind": "restore", "database": "sql", "target": "/x", "mode": "log"}, "unknown field"),
    ],
)
def test_a_mode_is_a_sql_server_backups(body: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidRequestError, match=re.escape(message)):
        JobRequest.from_json(body)
    with pytest.raises(InvalidRequestError, match="'mode' is for backups, not for a verify"):
        JobRequest(JobType.VERIFY, "sql", mode="log")


def test_admission_sets_full_and_refuses_a_mode_for_the_other_engines(tmp_path: Path) -> None:
    settings = settings_with_sql_server(tmp_path, schedules={})
    admission = Admission()
    request, _ = admission.resolve(settings, JobRequest(JobType.BACKUP, "sql"))
    assert request.mode == "full"
    assert request.params() == {"trigger": "api", "mode": "full"}
    log = JobRequest.from_json({"kind": "backup", "database": "sql", "mode": "log"})
    assert admission.resolve(settings, log)[0].mode == "log"
    job = admission.admit(settings, *admission.resolve(settings, log))
    assert job.record.params == {"trigger": "api", "mode": "log", "destination": "local"}
    verify, _ = admission.resolve(settings, JobRequest(JobType.VERIFY, "sql"))
    assert verify.mode is None
    with pytest.raises(InvalidRequestError, match="'mode' 'diff' is for SQL Server databases"):
        admission.resolve(settings, JobRequest(JobType.BACKUP, "app", mode="diff"))
    # backup --daemon SOURCE DEST: the same server and database, whatever the password
    by_source = JobRequest(
        JobType.BACKUP, "", source="mssql://sa:other@127.0.0.1:1/erp", destination="local"
    )
    assert admission.resolve(settings, by_source)[1].name == "sql"


@pytest.mark.parametrize(
    ("given", "same"),
    [
        ("mssql://sa@127.0.0.1:1/erp", True),
        ("sqlserver://sa:pw@127.0.0.1:1/erp?trigger=tds", True),
        ("mssql://sa@127.0.0.1:1433/erp", False),
        ("mssql://sa@127.0.0.1:1/erp2", False),
        ("mssql://other@127.0.0.1:1/erp", False),
        ("sqlite:///erp", False),
    ],
)
def test_sql_server_urls_meet_by_server_and_database(given: str, same: bool) -> None:
    assert _same_url(SQL_URL, given) is same


def test_a_restore_targets_password_is_not_stored() -> None:
    request = JobRequest(JobType.RESTORE, "sql", target="mssql://sa:pa@ss/w@rd@h:1/new")
    assert request.params()["target"] == "mssql://sa:***@h:1/new"
    assert request.target == "mssql://sa:pa@ss/w@rd@h:1/new"  # the job needs it


# --- schedules --------------------------------------------------------------------------


def test_one_schedule_per_kind_named_so_that_full_fires_first(tmp_path: Path) -> None:
    settings = settings_with_sql_server(
        tmp_path,
        schedules={
            "schedule_log": "*/15 * * * *",
            "schedule": "0 2 * * *",
            "schedule_diff": "0 */6 * * *",
        },
    )
    found = _schedules(settings)
    assert {name: (db, kind) for name, (_, db, kind) in found.items()} == {
        "sql": ("sql", "full"),
        "sql:diff": ("sql", "diff"),
        "sql:log": ("sql", "log"),
    }
    # the scheduler fires simultaneous schedules by name: full, diff, log
    assert sorted(found) == ["sql", "sql:diff", "sql:log"]


@pytest.mark.asyncio
async def test_full_and_log_fire_together_full_first_each_recorded_with_its_mode(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """1. ``schedule`` and ``schedule_log`` both ``* * * * *``, the clock 60 times fast.
    2. Each minute submits a full then a log backup (the database's max_jobs queues the
       log behind the full); both fail here (no server), each recorded with its mode.
    3. The metric counts them by mode; the API and ``next_fires`` show both kinds;
       the password is nowhere in the API's answer."""
    no_sqlcmd(monkeypatch, tmp_path)
    settings = settings_with_sql_server(
        tmp_path, schedules={"schedule": "* * * * *", "schedule_log": "* * * * *"}
    )
    registry = CollectorRegistry()
    async with Service(settings, registry=registry, schedule_speedup=60) as service:
        fires = service.next_fires()
        assert list(fires) == ["sql"]
        assert list(fires["sql"]) == ["full", "log"]
        assert fires["sql"]["full"] == fires["sql"]["log"]

        async def four_ended() -> list[Any]:
            jobs = await service.jobs(kind="backup", state=JobState.FAILED)
            return jobs if len(jobs) >= 4 else []

        await wait_for(four_ended, timeout=30, what="four scheduled backups")
        async with (
            aiohttp.ClientSession(
                connector=aiohttp.UnixConnector(path=str(settings.service.socket_path))
            ) as http,
            http.get("http://vdistream/v1/databases") as response,
        ):
            text = await response.text()
            rows = {row["name"]: row for row in (await response.json())["databases"]}
        metrics = (await service.metrics_text()).decode()
        jobs = sorted(await service.jobs(kind="backup"), key=lambda j: j.created)
        verifications = await service.jobs(kind="verify")
    assert PASSWORD not in text
    sql = rows["sql"]
    assert (sql["kind"], sql["url"]) == ("mssql", SQL_URL)
    assert (sql["schedule"], sql["schedule_diff"], sql["schedule_log"]) == (
        "* * * * *",
        None,
        "* * * * *",
    )
    assert list(sql["next_backups"]) == ["full", "log"]
    assert rows["app"]["next_backups"] == {}
    ended = [j for j in jobs if j.state is JobState.FAILED]
    modes = [j.params["mode"] for j in ended]
    assert modes[:4] == ["full", "log", "full", "log"], modes
    assert all(j.params["trigger"] == "schedule" for j in jobs)
    assert all(j.ended is not None for j in ended)
    for first, second in itertools.pairwise(ended):  # one at a time, FIFO
        assert first.ended is not None
        assert second.started is not None
        assert second.started >= first.ended
    assert missing(ended[0].error, tmp_path), ended[0].error
    assert PASSWORD not in str(ended[0].error)
    for mode in ("full", "log"):
        counted = registry.get_sample_value(
            "vdistream_sqlserver_backups_total",
            {"database": "sql", "mode": mode, "outcome": "failed"},
        )
        assert counted is not None, (mode, metrics)
        assert counted >= 2, (mode, metrics)
    assert not verifications  # a failed backup is not verified


@pytest.mark.asyncio
async def test_a_submitted_mode_is_recorded_and_the_other_engines_refuse_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    no_sqlcmd(monkeypatch, tmp_path)
    settings = settings_with_sql_server(tmp_path, schedules={})
    async with Service(settings, api=False) as service:
        assert service.next_fires() == {}
        record = await service.submit("backup", "sql", mode="copy-only")
        assert record.params["mode"] == "copy-only"
        ended = await service.wait(record.id)
        assert ended.state is JobState.FAILED
        assert missing(ended.error, tmp_path), ended.error
        with pytest.raises(InvalidRequestError, match="is for SQL Server databases"):
            await service.submit("backup", "app", mode="log")
        plain = await service.submit("backup", "app", verify=False)
        assert "mode" not in plain.params
        assert (await service.wait(plain.id)).state is JobState.SUCCEEDED
    assert dataclasses.asdict(ended)["params"]["mode"] == "copy-only"


# --- the command line -------------------------------------------------------------------


def test_the_command_line_asks_for_a_mode_and_shows_the_schedules(
    daemon_factory: Callable[..., Daemon], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``submit backup --mode log`` and ``submit_backup_to_daemon(..., mode=)`` send the
    mode (refused for a SQLite database: exit 2); ``status`` shows the next backups by
    kind. The daemon runs in its own process, its password in its environment."""
    source = make_sqlite(tmp_path / "app.db", rows=100)
    daemon = daemon_factory(
        {
            "app": {"url": f"sqlite://{source}"},
            "sql": {"url": SQL_URL, "schedule": "0 2 * * *", "schedule_log": "*/15 * * * *"},
        },
        env={
            "VDISTREAM_MSSQL_PASSWORD": PASSWORD,
            "VDISTREAM_SQLCMD": str(tmp_path / "no-sqlcmd"),
            "VDISTREAM_SQLVDI": str(tmp_path / "no-libsqlvdi.so"),
        },
    ).start()
    socket = ["--socket", str(daemon.socket)]
    assert main(["submit", "backup", "sql", "--mode", "log", "--wait", "--json", *socket]) == 1
    job = json.loads(capsys.readouterr().out)
    assert (job["state"], job["params"]["mode"]) == ("failed", "log")
    assert main(["submit", "backup", "sql", "--mode", "weekly", *socket]) == 2
    assert "'weekly' is not one of" in capsys.readouterr().err

    out, err = io.StringIO(), io.StringIO()
    backup = functools.partial(submit_backup_to_daemon, str(daemon.socket), stdout=out, stderr=err)
    assert anyio.run(functools.partial(backup, "app", None, None, mode="log")) == 2
    assert "'mode' 'log' is for SQL Server databases" in err.getvalue()
    code = anyio.run(functools.partial(backup, "sql", None, None, mode="diff", wait=False))
    assert code == 0, err.getvalue()
    status, body = daemon.get(f"/v1/jobs/{out.getvalue().split()[-1]}")
    assert status == 200
    assert json.loads(body)["params"]["mode"] == "diff"

    assert main(["status", *socket]) == 0
    shown = capsys.readouterr().out
    assert re.search(r"next backups of sql: full \S+T02:00:00\+00:00, log \S+", shown), shown
    assert main(["status", "--json", *socket]) == 0
    status = json.loads(capsys.readouterr().out)
    assert list(status["next_backups"]["sql"]) == ["full", "log"]
    assert "app" not in status["next_backups"]
    assert daemon.stop() == 0
    stored = [r for r in daemon.jobs_in_state_db() if r["kind"] == "backup"]
    assert [json.loads(r["params"])["mode"] for r in stored] == ["log", "diff"]
    assert PASSWORD not in daemon.log.read_text()
    assert PASSWORD not in json.dumps(stored)


@pytest.mark.asyncio
async def test_a_schedule_whose_backup_is_still_queued_is_not_queued_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full that runs long (here: a sqlcmd that never answers) keeps the database's one
    slot; a log schedule firing three times behind it queues one log backup, not three."""
    from datetime import UTC, datetime

    from standin.sqlvdi.build import build

    libs = build(tmp_path / "libs")
    hang = tmp_path / "sqlcmd"
    hang.write_text("#!/bin/sh\nexec sleep 600\n")
    hang.chmod(0o755)
    monkeypatch.setenv("VDISTREAM_MSSQL_PASSWORD", PASSWORD)
    monkeypatch.setenv("VDISTREAM_SQLCMD", str(hang))
    monkeypatch.setenv("VDISTREAM_SQLVDI", str(libs.client))
    settings = settings_with_sql_server(tmp_path, schedules={"schedule_log": "0 0 1 1 *"})
    async with Service(settings, api=False) as service:
        full = await service.submit("backup", "sql")

        async def running() -> bool:
            return bool((await service.job(full.id))["state"] == JobState.RUNNING.value)

        await wait_for(running, timeout=20, what="the full backup running")
        for _ in range(3):
            await service._on_schedule("sql:log", datetime.now(UTC))
        queued = [j for j in await service.jobs(kind="backup") if j.id != full.id]
        assert [j.params["mode"] for j in queued] == ["log"]
        assert queued[0].state is JobState.QUEUED
