"""The notifier in-process, with real settings and a real receiver: the bounded queue
drops the oldest and counts it, a 4xx is not retried, a delivery's deadline ends its
retries, and the receiver's check refuses old timestamps and changed bodies."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import anyio
import pytest
from prometheus_client import CollectorRegistry

from tests.daemon.conftest import wait_for
from tests.notify.conftest import SECRET, Receiver
from vdistream.service.notify import Notifier, events_of, sign, verify_signature
from vdistream.service.runners import Outcome
from vdistream.service.settings import Settings, load_settings
from vdistream.service.state import JobRecord, JobState, JobType

pytestmark = pytest.mark.timeout(60)


def settings(tmp_path: Path, url: str, **keys: object) -> Settings:
    extra = "".join(f"{k} = {json.dumps(v)}\n" for k, v in keys.items())
    path = tmp_path / "vdistream.toml"
    path.write_text(
        f'[destinations.local]\nurl = "{tmp_path}/backups"\n'
        f'[databases.app]\nurl = "sqlite:///{tmp_path}/app.db"\ndestination = "local"\n'
        f'[[service.webhooks]]\nurl = "{url}"\nsecret_env = "HOOK_SECRET"\n{extra}'
    )
    return load_settings(path, env={"HOOK_SECRET": SECRET})


def ended(kind: JobType, state: JobState, **result: object) -> tuple[JobRecord, Outcome]:
    record = JobRecord.new(kind, "app", state=state, backup_id="app.1")
    return record, Outcome(
        state, dict(result) or None, None if state is JobState.SUCCEEDED else "x"
    )


def sample(registry: CollectorRegistry, event: str, outcome: str) -> float:
    value = registry.get_sample_value(
        "vdistream_notifications_total", {"event": event, "outcome": outcome}
    )
    return value or 0.0


def test_the_events_of_a_job_end() -> None:
    assert events_of(*ended(JobType.BACKUP, JobState.SUCCEEDED)) == ["finished"]
    assert events_of(*ended(JobType.BACKUP, JobState.FAILED)) == ["failed"]
    assert events_of(*ended(JobType.RESTORE, JobState.ABORTED)) == ["failed"]
    assert events_of(*ended(JobType.VERIFY, JobState.FAILED)) == ["verify_failed"]
    assert events_of(*ended(JobType.VERIFY, JobState.ABORTED)) == ["failed"]
    pruned = ended(JobType.VERIFY, JobState.SUCCEEDED, retention={"deleted": ["app.0"]})
    assert events_of(*pruned) == ["finished", "retention_pruned"]
    kept = ended(JobType.VERIFY, JobState.SUCCEEDED, retention={"deleted": []})
    assert events_of(*kept) == ["finished"]


@pytest.mark.asyncio
async def test_a_full_queue_drops_the_oldest_and_counts_it(
    tmp_path: Path, receiver: Callable[..., Receiver]
) -> None:
    """Three job ends queued before the notifier runs, with room for two: the oldest is
    dropped (counted), the two others arrive in order once it runs."""
    hook = receiver()
    registry = CollectorRegistry()
    notifier = Notifier(settings(tmp_path, hook.url), registry, queue_size=2, workers=1)
    records = [ended(JobType.BACKUP, JobState.SUCCEEDED) for _ in range(3)]
    for record, outcome in records:
        notifier.job_event(record, outcome)
    assert sample(registry, "finished", "dropped") == 1
    assert registry.get_sample_value("vdistream_notifications_queued") == 2
    async with anyio.create_task_group() as tg:
        await tg.start(notifier.run)
        got = await hook.wait(2)
        tg.cancel_scope.cancel()
    assert [json.loads(r.body)["job_id"] for r in got] == [r.id for r, _ in records[1:]]
    assert sample(registry, "finished", "delivered") == 2
    assert registry.get_sample_value("vdistream_notifications_queued") == 0


@pytest.mark.asyncio
async def test_a_4xx_answer_is_rejected_without_a_retry(
    tmp_path: Path, receiver: Callable[..., Receiver]
) -> None:
    hook = receiver(404)
    registry = CollectorRegistry()
    notifier = Notifier(settings(tmp_path, hook.url), registry, backoff=0.05)
    async with anyio.create_task_group() as tg:
        await tg.start(notifier.run)
        notifier.job_event(*ended(JobType.BACKUP, JobState.FAILED))
        await hook.wait(1)
        await wait_for(lambda: sample(registry, "failed", "rejected"), what="rejected")
        await anyio.sleep(0.3)  # a retry would have come by now (backoff 0.05 s)
        tg.cancel_scope.cancel()
    assert len(hook.requests) == 1
    assert sample(registry, "failed", "failed") == 0


@pytest.mark.asyncio
async def test_the_deadline_ends_the_retries(
    tmp_path: Path, receiver: Callable[..., Receiver]
) -> None:
    """Answers 503 for ever, 20 attempts allowed, a deadline of 1 s: given up (failed)
    after the attempts that fit in it."""
    hook = receiver(*[503] * 50)
    registry = CollectorRegistry()
    notifier = Notifier(
        settings(tmp_path, hook.url, attempts=20, deadline=1), registry, backoff=0.1
    )
    start = time.monotonic()
    async with anyio.create_task_group() as tg:
        await tg.start(notifier.run)
        notifier.job_event(*ended(JobType.BACKUP, JobState.SUCCEEDED))
        await wait_for(lambda: sample(registry, "finished", "failed"), what="given up")
        tg.cancel_scope.cancel()
    assert time.monotonic() - start < 10  # generous: the deadline is 1 s
    assert 2 <= len(hook.requests) < 20


@pytest.mark.asyncio
async def test_the_shutdown_flush_tries_what_is_queued_once(
    tmp_path: Path, receiver: Callable[..., Receiver]
) -> None:
    """A notification queued as the notifier is cancelled gets one last attempt."""
    hook = receiver()
    registry = CollectorRegistry()
    notifier = Notifier(settings(tmp_path, hook.url), registry, flush_timeout=5)
    async with anyio.create_task_group() as tg:
        await tg.start(notifier.run)
        notifier.job_event(*ended(JobType.BACKUP, JobState.ABORTED))
        tg.cancel_scope.cancel()  # before any worker took it
    assert len(hook.requests) == 1
    assert json.loads(hook.requests[0].body)["state"] == "aborted"
    assert sample(registry, "failed", "delivered") == 1


def test_a_receiver_refuses_a_changed_body_an_old_timestamp_and_another_secret() -> None:
    body, now = b'{"event": "finished"}', time.time()
    timestamp = str(int(now))
    signature = sign(SECRET.encode(), timestamp, body)
    assert verify_signature(SECRET.encode(), body, timestamp, signature)
    assert not verify_signature(b"another secret, 16+ chars", body, timestamp, signature)
    assert not verify_signature(SECRET.encode(), body + b" ", timestamp, signature)
    old = str(int(now) - 301)
    assert not verify_signature(SECRET.encode(), body, old, sign(SECRET.encode(), old, body))
    assert not verify_signature(SECRET.encode(), body, "12x", signature)


def two_hooks(tmp_path: Path, dead: str, good: str) -> Settings:
    """A receiver of ``finished`` that never answers (3 s per attempt, 2 attempts) and
    one of ``failed`` whose notifications must arrive within 2 s of the event."""
    path = tmp_path / "vdistream.toml"
    path.write_text(
        f'[destinations.local]\nurl = "{tmp_path}/backups"\n'
        f'[databases.app]\nurl = "sqlite:///{tmp_path}/app.db"\ndestination = "local"\n'
        f'[[service.webhooks]]\nurl = "{dead}"\nsecret_env = "HOOK_SECRET"\n'
        'events = ["finished"]\ntimeout = 3\nattempts = 2\n'
        f'[[service.webhooks]]\nurl = "{good}"\nsecret_env = "HOOK_SECRET"\n'
        'events = ["failed"]\ndeadline = 2\n'
    )
    return load_settings(path, env={"HOOK_SECRET": SECRET})


@pytest.mark.asyncio
async def test_a_dead_receiver_does_not_hold_the_others(
    tmp_path: Path, receiver: Callable[..., Receiver]
) -> None:
    """Six notifications for a receiver that never answers, then one for a healthy
    receiver: the healthy one gets it (delivered, within its 2 s deadline) although
    the dead one has more notifications than there are workers."""
    dead, good = receiver(*["hang"] * 20), receiver()
    registry = CollectorRegistry()
    notifier = Notifier(two_hooks(tmp_path, dead.url, good.url), registry, backoff=0.05)
    async with anyio.create_task_group() as tg:
        await tg.start(notifier.run)
        for _ in range(6):
            notifier.job_event(*ended(JobType.BACKUP, JobState.SUCCEEDED))
        notifier.job_event(*ended(JobType.BACKUP, JobState.FAILED))
        await wait_for(
            lambda: sample(registry, "failed", "delivered") + sample(registry, "failed", "failed"),
            what="the healthy receiver's notification ended",
        )
        during = len(dead.requests)
        tg.cancel_scope.cancel()
    assert sample(registry, "failed", "delivered") == 1
    assert sample(registry, "failed", "failed") == 0
    assert len(good.requests) == 1
    assert during <= 1  # one attempt at a time per receiver (the shutdown then tries all)


@pytest.mark.asyncio
async def test_an_endless_answer_is_delivered_once_without_reading_it_all(
    tmp_path: Path, receiver: Callable[..., Receiver]
) -> None:
    """200 and a body that never ends: delivered after one attempt (the status is
    what counts), not read until the 1 s timeout, retried and counted failed."""
    hook = receiver("endless", "endless")
    registry = CollectorRegistry()
    notifier = Notifier(settings(tmp_path, hook.url, timeout=1, attempts=2), registry, backoff=0.05)
    async with anyio.create_task_group() as tg:
        await tg.start(notifier.run)
        notifier.job_event(*ended(JobType.BACKUP, JobState.SUCCEEDED))
        await wait_for(
            lambda: (
                sample(registry, "finished", "delivered") + sample(registry, "finished", "failed")
            ),
            what="the notification ended",
        )
        tg.cancel_scope.cancel()
    assert sample(registry, "finished", "delivered") == 1
    assert len(hook.requests) == 1


@pytest.mark.asyncio
async def test_the_shutdown_flush_counts_a_4xx_rejected(
    tmp_path: Path, receiver: Callable[..., Receiver]
) -> None:
    hook = receiver(410)
    registry = CollectorRegistry()
    notifier = Notifier(settings(tmp_path, hook.url), registry, flush_timeout=5)
    async with anyio.create_task_group() as tg:
        await tg.start(notifier.run)
        notifier.job_event(*ended(JobType.BACKUP, JobState.FAILED))
        tg.cancel_scope.cancel()  # before any worker took it: the flush's attempt
    assert len(hook.requests) == 1
    assert sample(registry, "failed", "rejected") == 1
    assert sample(registry, "failed", "failed") == 0


@pytest.mark.parametrize(
    ("timestamp", "signature"),
    [
        ("\u00b2", "sha256=00"),  # a Latin-1 header byte that str.isdigit() accepts
        ("1" * 5000, "sha256=00"),  # more digits than int() reads
        (None, "sha256=\u00e9"),  # non-ASCII: hmac.compare_digest raises on str
    ],
)
def test_a_hostile_signature_or_timestamp_is_refused_not_raised(
    timestamp: str | None, signature: str
) -> None:
    body = b"{}"
    timestamp = str(int(time.time())) if timestamp is None else timestamp
    assert verify_signature(SECRET.encode(), body, timestamp, signature) is False


@pytest.mark.asyncio
async def test_the_shutdown_flush_sends_nothing_past_its_deadline(
    tmp_path: Path, receiver: Callable[..., Receiver]
) -> None:
    """A notification whose deadline (1 s) passed while it was queued is counted failed
    at shutdown, not sent after all."""
    hook = receiver()
    registry = CollectorRegistry()
    notifier = Notifier(settings(tmp_path, hook.url, deadline=1), registry, flush_timeout=5)
    notifier.job_event(*ended(JobType.BACKUP, JobState.FAILED))
    await anyio.sleep(1.2)
    with anyio.CancelScope() as scope:
        scope.cancel()  # the notifier runs only to stop: its flush has the notification
        await notifier.run()
    assert hook.requests == []
    assert sample(registry, "failed", "failed") == 1
    assert sample(registry, "failed", "delivered") == 0
