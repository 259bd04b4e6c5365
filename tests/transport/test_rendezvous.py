"""Rendezvous by name: the runtime directory, publishing (modes, group, lock, stale
takeover, a name in use, a closed set freeing its name), name checks, connecting,
and the peer check's rule. Real directories, sockets, locks and processes."""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vdistream.errors import VDInstanceNameError, VDInvalidError, VDSecurityError
from vdistream.transport.rendezvous import (
    DAEMON_RUNTIME_DIR,
    RuntimeDirectory,
    default_runtime_dir,
    peer_credentials,
)

GROUP = "backup"  # a system group the test user (root) is not in and nobody is not in


@pytest.fixture
def rundir() -> Iterator[Path]:
    # Short and fresh: socket paths must fit in 107 bytes, tmp_path's may not.
    top = Path(tempfile.mkdtemp(prefix="vdr", dir="/tmp"))
    yield top / "run"
    shutil.rmtree(top, ignore_errors=True)


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path, follow_symlinks=False).st_mode)


def test_default_runtime_dir_follows_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VDISTREAM_RUNTIME_DIR", "/x/explicit")
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/7")
    assert default_runtime_dir() == Path("/x/explicit")
    monkeypatch.delenv("VDISTREAM_RUNTIME_DIR")
    assert default_runtime_dir() == Path("/run/user/7/vdistream")
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    assert default_runtime_dir() == Path(f"/tmp/vdistream-{os.geteuid()}")
    assert RuntimeDirectory().path == Path(f"/tmp/vdistream-{os.geteuid()}")
    assert Path("/run/vdistream") == DAEMON_RUNTIME_DIR


def test_publish_creates_a_private_seqpacket_socket_and_a_held_lock(rundir: Path) -> None:
    directory = RuntimeDirectory(rundir)
    with directory.publish(None, "db1") as publication:
        assert publication.path == rundir / "db1.sock"
        assert mode(rundir) == 0o700
        info = os.stat(publication.path)
        assert stat.S_ISSOCK(info.st_mode)
        assert stat.S_IMODE(info.st_mode) == 0o600
        assert publication.socket.type == socket.SOCK_SEQPACKET
        assert not publication.socket.getblocking()
        assert (rundir / "db1.lock").read_text().strip() == str(os.getpid())
        # the engine's side: a SEQPACKET connection the listener accepts
        engine = directory.connect(None, "db1")
        with engine:
            assert engine.getblocking()
            accepted, _ = publication.socket.accept()
            with accepted:
                assert peer_credentials(accepted) == (os.getpid(), os.geteuid(), os.getegid())
                engine.send(b"one record")
                engine.send(b"two")
                assert accepted.recv(100) == b"one record"  # boundaries kept
                assert accepted.recv(100) == b"two"
    assert publication.closed
    assert not (rundir / "db1.sock").exists()
    assert not (rundir / "db1.lock").exists()
    publication.close()  # idempotent


def test_a_group_gets_0660_and_0710(rundir: Path) -> None:
    gid = grp.getgrnam(GROUP).gr_gid
    directory = RuntimeDirectory(rundir, group=GROUP)
    assert directory.group == gid
    assert RuntimeDirectory(rundir, group=gid).group == gid
    with directory.publish("Inst", "db") as publication:
        assert publication.path == rundir / "inst" / "db.sock"
        for folder in (rundir, rundir / "inst"):
            assert mode(folder) == 0o710
            assert os.stat(folder).st_gid == gid
        assert mode(publication.path) == 0o660
        assert os.stat(publication.path).st_gid == gid
    with pytest.raises(VDInvalidError, match="no group named 'no-such-group-x'"):
        RuntimeDirectory(rundir, group="no-such-group-x")


def test_a_name_in_use_is_refused_and_a_closed_set_frees_it(rundir: Path) -> None:
    directory = RuntimeDirectory(rundir)
    first = directory.publish(None, "db")
    with pytest.raises(
        VDInvalidError, match=rf"a set named 'db' is already published by pid {os.getpid()}"
    ):
        directory.publish(None, "db")
    # the refused attempt left the live set alone
    assert (rundir / "db.sock").exists()
    directory.connect(None, "db").close()
    # names are per instance
    with directory.publish("other", "db"):
        pass
    first.close()
    with directory.publish(None, "db") as again:
        directory.connect(None, "db").close()
        assert again.path.exists()


_PUBLISHER = textwrap.dedent(
    """
    import sys, time
    from vdistream.transport.rendezvous import RuntimeDirectory
    publication = RuntimeDirectory(sys.argv[1]).publish(None, "db")
    print("ready", flush=True)
    time.sleep(60)
    """
)


