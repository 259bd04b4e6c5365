"""JSON lines over TCP between the stand-in server, its sqlcmd and its control client (stdlib)."""

from __future__ import annotations

import json
import select
import socket
from typing import Any

__all__ = ("Connection",)


class Connection:
    """One socket carrying one JSON object per line, both ways."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = bytearray()
        self.eof = False

    @classmethod
    def connect(cls, host: str, port: int, timeout: float) -> Connection:
        sock = socket.create_connection((host, port), timeout=timeout)
        sock.settimeout(None)
        return cls(sock)

    def send(self, obj: dict[str, Any]) -> None:
        self.sock.sendall(json.dumps(obj).encode() + b"\n")

    def _fill(self) -> None:
        try:
            data = self.sock.recv(65536)
        except OSError:
            data = b""
        if not data:
            self.eof = True
        self.buffer += data

    def read(self) -> dict[str, Any] | None:
        """The next object, or None once the peer closed the connection."""
        while b"\n" not in self.buffer:
            if self.eof:
                return None
            self._fill()
        line, _, rest = bytes(self.buffer).partition(b"\n")
        self.buffer = bytearray(rest)
        result: dict[str, Any] = json.loads(line)
        return result

    def peer_closed(self) -> bool:
        """Polls (without blocking) whether the peer has gone; keeps anything it sent."""
        if self.eof:
            return True
        try:
            readable, _, _ = select.select([self.sock], [], [], 0)
        except (OSError, ValueError):
            return True
        if readable:
            self._fill()
        return self.eof

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass
