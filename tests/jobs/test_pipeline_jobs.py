"""Backups with compression and encryption, end to end through the operations layer.

Round trips for every combination of stages on 1 and 4 devices with random and
compressible data; corruption of every kind caught by both restore and verify with a
distinct message; a job cancelled in the middle of a compression or encryption step
leaves no thread working and no file behind.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import anyio
import pytest
import pytest_asyncio

from vdistream.coordinator import Job
from vdistream.errors import KeyMissingError, WrongKeyError
from vdistream.operations import (
    BackupSettings,
    KeySource,
    run_backup,
    run_restore,
    run_verify,
)
from vdistream.pipeline.keys import generate_key_file
from vdistream.pipeline.spec import parse_compression

pytestmark = pytest.mark.asyncio

SMALL = {"block_size": 4096, "max_transfer_size": 65536}


def random_data(size: int) -> bytes:
    return os.urandom(size)


def compressible_data(size: int) -> bytes:
    rng = random.Random(3)
    words = [b"alpha", b"beta", b"gamma", b"delta", b"\x00" * 64, b"epsilon"]
    out = bytearray()
    while len(out) < size:
        out += rng.choice(words)
    return bytes(out[:size])


async def backup_file(
    tmp_path: Path,
    data: bytes,
    *,
    devices: int,
    compress: str = "none",
    keys: KeySource | None = None,
    backup_id: str = "b",
) -> tuple[Path, str]:
    source = tmp_path / "source.bin"
    await anyio.Path(source).write_bytes(data)
    dest = tmp_path / "dest"
    outcome = await run_backup(
        f"cmd:cat {source}",
        str(dest),
        BackupSettings(
            devices=devices,
            compression=parse_compression(compress),
            encryption=keys,
            backup_id=backup_id,
            **SMALL,
        ),
    )
    assert outcome.ok, outcome.result.error
    return dest, backup_id


async def restore_bytes(
    dest: Path, backup_id: str, tmp_path: Path, keys: KeySource | None
) -> bytes:
    out = tmp_path / "restored.bin"
    result = await run_restore(f"{dest}/{backup_id}", f"cmd:sh -c 'cat > {out}'", keys=keys)
    assert result.ok, result.error
    return await anyio.Path(out).read_bytes()


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "backup.key"
    generate_key_file(path)
    return path


@pytest.mark.parametrize("devices", [1, 4])
@pytest.mark.parametrize("compress", ["none", "zstd:1", "zstd:3", "lz4"])
@pytest.mark.parametrize("encrypt", [False, True], ids=["plain", "encrypted"])
@pytest.mark.parametrize("kind", ["random", "compressible"])
async def test_round_trip_every_combination(
    tmp_path: Path, key_file: Path, devices: int, compress: str, encrypt: bool, kind: str
) -> None:
    data = (random_data if kind == "random" else compressible_data)(700_000)
    keys = KeySource(key_file=str(key_file)) if encrypt else None
    dest, backup_id = await backup_file(
        tmp_path, data, devices=devices, compress=compress, keys=keys
    )
    manifest = json.loads((dest / backup_id / "manifest.json").read_text())
    stored = sum(d["bytes"] for d in manifest["devices"])
    logical = sum(d["logical_bytes"] for d in manifest["devices"])
    if compress != "none" and kind == "compressible":
        assert stored < logical / 3  # compression happened before storage
    if encrypt:
        assert manifest["pipeline"]["encryption"]["cipher"] == "aes-256-gcm"
        blob = b"".join((dest / d["key"]).read_bytes() for d in manifest["devices"])
        assert b"alpha" not in blob  # nothing readable reached the medium
    assert str(key_file) not in json.dumps(manifest)  # no key material, not even its path
    report = await run_verify(f"{dest}/{backup_id}", keys=keys)
    assert report.ok, report.checks
    assert await restore_bytes(dest, backup_id, tmp_path, keys) == data


# --- corruption: each caught by restore AND verify, each with its own message ---------


async def _both_fail(
    dest: Path, backup_id: str, tmp_path: Path, keys: KeySource | None, words: str
) -> None:
    report = await run_verify(f"{dest}/{backup_id}", keys=keys)
    assert not report.ok
    bad = " ".join(c.detail for c in report.checks if not c.ok)
    assert words in bad, bad
    out = tmp_path / "never.bin"
    try:
        result = await run_restore(f"{dest}/{backup_id}", f"cmd:sh -c 'cat > {out}'", keys=keys)
    except Exception as exc:  # refused before the job started (a catalog or key error)
        message = str(exc)
    else:
        assert not result.ok
        message = str(result.error)
    assert words in message, message


@pytest_asyncio.fixture
async def encrypted(tmp_path: Path, key_file: Path) -> tuple[Path, str, KeySource]:
    keys = KeySource(key_file=str(key_file))
    data = compressible_data(600_000) + random_data(600_000)
    dest, backup_id = await backup_file(tmp_path, data, devices=4, compress="zstd:3", keys=keys)
    return dest, backup_id, keys


def streams(dest: Path, backup_id: str) -> list[Path]:
    return sorted((dest / backup_id).glob("stream-*.vdi"))


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_bit_flip_at_a_random_offset(
    tmp_path: Path, encrypted: tuple[Path, str, KeySource], seed: int
) -> None:
    dest, backup_id, keys = encrypted
    rng = random.Random(seed)
    victim = rng.choice(streams(dest, backup_id))
    raw = bytearray(victim.read_bytes())
    raw[rng.randrange(100, len(raw))] ^= 1 << rng.randrange(8)
    victim.write_bytes(bytes(raw))
    await _both_fail(dest, backup_id, tmp_path, keys, "authentic")


async def test_truncation(tmp_path: Path, encrypted: tuple[Path, str, KeySource]) -> None:
    dest, backup_id, keys = encrypted
    victim = streams(dest, backup_id)[0]
    victim.write_bytes(victim.read_bytes()[:-100])
    await _both_fail(dest, backup_id, tmp_path, keys, "truncated")


async def test_segment_reorder(tmp_path: Path, key_file: Path) -> None:
    keys = KeySource(key_file=str(key_file))
    data = random_data(3 * 1024 * 1024)
    dest, backup_id = await backup_file(tmp_path, data, devices=1, keys=keys)
    (victim,) = streams(dest, backup_id)
    raw = victim.read_bytes()
    header, segment = 76, 4 + (1 << 20) + 16  # v1 header; a full 1 MiB segment
    first = raw[header : header + segment]
    second = raw[header + segment : header + 2 * segment]
    victim.write_bytes(raw[:header] + second + first + raw[header + 2 * segment :])
    await _both_fail(dest, backup_id, tmp_path, keys, "authentic")


async def test_device_swap(tmp_path: Path, key_file: Path) -> None:
    keys = KeySource(key_file=str(key_file))
    dest, backup_id = await backup_file(tmp_path, random_data(8 * 65536), devices=4, keys=keys)
    a, b = streams(dest, backup_id)[1:3]
    assert a.stat().st_size == b.stat().st_size  # same size: only the crypto can tell
    data_a, data_b = a.read_bytes(), b.read_bytes()
    a.write_bytes(data_b)
    b.write_bytes(data_a)
    await _both_fail(dest, backup_id, tmp_path, keys, "authentic")


async def test_wrong_key(tmp_path: Path, encrypted: tuple[Path, str, KeySource]) -> None:
    dest, backup_id, _ = encrypted
    other = tmp_path / "other.key"
    generate_key_file(other)
    await _both_fail(dest, backup_id, tmp_path, KeySource(key_file=str(other)), "does not match")
    with pytest.raises(WrongKeyError):
        await run_restore(f"{dest}/{backup_id}", "cmd:true", keys=KeySource(key_file=str(other)))


async def test_missing_key(tmp_path: Path, encrypted: tuple[Path, str, KeySource]) -> None:
    dest, backup_id, _ = encrypted
    await _both_fail(dest, backup_id, tmp_path, None, "is encrypted")
    with pytest.raises(KeyMissingError):
        await run_restore(f"{dest}/{backup_id}", "cmd:true")


async def test_passphrase_round_trip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BACKUP_PASSPHRASE", "correct horse battery staple")
    keys = KeySource(passphrase_env="BACKUP_PASSPHRASE")
    data = compressible_data(300_000)
    dest, backup_id = await backup_file(tmp_path, data, devices=2, compress="lz4", keys=keys)
    manifest = (dest / backup_id / "manifest.json").read_text()
    assert "correct horse" not in manifest
    assert "scrypt" in manifest
    assert await restore_bytes(dest, backup_id, tmp_path, keys) == data
    monkeypatch.setenv("BACKUP_PASSPHRASE", "wrong")
    with pytest.raises(WrongKeyError):
        await run_restore(f"{dest}/{backup_id}", "cmd:true", keys=keys)


# --- cancellation in the middle of a stage ------------------------------------------------


@pytest.mark.parametrize("stage", ["compress", "encrypt"])
async def test_cancel_mid_stage_leaves_no_thread_and_no_file(
    tmp_path: Path, key_file: Path, stage: str
) -> None:
    source = tmp_path / "big.bin"
    await anyio.Path(source).write_bytes(random_data(40 * 1024 * 1024))
    dest = tmp_path / "dest"
    jobs: list[Job] = []
    settings = BackupSettings(
        devices=4,
        compression=parse_compression("zstd:19" if stage == "compress" else "none"),
        encryption=KeySource(key_file=str(key_file)) if stage == "encrypt" else None,
    )
    with anyio.move_on_after(30):
        async with anyio.create_task_group() as tg:
            tg.start_soon(
                lambda: run_backup(f"cmd:cat {source}", str(dest), settings, on_job=jobs.append)
            )
            while not jobs or jobs[0].progress.moved()[0] < 2 * 1024 * 1024:  # noqa: ASYNC110
                await anyio.sleep(0.01)
            tg.cancel_scope.cancel()
    (job,) = jobs
    assert job.status.value == "aborted"
    assert job._hash_limiter.borrowed_tokens == 0  # no stage thread still working
    leftovers = [p for p in dest.rglob("*") if p.is_file()] if dest.exists() else []
    assert leftovers == []
