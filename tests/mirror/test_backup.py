"""Mirrored backups to two real directories (``BackupSettings.mirror``, ``--mirror``):
one pass, two complete backups each with its own manifest, restorable and verifiable
from either alone; a failure of either side at any step (preflight, a stream, the
manifest) leaves nothing in either."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from tests.jobs.test_manifest_failure import ManifestRefusingStorage
from tests.storage.test_file import files_under
from vdistream.catalog import CatalogError
from vdistream.coordinator import AbortCause, Job, JobStatus
from vdistream.errors import ConfigError, StorageError, StorageFullError
from vdistream.operations import BackupSettings, KeySource, run_backup, run_restore, run_verify
from vdistream.pipeline.keys import generate_key_file
from vdistream.pipeline.spec import parse_compression
from vdistream.storage import BackupInProgressError, FileStorage, StorageProbeError

pytestmark = pytest.mark.asyncio

SMALL = {"block_size": 4096, "max_transfer_size": 65536}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def source(tmp_path: Path) -> tuple[Path, bytes]:
    data = os.urandom(900_000) + bytes(300_000)
    path = tmp_path / "source.bin"
    path.write_bytes(data)
    return path, data


async def restored_from(ref: str, out: Path, keys: KeySource | None = None) -> bytes:
    result = await run_restore(ref, f"cmd:sh -c 'cat > {out}'", keys=keys)
    assert result.ok, result.error
    return await anyio.Path(out).read_bytes()


async def test_one_pass_two_backups_each_restorable_alone(
    tmp_path: Path, source: tuple[Path, bytes]
) -> None:
    """Compressed and encrypted: the stored streams of both sides are byte-identical,
    which only one run of the stages can give (each run draws fresh nonces); each side
    has its own manifest naming its own streams; each restores and verifies alone."""
    path, data = source
    key = tmp_path / "backup.key"
    generate_key_file(key)
    keys = KeySource(key_file=str(key))
    one, two = tmp_path / "one", tmp_path / "two"
    outcome = await run_backup(
        f"cmd:cat {path}",
        str(one),
        BackupSettings(
            devices=3,
            backup_id="b",
            compression=parse_compression("zstd:3"),
            encryption=keys,
            mirror=str(two),
            **SMALL,
        ),
    )
    assert outcome.ok, outcome.result.error
    assert outcome.manifest_url == (one / "b" / "manifest.json").as_uri()
    assert outcome.mirror_manifest_url == (two / "b" / "manifest.json").as_uri()
    summary = outcome.summary()
    assert summary["mirror_manifest"] == outcome.mirror_manifest_url
    assert summary["manifest"] == outcome.manifest_url

    streams = [f"b/stream-{i:02d}-of-03.vdi" for i in range(3)]
    assert files_under(one) == files_under(two) == ["b/manifest.json", *streams]
    for name in streams:
        assert sha256((one / name).read_bytes()) == sha256((two / name).read_bytes())
    manifests = {
        side: json.loads((side / "b" / "manifest.json").read_bytes()) for side in (one, two)
    }
    for side, manifest in manifests.items():
        assert [d["url"] for d in manifest["devices"]] == [(side / s).as_uri() for s in streams]
        assert [d["sha256"] for d in manifest["devices"]] == [
            sha256((side / s).read_bytes()) for s in streams
        ]
    assert manifests[one]["pipeline"] == manifests[two]["pipeline"]

    # either side alone: remove the other first
    (tmp_path / "aside").mkdir()
    os.rename(one, tmp_path / "aside" / "one")
    assert await restored_from(f"{two}/b", tmp_path / "from-two", keys) == data
    report = await run_verify(f"{two}/b", keys=keys)
    assert report.ok, report.checks
    os.rename(tmp_path / "aside" / "one", one)
    for name in streams:
        os.remove(two / name)
    assert await restored_from(f"{one}/b", tmp_path / "from-one", keys) == data
    report = await run_verify(f"{one}/b", keys=keys)
    assert report.ok, report.checks


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A directory on a real 256 KiB tmpfs: writing more fails with ENOSPC."""
    directory = tmp_path / "small"
    directory.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=262144", "tmpfs", str(directory)],
        capture_output=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield directory
    finally:
        subprocess.run(["umount", str(directory)], check=True)


@pytest.mark.parametrize("full", ["mirror", "destination"])
async def test_a_full_side_midway_leaves_nothing_in_either(
    tmp_path: Path, source: tuple[Path, bytes], small_disk: Path, full: str
) -> None:
    """One side's medium fills up in the middle of the streams: the job fails with
    that side's DISK_FULL error, and neither side keeps a stream, a temporary or a
    manifest (the other side had written more than the full one)."""
    path, _ = source
    roomy = tmp_path / "roomy"
    dest, mirror = (roomy, small_disk) if full == "mirror" else (small_disk, roomy)
    outcome = await run_backup(
        f"cmd:cat {path}",
        str(dest),
        BackupSettings(devices=2, backup_id="b", mirror=str(mirror), **SMALL),
    )
    assert not outcome.ok
    result = outcome.result
    assert result.status is JobStatus.FAILED
    assert result.aborted_by is AbortCause.SINK
    assert isinstance(result.error, StorageFullError)
    assert small_disk.as_uri() in str(result.error)
    assert outcome.manifest is None
    assert outcome.mirror_manifest_url is None
    assert outcome.summary()["mirror_manifest"] is None
    assert files_under(roomy) == []
    assert files_under(small_disk) == []


