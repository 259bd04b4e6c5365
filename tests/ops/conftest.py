"""Helpers of tests/ops over the daemon tests' ``Daemon`` (tests/daemon/conftest.py): plain
synchronous requests over its socket, and a job's end."""

from __future__ import annotations

import http.client
import json
import time
from typing import Any

import pytest

from tests.daemon.conftest import Daemon, _UnixHTTPConnection

TERMINAL = ("succeeded", "failed", "aborted")


def request(daemon: Daemon, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    """One request over the daemon's socket; (status, decoded JSON or raw text)."""
    connection: http.client.HTTPConnection = _UnixHTTPConnection(str(daemon.socket), timeout=10)
    try:
        data = None if body is None else json.dumps(body)
        connection.request(method, path, data, {"Content-Type": "application/json"})
        response = connection.getresponse()
        raw = response.read()
        try:
            return response.status, json.loads(raw)
        except ValueError:
            return response.status, raw.decode()
    finally:
        connection.close()


def submit(daemon: Daemon, **body: Any) -> str:
    """POST /v1/jobs; the new job's id."""
    status, job = request(daemon, "POST", "/v1/jobs", body)
    assert status in (200, 201, 202), job
    return str(job["id"])


def wait_job(
    daemon: Daemon, job_id: str, states: tuple[str, ...] = TERMINAL, timeout: float = 60
) -> dict[str, Any]:
    """Poll the job until its state is one of ``states``; its JSON form."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status, job = request(daemon, "GET", f"/v1/jobs/{job_id}")
        if status == 200 and job["state"] in states:
            return dict(job)
        time.sleep(0.1)
    pytest.fail(f"job {job_id} did not reach {states} in {timeout} s")
