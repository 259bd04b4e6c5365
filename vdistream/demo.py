"""``vdistream demo``: a real backup, verify and restore of a SQLite database.

Creates a SQLite database with real rows (unless one is given), backs it up through 4
virtual devices into ``DIR/backups``, verifies the backup (streams re-read and hashed,
then a restore into a temporary file that must pass ``PRAGMA integrity_check``),
restores it into ``DIR/restored-<id>.db`` and compares the rows with the original.
"""

from __future__ import annotations

import hashlib
import random
import sqlite3
from pathlib import Path

import anyio.to_thread

from vdistream.operations import BackupSettings, run_backup, run_restore, run_verify

__all__ = ("run_demo",)


def _create(path: Path, rows: int = 200_000) -> None:
    """A WAL-mode database (the mode a live application uses), closed properly: the
    last connection's close checkpoints and removes the ``-wal`` and ``-shm`` files."""
    rng = random.Random(42)
    db = sqlite3.connect(path)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        with db:
            db.execute(
                "CREATE TABLE orders (id INTEGER PRIMARY KEY, customer TEXT, amount REAL, "
                "note TEXT)"
            )
            db.executemany(
                "INSERT INTO orders (customer, amount, note) VALUES (?, ?, ?)",
                (
                    (f"customer-{rng.randrange(5000)}", round(rng.uniform(1, 999), 2), "x" * 40)
                    for _ in range(rows)
                ),
            )
    finally:
        db.close()


def _fingerprint(path: Path) -> tuple[int, str]:
    """Rows and a hash of every table's content, in a stable order.

    Read through an ordinary connection with ``query_only``, not ``mode=ro``: a
    read-only connection to a WAL database cannot remove the ``-wal`` and ``-shm``
    files it creates, and would leave them beside the database."""
    db = sqlite3.connect(path)
    try:
        db.execute("PRAGMA query_only=ON")
        digest = hashlib.sha256()
        count = 0
        tables = [
            name
            for (name,) in db.execute(
                "SELECT name FROM sqlite_master WHERE type='table' ORDER BY name"
            )
        ]
        for table in tables:
            for row in db.execute(f'SELECT * FROM "{table}" ORDER BY rowid'):
                digest.update(repr(row).encode())
                count += 1
        return count, digest.hexdigest()
    finally:
        db.close()


def _prepare(directory: str, database: str | None) -> tuple[Path, Path]:
    root = Path(directory).absolute()
    root.mkdir(parents=True, exist_ok=True)
    if database is not None:
        return root, Path(database).absolute()
    db = root / "app.db"
    if not db.exists():
        print(f"creating {db} with 200,000 rows")
        _create(db)
    return root, db


async def run_demo(directory: str, database: str | None) -> int:
    root, db = await anyio.to_thread.run_sync(_prepare, directory, database)
    backups = root / "backups"

    print(f"backing up sqlite://{db} into {backups} through 4 virtual devices")
    outcome = await run_backup(f"sqlite://{db}", str(backups), BackupSettings(devices=4))
    if not outcome.ok:
        print(f"backup failed: {outcome.result.error}")
        return 1
    backup_id = outcome.result.backup_id
    stored = outcome.manifest.stored_bytes if outcome.manifest is not None else None
    print(
        f"  {backup_id}: logical {outcome.result.bytes:,} bytes, stored {stored or 0:,} bytes, "
        f"manifest {outcome.manifest_url}"
    )

    print("verifying (re-read every stream, then restore into a temporary file and check it)")
    report = await run_verify(f"{backups}/{backup_id}")
    for check in report.checks:
        print(f"  {'ok ' if check.ok else 'BAD'} {check.name}: {check.detail}")
    if not report.ok:
        return 1

    target = root / f"restored-{backup_id}.db"
    print(f"restoring into {target}")
    result = await run_restore(f"{backups}/{backup_id}", str(target))
    if not result.ok:
        print(f"restore failed: {result.error}")
        return 1
    original = await anyio.to_thread.run_sync(_fingerprint, db)
    restored = await anyio.to_thread.run_sync(_fingerprint, target)
    same = original == restored
    print(
        f"  {restored[0]:,} rows restored; content "
        f"{'identical to' if same else 'DIFFERENT from'} the original"
    )
    print(f"\nlist the backups: vdistream list {backups}")
    return 0 if same else 1