def test_the_stale_socket_of_a_dead_process_is_taken_over(rundir: Path) -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", _PUBLISHER, str(rundir)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "ready"
        directory = RuntimeDirectory(rundir)
        with pytest.raises(VDInvalidError, match=f"already published by pid {child.pid}"):
            directory.publish(None, "db")
        directory.connect(None, "db").close()  # the live set answers
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
        if child.stdout is not None:
            child.stdout.close()
    # kill -9 left its socket and lock file behind: nobody listens, nobody holds the lock
    assert (rundir / "db.sock").exists()
    assert (rundir / "db.lock").exists()
    with pytest.raises(
        VDInvalidError, match=f"no virtual device set named 'db' is published in '{rundir}'"
    ):
        directory.connect(None, "db")
    with directory.publish(None, "db") as publication:
        assert (rundir / "db.lock").read_text().strip() == str(os.getpid())
        engine = directory.connect(None, "db")
        with engine, publication.socket.accept()[0] as accepted:
            assert peer_credentials(accepted)[0] == os.getpid()


def test_connect_to_an_absent_set(rundir: Path) -> None:
    with pytest.raises(VDInvalidError, match="no virtual device set named 'nope' is published"):
        RuntimeDirectory(rundir).connect(None, "nope")
    with pytest.raises(VDInvalidError, match="no virtual device set named 'nope'"):
        RuntimeDirectory(rundir).connect("inst", "nope")


@pytest.mark.parametrize(
    "name",
    ["", ".hidden", "a/b", "a\\b", "a\0b", "x" * 101, "é" * 51, 42],
)
def test_bad_set_names_are_refused_naming_them(rundir: Path, name: object) -> None:
    directory = RuntimeDirectory(rundir)
    with pytest.raises(VDInvalidError, match="set name") as caught:
        directory.publish(None, name)  # type: ignore[arg-type]
    if isinstance(name, str) and name:
        assert repr(name) in str(caught.value)
    with pytest.raises(VDInvalidError):
        directory.connect(None, name)  # type: ignore[arg-type]
    assert not rundir.exists() or not any(rundir.iterdir())


def test_good_names_and_bad_instances(rundir: Path) -> None:
    directory = RuntimeDirectory(rundir)
    assert directory.socket_path(None, "x" * 20 + "é") == rundir / ("x" * 20 + "é.sock")
    assert directory.socket_path("MSSQL", "db.full") == rundir / "mssql" / "db.full.sock"
    for instance in ("", "../up", ".dot", "a\\b"):
        with pytest.raises(VDInstanceNameError, match="instance name"):
            directory.socket_path(instance, "db")


def test_a_path_too_long_for_sun_path_is_refused(rundir: Path) -> None:
    deep = RuntimeDirectory(rundir / ("d" * 60))
    name = "n" * 60
    with pytest.raises(VDInvalidError, match=r"more than a Unix socket address holds \(107\)"):
        deep.publish(None, name)
    assert not (rundir / ("d" * 60)).exists()
    # just fitting is fine
    fits = 107 - len(os.fsencode(rundir / ("d" * 60))) - len("/.sock")
    with deep.publish(None, "n" * fits) as publication:
        assert len(os.fsencode(publication.path)) == 107


def test_a_directory_owned_by_someone_else_is_refused(rundir: Path) -> None:
    rundir.mkdir(mode=0o700)
    os.chown(rundir, 65534, -1)
    with pytest.raises(VDSecurityError, match="not a directory owned by uid 0"):
        RuntimeDirectory(rundir).publish(None, "db")
    os.chown(rundir, 0, -1)
    os.chmod(rundir, 0o777)
    with pytest.raises(VDSecurityError, match="writable by others"):
        RuntimeDirectory(rundir).publish(None, "db")


def test_may_open_rule() -> None:
    backup = pwd.getpwnam("backup")  # primary group: backup
    gid = grp.getgrnam(GROUP).gr_gid
    private = RuntimeDirectory("/tmp/unused")
    assert private.may_open(os.geteuid(), 12345)
    assert private.may_open(0, 0)
    assert not private.may_open(65534, 65534)
    assert not private.may_open(backup.pw_uid, gid)
    shared = RuntimeDirectory("/tmp/unused", group=GROUP)
    assert shared.may_open(65534, gid)  # the peer's gid is the group
    assert shared.may_open(backup.pw_uid, 0)  # a user whose group it is
    assert not shared.may_open(65534, 65534)
    assert not shared.may_open(424242, 424242)  # no such user


def test_publish_and_close_many_times_leave_nothing(rundir: Path) -> None:
    directory = RuntimeDirectory(rundir)
    before = len(os.listdir("/proc/self/fd"))
    started = time.monotonic()
    for _ in range(50):
        with directory.publish(None, "db"):
            directory.connect(None, "db").close()
    assert time.monotonic() - started < 1.5
    assert len(os.listdir("/proc/self/fd")) == before
    assert sorted(os.listdir(rundir)) == []
