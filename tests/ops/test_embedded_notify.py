"""An embedded ``Service`` tells systemd nothing unless its host asks (``notify=``),
even with ``NOTIFY_SOCKET`` in the environment; asked, it says READY=1 once the API
listens, STATUS= lines, RELOADING=1/READY=1 around a reload and STOPPING=1 at the
shutdown. Importing vdistream sends nothing either."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.daemon.conftest import embedded_settings
from vdistream.service import Service
from vdistream.service.sdnotify import SystemdNotifier

pytestmark = pytest.mark.timeout(60)


def _receiver(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.setblocking(False)
    return sock


def _drain(sock: socket.socket) -> list[str]:
    out: list[str] = []
    while True:
        try:
            out += [line for line in sock.recv(65536).decode().splitlines() if line]
        except BlockingIOError:
            return out


@pytest.mark.asyncio
async def test_embedded_service_is_silent_unless_asked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    receiver = _receiver(tmp_path / "notify.sock")
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify.sock"))
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")
    settings = embedded_settings(tmp_path)
    async with Service(settings) as service:
        assert service.ready
    assert _drain(receiver) == []
    receiver.close()


@pytest.mark.asyncio
async def test_embedded_service_notifies_when_asked(tmp_path: Path) -> None:
    receiver = _receiver(tmp_path / "notify.sock")
    notifier = SystemdNotifier(str(tmp_path / "notify.sock"))
    settings = embedded_settings(tmp_path)
    async with Service(settings, notify=notifier) as service:
        messages = _drain(receiver)
        assert messages[0].startswith("STATUS=starting")
        assert "READY=1" in messages
        assert settings.service.socket_path.exists()
        await service.reload(settings)
        # (the periodic STATUS= refresh may come at any time: not counted)
        reload = [m for m in _drain(receiver) if not m.startswith("STATUS=")]
        assert reload[0] == "RELOADING=1"
        assert reload[1].startswith("MONOTONIC_USEC=")
        assert "READY=1" in reload
    messages = _drain(receiver)
    stopping = messages.index("STOPPING=1")
    assert messages[stopping + 1] == (
        "STATUS=stopping: the service is leaving its `async with` block"
    )
    notifier.close()
    receiver.close()


def test_importing_vdistream_sends_nothing(tmp_path: Path) -> None:
    receiver = _receiver(tmp_path / "notify.sock")
    code = "import vdistream, vdistream.service, vdistream.service.serve"
    env = {"NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", code], env=env, timeout=60, check=False)
    assert done.returncode == 0
    assert _drain(receiver) == []
    receiver.close()
