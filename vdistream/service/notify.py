"""Webhooks: job events POSTed as signed JSON to the receivers of the settings.

``Notifier(settings, registry)`` is told of every job's end by the job manager
(``job_event(record, outcome)``, synchronous, never blocking, never raising) and
delivers from a bounded queue in a task of the service's own task group
(``await tg.start(notifier.run)``). A notification never delays or fails a job.

Events
------

========================  ==========================================================
``finished``              a job (backup, restore, verify) succeeded
``failed``                a backup or restore failed or was aborted (``state`` says
                          which), or a verification was aborted
``verify_failed``         a verification ended ``failed`` (the backup is bad, or could
                          not be read)
``retention_pruned``      a verification's retention deleted backups (sent besides
                          that verification's ``finished``; ``deleted`` lists them)
========================  ==========================================================

The receivers of an event are those of ``[[service.webhooks]]`` and those of the
job's database (``[[databases.NAME.webhooks]]``) whose ``events`` include it.

The request
-----------

``POST url`` with ``Content-Type: application/json`` and the body (UTF-8 JSON, keys
sorted; ``version`` changes only if a field changes meaning or goes away)::

    {"version": 1, "event": "finished", "delivery": "<uuid>", "database": "app",
     "job_id": "...", "kind": "backup", "state": "succeeded", "trigger": "schedule",
     "backup_id": "app.20260101T030000Z-...", "error": null,
     "created": "2026-01-01T03:00:00+00:00", "started": "...", "ended": "...",
     "seconds": 12.5, "bytes": 1048576, "deleted": [], "result": {...}}

``result`` is the job's result as ``GET /v1/jobs/ID`` shows it (``null`` when it has
none), ``bytes`` its ``bytes`` (stored bytes of a backup, read bytes of a restore),
``seconds`` from ``started`` to ``ended``; ``deleted`` (the ids retention removed)
is non-empty only in ``retention_pruned``. ``delivery`` is the same for every attempt
of one notification to one receiver: a receiver drops a ``delivery`` it has seen.

Headers: ``X-Vdistream-Event`` (the event), ``X-Vdistream-Delivery`` (``delivery``),
``X-Vdistream-Timestamp`` (Unix seconds of this attempt) and
``X-Vdistream-Signature: sha256=<hex>``, the HMAC-SHA256 with the receiver's secret
(its UTF-8 bytes: the value of ``secret_env``, or the first line of ``secret_file``,
surrounding whitespace stripped) of ``<timestamp>.<body>`` (the header's decimal
digits, a dot, the raw body bytes).
A receiver checks it so (``verify_signature`` does exactly this)::

    expected = hmac.new(secret, ts.encode() + b"." + body, "sha256").hexdigest()
    ok = hmac.compare_digest("sha256=" + expected, signature) and abs(now - int(ts)) <= 300

The timestamp is signed, so an old request replayed is refused by its age, and a
replay within the window by its ``delivery`` id.

Delivery
--------

* One notification per receiver and event, queued (at most ``queue_size``; when
  full, the oldest is dropped and counted ``dropped``), sent by ``workers`` tasks at
  once. One slow or dead receiver does not hold the others: a receiver has at most
  one attempt in flight (the other workers serve the other receivers), and a
  notification waiting for its retry holds no worker (it waits in the queue).
* An answer 2xx is ``delivered`` (at most 64 KiB of its body is read: an endless
  answer neither fills the memory nor turns a delivery into a timeout). A connection
  error, a timeout (the receiver's ``timeout`` per attempt), 408, 429 or 5xx is
  retried after an exponential backoff with full jitter (``backoff`` x 2^n seconds,
  at most 60, times a random factor in [0.5, 1]), up to the receiver's ``attempts``
  and never after its ``deadline`` (from the event; a notification still queued at
  its deadline is not sent); then ``failed``. Any other answer (4xx, 3xx: redirects
  are not followed) is ``rejected`` at once: retrying would not change it.
* Every notification's end is counted in ``vdistream_notifications_total{event,
  outcome}`` (``delivered``, ``failed``, ``rejected``, ``dropped``) and logged
  (``notification_failed`` at warning level); ``vdistream_notifications_queued`` is
  the queue's length. No error of a receiver is ever raised to the job or the service.
* At shutdown (``run`` cancelled) what is queued or in flight gets one last attempt
  each (unless past its deadline: ``failed``), shielded, within ``flush_timeout``
  seconds in all; the rest is ``dropped``.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import hmac
import json
import random
import time
import uuid
import weakref
from collections.abc import Iterable
from typing import Any

import aiohttp
import anyio
import anyio.abc
from prometheus_client import CollectorRegistry, Counter, Gauge

from vdistream._version import __version__
from vdistream.log import get_logger
from vdistream.service.runners import Outcome
from vdistream.service.settings import Settings, WebhookSettings
from vdistream.service.state import JobRecord, JobState, JobType

__all__ = (
    "SIGNATURE_HEADER",
    "TIMESTAMP_HEADER",
    "Notifier",
    "events_of",
    "sign",
    "verify_signature",
)

log = get_logger(__name__)

SIGNATURE_HEADER = "X-Vdistream-Signature"
TIMESTAMP_HEADER = "X-Vdistream-Timestamp"
EVENT_HEADER = "X-Vdistream-Event"
DELIVERY_HEADER = "X-Vdistream-Delivery"
#: how old a signed timestamp ``verify_signature`` accepts by default (seconds)
TOLERANCE = 300.0
#: the longest wait between two attempts (seconds)
_MAX_BACKOFF = 60.0
#: answers worth another attempt besides 5xx: timeout, too many requests
_RETRY_STATUS = frozenset({408, 429})
#: the most of an answer's body read (only its status matters)
_MAX_ANSWER = 64 * 1024
#: the longest a signature header or timestamp ``verify_signature`` looks at
_MAX_HEADER = 200


def sign(secret: bytes, timestamp: str, body: bytes) -> str:
    """The ``X-Vdistream-Signature`` value of ``body`` sent at ``timestamp``."""
    digest = hmac.new(secret, timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"sha256={digest}"


def verify_signature(
    secret: bytes,
    body: bytes,
    timestamp: str,
    signature: str,
    *,
    now: float | None = None,
    tolerance: float = TOLERANCE,
) -> bool:
    """A receiver's check (module doc): the signature matches and the timestamp is
    within ``tolerance`` seconds of ``now``."""
    # Both come from the request: anything (non-ASCII digits like "²", which int()
    # refuses; non-ASCII text, which compare_digest refuses) is a False, not an error.
    if not (timestamp.isascii() and timestamp.isdigit() and len(timestamp) <= 20):
        return False
    if not (signature.isascii() and len(signature) <= _MAX_HEADER):
        return False
    if abs((time.time() if now is None else now) - int(timestamp)) > tolerance:
        return False
    return hmac.compare_digest(sign(secret, timestamp, body).encode(), signature.encode())


# --- what is sent ----------------------------------------------------------------------


def events_of(record: JobRecord, outcome: Outcome) -> list[str]:
    """The events a job's end makes (module doc: Events)."""
    if outcome.state is JobState.SUCCEEDED:
        events = ["finished"]
        if _deleted(outcome.result):
            events.append("retention_pruned")
        return events
    if record.kind is JobType.VERIFY and outcome.state is JobState.FAILED:
        return ["verify_failed"]
    return ["failed"]


