"""Shared parts of the key tests: real backups through ``run_backup`` (a ``cmd:`` engine
on 2 devices, small transfers), restores into a file, the command line in a subprocess,
and the moto S3 server of tests/s3."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest

from tests.s3.conftest import bucket, moto_server  # noqa: F401  (fixtures)
from vdistream.operations import BackupSettings, KeySource, run_backup, run_restore

ROOT = Path(__file__).resolve().parents[2]
SMALL = {"block_size": 4096, "max_transfer_size": 65536}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def vdistream(*args: str, check: int | None = 0, env: dict[str, str] | None = None) -> Any:
    """The command line in a subprocess; ``check``: the exit code it must have."""
    done = subprocess.run(
        [sys.executable, "-m", "vdistream", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
    )
    if check is not None:
        assert done.returncode == check, (done.returncode, done.stdout, done.stderr)
    return done


async def backup(
    source: Path, dest: str, keys: KeySource | None, backup_id: str, *, compress: str = "none"
) -> None:
    from vdistream.pipeline import parse_compression

    outcome = await run_backup(
        f"cmd:cat {source}",
        dest,
        BackupSettings(
            devices=2,
            compression=parse_compression(compress),
            encryption=keys,
            backup_id=backup_id,
            **SMALL,
        ),
    )
    assert outcome.ok, outcome.result.error


async def restore(ref: str, keys: KeySource | None, out: Path) -> bytes:
    """Restore ``ref`` into ``out`` and return the bytes (raises the job's error)."""
    await anyio.Path(out).unlink(missing_ok=True)
    result = await run_restore(ref, f"cmd:sh -c 'cat > {out}'", keys=keys)
    if not result.ok:
        assert result.error is not None
        raise result.error
    return await anyio.Path(out).read_bytes()


def streams(dest: Path, backup_id: str) -> dict[str, tuple[str, int]]:
    """Each stream file of a backup: its SHA-256 and mtime (ns)."""
    return {
        p.name: (sha256(p.read_bytes()), p.stat().st_mtime_ns)
        for p in sorted((dest / backup_id).glob("*.vdi"))
    }


def without_key_block(manifest: Path) -> dict[str, Any]:
    """A manifest's JSON without its key block and checksum (what a rewrap keeps)."""
    body = json.loads(manifest.read_text())
    body.pop("checksum")
    body["pipeline"]["encryption"].pop("key")
    return body


@pytest.fixture
def source(tmp_path: Path) -> Path:
    path = tmp_path / "source.bin"
    path.write_bytes(os.urandom(200_000))
    return path
