"""The daemon's command line: ``serve --check``, ``status``, ``jobs``, ``job``, ``abort``,
``submit``, ``prune``, and ``submit_backup_to_daemon`` (``vdistream backup --daemon``)."""

from __future__ import annotations

import io
import json
import os
import re
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import anyio
import pytest

from tests.daemon.conftest import REPO, Daemon, make_sqlite, slow_url, wait_job
from vdistream.cli import main
from vdistream.cli.daemon import submit_backup_to_daemon
from vdistream.operations import BackupSettings, run_backup

pytestmark = pytest.mark.timeout(90)


def _run(*argv: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vdistream", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        check=False,
    )


def test_client_commands_against_a_running_daemon(
    daemon_factory: Callable[..., Daemon],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``submit backup --wait``, ``jobs``, ``job``, ``abort`` and ``status`` through the
    socket, with their exit codes; ``serve --check`` prints the settings."""
    source = make_sqlite(tmp_path / "app.db")
    daemon = daemon_factory(
        {"app": {"url": f"sqlite://{source}"}, "slow": {"url": slow_url()}}
    ).start()
    socket = ["--socket", str(daemon.socket)]

    assert main(["submit", "backup", "app", "--wait", "--no-verify", *socket]) == 0
    out = capsys.readouterr()
    assert "backup of app, succeeded" in out.out
    assert "device 1:" in out.out
    assert re.search(r"logical [0-9,]+ bytes, stored [0-9,]+ bytes", out.out), out.out

    done = _run("jobs", "--json", *socket)
    assert done.returncode == 0, done.stderr
    (job,) = json.loads(done.stdout)
    assert job["state"] == "succeeded"
    assert job["params"]["verify"] is False
    listed = _run("jobs", *socket)
    stored, logical = job["result"]["bytes"], job["result"]["logical_bytes"]
    assert f"logical {logical:,} bytes, stored {stored:,} bytes" in listed.stdout

    assert main(["job", job["id"], "--json", *socket]) == 0
    assert json.loads(capsys.readouterr().out)["backup_id"] == job["backup_id"]
    assert main(["job", "nope", *socket]) == 2
    assert "job_not_found" in capsys.readouterr().err

    assert main(["submit", "backup", "slow", "--json", *socket]) == 0
    slow = json.loads(capsys.readouterr().out)
    assert main(["abort", slow["id"], "--reason", "from the CLI", *socket]) == 0
    assert "abort requested" in capsys.readouterr().out
    assert main(["job", slow["id"], "--follow", *socket]) == 1  # it ends aborted
    assert "from the CLI" in capsys.readouterr().out

    assert main(["submit", "backup", "nope", *socket]) == 2
    assert "unknown_database" in capsys.readouterr().err
    assert main(["status", *socket]) == 0
    assert "ready, 0 running, 0 queued" in capsys.readouterr().out
    assert daemon.stop() == 0
    assert main(["status", *socket]) == 1
    assert "cannot reach the vdistream daemon" in capsys.readouterr().err

    check = _run("serve", "--config", str(daemon.config), "--check")
    assert check.returncode == 0, check.stderr
    assert set(json.loads(check.stdout)["databases"]) == {"app", "slow"}
    bad = tmp_path / "bad.toml"
    bad.write_text("[service]\nmax_jobs = 'two'\n")
    refused = _run("serve", "--config", str(bad))
    assert refused.returncode == 2
    assert "line 2: service.max_jobs" in refused.stderr


@pytest.mark.asyncio
async def test_submit_backup_to_daemon_by_name_or_by_source_and_destination(
    daemon_factory: Callable[..., Daemon], tmp_path: Path
) -> None:
    """The function ``vdistream backup --daemon`` calls: a configured database by name,
    or by the same source and destination as ``vdistream backup`` takes; a source the
    settings do not name is refused (2); no daemon is an error (1)."""
    source = make_sqlite(tmp_path / "app.db")
    daemon = daemon_factory({"app": {"url": f"sqlite://{source}"}}).start()
    out, err = io.StringIO(), io.StringIO()
    code = await submit_backup_to_daemon(
        str(daemon.socket), "app", None, None, stdout=out, stderr=err
    )
    assert code == 0, err.getvalue()
    backup_id = out.getvalue().strip()  # stdout: the bare id, as `ID=$(vdistream backup ...)`
    assert out.getvalue() == backup_id + "\n"
    assert (daemon.dest / backup_id / "manifest.json").is_file()
    assert f"backup {backup_id} complete: logical " in err.getvalue()
    assert "bytes, stored " in err.getvalue()
    assert "manifest file://" in err.getvalue()

    out, err = io.StringIO(), io.StringIO()
    code = await submit_backup_to_daemon(
        str(daemon.socket),
        None,
        f"sqlite://{source}",
        str(daemon.dest),
        json_output=True,
        stdout=out,
        stderr=err,
    )
    assert code == 0, err.getvalue()
    result = json.loads(out.getvalue())
    assert result["state"] == "succeeded"
    assert result["database"] == "app"

    code = await submit_backup_to_daemon(
        str(daemon.socket), None, "sqlite:///elsewhere.db", str(daemon.dest), stderr=err
    )
    assert code == 2
    assert "no configured database backs up" in err.getvalue()
    async with daemon.client() as client:
        for job in await client.jobs(state="queued,running"):
            await wait_job(client, job["id"])
    assert daemon.stop() == 0
    code = await submit_backup_to_daemon(str(daemon.socket), "app", None, None, stderr=err)
    assert code == 1
    assert "cannot reach" in err.getvalue()


def test_backup_daemon_through_the_command_line(
    daemon_factory: Callable[..., Daemon], tmp_path: Path
) -> None:
    """``vdistream backup --daemon`` as a user types it: by database name, and by the
    same SOURCE DEST as an in-process backup; an option the daemon takes from its
    settings is refused (2) instead of being silently ignored."""
    source = make_sqlite(tmp_path / "app.db")
    daemon = daemon_factory({"app": {"url": f"sqlite://{source}", "verify_after_backup": False}})
    daemon.start()
    socket = ["--socket", str(daemon.socket)]

    by_name = _run("backup", "app", "--daemon", "--json", *socket)
    assert by_name.returncode == 0, by_name.stderr
    first = json.loads(by_name.stdout)
    assert first["state"] == "succeeded"
    assert (daemon.dest / first["backup_id"] / "manifest.json").is_file()

    by_urls = _run("backup", f"sqlite://{source}", str(daemon.dest), "--daemon", *socket)
    assert by_urls.returncode == 0, by_urls.stderr
    backup_id = by_urls.stdout.strip()
    assert (daemon.dest / backup_id / "manifest.json").is_file()
    assert by_urls.stderr.splitlines() == [by_urls.stderr.strip()]  # one line: the summary
    assert "complete: logical " in by_urls.stderr

    queued = _run("backup", "app", "--daemon", "--no-wait", "--json", *socket)
    assert queued.returncode == 0, queued.stderr
    assert json.loads(queued.stdout)["state"] in ("queued", "running", "succeeded")

    refused = _run("backup", "app", "--daemon", "--devices", "8", *socket)
    assert refused.returncode == 2
    assert "--devices cannot be used with --daemon" in refused.stderr
    no_dest = _run("backup", f"sqlite://{source}")
    assert no_dest.returncode == 2
    assert "needs a destination" in no_dest.stderr
    assert daemon.stop() == 0
    backups = [p.name for p in daemon.dest.iterdir() if (p / "manifest.json").is_file()]
    assert len(backups) == 3


def test_prune_by_hand_with_and_without_verified_state(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``vdistream prune DEST``, no daemon: unverified backups are never deleted;
    ``--verify`` verifies them first; ``--dry-run`` deletes nothing; a real run
    deletes the older backups (manifest first) and keeps the newest."""
    source = make_sqlite(tmp_path / "app.db", rows=500)
    dest = tmp_path / "dest"
    ids = [f"app.2024010{i}T000000Z-0000000{i}" for i in range(1, 4)]

    async def make() -> None:
        for backup_id in ids:
            outcome = await run_backup(
                f"sqlite://{source}", str(dest), BackupSettings(devices=2, backup_id=backup_id)
            )
            assert outcome.ok
            await anyio.sleep(1.01)  # manifests record whole seconds: distinct end times

    anyio.run(make)
    assert main(["prune", str(dest), "--keep-last", "1", "--json"]) == 0
    (group,) = json.loads(capsys.readouterr().out)["groups"]
    assert group["delete"] == []
    assert {r["reasons"][0] for r in group["keep"]} == {
        "no verified backup yet: nothing is deleted"
    }

    assert main(["prune", str(dest), "--keep-last", "1", "--verify", "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "database app: keep_last=1, keep_within=-" in text
    # durations are shown as written, never as seconds
    assert main(["prune", str(dest), "--keep-within", "14d", "--dry-run"]) == 0
    assert "database app: keep_last=-, keep_within=14d" in capsys.readouterr().out
    assert main(["prune", str(dest), "--keep-within", "1d12h", "--dry-run"]) == 0
    assert "keep_within=1d12h" in capsys.readouterr().out
    assert "dry run: 2 backup(s) would be deleted" in text
    assert sorted(p.name for p in dest.iterdir()) == ids

    # retention reads the manifests' end times (seconds ago), not the ids' dates
    assert main(["prune", str(dest), "--keep-within", "1h", "--keep-last", "1", "--verify"]) == 0
    assert "0 backup(s) deleted" in capsys.readouterr().out
    assert sorted(p.name for p in dest.iterdir()) == ids
    assert main(["prune", str(dest), "--keep-last", "1", "--verify", "--json"]) == 0
    (group,) = json.loads(capsys.readouterr().out)["groups"]
    assert sorted(group["deleted"]) == ids[:2]
    assert [p.name for p in dest.iterdir()] == [ids[2]]
    assert main(["prune", str(dest)]) == 2
    assert "no retention rule" in capsys.readouterr().err


def test_relative_paths_are_the_clients(
    daemon_factory: Callable[..., Daemon], tmp_path: Path
) -> None:
    """``submit restore app rel.db`` restores into the client's directory, not the
    daemon's (which is the repository here); so does ``backup --daemon`` with a
    relative DEST and a ``sqlite:`` source relative to the client."""
    source = make_sqlite(tmp_path / "app.db")
    daemon = daemon_factory({"app": {"url": f"sqlite://{source}", "verify_after_backup": False}})
    daemon.start()
    client_dir = tmp_path / "client"
    client_dir.mkdir()
    socket = ["--socket", str(daemon.socket)]

    def run_here(*argv: str) -> subprocess.CompletedProcess[str]:
        return _run(*argv, cwd=client_dir)

    relative_dest = os.path.relpath(daemon.dest, client_dir)
    made = run_here("backup", "sqlite:../app.db", relative_dest, "--daemon", *socket)
    assert made.returncode == 0, made.stderr
    restored = run_here("submit", "restore", "app", "rel.db", "--wait", *socket)
    assert restored.returncode == 0, restored.stderr
    assert (client_dir / "rel.db").is_file()
    assert not (REPO / "rel.db").exists()
    with sqlite3.connect(client_dir / "rel.db") as db:
        assert db.execute("SELECT count(*) FROM items").fetchone() == (20_000,)
    db.close()
    assert daemon.stop() == 0
