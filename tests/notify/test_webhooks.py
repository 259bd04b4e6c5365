"""Webhooks of a real daemon (``vdistream serve``) POSTed to a receiver on 127.0.0.1:
signed ``finished``, ``failed``, ``verify_failed`` and ``retention_pruned``, retries
after 5xx, and a receiver that never answers holding no job."""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from tests.daemon.conftest import Daemon, make_sqlite, wait_for, wait_job
from tests.notify.conftest import SECRET, Receiver
from vdistream.service.notify import verify_signature

pytestmark = pytest.mark.timeout(90)


def webhook(url: str, secret_file: Path, table: str = "service.webhooks", **keys: Any) -> str:
    """One ``[[TABLE]]`` of the settings file."""
    lines = [f"[[{table}]]", f'url = "{url}"', f'secret_file = "{secret_file}"']
    lines += [f"{k} = {json.dumps(v)}" for k, v in keys.items()]
    return "\n" + "\n".join(lines) + "\n"


def with_hooks(daemon: Daemon, *tables: str) -> Daemon:
    daemon.config.write_text(daemon.config.read_text() + "".join(tables))
    return daemon


def metric(daemon: Daemon, name: str, **labels: str) -> float:
    """One sample of the daemon's ``/metrics`` (0 when absent)."""
    status, text = daemon.get("/metrics")
    assert status == 200
    for line in text.decode().splitlines():
        match = re.fullmatch(r"([a-zA-Z_:][\w:]*)(?:\{(.*)\})? (\S+)", line)
        if match is None or match[1] != name:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', match[2] or ""))
        if found == labels:
            return float(match[3])
    return 0.0


async def submit(daemon: Daemon, **request: Any) -> dict[str, Any]:
    async with daemon.http() as http:
        response = await http.post("http://vdistream/v1/jobs", json=request)
        assert response.status == 202, await response.text()
        job: dict[str, Any] = await response.json()
    async with daemon.client() as client:
        return await wait_job(client, job["id"], timeout=60)


def signed(body: bytes, timestamp: str, secret: str = SECRET) -> str:
    """The signature computed here, from the documented recipe (not the daemon's code)."""
    digest = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return "sha256=" + digest.hexdigest()


