"""The stand-in SQL Server process.

``python -m standin.mssql.server --data DIR --lib libsqlvdi_standin_server.so --user sa
--password X`` (or the password in ``STANDIN_MSSQL_PASSWORD``) listens on 127.0.0.1, prints
``READY <port>``, and serves one thread per connection: a login, then statements (``exec``)
or control requests (``control``). A connection that drops while its statement runs cancels
the statement, which aborts its device set, as SQL Server does on a dropped connection.
"""

from __future__ import annotations

import argparse
import os
import queue
import signal
import socket
import socketserver
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from standin.mssql.data import Store, StoreError
from standin.mssql.engine import Engine, Output, Session
from standin.mssql.messages import Message, error
from standin.mssql.vdss import VdssLib
from standin.mssql.wire import Connection

__all__ = ("main",)


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    engine: Engine
    user: str
    password: str
    server_name: str


class _Handler(socketserver.BaseRequestHandler):
    server: _Server

    def handle(self) -> None:
        conn = Connection(self.request)
        try:
            self._serve(conn)
        finally:
            conn.close()

    def _serve(self, conn: Connection) -> None:
        hello = conn.read()
        if hello is None:
            return
        server = self.server
        if (
            hello.get("op") != "login"
            or hello.get("user") != server.user
            or hello.get("password") != server.password
        ):
            login = error(18456, f"Login failed for user '{hello.get('user', '')}'.", 14)
            conn.send({"ok": False, "server": server.server_name, "message": login.wire()})
            return
        conn.send({"ok": True, "server": server.server_name})
        session = Session()
        while True:
            request = conn.read()
            if request is None:
                return
            op = request.get("op")
            if op == "exec":
                if not self._exec(conn, str(request.get("sql", "")), session):
                    return
            elif op == "control":
                conn.send(self._control(str(request.get("cmd")), request.get("args") or {}))
            elif op == "shutdown":
                conn.send({"ok": True})
                threading.Thread(target=_shutdown, args=(server,), daemon=True).start()
                return
            else:
                conn.send({"ok": False, "error": f"unknown op {op!r}"})

    def _exec(self, conn: Connection, sql: str, session: Session) -> bool:
        """Run one batch, streaming its messages; False when the client went away."""
        events: queue.Queue[dict[str, Any] | None] = queue.Queue()
        cancel = threading.Event()

        def message(m: Message) -> None:
            events.put({"message": m.wire()})

        def rows(columns: list[str], values: list[list[Any]]) -> None:
            events.put({"resultset": {"columns": columns, "rows": values}})

        def work() -> None:
            try:
                self.server.engine.execute(sql, session, Output(message, rows), cancel)
            except Exception as exc:  # a bug of the stand-in: say so, as a severe error
                message(error(3013, f"stand-in internal error: {exc!r}", 20))
            finally:
                events.put(None)

        worker = threading.Thread(target=work, name="statement", daemon=True)
        worker.start()
        alive = True
        while True:
            try:
                item = events.get(timeout=0.05)
            except queue.Empty:
                if alive and conn.peer_closed():
                    alive = False
                    cancel.set()  # attention / dropped connection: abort the statement at once
                continue
            if item is None:
                break
            if alive:
                try:
                    conn.send(item)
                except OSError:
                    alive = False
                    cancel.set()
        worker.join()
        if alive:
            try:
                conn.send({"done": True})
            except OSError:
                return False
        return alive

    def _control(self, cmd: str, args: dict[str, Any]) -> dict[str, Any]:
        engine = self.server.engine
        store = engine.store
        try:
            result: Any = None
            if cmd == "create_database":
                store.create(args["name"], int(args["size"]), int(args.get("seed", 0)))
            elif cmd == "write":
                result = store.write(args["name"], int(args.get("pages", 16)))
            elif cmd == "checksum":
                result = store.checksum(args["name"])
            elif cmd == "checksum_at":
                when = datetime.fromisoformat(args["when"])
                if when.tzinfo is None:
                    when = when.replace(tzinfo=UTC)
                result = store.checksum_at(args["name"], when.timestamp())
            elif cmd == "state":
                db = store.get(args["name"])
                result = db.state if db is not None else None
            elif cmd == "drop_database":
                store.drop(args["name"])
            elif cmd == "statements":
                result = engine.statements()
            elif cmd == "history":
                result = store.history(args["name"])
            elif cmd == "fail_next_backup":
                with engine.lock:
                    engine.fail_next[args["name"].casefold()] = int(args["after_bytes"])
            elif cmd == "set_pace":
                pace = args.get("bytes_per_second")
                engine.pace = None if pace is None else int(pace)
            elif cmd == "running":
                result = engine.running()
            else:
                return {"ok": False, "error": f"unknown control command {cmd!r}"}
            return {"ok": True, "result": result}
        except (StoreError, KeyError, ValueError) as exc:
            return {"ok": False, "error": str(exc)}


def _shutdown(server: _Server) -> None:
    server.engine.cancel_all()
    server.shutdown()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m standin.mssql.server")
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--lib", type=Path, required=True)
    parser.add_argument("--user", default="sa")
    parser.add_argument("--password", default=os.environ.get("STANDIN_MSSQL_PASSWORD"))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    if not args.password:
        parser.error("--password or STANDIN_MSSQL_PASSWORD is required")
    args.data.mkdir(parents=True, exist_ok=True)
    name = socket.gethostname().split(".")[0] or "standin"
    engine = Engine(Store(args.data), VdssLib(args.lib), name)
    server = _Server((args.host, args.port), _Handler)
    server.engine = engine
    server.user = args.user
    server.password = args.password
    server.server_name = name

    def on_term(signum: int, frame: object) -> None:
        threading.Thread(target=_shutdown, args=(server,), daemon=True).start()

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    sys.stdout.write(f"READY {server.server_address[1]}\n")
    sys.stdout.flush()
    try:
        server.serve_forever(poll_interval=0.05)
    finally:
        engine.cancel_all()
        deadline = time.monotonic() + 10
        while engine.running() and time.monotonic() < deadline:
            time.sleep(0.05)  # statements end within a wait slice once cancelled
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