async def test_a_refused_mirror_manifest_takes_back_the_destination_manifest(
    tmp_path: Path, source: tuple[Path, bytes]
) -> None:
    """The mirror cannot write its manifest after every stream committed on both
    sides: the destination's manifest (written first) and every stream go again."""
    path, _ = source
    one = tmp_path / "one"
    mirror = ManifestRefusingStorage(tmp_path / "two")
    outcome = await run_backup(
        f"cmd:cat {path}",
        str(one),
        BackupSettings(devices=3, backup_id="b", mirror=mirror, **SMALL),
    )
    assert not outcome.ok
    assert outcome.result.status is JobStatus.FAILED
    assert isinstance(outcome.result.error, StorageError)
    assert "injected manifest write failure" in str(outcome.result.error)
    assert files_under(one) == []
    assert files_under(tmp_path / "two") == []


async def test_a_refused_destination_manifest_writes_none_to_the_mirror(
    tmp_path: Path, source: tuple[Path, bytes]
) -> None:
    path, _ = source
    dest = ManifestRefusingStorage(tmp_path / "one")
    two = tmp_path / "two"
    outcome = await run_backup(
        f"cmd:cat {path}", dest, BackupSettings(devices=2, backup_id="b", mirror=str(two), **SMALL)
    )
    assert not outcome.ok
    assert "injected manifest write failure" in str(outcome.result.error)
    assert files_under(tmp_path / "one") == []
    assert files_under(two) == []


async def test_an_unusable_mirror_is_refused_before_the_engine_starts(
    tmp_path: Path, source: tuple[Path, bytes]
) -> None:
    path, _ = source
    blocked = tmp_path / "blocked"
    blocked.write_bytes(b"a file where the mirror's directory should be")
    one = tmp_path / "one"
    with pytest.raises(StorageProbeError) as caught:
        await run_backup(
            f"cmd:cat {path}",
            str(one),
            BackupSettings(devices=2, backup_id="b", mirror=str(blocked), **SMALL),
        )
    assert str(caught.value) == f"{blocked}: not a directory (a file is in the way)"
    assert files_under(one) == []


async def test_the_id_must_be_free_in_the_mirror_too(
    tmp_path: Path, source: tuple[Path, bytes]
) -> None:
    path, data = source
    one, two = tmp_path / "one", tmp_path / "two"
    first = await run_backup(
        f"cmd:cat {path}", str(two), BackupSettings(devices=2, backup_id="b", **SMALL)
    )
    assert first.ok
    kept = {name: (two / name).read_bytes() for name in files_under(two)}
    with pytest.raises(CatalogError) as caught:
        await run_backup(
            f"cmd:cat {path}",
            str(one),
            BackupSettings(devices=2, backup_id="b", mirror=str(two), **SMALL),
        )
    assert str(caught.value) == f"backup b already exists in {two.as_uri()}"
    assert files_under(one) == []
    assert {name: (two / name).read_bytes() for name in files_under(two)} == kept
    assert await restored_from(f"{two}/b", tmp_path / "out") == data


async def test_the_mirror_cannot_be_the_destination(
    tmp_path: Path, source: tuple[Path, bytes]
) -> None:
    path, _ = source
    one = tmp_path / "one"
    with pytest.raises(ConfigError) as caught:
        await run_backup(
            f"cmd:cat {path}",
            str(one),
            BackupSettings(devices=2, backup_id="b", mirror=one.as_uri() + "/", **SMALL),
        )
    assert str(caught.value) == (
        f"the mirror {one.as_uri()} is the destination itself: give another destination"
    )
    assert not one.exists()


async def test_an_aborted_mirrored_backup_leaves_nothing(tmp_path: Path) -> None:
    """The user aborts while the streams flow (once bytes reached both sides): both
    sides are aborted, nothing stays in either."""
    one, two = tmp_path / "one", tmp_path / "two"
    jobs: list[Job] = []
    moved = 0

    async def abort_when_flowing() -> None:
        nonlocal moved
        for _ in range(3000):  # at most 30 s: the job's progress, polled
            if jobs and jobs[0].progress.moved()[0] >= 4 << 20:
                break
            await anyio.sleep(0.01)
        moved = jobs[0].progress.moved()[0]
        jobs[0].abort()

    async with anyio.create_task_group() as tg:
        tg.start_soon(abort_when_flowing)
        outcome = await run_backup(
            "cmd:head -c 2000000000 /dev/zero",
            str(one),
            BackupSettings(devices=2, backup_id="b", mirror=str(two), **SMALL),
            on_job=jobs.append,
        )
    assert moved >= 4 << 20
    assert outcome.result.status is JobStatus.ABORTED
    assert outcome.result.aborted_by is AbortCause.USER
    assert files_under(one) == []
    assert files_under(two) == []


async def test_a_backup_in_progress_in_the_mirror_is_refused(
    tmp_path: Path, source: tuple[Path, bytes]
) -> None:
    """The mirror's in-progress mark is taken like the destination's: a live writer of
    the same id there refuses the backup before the engine starts."""
    path, _ = source
    one, two = tmp_path / "one", tmp_path / "two"
    async with FileStorage(two).in_progress("b"):
        with pytest.raises(BackupInProgressError) as caught:
            await run_backup(
                f"cmd:cat {path}",
                str(one),
                BackupSettings(devices=2, backup_id="b", mirror=str(two), **SMALL),
            )
    assert str(caught.value).startswith("backup b is being written by another process (")
    assert (two / "b").as_uri() in str(caught.value)
    assert files_under(one) == []