def _deleted(result: Any) -> list[str]:
    retention = result.get("retention") if isinstance(result, dict) else None
    deleted = retention.get("deleted") if isinstance(retention, dict) else None
    return [str(d) for d in deleted] if isinstance(deleted, list) else []


def _body(event: str, delivery: str, record: JobRecord, outcome: Outcome) -> bytes:
    result = outcome.result if outcome.result is not None else record.result
    result = dict(result) if result is not None else None
    started, ended = record.started, record.ended
    seconds = None if started is None or ended is None else (ended - started).total_seconds()
    size = result.get("bytes") if result is not None else None
    body = {
        "version": 1,
        "event": event,
        "delivery": delivery,
        "database": record.database,
        "job_id": record.id,
        "kind": record.kind.value,
        "state": outcome.state.value,
        "trigger": record.params.get("trigger"),
        "backup_id": record.backup_id,
        "error": outcome.error,
        "created": record.created.isoformat(),
        "started": None if started is None else started.isoformat(),
        "ended": None if ended is None else ended.isoformat(),
        "seconds": None if seconds is None else round(seconds, 3),
        "bytes": size if isinstance(size, int) and not isinstance(size, bool) else None,
        "deleted": _deleted(result) if event == "retention_pruned" else [],
        "result": result,
    }
    return json.dumps(body, sort_keys=True, default=str).encode()


