"""A fault-injecting HTTP/1.1 proxy on 127.0.0.1, between vdistream and moto.

It reads each request head on a client connection (bodies are plain Content-Length:
botocore sends no chunked bodies with ``request_checksum_calculation="when_required"``)
and applies the first armed ``Fault`` whose pattern matches ``"METHOD /path?query"``:

* ``delay``: forward after ``seconds`` (latency);
* ``reset``: drop the connection with a TCP RST instead of forwarding;
* ``error``: answer ``status`` with the S3 XML error ``code`` (e.g. 503 SlowDown);
* ``cut``: forward, pass ``after_bytes`` of the response, then RST (a lost response);
* ``stall``: forward, hold the response for ``seconds``, then RST.

Each fault applies to its first ``count`` matching requests, then is spent;
``hits`` counts how often it fired. ``latency`` delays every request. Responses are
relayed byte for byte.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import struct
from dataclasses import dataclass, field

import anyio


@dataclass
class Fault:
    kind: str  # delay | reset | error | cut | stall
    pattern: str
    count: int = 1
    seconds: float = 0.0
    status: int = 503
    code: str = "SlowDown"
    after_bytes: int = 0
    hits: int = 0


@dataclass
class _Connection:
    cut_after: int | None = None
    stall: float | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with RST (SO_LINGER 0), the way a crashed middlebox would."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class FaultProxy:
    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.faults: list[Fault] = []
        self.requests: list[str] = []
        self.latency = 0.0
        self.port = 0
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def add(self, kind: str, pattern: str, **options: float | int | str) -> Fault:
        fault = Fault(kind, pattern, **options)  # type: ignore[arg-type]
        self.faults.append(fault)
        return fault

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for writer in list(self._writers):  # handlers end on their own
                writer.transport.abort()
            await asyncio.gather(*self._handlers, return_exceptions=True)
            await self._server.wait_closed()

    def _match(self, line: str) -> Fault | None:
        for fault in self.faults:
            if fault.hits < fault.count and re.search(fault.pattern, line):
                fault.hits += 1
                return fault
        return None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        self._writers.add(writer)
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        self._writers.add(up_writer)
        state = _Connection()
        try:
            async with anyio.create_task_group() as relays:
                relays.start_soon(self._relay, up_reader, writer, state)
                try:
                    await self._requests(reader, writer, up_writer, state)
                except (ConnectionError, asyncio.IncompleteReadError, OSError):
                    pass
                relays.cancel_scope.cancel()
        finally:
            up_writer.transport.abort()
            writer.transport.abort()
            self._handlers.discard(task)
            self._writers.difference_update((writer, up_writer))

    async def _requests(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        upstream: asyncio.StreamWriter,
        state: _Connection,
    ) -> None:
        while not state.done.is_set():
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            method, target, _ = lines[0].split(" ", 2)
            headers = {
                name.strip().lower(): value.strip()
                for name, _, value in (line.partition(":") for line in lines[1:] if line)
            }
            assert "chunked" not in headers.get("transfer-encoding", ""), lines[0]
            length = int(headers.get("content-length", "0"))
            line = f"{method} {target}"
            self.requests.append(line)
            fault = self._match(line)
            kind = fault.kind if fault else None
            if self.latency:
                await asyncio.sleep(self.latency)
            if fault is not None and kind == "delay":
                await asyncio.sleep(fault.seconds)
            elif fault is not None and kind == "reset":
                _reset(writer)
                return
            elif fault is not None and kind == "error":
                expect = headers.get("expect", "").lower() == "100-continue"
                if length and not expect:
                    await reader.readexactly(length)
                body = (
                    '<?xml version="1.0" encoding="UTF-8"?><Error><Code>'
                    f"{fault.code}</Code><Message>injected by the test proxy</Message>"
                    "<RequestId>proxy</RequestId></Error>"
                ).encode()
                writer.write(
                    (
                        f"HTTP/1.1 {fault.status} Injected\r\n"
                        f"Content-Type: application/xml\r\nContent-Length: {len(body)}\r\n"
                        + ("Connection: close\r\n" if expect else "")
                        + "\r\n"
                    ).encode()
                )
                writer.write(body)
                await writer.drain()
                if expect:
                    return
                continue
            elif fault is not None and kind == "cut":
                state.cut_after = fault.after_bytes
            elif fault is not None and kind == "stall":
                state.stall = fault.seconds
            if headers.get("expect", "").lower() == "100-continue":
                # Answer the interim response here, so faults hit the final one.
                writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                head = re.sub(rb"(?im)^expect:[^\r]*\r\n", b"", head)
            upstream.write(head)
            left = length
            while left:
                chunk = await reader.read(min(left, 1 << 16))
                if not chunk:
                    return
                upstream.write(chunk)
                left -= len(chunk)
                await upstream.drain()
            await upstream.drain()

    async def _relay(
        self, upstream: asyncio.StreamReader, writer: asyncio.StreamWriter, state: _Connection
    ) -> None:
        try:
            while chunk := await upstream.read(1 << 16):
                if state.stall is not None:
                    await asyncio.sleep(state.stall)
                    break
                if state.cut_after is not None:
                    writer.write(chunk[: state.cut_after])
                    await writer.drain()
                    break
                writer.write(chunk)
                await writer.drain()
            else:  # the server closed the connection: close it gracefully
                state.done.set()
                writer.close()
                return
        except (ConnectionError, OSError):
            pass
        state.done.set()
        _reset(writer)
