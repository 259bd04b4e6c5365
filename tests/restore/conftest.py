"""Helpers for the restore tests: real SQLite databases backed up into real files, and
streams damaged on disk the way a bad medium or a careless copy damages them."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest

from vdistream.operations import BackupSettings, KeySource, run_backup
from vdistream.pipeline.keys import generate_key_file
from vdistream.pipeline.spec import parse_compression

#: small transfers, so that a few hundred KiB cross many chunks and every device
SMALL = {"block_size": 4096, "max_transfer_size": 65536}


def make_database(path: Path, rows: int = 3000) -> Path:
    """A SQLite database of a few hundred KiB of incompressible rows."""
    connection = sqlite3.connect(path)
    with connection:
        connection.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, payload BLOB)")
        connection.executemany(
            "INSERT INTO t (payload) VALUES (?)", [(os.urandom(100),) for _ in range(rows)]
        )
    connection.close()
    return path


def rows_of(path: Path) -> int:
    connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return int(connection.execute("SELECT count(*) FROM t").fetchone()[0])
    finally:
        connection.close()


def streams(dest: Path, backup_id: str) -> list[Path]:
    return sorted((dest / backup_id).glob("stream-*.vdi"))


def flip_bit(path: Path, offset_from_end: int, bit: int = 0) -> None:
    """Flip one bit ``offset_from_end`` bytes before the end of ``path``."""
    data = bytearray(path.read_bytes())
    data[len(data) - offset_from_end] ^= 1 << bit
    path.write_bytes(bytes(data))


def flip_bit_at(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 1
    path.write_bytes(bytes(data))


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "backup.key"
    generate_key_file(path)
    return path


async def backup_database(
    database: Path,
    dest: Path,
    *,
    backup_id: str = "b",
    devices: int = 2,
    compress: str = "none",
    keys: KeySource | None = None,
) -> str:
    outcome = await run_backup(
        f"sqlite://{database}",
        str(dest),
        BackupSettings(
            devices=devices,
            backup_id=backup_id,
            compression=parse_compression(compress),
            encryption=keys,
            **SMALL,
        ),
    )
    assert outcome.ok, outcome.result.error
    return backup_id
