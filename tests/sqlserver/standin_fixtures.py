"""Fixtures of the stand-in SQL Server and its VDI library (see ``standin``)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from standin.mssql.control import SQLCMD, StandinServer
from standin.sqlvdi.build import Libraries, build

__all__ = ("sqlvdi_libs", "standin", "standin_env")

_SHM = Path("/dev/shm")


def _segments(sets: list[str]) -> list[str]:
    """The shared-memory segments of these sets that still exist."""
    names = [f"sqlvdi-standin.{s}" for s in sets]
    names += [f"{n}.buffers" for n in names]
    return [n for n in names if (_SHM / n).exists()]


@pytest.fixture(scope="session")
def sqlvdi_libs(tmp_path_factory: pytest.TempPathFactory) -> Libraries:
    """Both stand-in libraries, compiled once per test session."""
    out: Path = tmp_path_factory.mktemp("sqlvdi")
    return build(out)


@pytest.fixture
def standin(tmp_path: Path, sqlvdi_libs: Libraries) -> Iterator[StandinServer]:
    """A running stand-in SQL Server (data in ``tmp_path/mssql``), stopped and checked after."""
    server = StandinServer.start(tmp_path / "mssql", libs=sqlvdi_libs)
    try:
        yield server
    finally:
        server.stop()
    assert server.proc.poll() is not None, "the stand-in SQL Server is still running"
    # only the sets of this server: other test runs may share /dev/shm. A set's segments
    # go within one wait slice of its last user; give the peers a bounded moment
    sets = server.sets_seen()
    deadline = time.monotonic() + 5
    while (left := _segments(sets)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not left, f"shared memory left behind in /dev/shm: {sorted(left)}"


@pytest.fixture
def standin_env(monkeypatch: pytest.MonkeyPatch, sqlvdi_libs: Libraries) -> dict[str, str]:
    """VDISTREAM_SQLVDI -> the stand-in libsqlvdi.so, VDISTREAM_SQLCMD -> the stand-in sqlcmd."""
    env = {"VDISTREAM_SQLVDI": str(sqlvdi_libs.client), "VDISTREAM_SQLCMD": str(SQLCMD)}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env
