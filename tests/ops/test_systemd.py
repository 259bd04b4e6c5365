"""The systemd unit (``contrib/systemd/vdistream.service``) and the daemon's ``sd_notify``.

* ``systemd-analyze verify`` (Debian's ``systemd``; the test FAILS when it is missing)
  on the unit as shipped, with only ``/usr/bin/vdistream`` replaced by this
  environment's ``vdistream`` (verify checks that ``ExecStart``'s program exists).
* The test plays systemd: a Unix datagram socket as ``NOTIFY_SOCKET`` and
  ``WATCHDOG_USEC`` in the environment of a real ``vdistream serve``; READY=1 must come
  only once the control socket answers, WATCHDOG=1 again and again, RELOADING=1 then
  READY=1 on SIGHUP, STOPPING=1 on SIGTERM, then exit 0; the variables are not passed
  on to the engines' tools.
"""

from __future__ import annotations

import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from tests.daemon.conftest import REPO, Daemon
from tests.ops.conftest import submit, wait_job
from vdistream.service.sdnotify import SystemdNotifier

UNIT = REPO / "contrib" / "systemd" / "vdistream.service"
ENV_PROBE = Path(__file__).with_name("env_probe.py")
MDWE_EXEC = Path(__file__).with_name("mdwe_exec.py")


def _tool(name: str) -> str:
    found = shutil.which(name)
    assert found is not None, (
        f"{name} is missing: install Debian's package (.ci/apt-packages lists it); "
        "these tests do not skip"
    )
    return found


def _venv_vdistream() -> Path:
    path = Path(sys.executable).parent / "vdistream"
    assert path.exists(), f"{path} is missing: install vdistream into this environment"
    return path


