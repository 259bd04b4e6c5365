"""Fault injection costs nothing when unused: the checks live in a session chosen once."""

from __future__ import annotations

import random
from typing import Any

import pytest

from tests.engines.fake_client import CHUNK, OPTIONS, FakeClient, run_job
from vdistream import Registry
from vdistream.engines import FailPoint, InjectedFaultError, Phase, StripedBackup, faults, striping
from vdistream.engines.session import ServerSession

pytestmark = pytest.mark.asyncio

DEVICES = 3
DATA = random.Random(7).randbytes(20 * CHUNK + 5)


async def test_only_an_engine_with_a_fail_point_runs_the_fault_checks(
    registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without a fail point the engine runs a plain ``ServerSession``, whose commands go
    out without any fault check; with one, a ``FaultySession`` that fires it."""
    built: list[type[ServerSession]] = []

    def spy(*args: Any, **kwargs: Any) -> ServerSession:
        session = faults.session_for(*args, **kwargs)
        built.append(type(session))
        return session

    monkeypatch.setattr(striping, "session_for", spy)
    await run_job(StripedBackup(DATA, OPTIONS), FakeClient(registry, DEVICES), registry)
    point = FailPoint(Phase.MID_STREAM, after_commands=4 * DEVICES)
    with pytest.raises(InjectedFaultError):
        await run_job(
            StripedBackup(DATA, OPTIONS, fail_at=point), FakeClient(registry, DEVICES), registry
        )
    assert built == [ServerSession, faults.FaultySession]
    assert ServerSession.send is not faults.FaultySession.send
