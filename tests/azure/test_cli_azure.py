"""The command line against Azurite: a SQLite backup to ``azure://``, verified and
restored; an aborted and a killed backup leave no backup, and ``storage audit`` finds
and removes what the killed one left; bad credentials and a missing container are one
clear line each."""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from azure.storage.blob import ContainerSasPermissions, generate_container_sas

from tests.azure.azurite import Azurite
from tests.cli.test_cli import vdistream

#: more than one 8 MiB block (the default) in a one-device backup
DB_BYTES = 12 << 20
#: a producer of more than one block for one device
MORE_THAN_A_BLOCK = "head -c 9000000 /dev/urandom"


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vdistream", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


def make_database(path: Path) -> list[tuple[int, bytes]]:
    rng = random.Random(16)
    rows = [(i, rng.randbytes(1 << 20)) for i in range(DB_BYTES >> 20)]
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, data BLOB)")
        db.executemany("INSERT INTO t VALUES (?, ?)", rows)
    return rows


def test_sqlite_backup_verify_restore_through_azure(azurite: Azurite, tmp_path: Path) -> None:
    rows = make_database(tmp_path / "app.db")
    container = azurite.new_container()
    dest = azurite.url(container, "db1")
    summary = json.loads(
        vdistream("backup", f"sqlite://{tmp_path}/app.db", dest, "--devices", "1", "--json").stdout
    )
    assert summary["status"] == "succeeded"
    backup_id = summary["id"]

    manifest = json.loads(azurite.get(container, f"db1/{backup_id}/manifest.json"))
    assert len(manifest["devices"]) == 1
    for device in manifest["devices"]:  # what Azure holds is what the manifest promises
        stored = azurite.get(container, f"db1/{device['key']}")
        assert len(stored) == device["bytes"]
        assert hashlib.sha256(stored).hexdigest() == device["sha256"]
    staged = [
        len(azurite.service.get_blob_client(container, f"db1/{d['key']}").get_block_list()[0])
        for d in manifest["devices"]
    ]
    assert staged == [2], staged  # the stream went up as two staged blocks
    assert azurite.blobs(container, uncommitted=True) == []
    assert azurite.blobs(container) == sorted(
        [f"db1/{backup_id}/manifest.json", *(f"db1/{d['key']}" for d in manifest["devices"])]
    )  # the owner mark is gone

    listed = json.loads(vdistream("list", dest, "--json").stdout)
    assert [row["id"] for row in listed] == [backup_id]
    ref = azurite.url(container, f"db1/{backup_id}")
    assert json.loads(vdistream("verify", ref, "--json").stdout)["status"] == "verified"
    vdistream("restore", ref, f"sqlite://{tmp_path}/restored.db")
    with sqlite3.connect(tmp_path / "restored.db") as db:
        restored = db.execute("SELECT id, data FROM t ORDER BY id").fetchall()
    assert [(i, hashlib.sha256(d).digest()) for i, d in restored] == [
        (i, hashlib.sha256(d).digest()) for i, d in rows
    ]

    again = run("backup", f"sqlite://{tmp_path}/app.db", dest, "--id", backup_id)
    assert again.returncode == 1
    assert again.stderr.count("\n") == 1, again.stderr
    assert f"backup {backup_id} already exists in azure://" in again.stderr


def test_an_aborted_backup_leaves_nothing(azurite: Azurite) -> None:
    container = azurite.new_container()
    dest = azurite.url(container, "db")
    failing = f"cmd:sh -c '{MORE_THAN_A_BLOCK}; exit 3'"
    done = run("backup", failing, dest, "--devices", "1")
    assert done.returncode == 1, done.stderr
    assert done.stderr.count("\n") == 1, done.stderr
    assert azurite.blobs(container) == []
    assert azurite.blobs(container, uncommitted=True) == []
    assert run("storage", "audit", dest, "--min-age", "0").returncode == 0


