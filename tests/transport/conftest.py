"""Fixtures for the tests across processes (``test_xproc*.py``): an engine-side agent
process per module and a ``World`` on it per test (see ``remote_proxy``). Named
``xproc_*`` so that no other test module of this directory picks them up by accident."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
import pytest_asyncio

from tests.transport.remote_proxy import AgentProcess, World


@pytest.fixture(scope="module")
def xproc_agent() -> Iterator[AgentProcess]:
    process = AgentProcess()
    yield process
    process.stop()


@pytest_asyncio.fixture
async def xproc_world(xproc_agent: AgentProcess) -> AsyncIterator[World]:
    world = await World.xproc_on(xproc_agent)
    try:
        yield world
    finally:
        await world.close()