@dataclasses.dataclass(eq=False)
class _Delivery:
    """One notification to one receiver, with its attempts so far."""

    webhook: WebhookSettings
    event: str
    delivery: str
    body: bytes
    #: ``anyio.current_time()``-independent: the event's wall time (``time.monotonic``)
    created: float
    attempts: int = 0
    #: not attempted before this ``time.monotonic()`` (a retry's backoff)
    due: float = 0.0
    #: why the last attempt failed
    why: str | None = None

    @property
    def receiver(self) -> str:
        """Who gets it: at most one attempt in flight per receiver."""
        return self.webhook.url

    @property
    def deadline(self) -> float:
        return self.created + self.webhook.deadline


# --- metrics ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Metrics:
    notifications: Counter
    queued: Gauge


#: One set per registry, like ``manager._sqlserver_backups``: a Service run twice (or
#: two Notifiers on one registry) must not register a name twice.
_METRICS: weakref.WeakKeyDictionary[CollectorRegistry, _Metrics] = weakref.WeakKeyDictionary()


def _metrics(registry: CollectorRegistry) -> _Metrics:
    found = _METRICS.get(registry)
    if found is None:
        found = _METRICS[registry] = _Metrics(
            Counter(
                "vdistream_notifications",
                "Webhook notifications that ended, by event and outcome (delivered, "
                "failed, rejected, dropped)",
                ("event", "outcome"),
                registry=registry,
            ),
            Gauge(
                "vdistream_notifications_queued",
                "Webhook notifications waiting to be sent or retried",
                registry=registry,
            ),
        )
    return found


# --- the notifier ----------------------------------------------------------------------


