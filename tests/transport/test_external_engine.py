"""``ExternalBackup``/``ExternalRestore`` in one process: the job's set published by
name, ``feed``/``drain`` (the engine side) meeting it over a real Unix socket, real
files as their input and output; the errors of a set nobody opens."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

import vdistream
from vdistream.coordinator import JobStatus
from vdistream.engines.base import Direction, EngineError
from vdistream.engines.external import (
    ExternalBackup,
    ExternalOptions,
    ExternalRestore,
    ExternalResult,
    drain,
    feed,
)
from vdistream.errors import ConfigError

pytestmark = pytest.mark.asyncio


@pytest.fixture
def empty() -> Iterator[int]:
    """A file descriptor at its end of file."""
    fd = os.open(os.devnull, os.O_RDONLY)
    yield fd
    os.close(fd)


def runtime(tmp_path: Path) -> Path:
    return tmp_path / "rt"


async def published(path: Path, within: float = 5.0) -> None:
    with anyio.fail_after(within):
        while not await anyio.Path(path).exists():  # noqa: ASYNC110 - another task's file
            await anyio.sleep(0.01)


async def test_backup_and_restore_through_feed_and_drain(tmp_path: Path) -> None:
    rt = runtime(tmp_path)
    data = os.urandom(3 * 1024 * 1024 + 12345)
    source = tmp_path / "input.bin"
    source.write_bytes(data)
    dest = tmp_path / "dest"
    options = ExternalOptions(directory=rt, connect_timeout=10)

    engine = ExternalBackup("nightly", options, job="b1")
    assert engine.set_name == "nightly"
    assert engine.direction is Direction.BACKUP
    results = {}
    async with anyio.create_task_group() as tg:

        async def back_up() -> None:
            results["job"] = await vdistream.backup(
                engine, str(dest), backup_id="b1", options=vdistream.JobOptions(devices=3)
            )

        tg.start_soon(back_up)
        await published(rt / "nightly.sock")
        with source.open("rb") as f:
            results["feed"] = await feed("nightly", f.fileno(), devices=3, directory=rt)
    job = results["job"]
    job.raise_for_status()
    assert job.set_name == "nightly"  # the hint: the job's set is the published one
    assert [d.name for d in job.devices] == ["nightly", "nightly1", "nightly2"]
    fed = results["feed"]
    assert fed.logical_bytes == len(data)
    assert fed.devices == 3
    made = job.engine_result
    assert isinstance(made, ExternalResult)
    assert made.name == "nightly"
    assert made.engine_pid == os.getpid()
    assert made.logical_bytes == job.bytes == sum(d.bytes for d in made.devices)
    assert job.configuration is not None
    assert job.configuration.block_size == 65536
    assert not (rt / "nightly.sock").exists()
    assert not (rt / "nightly.lock").exists()

    out = tmp_path / "out.bin"
    async with anyio.create_task_group() as tg:

        async def restore() -> None:
            results["restore"] = await vdistream.restore(
                ExternalRestore("back", options),
                str(dest),
                "b1",
                options=vdistream.JobOptions(devices=3),
            )

        tg.start_soon(restore)
        await published(rt / "back.sock")
        with out.open("wb") as f:
            results["drain"] = await drain("back", f.fileno(), directory=rt)
    results["restore"].raise_for_status()
    assert results["drain"].logical_bytes == len(data)
    assert hashlib.sha256(out.read_bytes()).digest() == hashlib.sha256(data).digest()


async def test_nobody_opening_the_set_fails_in_one_line(tmp_path: Path) -> None:
    rt = runtime(tmp_path)
    dest = tmp_path / "dest"
    engine = ExternalBackup("lonely", ExternalOptions(directory=rt, connect_timeout=0.3))
    with anyio.fail_after(10):
        result = await vdistream.backup(engine, str(dest), options=vdistream.JobOptions(devices=2))
    assert result.status is JobStatus.FAILED
    error = result.error
    assert isinstance(error, EngineError)
    text = str(error)
    assert "\n" not in text
    assert "no engine opened the set 'lonely' within 0.3 s" in text
    assert str(rt / "lonely.sock") in text
    assert "vdistream feed lonely" in text
    assert result.devices == ()  # no device opened, nothing written
    assert not (rt / "lonely.sock").exists()
    assert not (rt / "lonely.lock").exists()


async def test_feed_of_a_set_nobody_published(tmp_path: Path, empty: int) -> None:
    with pytest.raises(EngineError) as caught:
        await feed("absent", empty, directory=runtime(tmp_path))
    assert "absent" in str(caught.value)


async def test_feed_refuses_a_set_of_another_device_count(tmp_path: Path, empty: int) -> None:
    rt = runtime(tmp_path)
    engine = ExternalBackup("two", ExternalOptions(directory=rt, connect_timeout=10))
    results = {}
    async with anyio.create_task_group() as tg:

        async def back_up() -> None:
            results["job"] = await vdistream.backup(
                engine, str(tmp_path / "dest"), options=vdistream.JobOptions(devices=2)
            )

        tg.start_soon(back_up)
        await published(rt / "two.sock")
        with pytest.raises(ConfigError) as caught:
            await feed("two", empty, devices=4, directory=rt)
    assert "--devices 4: the set 'two' has 2 devices" in str(caught.value)
    assert not results["job"].ok


async def test_a_name_in_use_is_refused_and_the_first_set_keeps_it(tmp_path: Path) -> None:
    rt = runtime(tmp_path)
    options = ExternalOptions(directory=rt, connect_timeout=10)
    async with anyio.create_task_group() as tg:
        tg.start_soon(vdistream.backup, ExternalBackup("taken", options), str(tmp_path / "a"))
        await published(rt / "taken.sock")
        second = await vdistream.backup(ExternalBackup("taken", options), str(tmp_path / "b"))
        assert (rt / "taken.sock").exists()  # still the first job's
        tg.cancel_scope.cancel()
    assert second.status is JobStatus.FAILED
    assert str(second.error) == (
        f"the set 'taken' could not be published: a set named 'taken' is already published "
        f"by pid {os.getpid()} (in {str(rt)!r})"
    )
    assert not (rt / "taken.sock").exists()  # the first one's cancellation unpublished it


async def test_the_job_waits_for_a_late_engine_beyond_its_configuration_timeout(
    tmp_path: Path, empty: int
) -> None:
    """The job's own configuration timeout (0.3 s) would abort it before the engine
    arrives (0.8 s); the engine's ``configuration_wait`` covers the connect timeout."""
    rt = runtime(tmp_path)
    engine = ExternalBackup("late", ExternalOptions(directory=rt, connect_timeout=5))
    assert engine.configuration_wait == 35.0
    results = {}
    async with anyio.create_task_group() as tg:

        async def back_up() -> None:
            options = vdistream.JobOptions(devices=2, configuration_timeout=0.3, stall_timeout=0.5)
            results["job"] = await vdistream.backup(engine, str(tmp_path / "d"), options=options)

        tg.start_soon(back_up)
        await published(rt / "late.sock")
        await anyio.sleep(0.8)  # past both the configuration and the stall timeouts
        await feed("late", empty, directory=rt)
    results["job"].raise_for_status()