def test_a_killed_backup_is_no_backup_and_the_audit_removes_its_debris(
    azurite: Azurite, tmp_path: Path
) -> None:
    container = azurite.new_container()
    dest = azurite.url(container, "db")
    producer = f"cmd:sh -c '{MORE_THAN_A_BLOCK}; sleep 60'"
    backup = subprocess.Popen(
        [sys.executable, "-m", "vdistream", "backup", producer, dest, "--devices", "1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not azurite.blobs(container, uncommitted=True):  # blocks staged, not committed
            assert backup.poll() is None, "the backup ended before it was killed"
            assert time.monotonic() < deadline, "no block was staged within 60 s"
            time.sleep(0.1)
    finally:
        os.killpg(backup.pid, signal.SIGKILL)  # the backup and its producer
        backup.wait()

    assert json.loads(vdistream("list", dest, "--json").stdout) == []
    (backup_id,) = {name.split("/")[1] for name in azurite.blobs(container, uncommitted=True)}
    assert f"db/{backup_id}/.vdistream-owner.json" in azurite.blobs(container)

    found = run("storage", "audit", dest, "--min-age", "0", "--json")
    assert found.returncode == 3, found.stderr  # debris found, not removed
    report = json.loads(found.stdout)
    assert report["orphan_uploads"]
    assert all(up["key"].startswith(f"{backup_id}/") for up in report["orphan_uploads"])
    assert report["temporaries"] == [f"{backup_id}/.vdistream-owner.json"]
    assert f"`vdistream storage audit {dest} --clean` removes them" in found.stderr

    cleaned = run("storage", "audit", dest, "--min-age", "0", "--clean", "--json")
    assert cleaned.returncode == 0, cleaned.stderr
    assert len(json.loads(cleaned.stdout)["aborted_uploads"]) == len(report["orphan_uploads"])
    assert azurite.blobs(container) == []
    assert azurite.blobs(container, uncommitted=True) == []
    assert run("storage", "audit", dest, "--min-age", "0").returncode == 0


def test_bad_credentials_and_a_missing_container_are_one_clear_line(azurite: Azurite) -> None:
    container = azurite.new_container()
    dest = azurite.url(container, "db")
    producer = "cmd:head -c 1000 /dev/urandom"
    wrong = dict(os.environ, AZURE_STORAGE_KEY="d3Jvbmc=" * 11)
    done = run("backup", producer, dest, env=wrong)
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1, done.stderr
    assert f"azure://devstoreaccount1/{container}/db" in done.stderr
    assert "access denied" in done.stderr

    missing = azurite.url("no-such-container", "db")
    done = run("backup", producer, missing)
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1, done.stderr
    assert "azure://devstoreaccount1/no-such-container/db: no such container" in done.stderr

    none = {k: v for k, v in os.environ.items() if not k.startswith("AZURE_STORAGE_")}
    done = run("list", dest, env=none)
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1, done.stderr
    assert "no Azure credentials: set AZURE_STORAGE_CONNECTION_STRING" in done.stderr
    assert azurite.blobs(container) == []


def test_a_backup_with_a_container_sas(azurite: Azurite) -> None:
    """A container SAS (the credential a backup host is usually given) passes the probe
    every backup starts with, and the backup lists afterwards."""
    container = azurite.new_container()
    dest = azurite.url(container, "db")
    sas = generate_container_sas(
        azurite.account,
        container,
        account_key=azurite.key,
        permission=ContainerSasPermissions(
            read=True, add=True, create=True, write=True, delete=True, list=True
        ),
        expiry=datetime.datetime.now(datetime.UTC) + datetime.timedelta(hours=1),
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("AZURE_STORAGE_")}
    env["AZURE_STORAGE_SAS_TOKEN"] = sas
    done = run("backup", "cmd:head -c 1000 /dev/urandom", dest, "--json", env=env)
    assert done.returncode == 0, done.stderr
    backup_id = json.loads(done.stdout)["id"]
    listed = run("list", dest, "--json", env=env)
    assert [row["id"] for row in json.loads(listed.stdout)] == [backup_id]
