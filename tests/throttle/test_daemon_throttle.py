"""A daemon job throttled live: the database's ``max_rate`` applies, ``vdistream throttle
JOB RATE`` changes it while the job runs (the job's view says the new limit and its
rate follows), the global limit caps every job (``throttle --global``, and a reload sets
it from the settings again), and refusals are one line, exit 2.

Rates are measured from the job's live progress over a few seconds, with generous
bounds: they show that the limit is applied, not how precisely (benchmarks/throttle.py).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import pytest

from tests.daemon.conftest import REPO, TERMINAL, Daemon, _UnixHTTPConnection, slow_url

pytestmark = pytest.mark.timeout(90)

MIB = 1024 * 1024


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vdistream", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        check=False,
    )


def _view(daemon: Daemon, job_id: str) -> dict[str, Any]:
    status, body = daemon.get(f"/v1/jobs/{job_id}")
    assert status == 200, body
    view: dict[str, Any] = json.loads(body)
    return view


def _moved(daemon: Daemon, job_id: str) -> int:
    return int((_view(daemon, job_id).get("progress") or {}).get("bytes", 0))


def _rate(daemon: Daemon, job_id: str, seconds: float) -> float:
    """Bytes per second the job moved over the next ``seconds``."""
    start, before = time.monotonic(), _moved(daemon, job_id)
    time.sleep(seconds)
    return (_moved(daemon, job_id) - before) / (time.monotonic() - start)


def _until(daemon: Daemon, job_id: str, ok: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        view = _view(daemon, job_id)
        if ok(view):
            return view
        time.sleep(0.05)
    raise AssertionError(f"job {job_id}: {view}")


def _post(daemon: Daemon, path: str, body: object) -> tuple[int, dict[str, Any]]:
    conn = _UnixHTTPConnection(str(daemon.socket), timeout=10)
    try:
        conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        answer = conn.getresponse()
        return answer.status, json.loads(answer.read())
    finally:
        conn.close()


def test_a_job_throttled_live_through_the_command_line(
    daemon_factory: Callable[..., Daemon],
) -> None:
    source = slow_url(total=40_000_000, rate=500_000_000)  # as fast as it can
    daemon = daemon_factory({"fast": {"url": source, "max_rate": "2M"}}).start()
    socket = ["--socket", str(daemon.socket)]

    submitted = _run("submit", "backup", "fast", "--no-verify", "--json", *socket)
    assert submitted.returncode == 0, submitted.stderr
    job_id = json.loads(submitted.stdout)["id"]
    view = _until(daemon, job_id, lambda v: v["state"] == "running" and _moved(daemon, job_id) > 0)
    assert view["max_rate"] == 2 * MIB  # the database's limit
    slow = _rate(daemon, job_id, 2.0)
    assert 0.5 * MIB < slow < 3 * MIB, slow

    changed = _run("throttle", job_id, "16M", *socket)
    assert changed.returncode == 0, changed.stderr
    assert changed.stdout == f"job {job_id}: bandwidth limit 16M/s (state running)\n"
    assert _view(daemon, job_id)["max_rate"] == 16 * MIB
    shown = _run("job", job_id, *socket)
    assert "  bandwidth limit 16,777,216 bytes/s\n" in shown.stdout, shown.stdout
    time.sleep(0.5)
    fast = _rate(daemon, job_id, 1.0)
    assert fast > 3 * slow, (slow, fast)

    done = _until(daemon, job_id, lambda v: v["state"] in TERMINAL)
    assert done["state"] == "succeeded", done["error"]
    assert done["max_rate"] is None  # ended: no live limit

    # refusals: one line on stderr, exit 2, nothing changed
    ended = _run("throttle", job_id, "1M", *socket)
    assert ended.returncode == 2
    assert ended.stderr == (
        f"vdistream: job {job_id} already ended (succeeded); its bandwidth limit cannot "
        "change (job_finished, HTTP 409)\n"
    )
    unknown = _run("throttle", "nope", "1M", *socket)
    assert unknown.returncode == 2
    assert unknown.stderr == "vdistream: no job 'nope' (job_not_found, HTTP 404)\n"
    bad = _run("throttle", job_id, "fast", *socket)
    assert bad.returncode == 2
    assert bad.stderr == (
        "vdistream: error: Invalid value for RATE: 'fast' is not a rate; give bytes per "
        "second like 500K, 200M or 1.5G (powers of 1024; KB, MB, GB are powers of 1000), "
        'or "off"\n'
    )

    # the API: a rate that is no rate is a 400 naming it; a finished job a 409
    status, answer = _post(daemon, f"/v1/jobs/{job_id}/throttle", {"max_rate": "lots"})
    assert status == 400
    assert answer["error"]["code"] == "invalid_request"
    assert answer["error"]["message"].startswith("max_rate: 'lots' is not a rate")
    status, answer = _post(daemon, "/v1/throttle", {"max_rate": "9" * 400})  # no HTTP 500
    assert (status, answer["error"]["code"]) == (400, "invalid_request")
    assert answer["error"]["message"].endswith("is more than 1024T (a pebibyte) per second")
    status, answer = _post(daemon, f"/v1/jobs/{job_id}/throttle", {"max_rate": 1024})
    assert (status, answer["error"]["code"]) == (409, "job_finished")
    status, answer = _post(daemon, "/v1/jobs/nope/throttle", {"max_rate": "off"})
    assert (status, answer["error"]["code"]) == (404, "job_not_found")
    status, answer = _post(daemon, "/v1/throttle", {"rate": 1})
    assert (status, answer["error"]["message"]) == (400, "unknown field 'rate' (known: max_rate)")


def test_the_global_limit_caps_every_job(daemon_factory: Callable[..., Daemon]) -> None:
    source = slow_url(total=400_000_000, rate=500_000_000)
    daemon = daemon_factory({"fast": {"url": source}}, service={"max_rate": "64M"}).start()
    socket = ["--socket", str(daemon.socket)]

    shown = _run("throttle", "--global", *socket)
    assert (shown.returncode, shown.stdout) == (0, "global bandwidth limit 64M/s\n"), shown.stderr
    changed = _run("throttle", "--global", "1M", "--json", *socket)
    assert changed.returncode == 0, changed.stderr
    assert json.loads(changed.stdout) == {"max_rate": MIB}

    submitted = _run("submit", "backup", "fast", "--no-verify", "--json", *socket)
    job_id = json.loads(submitted.stdout)["id"]
    view = _until(daemon, job_id, lambda v: v["state"] == "running" and _moved(daemon, job_id) > 0)
    assert view["max_rate"] is None  # no limit of its own: the global one applies
    capped = _rate(daemon, job_id, 2.0)
    assert 0.25 * MIB < capped < 1.6 * MIB, capped

    off = _run("throttle", "--global", "off", *socket)
    assert off.stdout == "global bandwidth limit unlimited\n"
    time.sleep(0.5)
    free = _run("abort", job_id, *socket)  # the rate is free now: end it
    assert free.returncode == 0, free.stderr
    final = _until(daemon, job_id, lambda v: v["state"] in TERMINAL)
    assert final["state"] == "aborted"
    assert final["progress"]["bytes"] > 4 * MIB  # it sped up once the limit was off
    usage = _run("throttle", "--global", "1M", "2M", *socket)
    assert usage.returncode == 2
    assert "throttle --global takes one RATE, not a job id" in usage.stderr

    # a reload sets the global limit from the settings again
    daemon.write_config({"fast": {"url": source}}, service={"max_rate": "32M"})
    daemon.send(signal.SIGHUP)
    deadline = time.monotonic() + 20
    while json.loads(daemon.get("/v1/throttle")[1])["max_rate"] != 32 * MIB:
        assert time.monotonic() < deadline, "the reload did not set the global limit"
        time.sleep(0.05)
