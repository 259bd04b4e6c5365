"""The systemd unit (``contrib/systemd/vdistream.service``) and the daemon's ``sd_notify``.

* ``systemd-analyze verify`` (Debian's ``systemd``; the test FAILS when it is missing)
  on the unit as shipped, with only ``/usr/bin/vdistream`` replaced by this
  environment's ``vdistream`` (verify checks that ``ExecStart``'s program exists).
* The test plays systemd: a Unix datagram socket as ``NOTIFY_SOCKET`` and
  ``WATCHDOG_USEC`` in the environment of a real ``vdistream serve``; READY=1 must come
  only once the control socket answers, WATCHDOG=1 again and again, STOPPING=1 on
  SIGTERM, then exit 0; the variables are not passed on to the engines' tools.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from tests.daemon.conftest import REPO, Daemon
from tests.ops.conftest import submit, wait_job
from vdistream.service.sdnotify import SystemdNotifier

UNIT = REPO / "contrib" / "systemd" / "vdistream.service"
ENV_PROBE = Path(__file__).with_name("env_probe.py")


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


def _messages(sock: socket.socket) -> list[str]:
    return [line for line in sock.recv(65536).decode().splitlines() if line]


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
        # Until READY=1: the control socket must answer by the time it arrives.
        deadline = time.monotonic() + 60
        while "READY=1" not in seen:
            assert time.monotonic() < deadline, f"no READY=1; got {seen}"
            assert proc.poll() is None, daemon.log.read_text()
            got = _messages(receiver)
            if "READY=1" in got:
                assert daemon.get("/v1/ready")[0] == 200, "READY=1 before the socket answered"
            seen += got
        before_ready = seen[: seen.index("READY=1")]
        assert any(m.startswith("STATUS=starting") for m in before_ready), seen
        assert any(m.startswith("STATUS=ready:") for m in seen), seen

        # The watchdog keeps pinging while the daemon runs a backup.
        job_id = submit(daemon, kind="backup", database="probe")
        pings = 0
        deadline = time.monotonic() + 30
        while pings < 4:
            assert time.monotonic() < deadline, f"only {pings} WATCHDOG=1 in 30 s"
            pings += _messages(receiver).count("WATCHDOG=1")
        assert wait_job(daemon, job_id)["state"] == "succeeded"
        # The engine's tool did not inherit systemd's variables.
        assert marker.read_text() == "NOTIFY_SOCKET= WATCHDOG_USEC= WATCHDOG_PID=\n"

        proc.send_signal(signal.SIGTERM)
        rest: list[str] = []
        deadline = time.monotonic() + 30
        while "STOPPING=1" not in rest:
            assert time.monotonic() < deadline, f"no STOPPING=1; got {rest}"
            rest += _messages(receiver)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        log.close()
        receiver.close()