class Notifier:
    """Delivers job events to the webhooks of ``settings`` (module doc).

    ``queue_size``: notifications held at most; ``workers``: sent at once;
    ``backoff``: the first retry's wait (seconds); ``flush_timeout``: the last
    attempts' time at shutdown. ``run`` may be started again after it ended.
    """

    def __init__(
        self,
        settings: Settings,
        registry: CollectorRegistry,
        *,
        queue_size: int = 1000,
        workers: int = 4,
        backoff: float = 1.0,
        flush_timeout: float = 1.0,
    ) -> None:
        if queue_size < 1 or workers < 1:
            raise ValueError("queue_size and workers must be at least 1")
        self._settings = settings
        self._metrics = _metrics(registry)
        self._queue: collections.deque[_Delivery] = collections.deque()
        self._queue_size = queue_size
        self._workers = workers
        self._backoff = backoff
        self._flush_timeout = flush_timeout
        self._wake: anyio.Event | None = None  # made in ``run``: it needs the event loop
        self._in_flight: set[_Delivery] = set()
        #: receivers with an attempt in flight (module doc: Delivery)
        self._busy: set[str] = set()

    def update_settings(self, settings: Settings) -> None:
        """Use these receivers for events from now on (queued ones keep theirs)."""
        self._settings = settings

    def receivers(self, database: str, event: str) -> list[WebhookSettings]:
        """The webhooks that want ``event`` of ``database``."""
        table = self._settings.databases.get(database)
        hooks: Iterable[WebhookSettings] = self._settings.service.webhooks
        if table is not None:
            hooks = (*hooks, *table.webhooks)
        return [w for w in hooks if event in w.events]

    def job_event(self, record: JobRecord, outcome: Outcome) -> None:
        """The job manager's hook: queue the notifications of a job's end. Never
        blocks, never raises (a bug here is logged, the job is not concerned)."""
        try:
            for event in events_of(record, outcome):
                for webhook in self.receivers(record.database, event):
                    delivery = str(uuid.uuid4())
                    body = _body(event, delivery, record, outcome)
                    self._put(_Delivery(webhook, event, delivery, body, time.monotonic()))
        except Exception:
            log.exception("notification_not_queued", job_id=record.id)

    def _put(self, item: _Delivery) -> None:
        if len(self._queue) >= self._queue_size:
            dropped = self._queue.popleft()
            self._count(dropped, "dropped", "the queue is full")
        self._queue.append(item)
        self._metrics.queued.set(len(self._queue))
        self._signal()

    def _signal(self) -> None:
        """Wake the idle workers: a notification is queued or a receiver is free."""
        if self._wake is not None:
            self._wake.set()

    def _count(self, item: _Delivery, outcome: str, why: str | None = None) -> None:
        self._metrics.notifications.labels(item.event, outcome).inc()
        if outcome == "delivered":
            log.info(
                "notification_delivered",
                notify_event=item.event,
                url=item.webhook.display_url,
                attempts=item.attempts,
            )
        else:
            log.warning(
                "notification_failed",
                notify_event=item.event,
                url=item.webhook.display_url,
                outcome=outcome,
                attempts=item.attempts,
                error=why,
            )

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Send until cancelled; then the last attempts (module doc: Delivery)."""
        self._wake = anyio.Event()
        headers = {"User-Agent": f"vdistream/{__version__}"}
        session = aiohttp.ClientSession(headers=headers)
        try:
            async with anyio.create_task_group() as tg:
                for n in range(self._workers):
                    tg.start_soon(self._work, session, name=f"vdistream notifications {n}")
                task_status.started()
        finally:
            with anyio.CancelScope(shield=True):
                with anyio.move_on_after(self._flush_timeout):
                    await self._flush(session)
                for item in (*self._queue, *self._in_flight):
                    self._count(item, "dropped", "the service stopped")
                self._queue.clear()
                self._in_flight.clear()
                self._busy.clear()
                self._metrics.queued.set(0)
                self._wake = None
                await session.close()

    async def _next(self) -> _Delivery:
        """The oldest queued notification that is due and whose receiver has no
        attempt in flight; waits for one."""
        while True:
            now, soonest = time.monotonic(), float("inf")
            for item in self._queue:
                if item.receiver in self._busy:
                    continue
                if item.due <= now:
                    self._queue.remove(item)  # by identity (eq=False); at most queue_size
                    self._metrics.queued.set(len(self._queue))
                    return item
                soonest = min(soonest, item.due)
            assert self._wake is not None
            if self._wake.is_set():
                self._wake = anyio.Event()
            with anyio.move_on_after(soonest - now):
                await self._wake.wait()

    async def _work(self, session: aiohttp.ClientSession) -> None:
        while True:
            item = await self._next()
            if time.monotonic() >= item.deadline:  # waited in the queue past it
                self._count(item, "failed", item.why or "its deadline passed before it was sent")
                continue
            self._in_flight.add(item)
            self._busy.add(item.receiver)
            try:
                retry, why = await self._attempt(session, item, item.deadline)
                # cancelled in the attempt: stays in flight, for the last attempt
                self._in_flight.discard(item)
                self._settle(item, retry, why)
            except Exception as exc:  # a bug here must not take the service down
                self._in_flight.discard(item)
                log.exception("notification_crashed", notify_event=item.event)
                self._count(item, "failed", repr(exc))
            finally:
                self._busy.discard(item.receiver)
                self._signal()

    def _settle(self, item: _Delivery, retry: bool, why: str | None) -> None:
        """After an attempt: counted (delivered, rejected, failed) or queued again for
        a retry after its backoff (module doc: Delivery)."""
        if why is None:
            self._count(item, "delivered")
            return
        item.why = why
        if not retry:
            self._count(item, "rejected", why)
            return
        wait = min(_MAX_BACKOFF, self._backoff * 2 ** (item.attempts - 1))
        wait *= random.uniform(0.5, 1.0)  # jitter, not a secret
        if item.attempts >= item.webhook.attempts or time.monotonic() + wait >= item.deadline:
            self._count(item, "failed", why)
            return
        log.info(
            "notification_retry",
            notify_event=item.event,
            url=item.webhook.display_url,
            attempts=item.attempts,
            error=why,
            wait=round(wait, 3),
        )
        item.due = time.monotonic() + wait
        self._put(item)

    async def _attempt(
        self, session: aiohttp.ClientSession, item: _Delivery, deadline: float
    ) -> tuple[bool, str | None]:
        """One POST: ``(retry, None)`` when delivered, else whether a retry may help
        and why it failed."""
        item.attempts += 1
        webhook = item.webhook
        timestamp = str(int(time.time()))
        headers = {
            "Content-Type": "application/json",
            EVENT_HEADER: item.event,
            DELIVERY_HEADER: item.delivery,
            TIMESTAMP_HEADER: timestamp,
            SIGNATURE_HEADER: sign(webhook.secret.reveal().encode(), timestamp, item.body),
        }
        limit = max(0.001, min(webhook.timeout, deadline - time.monotonic()))
        try:
            # aiohttp's own timeout and ours: the cancel scope bounds DNS and the
            # connection pool's wait too
            with anyio.fail_after(limit + 0.5):
                async with session.post(
                    webhook.url,
                    data=item.body,
                    headers=headers,
                    allow_redirects=False,
                    timeout=aiohttp.ClientTimeout(total=limit),
                ) as response:
                    status = response.status
                    # only the status matters: a bounded read (an endless answer is
                    # cut off, its connection closed, not read until the timeout)
                    await response.content.read(_MAX_ANSWER)
        except (TimeoutError, aiohttp.ServerTimeoutError):
            return True, f"no answer within {limit:g} s"
        except aiohttp.ClientError as exc:
            return True, f"{type(exc).__name__}: {exc}"
        except OSError as exc:
            return True, str(exc)
        if 200 <= status < 300:
            return False, None
        return status >= 500 or status in _RETRY_STATUS, f"HTTP {status}"

    async def _flush(self, session: aiohttp.ClientSession) -> None:
        """One last attempt for each notification queued or cut off in flight."""
        pending = [*self._in_flight, *self._queue]
        self._in_flight.clear()
        self._queue.clear()
        if not pending:
            return
        self._in_flight.update(pending)  # counted dropped by ``run`` if not done in time

        async def last(item: _Delivery) -> None:
            if time.monotonic() >= item.deadline:  # never after its deadline, even now
                self._in_flight.discard(item)
                self._count(item, "failed", item.why or "its deadline passed before it was sent")
                return
            try:
                retry, why = await self._attempt(session, item, time.monotonic() + 60.0)
            except Exception as exc:  # one bug must not cost the others their attempt
                log.exception("notification_crashed", notify_event=item.event)
                retry, why = True, repr(exc)
            self._in_flight.discard(item)
            outcome = "delivered" if why is None else "failed" if retry else "rejected"
            self._count(item, outcome, why)

        async with anyio.create_task_group() as tg:
            for item in pending:
                tg.start_soon(last, item)
