"""Jobs through the socket of a real daemon: backup, verify, restore, events, metrics,
the bounded queue, and requests that must be refused without changing anything."""

from __future__ import annotations

import json
import os
import re
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.daemon.conftest import Daemon, make_sqlite, slow_url, wait_for, wait_job
from tests.databases.pgserver import free_port

pytestmark = pytest.mark.timeout(90)


def _metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample of the exposition ``text``."""
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        match = re.fullmatch(r"([a-zA-Z_:][\w:]*)(?:\{(.*)\})? (\S+)", line)
        if match is None or match[1] != name:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', match[2] or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(match[3])
    raise AssertionError(f"no sample {name}{labels} in the metrics")


@pytest.mark.asyncio
async def test_sqlite_backup_is_verified_restored_and_measured(
    daemon_factory: Callable[..., Daemon], tmp_path: Path
) -> None:
    """1. A daemon with one SQLite database; a backup is submitted over the socket.
    2. It succeeds with per-device progress; a verify job follows it and succeeds.
    3. A restore job puts the same rows back into a new file.
    4. /metrics shows bytes per device, outcomes, durations and the age of the last
       verified backup; the state database recorded all three jobs."""
    source = make_sqlite(tmp_path / "app.db")
    daemon = daemon_factory({"app": {"url": f"sqlite://{source}"}}).start()
    async with daemon.http() as http:
        response = await http.post(
            "http://vdistream/v1/jobs", json={"kind": "backup", "database": "app"}
        )
        assert response.status == 202, await response.text()
        job = await response.json()
        assert response.headers["Location"] == f"/v1/jobs/{job['id']}"
        assert job["kind"] == "backup"
        assert job["state"] in ("queued", "running")
    async with daemon.client() as client:
        done = await wait_job(client, job["id"])
        assert done["state"] == "succeeded", done["error"]
        backup_id = done["backup_id"]
        assert backup_id.startswith("app.")
        devices = done["progress"]["devices"]
        assert [d["index"] for d in devices] == [0, 1]
        assert sum(d["bytes"] for d in devices) == done["result"]["bytes"] > 0
        assert (daemon.dest / backup_id / "manifest.json").is_file()

        verify = await wait_for(
            lambda: client.jobs(kind="verify", state="succeeded"), what="the verify job"
        )
        assert verify[0]["backup_id"] == backup_id
        assert verify[0]["params"]["after"] == job["id"]

        target = tmp_path / "restored.db"
        restore = await client.submit({"kind": "restore", "database": "app", "target": str(target)})
        restored = await wait_job(client, restore["id"])
        assert restored["state"] == "succeeded", restored["error"]
        assert restored["backup_id"] == backup_id
        db = sqlite3.connect(target)
        assert db.execute("SELECT count(*) FROM items").fetchone()[0] == 20_000
        db.close()

        metrics = await client.metrics()
    assert _metric(metrics, "vdistream_device_bytes_total", database="app", device="0") > 0
    assert _metric(metrics, "vdistream_device_commands_total", database="app", device="1") > 0
    assert _metric(metrics, "vdistream_jobs_total", kind="backup", outcome="succeeded") == 1
    assert _metric(metrics, "vdistream_jobs_total", kind="verify", outcome="succeeded") == 1
    assert _metric(metrics, "vdistream_job_duration_seconds_count", kind="restore") == 1
    age = _metric(metrics, "vdistream_seconds_since_last_verified_backup", database="app")
    assert 0 <= age < 60
    assert _metric(metrics, "vdistream_event_loop_lag_seconds_count") > 0
    assert _metric(metrics, "vdistream_ready") == 1
    assert _metric(metrics, "process_open_fds") > 0
    recorded = daemon.jobs_in_state_db()
    assert [(r["kind"], r["state"]) for r in recorded] == [
        ("backup", "succeeded"),
        ("verify", "succeeded"),
        ("restore", "succeeded"),
    ]
    assert json.loads(recorded[0]["progress"])["devices"][0]["bytes"] > 0
    assert daemon.stop() == 0


@pytest.mark.asyncio
async def test_a_compressed_and_encrypted_database(
    daemon_factory: Callable[..., Daemon], tmp_path: Path
) -> None:
    """A database with ``compress`` and ``encrypt_key_file``: the daemon's backup is
    stored compressed and encrypted (no plaintext on disk, the pipeline in the
    manifest), its verification and a restore read it back with the same key."""
    source = make_sqlite(tmp_path / "app.db")
    key_file = tmp_path / "backup.key"
    key_file.write_text(os.urandom(32).hex() + "\n")
    key_file.chmod(0o600)
    daemon = daemon_factory(
        {
            "app": {
                "url": f"sqlite://{source}",
                "compress": "zstd:3",
                "encrypt_key_file": str(key_file),
            }
        }
    ).start()
    async with daemon.client() as client:
        job = await client.submit({"kind": "backup", "database": "app"})
        done = await wait_job(client, job["id"])
        assert done["state"] == "succeeded", done["error"]
        backup_id = done["backup_id"]
        verify = await wait_for(
            lambda: client.jobs(kind="verify", state="succeeded,failed"), what="the verify job"
        )
        assert verify[0]["state"] == "succeeded", verify[0]["error"]
        target = tmp_path / "restored.db"
        restore = await client.submit({"kind": "restore", "database": "app", "target": str(target)})
        restored = await wait_job(client, restore["id"])
        assert restored["state"] == "succeeded", restored["error"]
    manifest = json.loads((daemon.dest / backup_id / "manifest.json").read_text())
    pipeline = json.dumps(manifest["pipeline"])
    assert "zstd" in pipeline
    assert "aes-256-gcm" in pipeline.lower()
    manifest_text = (daemon.dest / backup_id / "manifest.json").read_text()
    assert key_file.read_text().strip() not in manifest_text
    stored = b"".join(p.read_bytes() for p in sorted((daemon.dest / backup_id).glob("stream-*")))
    assert b"SQLite format 3" not in stored
    assert b"item 1" not in stored
    db = sqlite3.connect(target)
    assert db.execute("SELECT count(*) FROM items").fetchone()[0] == 20_000
    db.close()
    assert daemon.stop() == 0


@pytest.mark.asyncio
async def test_events_stream_until_the_job_ends(
    daemon_factory: Callable[..., Daemon], tmp_path: Path
) -> None:
    """Progress events come as newline-delimited JSON (or SSE) and end with the job."""
    source = make_sqlite(tmp_path / "app.db")
    daemon = daemon_factory(
        {"app": {"url": f"sqlite://{source}", "verify_after_backup": False}}
    ).start()
    async with daemon.client() as client:
        job = await client.submit({"kind": "backup", "database": "app"})
        events = [e async for e in client.events(job["id"], interval=0.1)]
    assert events[-1]["event"] == "end"
    assert events[-1]["job"]["state"] == "succeeded"
    assert all(e["event"] == "progress" for e in events[:-1])
    async with (
        daemon.http() as http,
        http.get(
            f"http://vdistream/v1/jobs/{job['id']}/events",
            headers={"Accept": "text/event-stream"},
        ) as response,
    ):
        assert response.headers["Content-Type"].startswith("text/event-stream")
        text = await response.text()
    assert text.startswith("event: end\ndata: {")
    assert json.loads(text.split("data: ", 1)[1])["job"]["id"] == job["id"]


@pytest.mark.asyncio
async def test_a_full_queue_refuses_with_429_and_records_nothing(
    daemon_factory: Callable[..., Daemon],
) -> None:
    """max_jobs 1, max_queued 1: the third request is refused (429, queue_full); the
    queued job aborts at once, the running one through its device set."""
    daemon = daemon_factory(
        {"slow": {"url": slow_url()}}, service={"max_jobs": 1, "max_queued": 1}
    ).start()
    body = {"kind": "backup", "database": "slow"}
    async with daemon.http() as http:
        first = await (await http.post("http://vdistream/v1/jobs", json=body)).json()
        second = await (await http.post("http://vdistream/v1/jobs", json=body)).json()
        refused = await http.post("http://vdistream/v1/jobs", json=body)
        assert refused.status == 429
        assert refused.headers["Retry-After"]
        error = (await refused.json())["error"]
        assert error["code"] == "queue_full"
        assert "service.max_queued = 1" in error["message"]
    assert len(daemon.jobs_in_state_db()) == 2
    async with daemon.client() as client:
        assert (await client.job(second["id"]))["queue_position"] == 0
        aborted = await client.abort(second["id"], "not needed")
        assert aborted["state"] == "aborted"
        assert aborted["error"] == "not needed"
        await wait_job(client, first["id"], frozenset({"running"}), min_bytes=1)
        await client.abort(first["id"])
        done = await wait_job(client, first["id"])
        assert done["state"] == "aborted"
        assert done["result"]["aborted_by"] == "user"
        async with daemon.http() as http:
            again = await http.post(f"http://vdistream/v1/jobs/{first['id']}/abort")
            assert again.status == 409
            assert (await again.json())["error"]["code"] == "job_finished"
    assert daemon.leftovers() == []
    assert daemon.stop() == 0


async def _error(response: aiohttp.ClientResponse) -> dict[str, Any]:
    body = await response.json()
    assert set(body) == {"error"}, body
    assert body["error"]["message"], body
    error: dict[str, Any] = body["error"]
    return error


@pytest.mark.asyncio
async def test_bad_requests_get_a_clear_4xx_and_change_nothing(
    daemon_factory: Callable[..., Daemon], tmp_path: Path
) -> None:
    """Malformed JSON, unknown fields, an unknown database, an unknown job, an
    oversized body, a wrong method or path, and TCP requests without the right token:
    each a JSON error with its own code; no job is recorded, no file written."""
    source = make_sqlite(tmp_path / "app.db")
    port = free_port()
    token = "a-token-of-at-least-16-characters"
    daemon = daemon_factory(
        {"app": {"url": f"sqlite://{source}"}},
        service={"listen": f"127.0.0.1:{port}"},
        env={"VDISTREAM_API_TOKEN": token},
    ).start()
    url = "http://vdistream"
    async with daemon.http() as http:
        cases: list[tuple[str, str, dict[str, Any], int, str]] = [
            (
                "POST",
                "/v1/jobs",
                {"data": b"{not json", "headers": {"Content-Type": "application/json"}},
                400,
                "malformed_json",
            ),
            ("POST", "/v1/jobs", {"json": ["backup"]}, 400, "invalid_request"),
            ("POST", "/v1/jobs", {"json": {"kind": "backup"}}, 400, "invalid_request"),
            ("POST", "/v1/jobs", {"json": {"kind": "nap", "database": "app"}}, 400, ""),
            (
                "POST",
                "/v1/jobs",
                {"json": {"kind": "backup", "database": "app", "devices": 8}},
                400,
                "invalid_request",
            ),
            (
                "POST",
                "/v1/jobs",
                {"json": {"kind": "backup", "database": "app", "verify": "yes"}},
                400,
                "invalid_request",
            ),
            (
                "POST",
                "/v1/jobs",
                {"json": {"kind": "backup", "database": "app", "backup_id": "other.1"}},
                400,
                "invalid_request",
            ),
            (
                "POST",
                "/v1/jobs",
                {"json": {"kind": "backup", "database": "nope"}},
                422,
                "unknown_database",
            ),
            (
                "POST",
                "/v1/jobs",
                {"json": {"kind": "backup", "source": "sqlite:///x.db", "destination": "local"}},
                422,
                "unknown_database",
            ),
            (
                "POST",
                "/v1/jobs",
                {"data": b"{}", "headers": {"Content-Type": "text/plain"}},
                415,
                "unsupported_media_type",
            ),
            (
                "POST",
                "/v1/jobs",
                {"json": {"kind": "backup", "database": "app", "x": "y" * 100_000}},
                413,
                "body_too_large",
            ),
            ("GET", "/v1/jobs/20240101T000000.000Z-0000000000", {}, 404, "job_not_found"),
            ("POST", "/v1/jobs/nope/abort", {}, 404, "job_not_found"),
            ("GET", "/v1/jobs?colour=red", {}, 400, "invalid_request"),
            ("GET", "/v1/jobs?state=sleeping", {}, 400, "invalid_request"),
            ("GET", "/v1/nothing", {}, 404, "not_found"),
            ("DELETE", "/v1/jobs", {}, 405, "method_not_allowed"),
        ]
        for method, path, kwargs, status, code in cases:
            async with http.request(method, url + path, **kwargs) as response:
                assert response.status == status, (method, path, await response.text())
                error = await _error(response)
                if code:
                    assert error["code"] == code, (path, error)
        async with http.get(url + "/v1/jobs") as response:
            assert (await response.json()) == {"jobs": []}

    tcp = f"http://127.0.0.1:{port}"
    async with aiohttp.ClientSession() as http:
        for headers in ({}, {"Authorization": "Bearer wrong-token-wrong-token"}, {"X": "y"}):
            async with http.post(
                tcp + "/v1/jobs", json={"kind": "backup", "database": "app"}, headers=headers
            ) as response:
                assert response.status == 401
                assert (await _error(response))["code"] == "unauthorized"
                assert response.headers["WWW-Authenticate"].startswith("Bearer")
        async with http.get(
            tcp + "/v1/ready", headers={"Authorization": f"Bearer {token}"}
        ) as response:
            assert response.status == 200
    assert daemon.jobs_in_state_db() == []
    assert daemon.leftovers() == []
    assert daemon.stop() == 0