@pytest.mark.asyncio
async def test_a_backup_that_succeeds_posts_one_finished_signed_with_the_secret(
    daemon_factory: Callable[..., Daemon],
    receiver: Callable[..., Receiver],
    secret_file: Path,
    tmp_path: Path,
) -> None:
    """1. A daemon with a [[service.webhooks]] to a receiver; a backup succeeds.
    2. One POST: event finished, the body names the job, its backup and bytes.
    3. The signature is the HMAC-SHA256 of "<timestamp>.<body>" with the secret; with a
       wrong secret, without the timestamp or on a changed body it does not match."""
    hook = receiver()
    source = make_sqlite(tmp_path / "app.db")
    daemon = daemon_factory({"app": {"url": f"sqlite://{source}", "verify_after_backup": False}})
    with_hooks(daemon, webhook(hook.url, secret_file)).start()
    job = await submit(daemon, kind="backup", database="app")
    assert job["state"] == "succeeded", job["error"]
    (request,) = await hook.wait(1)
    assert daemon.stop() == 0
    assert len(hook.requests) == 1  # the shutdown flushed nothing else

    headers, body = request.headers, request.body
    assert request.path == "/hook"
    assert headers["Content-Type"] == "application/json"
    assert headers["X-Vdistream-Event"] == "finished"
    timestamp = headers["X-Vdistream-Timestamp"]
    assert abs(time.time() - int(timestamp)) < 120
    assert headers["X-Vdistream-Signature"] == signed(body, timestamp)
    assert verify_signature(SECRET.encode(), body, timestamp, headers["X-Vdistream-Signature"])
    assert headers["X-Vdistream-Signature"] != signed(body, timestamp, "another-secret-012345")
    assert not verify_signature(b"wrong", body, timestamp, headers["X-Vdistream-Signature"])
    assert not verify_signature(
        SECRET.encode(),
        body.replace(b"succeeded", b"succeedeD"),
        timestamp,
        headers["X-Vdistream-Signature"],
    )
    assert (
        headers["X-Vdistream-Signature"]
        != "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    )  # the timestamp is part of what is signed

    sent = json.loads(body)
    assert sent["version"] == 1
    assert sent["event"] == "finished"
    assert sent["delivery"] == headers["X-Vdistream-Delivery"]
    assert (sent["job_id"], sent["database"], sent["kind"]) == (job["id"], "app", "backup")
    assert (sent["state"], sent["error"]) == ("succeeded", None)
    assert sent["backup_id"] == job["backup_id"]
    assert sent["bytes"] == job["result"]["bytes"] > 0
    assert sent["result"]["id"] == job["backup_id"]
    assert sent["trigger"] == "api"
    assert sent["seconds"] >= 0
    assert sent["deleted"] == []


@pytest.mark.asyncio
async def test_a_failing_backup_posts_failed_to_the_receivers_that_want_it(
    daemon_factory: Callable[..., Daemon],
    receiver: Callable[..., Receiver],
    secret_file: Path,
) -> None:
    """A backup whose command fails: the database's webhook (all events) gets
    ``failed`` with the job's error; the service's, which wants only ``finished``,
    gets nothing (checked after the shutdown's flush)."""
    service_hook, database_hook = receiver(), receiver()
    daemon = daemon_factory({"app": {"url": "cmd:sh -c 'echo partial; exit 3'"}})
    with_hooks(
        daemon,
        webhook(service_hook.url, secret_file, events=["finished"]),
        webhook(database_hook.url, secret_file, "databases.app.webhooks"),
    ).start()
    job = await submit(daemon, kind="backup", database="app")
    assert job["state"] == "failed"
    (request,) = await database_hook.wait(1)
    assert daemon.stop() == 0
    assert service_hook.requests == []
    sent = json.loads(request.body)
    assert request.headers["X-Vdistream-Event"] == "failed"
    assert (sent["event"], sent["job_id"], sent["state"]) == ("failed", job["id"], "failed")
    assert sent["error"] == job["error"]
    assert "3" in sent["error"]
    timestamp = request.headers["X-Vdistream-Timestamp"]
    assert request.headers["X-Vdistream-Signature"] == signed(request.body, timestamp)


@pytest.mark.asyncio
async def test_a_receiver_answering_500_twice_gets_it_on_the_third_attempt(
    daemon_factory: Callable[..., Daemon],
    receiver: Callable[..., Receiver],
    secret_file: Path,
    tmp_path: Path,
) -> None:
    """500, 500, then 200: three POSTs of the same body and delivery id, each signed
    with its own timestamp, the retries after a backoff; counted delivered."""
    hook = receiver(500, 500)
    source = make_sqlite(tmp_path / "app.db")
    daemon = daemon_factory({"app": {"url": f"sqlite://{source}", "verify_after_backup": False}})
    with_hooks(daemon, webhook(hook.url, secret_file, attempts=5)).start()
    job = await submit(daemon, kind="backup", database="app")
    assert job["state"] == "succeeded", job["error"]
    first, second, third = await hook.wait(3)
    await wait_for(
        lambda: (
            metric(daemon, "vdistream_notifications_total", event="finished", outcome="delivered")
            == 1
        ),
        what="the delivery counted",
    )
    assert metric(daemon, "vdistream_notifications_total", event="finished", outcome="failed") == 0
    assert daemon.stop() == 0
    assert len(hook.requests) == 3
    assert first.body == second.body == third.body
    deliveries = {r.headers["X-Vdistream-Delivery"] for r in (first, second, third)}
    assert deliveries == {json.loads(first.body)["delivery"]}
    for request in (first, second, third):
        timestamp = request.headers["X-Vdistream-Timestamp"]
        assert request.headers["X-Vdistream-Signature"] == signed(request.body, timestamp)
    # backoff 1 s then 2 s, each times a jitter factor in [0.5, 1]
    assert second.at - first.at >= 0.45
    assert third.at - second.at >= 0.95


@pytest.mark.asyncio
async def test_a_receiver_that_never_answers_holds_no_job_and_is_counted(
    daemon_factory: Callable[..., Daemon],
    receiver: Callable[..., Receiver],
    secret_file: Path,
    tmp_path: Path,
) -> None:
    """A receiver that reads the request and never answers (timeout 1 s, 2 attempts):
    two backups in a row still succeed, their notifications end ``failed`` in
    /metrics, and the daemon stops cleanly."""
    hook = receiver(*["hang"] * 10)
    source = make_sqlite(tmp_path / "app.db")
    daemon = daemon_factory({"app": {"url": f"sqlite://{source}", "verify_after_backup": False}})
    with_hooks(daemon, webhook(hook.url, secret_file, timeout=1, attempts=2)).start()
    started = time.monotonic()
    first = await submit(daemon, kind="backup", database="app")
    second = await submit(daemon, kind="backup", database="app")
    assert (first["state"], second["state"]) == ("succeeded", "succeeded")
    assert time.monotonic() - started < 30  # generous: the jobs took well under a second
    await wait_for(
        lambda: (
            metric(daemon, "vdistream_notifications_total", event="finished", outcome="failed") == 2
        ),
        what="both notifications counted failed",
    )
    assert (
        metric(daemon, "vdistream_notifications_total", event="finished", outcome="delivered") == 0
    )
    assert len(hook.requests) == 4  # two attempts each
    assert daemon.stop() == 0
    ended = [e for e in daemon.events() if e.get("event") == "notification_failed"]
    assert {e["outcome"] for e in ended} == {"failed"}
    assert all(e["url"] == hook.url for e in ended)


@pytest.mark.asyncio
async def test_verifications_post_retention_pruned_and_verify_failed(
    daemon_factory: Callable[..., Daemon],
    receiver: Callable[..., Receiver],
    secret_file: Path,
    tmp_path: Path,
) -> None:
    """keep_last = 1: the verification of a second backup deletes the first ->
    ``retention_pruned`` naming it; a verification of a corrupted backup ->
    ``verify_failed``. The receiver wants only those two events."""
    hook = receiver()
    source = make_sqlite(tmp_path / "app.db")
    database = {
        "url": f"sqlite://{source}",
        "verify_after_backup": False,
        "retention": {"keep_last": 1},
    }
    daemon = daemon_factory({"app": database})
    events = ["verify_failed", "retention_pruned"]
    with_hooks(daemon, webhook(hook.url, secret_file, events=events)).start()
    first = await submit(daemon, kind="backup", database="app")
    assert (await submit(daemon, kind="verify", database="app", backup_id=first["backup_id"]))[
        "state"
    ] == "succeeded"
    # a backup's end is recorded to the second, and one that ended in the same second
    # as the newest verified one is kept: the second backup starts a second later
    await anyio.sleep(1.1)
    second = await submit(daemon, kind="backup", database="app")
    verify = await submit(daemon, kind="verify", database="app", backup_id=second["backup_id"])
    assert verify["state"] == "succeeded", verify["error"]
    (pruned,) = await hook.wait(1)
    sent = json.loads(pruned.body)
    assert pruned.headers["X-Vdistream-Event"] == "retention_pruned"
    assert (sent["event"], sent["kind"], sent["job_id"]) == (
        "retention_pruned",
        "verify",
        verify["id"],
    )
    assert sent["backup_id"] == second["backup_id"]
    assert sent["deleted"] == [first["backup_id"]]

    streams = sorted((daemon.dest / second["backup_id"]).glob("stream-*"))
    assert streams
    data = bytearray(streams[0].read_bytes())
    data[len(data) // 2] ^= 0xFF
    streams[0].write_bytes(bytes(data))
    bad = await submit(daemon, kind="verify", database="app", backup_id=second["backup_id"])
    assert bad["state"] == "failed"
    _, failed = await hook.wait(2)
    assert daemon.stop() == 0
    sent = json.loads(failed.body)
    assert failed.headers["X-Vdistream-Event"] == "verify_failed"
    assert (sent["event"], sent["job_id"], sent["state"]) == ("verify_failed", bad["id"], "failed")
    assert sent["error"] == bad["error"]
    assert f"backup {second['backup_id']} failed to verify" in sent["error"]
    assert len(hook.requests) == 2
