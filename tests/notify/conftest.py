"""A webhook receiver of the tests' own: ``http.server`` on 127.0.0.1 in a thread.

``receiver(*script)`` starts one; each request is recorded (``Received``: headers and
raw body) and answered by the next word of ``script`` (an HTTP status as an int, or
``"hang"``: read the request and never answer until the receiver stops;
``"endless"``: answer 200 with a body that never ends, 64 KiB every 10 ms), then 200
for every request after the script. ``receiver.url`` is where it listens;
``await receiver.wait(n)`` waits for ``n`` requests. Every receiver stops at the end
of its test. The daemon fixtures are those of ``tests/daemon``.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import anyio
import pytest

from tests.daemon.conftest import daemon_factory  # noqa: F401 -- the fixture, re-exported

SECRET = "notify-test-secret-0123456789"


@dataclasses.dataclass(frozen=True)
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float


class Receiver:
    def __init__(self, script: tuple[int | str, ...]) -> None:
        self.script = list(script)
        self.requests: list[Received] = []
        self.stopped = threading.Event()
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(length)
                with receiver._lock:
                    receiver.requests.append(
                        Received(self.path, dict(self.headers.items()), body, time.monotonic())
                    )
                    action = receiver.script.pop(0) if receiver.script else 200
                if action == "hang":
                    receiver.stopped.wait(60)
                    return
                if action == "endless":
                    self.send_response(200)
                    self.send_header("Content-Length", str(10**12))
                    self.end_headers()
                    chunk = bytes(64 * 1024)
                    try:
                        while not receiver.stopped.wait(0.01):
                            self.wfile.write(chunk)
                    except OSError:  # the client hung up: what it should do
                        pass
                    return
                assert isinstance(action, int)
                self.send_response(action)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host!s}:{port}/hook"

    async def wait(self, count: int, timeout: float = 30.0) -> list[Received]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(self.requests) >= count:
                return list(self.requests)
            await anyio.sleep(0.05)  # the server's thread records; polled
        raise AssertionError(f"{len(self.requests)} requests after {timeout} s, wanted {count}")

    def stop(self) -> None:
        self.stopped.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Callable[..., Receiver]]:
    made: list[Receiver] = []

    def make(*script: int | str) -> Receiver:
        made.append(Receiver(script))
        return made[-1]

    yield make
    for one in made:
        one.stop()


@pytest.fixture
def secret_file(tmp_path: Path) -> Path:
    path = tmp_path / "webhook.secret"
    path.write_text(SECRET + "\n")
    path.chmod(0o600)
    return path