# --------------------------------------------------------------------------- the unit


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    text = UNIT.read_text()
    assert "ExecStart=/usr/bin/vdistream serve " in text
    unit = tmp_path / "vdistream.service"
    unit.write_text(text.replace("/usr/bin/vdistream", str(_venv_vdistream())))
    done = subprocess.run(
        [_tool("systemd-analyze"), "verify", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    # Unknown or misspelt keys are only warnings (exit 0): none is accepted either.
    assert (done.returncode, done.stderr, done.stdout) == (0, "", "")


def test_unit_exposure_stays_low(tmp_path: Path) -> None:
    """``systemd-analyze security``'s exposure (0 to 10, lower is better) stays at
    2.0 or below: it was 1.5 when the hardening was written."""
    unit = tmp_path / "vdistream.service"
    unit.write_text(UNIT.read_text().replace("/usr/bin/vdistream", str(_venv_vdistream())))
    done = subprocess.run(
        [_tool("systemd-analyze"), "security", "--offline=true", "--threshold=20", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    level = re.search(r"Overall exposure level for vdistream.service: ([0-9.]+)", done.stdout)
    assert level is not None, done.stdout
    assert float(level[1]) <= 2.0


def test_systemd_analyze_refuses_a_broken_unit(tmp_path: Path) -> None:
    """The check above can fail: a missing ExecStart program and a misspelt key."""
    unit = tmp_path / "vdistream.service"
    unit.write_text(UNIT.read_text().replace("NoNewPrivileges=", "NoNewPrivilege="))
    done = subprocess.run(
        [_tool("systemd-analyze"), "verify", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert "/usr/bin/vdistream" in done.stderr or "is not executable" in done.stderr
    assert "Unknown key 'NoNewPrivilege'" in done.stderr


def test_unit_grace_and_timeouts_agree() -> None:
    """TimeoutStopSec leaves room for the default grace period and the exit timer."""
    lines = dict(
        line.split("=", 1)
        for line in UNIT.read_text().splitlines()
        if "=" in line and not line.startswith("#")
    )
    assert lines["Type"] == "notify"
    assert lines["NotifyAccess"] == "main"
    assert lines["KillMode"] == "mixed"
    assert int(lines["TimeoutStopSec"].removesuffix("s")) >= 30 + 5  # grace_period default
    assert lines["RestrictAddressFamilies"] == "AF_UNIX AF_INET AF_INET6"
    assert lines["CapabilityBoundingSet"] == ""


# --------------------------------------------------------------------- the notifier


def _receiver(address: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + address[1:] if address.startswith("@") else address)
    sock.settimeout(10)
    return sock


def test_notifier_sends_to_a_path_and_to_an_abstract_name(tmp_path: Path) -> None:
    for address in (str(tmp_path / "notify"), f"@vdistream-test-{os.getpid()}"):
        receiver = _receiver(address)
        env = {"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "3000000", "OTHER": "x"}
        notifier = SystemdNotifier.from_environment(env)
        assert notifier is not None
        assert env == {"OTHER": "x"}  # taken out: the engines' tools do not inherit them
        assert notifier.watchdog_interval == 1.5
        assert notifier.ready("up\nand running")
        assert receiver.recv(4096) == b"READY=1\nSTATUS=up and running\n"
        assert notifier.watchdog()
        assert receiver.recv(4096) == b"WATCHDOG=1\n"
        notifier.close()
        receiver.close()


def test_notifier_without_systemd_or_for_another_pid(tmp_path: Path) -> None:
    assert SystemdNotifier.from_environment({}) is None
    other = {"NOTIFY_SOCKET": str(tmp_path / "n"), "WATCHDOG_USEC": "1000", "WATCHDOG_PID": "1"}
    notifier = SystemdNotifier.from_environment(other)
    assert notifier is not None
    assert notifier.watchdog_interval is None
    # nobody listens: no exception, False
    assert notifier.status("x") is False
    notifier.close()
    assert SystemdNotifier.from_environment({"NOTIFY_SOCKET": "vsock:2:9"}) is None


# ------------------------------------------------------------ the daemon under "systemd"


class Listener:
    """Plays systemd's side: reads every datagram at once in a thread (a Unix datagram
    queue holds only ``net.unix.max_dgram_qlen`` messages, 10 by default: a test busy
    elsewhere must not make the daemon's sends fail), and asks the control socket the
    moment READY=1 arrives."""

    def __init__(self, sock: socket.socket, daemon: Daemon) -> None:
        self._sock = sock
        self._daemon = daemon
        self._queue: queue.Queue[list[str]] = queue.Queue()
        self._stop = threading.Event()
        #: GET /v1/ready's status at the moment each READY=1 arrived
        self.ready_answers: list[int] = []
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        self._sock.settimeout(0.1)
        while not self._stop.is_set():
            try:
                data = self._sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            lines = [line for line in data.decode().splitlines() if line]
            if "READY=1" in lines:
                self.ready_answers.append(self._daemon.get("/v1/ready")[0])
            self._queue.put(lines)

    def messages(self, timeout: float = 10) -> list[str]:
        """The lines of the next datagram (``[]`` if none came within ``timeout``)."""
        try:
            return self._queue.get(timeout=timeout)
        except queue.Empty:
            return []

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)


def test_daemon_notifies_ready_watchdog_and_stopping(tmp_path: Path) -> None:
    address = str(tmp_path / "notify.sock")
    receiver = _receiver(address)
    marker = tmp_path / "probe-env.txt"
    (tmp_path / "d").mkdir()
    daemon = Daemon(
        tmp_path / "d",
        {"probe": {"url": f"cmd:{sys.executable} {ENV_PROBE} {marker}"}},
        env={"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "1000000"},  # a ping each 0.5 s
    )
    listener = Listener(receiver, daemon)
    log = daemon.log.open("ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "vdistream", "serve", "--config", str(daemon.config)],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=daemon.env,
        cwd=REPO,
    )
    try:
        seen: list[str] = []
        deadline = time.monotonic() + 60
        while "READY=1" not in seen:
            assert time.monotonic() < deadline, f"no READY=1; got {seen}"
            assert proc.poll() is None, daemon.log.read_text()
            seen += listener.messages(1)
        # The control socket answered at the moment READY=1 arrived.
        assert listener.ready_answers == [200]
        before_ready = seen[: seen.index("READY=1")]
        assert any(m.startswith("STATUS=starting") for m in before_ready), seen
        assert any(m.startswith("STATUS=ready:") for m in seen), seen

        # The watchdog keeps pinging while the daemon runs a backup.
        job_id = submit(daemon, kind="backup", database="probe")
        pings = 0
        deadline = time.monotonic() + 30
        while pings < 4:
            assert time.monotonic() < deadline, f"only {pings} WATCHDOG=1 in 30 s"
            pings += listener.messages().count("WATCHDOG=1")
        assert wait_job(daemon, job_id)["state"] == "succeeded"
        # The engine's tool did not inherit systemd's variables.
        assert marker.read_text() == "NOTIFY_SOCKET= WATCHDOG_USEC= WATCHDOG_PID=\n"

        # SIGHUP: the settings are read again, between RELOADING=1 and READY=1 (the
        # pings and the periodic STATUS= refresh may come in between: not counted)
        while listener.messages(0.2):
            pass  # what came before the signal
        proc.send_signal(signal.SIGHUP)
        reload: list[str] = []
        deadline = time.monotonic() + 30
        while "READY=1" not in reload:
            assert time.monotonic() < deadline, f"no READY=1 after SIGHUP; got {reload}"
            reload += [
                m for m in listener.messages() if m != "WATCHDOG=1" and not m.startswith("STATUS=")
            ]
        assert reload[0] == "RELOADING=1", reload
        assert reload[1].startswith("MONOTONIC_USEC="), reload

        proc.send_signal(signal.SIGTERM)
        rest: list[str] = []
        deadline = time.monotonic() + 30
        while "STOPPING=1" not in rest:
            assert time.monotonic() < deadline, f"no STOPPING=1; got {rest}"
            rest += listener.messages()
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        log.close()
        listener.close()
        receiver.close()


def test_daemon_backs_up_and_verifies_under_memory_deny_write_execute(tmp_path: Path) -> None:
    """The unit's MemoryDenyWriteExecute=yes: the daemon, with what a backup loads
    (SQLite, zstd, AES, the engine's tool), works when W+X memory is refused."""
    from tests.daemon.conftest import make_sqlite

    key = tmp_path / "key"
    key.write_bytes(os.urandom(32))
    key.chmod(0o600)
    source = make_sqlite(tmp_path / "app.db", rows=2_000)
    (tmp_path / "d").mkdir()
    daemon = Daemon(
        tmp_path / "d",
        {
            "app": {
                "url": f"sqlite://{source}",
                "compress": "zstd",
                "encrypt_key_file": str(key),
            },
            "tool": {"url": f"cmd:{sys.executable} {ENV_PROBE} {tmp_path / 'probe.txt'}"},
        },
    )
    serve = [sys.executable, "-m", "vdistream", "serve", "--config", str(daemon.config)]
    with daemon.log.open("ab") as log:
        proc = subprocess.Popen(
            [sys.executable, str(MDWE_EXEC), *serve],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=daemon.env,
            cwd=REPO,
        )
    daemon.proc = proc
    try:
        deadline = time.monotonic() + 60
        while daemon.get("/v1/ready")[0] != 200:
            assert proc.poll() is None, daemon.log.read_text()
            assert time.monotonic() < deadline, daemon.log.read_text()
            time.sleep(0.05)
        for database in ("app", "tool"):
            job = wait_job(daemon, submit(daemon, kind="backup", database=database))
            assert job["state"] == "succeeded", job
        jobs = [j for j in daemon.jobs_in_state_db() if j["kind"] == "verify"]
        for job in jobs:
            assert wait_job(daemon, job["id"])["state"] == "succeeded"
        assert len(jobs) == 2
        assert daemon.stop() == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
