"""Owner locks and owner records: proof that the owner of debris is gone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vdistream.ownership import (
    OwnerLock,
    owner_gone,
    owner_record,
    process_start_time,
    record_owner_gone,
    record_owner_state,
)

HOLD = """
import sys, time
from vdistream.ownership import OwnerLock
lock = OwnerLock.acquire(sys.argv[1])
print("held", flush=True)
time.sleep(60)
"""


def test_lock_of_a_live_process_is_not_gone_and_of_a_killed_one_is(tmp_path: Path) -> None:
    path = tmp_path / "owner.lock"
    child = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "held"
        assert not owner_gone(path)
        with pytest.raises(BlockingIOError):
            OwnerLock.acquire(path)
        record = json.loads(path.read_text())
        assert record["pid"] == child.pid
        assert not record_owner_gone(record)
    finally:
        child.kill()
        child.wait()
        assert child.stdout is not None
        child.stdout.close()
    assert owner_gone(path)  # kill -9 released the lock: the kernel vouches for it
    assert record_owner_gone(record)
    OwnerLock.acquire(path).release()
    assert not path.exists()


def test_a_dead_owners_record_is_read_and_a_removed_file_is_noticed(tmp_path: Path) -> None:
    path = tmp_path / "owner.lock"
    path.write_text(json.dumps({"pid": 12345, "host": "gone"}))
    with OwnerLock.take(path) as lock:
        assert lock.previous == {"pid": 12345, "host": "gone"}
        assert json.loads(path.read_text())["pid"] == os.getpid()
        assert lock.linked()
        path.unlink()  # what a sweeper holding the lock would do
        assert not lock.linked()
    with OwnerLock.take(path) as fresh:
        assert fresh.previous is None


def test_own_lock_is_held_and_release_removes_the_file(tmp_path: Path) -> None:
    path = tmp_path / "owner.lock"
    with OwnerLock.acquire(path) as lock:
        assert lock.held
        assert not owner_gone(path)  # another open file description cannot take it
    assert not path.exists()
    assert not owner_gone(path)  # no file, no proof


def test_records_prove_only_what_they_can() -> None:
    me = owner_record()
    assert me["pid"] == os.getpid()
    assert me["start_time"] == process_start_time(os.getpid())
    assert not record_owner_gone(me)
    assert record_owner_gone({**me, "start_time": me["start_time"] + 1})  # pid reused
    assert not record_owner_gone({**me, "host": "elsewhere", "pid": 2**22 + 1})
    # a machine that shares our host name, or a container that shares our machine
    dead = {**me, "pid": 2**22 + 1, "start_time": 1}
    assert record_owner_gone(dead)
    assert not record_owner_gone({**dead, "machine_id": "another machine"})
    assert not record_owner_gone({**dead, "machine_id": None})
    assert not record_owner_gone({**dead, "pid_namespace": 1})
    assert not record_owner_gone({**me, "machine_id": "other", "boot_id": "other boot"})
    assert record_owner_gone({**me, "boot_id": "a boot before this one"})
    assert not record_owner_gone("garbage")
    assert record_owner_state(me) is True
    assert record_owner_state(dead) is False
    assert record_owner_state({**me, "machine_id": "another machine"}) is None
    assert record_owner_state({**me, "start_time": None}) is None
    assert not record_owner_gone({"host": me["host"]})
