"""A rotation cut short (a fault between the temporary's write and its rename, or kill -9
of the process) leaves every manifest either old or new, each valid, and a rerun
finishes the job."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import anyio
import pytest

from tests.keys.conftest import ROOT, backup, restore, sha256, streams
from vdistream.catalog import Manifest, read_manifest
from vdistream.errors import WrongKeyError
from vdistream.operations import KeySource
from vdistream.operations.keys import KeyRef, pipeline_for, rotate_keys
from vdistream.pipeline.keys import generate_key_file
from vdistream.storage.file import FileStorage

pytestmark = pytest.mark.asyncio


async def _opens_with(dest: Path, backup_id: str, keys: dict[str, KeySource]) -> str:
    """Which of ``keys`` opens the backup (its manifest must be valid); exactly one."""
    manifest = await read_manifest(FileStorage(dest), backup_id)
    opened = []
    for name, source in keys.items():
        try:
            await pipeline_for(manifest, source)
        except WrongKeyError:
            continue
        opened.append(name)
    assert len(opened) == 1, (backup_id, opened)
    return opened[0]


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path]:
    old, new = tmp_path / "old.key", tmp_path / "new.key"
    generate_key_file(old)
    generate_key_file(new)
    return old, new


async def test_a_fault_before_the_rename_leaves_the_old_manifest(
    tmp_path: Path, source: Path, pair: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    old, new = pair
    dest = tmp_path / "dest"
    for backup_id in ("b1", "b2", "b3"):
        await backup(source, str(dest), KeySource(key_file=str(old)), backup_id)
    keys = {"old": KeySource(key_file=str(old)), "new": KeySource(key_file=str(new))}
    real_replace = os.replace
    calls: list[str] = []

    def failing_replace(temp: str | Path, final: str | Path) -> None:
        calls.append(str(final))
        assert Path(temp).exists()  # written and fsynced, not yet renamed
        if len(calls) == 2:
            raise OSError(errno.EIO, "Input/output error (injected)")
        real_replace(temp, final)

    # the fault between the temporary's write and its rename
    monkeypatch.setattr(os, "replace", failing_replace)
    report = await rotate_keys(str(dest), [KeyRef(file=str(old))], [KeyRef(file=str(new))])
    assert report.changed == ["b1", "b3"]
    assert calls[1] == str(dest / "b2" / "manifest.json")
    assert [b for b, _ in report.failed] == ["b2"]
    assert "Input/output error (injected)" in report.failed[0][1]
    assert [await _opens_with(dest, b, keys) for b in ("b1", "b2", "b3")] == ["new", "old", "new"]
    assert not list(dest.rglob("*.tmp"))  # the temporary of the failed one is gone

    monkeypatch.setattr(os, "replace", real_replace)
    again = await rotate_keys(str(dest), [KeyRef(file=str(old))], [KeyRef(file=str(new))])
    assert again.ok
    assert again.changed == ["b2"]
    assert again.unchanged == [("b1", "already rotated"), ("b3", "already rotated")]
    data = await restore(f"{dest}/b2", keys["new"], tmp_path / "o")
    assert sha256(data) == sha256(await anyio.Path(source).read_bytes())


def _kill_when_changed(command: list[str], watched: Path, first: bytes) -> int:
    """Run ``command``; SIGKILL it as soon as ``watched`` is no longer ``first``."""
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while watched.read_bytes() == first:
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.002)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.kill()
        process.communicate()
    return process.returncode


async def test_kill_9_in_the_middle(tmp_path: Path, source: Path, pair: tuple[Path, Path]) -> None:
    old, new = pair
    dest = tmp_path / "dest"
    await backup(source, str(dest), KeySource(key_file=str(old)), "b000")
    before = streams(dest, "b000")
    # many more backups to rotate: copies of the manifest under other ids (the rotation
    # reads no stream; these have none)
    template = Manifest.from_json((dest / "b000" / "manifest.json").read_bytes(), where="b000")
    count = 300
    for i in range(1, count):
        backup_id = f"b{i:03d}"
        (dest / backup_id).mkdir()
        copy = dataclasses.replace(template, backup_id=backup_id)
        (dest / backup_id / "manifest.json").write_bytes(copy.to_json())
    # killed once the rotation has reached a backup somewhere in the first half
    watched = dest / f"b{random.randrange(count // 2):03d}" / "manifest.json"
    first = watched.read_bytes()

    command = [sys.executable, "-m", "vdistream", "key", "rotate", str(dest)]
    command += ["--old", str(old), "--new", str(new)]
    returncode = await anyio.to_thread.run_sync(_kill_when_changed, command, watched, first)
    assert returncode == -signal.SIGKILL

    keys = {"old": KeySource(key_file=str(old)), "new": KeySource(key_file=str(new))}
    ids = [f"b{i:03d}" for i in range(count)]
    states = [await _opens_with(dest, b, keys) for b in ids]
    assert states[0] == "new"
    assert "old" in states  # it was cut short
    # in order: a prefix is done, the rest untouched
    assert states == ["new"] * states.count("new") + ["old"] * states.count("old")

    report = await rotate_keys(str(dest), [KeyRef(file=str(old))], [KeyRef(file=str(new))])
    assert report.ok, report.failed
    assert len(report.changed) == states.count("old")
    assert [await _opens_with(dest, b, keys) for b in ids] == ["new"] * count
    assert streams(dest, "b000") == before
    # whatever the kill left (a temporary, a lock file) is debris the sweep removes
    await FileStorage(dest).sweep()
    assert not list(dest.rglob("*.tmp"))
    data = await restore(f"{dest}/b000", keys["new"], tmp_path / "o")
    assert sha256(data) == sha256(await anyio.Path(source).read_bytes())


async def test_two_rotations_at_once(tmp_path: Path, source: Path, pair: tuple[Path, Path]) -> None:
    """Each manifest is rewrapped under its backup's mark: two concurrent rotations
    rewrap each backup once between them, and neither loses the other's work."""
    old, new = pair
    dest = tmp_path / "dest"
    await backup(source, str(dest), KeySource(key_file=str(old)), "b000")
    template = Manifest.from_json((dest / "b000" / "manifest.json").read_bytes(), where="b000")
    count = 60
    for i in range(1, count):
        (dest / f"b{i:03d}").mkdir()
        copy = dataclasses.replace(template, backup_id=f"b{i:03d}")
        (dest / f"b{i:03d}" / "manifest.json").write_bytes(copy.to_json())
    command = [sys.executable, "-m", "vdistream", "key", "rotate", str(dest), "--json"]
    command += ["--old", str(old), "--new", str(new)]

    def both() -> list[subprocess.CompletedProcess[bytes]]:
        running = [subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE) for _ in range(2)]
        return [
            subprocess.CompletedProcess(p.args, p.wait(60), p.communicate()[0], b"")
            for p in running
        ]

    results = await anyio.to_thread.run_sync(both)
    assert [r.returncode for r in results] == [0, 0]
    reports = [json.loads(r.stdout) for r in results]
    changed = sorted(reports[0]["changed"] + reports[1]["changed"])
    assert changed == [f"b{i:03d}" for i in range(count)]  # each exactly once
    keys = {"old": KeySource(key_file=str(old)), "new": KeySource(key_file=str(new))}
    assert {await _opens_with(dest, f"b{i:03d}", keys) for i in range(count)} == {"new"}
