"""Fixtures of the database engine tests; ``pg`` is a real PostgreSQL 15 server.

``pg`` (session scope) starts one server for the whole run, with ``pgbench -i -s 2``
data in its ``postgres`` database, and stops it at the end (``pg_ctl stop -m fast``).
If PostgreSQL's binaries are missing the fixture FAILS (it never skips): these tests
are part of the suite, and ``scripts/test`` installs PostgreSQL on a fresh machine.
``pg_cluster`` is the area the server lives in, for tests that start a second server
(on a restored data directory). See ``tests/databases/pgserver.py`` for how root and
the ``postgres`` user share the work.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.databases.pgserver import PG_BINDIR, PgCluster, PgServer, missing_tools, run
from vdistream.engines import StripingOptions

#: Small transfers so that even small backups spread over every device.
OPTIONS = StripingOptions(block_size=4096, max_transfer_size=256 * 1024)


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    missing = missing_tools(PG_BINDIR)
    if missing:
        pytest.fail(
            f"PostgreSQL's binaries are missing in {PG_BINDIR} ({', '.join(missing)}): run "
            "scripts/test, which installs the packages of .ci/apt-packages, or "
            "`apt-get install postgresql` (VDISTREAM_TEST_PG_BINDIR names another bindir)",
            pytrace=False,
        )
    if shutil.which("runuser") is None:
        pytest.fail("runuser (util-linux) is needed to run PostgreSQL as its user", pytrace=False)
    cluster = PgCluster(PG_BINDIR)
    try:
        yield cluster
    finally:
        cluster.close()


@pytest.fixture(scope="session")
def pg(pg_cluster: PgCluster) -> PgServer:
    """The primary server, running, with pgbench's tables (scale 2) in ``postgres``."""
    server = pg_cluster.initdb("primary")
    server.start()
    # pgbench's -d is --debug: the database is its last argument.
    connection = ["-h", str(server.socket_dir), "-p", str(server.port), "-U", "postgres"]
    run([server.tool("pgbench"), "-i", "-s", "2", "-q", *connection, "postgres"])
    return server


def tree(root: Path) -> dict[str, str]:
    """Every file below ``root`` with its SHA-256."""
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }
