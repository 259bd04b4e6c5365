"""The stand-in ``sqlcmd``: the options vdistream uses, output as Microsoft's sqlcmd prints it.

``sqlcmd -S host,port -U user -d master -b -Q "<statement>" [-h -1 -W -s "|"]`` with the
password in ``SQLCMDPASSWORD``; errors as ``Msg N, Level L, State S, Server X, Line 1`` and the
text, informational messages as their text, rows separated by ``-s``; exit 1 with ``-b`` after
an error of severity >= 11. ``STANDIN_SQLCMD_LOG`` names a file each statement is appended to.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from standin.mssql.wire import Connection

__all__ = ("main",)

_VALUED = set("SUPdQqhslttwiov")
_ODBC = "Sqlcmd: Error: Microsoft ODBC Driver 18 for SQL Server : "


def _parse(argv: list[str]) -> tuple[dict[str, str], set[str]] | str:
    values: dict[str, str] = {}
    flags: set[str] = set()
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("-") or len(arg) < 2:
            return f"Sqlcmd: '{arg}': Unexpected argument. Enter '-?' for help."
        letter = arg[1]
        if letter in _VALUED:
            if len(arg) > 2:
                values[letter] = arg[2:]
            elif i + 1 < len(argv):
                i += 1
                values[letter] = argv[i]
            else:
                return f"Sqlcmd: '{arg}': Missing argument. Enter '-?' for help."
        elif letter in "bWCNIrXe" and len(arg) == 2:
            flags.add(letter)
        else:
            return f"Sqlcmd: '{arg}': Unknown Option. Enter '-?' for help."
        i += 1
    return values, flags


def _out(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _print_rows(result: dict[str, Any], values: dict[str, str], flags: set[str]) -> None:
    sep = values.get("s", " ")
    headers = values.get("h", "0") != "-1"
    columns: list[str] = result["columns"]
    rows = [["NULL" if v is None else str(v) for v in row] for row in result["rows"]]
    trim = "W" in flags
    widths = [
        max([len(c)] + [len(r[k]) for r in rows]) if not trim else len(c)
        for k, c in enumerate(columns)
    ]

    def fmt(cells: list[str]) -> str:
        if trim:
            return sep.join(cells)
        return sep.join(c.ljust(w) for c, w in zip(cells, widths, strict=False))

    if headers:
        _out(fmt(columns))
        _out(sep.join("-" * (len(c) if trim else w) for c, w in zip(columns, widths, strict=False)))
    for row in rows:
        _out(fmt(row))


def main(argv: list[str] | None = None) -> int:
    parsed = _parse(sys.argv[1:] if argv is None else argv)
    if isinstance(parsed, str):
        _out(parsed)
        return 1
    values, flags = parsed
    statement = values.get("Q", values.get("q"))
    if statement is None:
        _out("Sqlcmd: the stand-in runs only -Q/-q statements.")
        return 1
    log = os.environ.get("STANDIN_SQLCMD_LOG")
    if log:
        with open(log, "a", encoding="utf-8") as f:
            f.write(statement + "\n")
    target = values.get("S", "localhost").removeprefix("tcp:")
    host, _, port = target.partition(",")
    password = values.get("P", os.environ.get("SQLCMDPASSWORD", ""))
    user = values.get("U", "")
    try:
        conn = Connection.connect(host or "localhost", int(port or 1433), float(values.get("l", 8)))
        conn.send({"op": "login", "user": user, "password": password, "app": "sqlcmd"})
        hello = conn.read()
    except (OSError, ValueError):
        _out(_ODBC + "Login timeout expired.")
        return 1
    if hello is None:
        _out(_ODBC + "Login timeout expired.")
        return 1
    server = hello.get("server", "")
    if not hello.get("ok"):
        m = hello["message"]
        _out(
            f"Msg {m['number']}, Level {m['severity']}, State {m['state']}, Server {server}, Line 1"
        )
        _out(m["text"])
        return 1
    failed = False
    conn.send({"op": "exec", "sql": statement})
    while True:
        event = conn.read()
        if event is None:
            _out(_ODBC + "Communication link failure.")
            return 1
        if "message" in event:
            m = event["message"]
            if m["severity"] > 10:
                failed = failed or m["severity"] >= 11
                _out(
                    f"Msg {m['number']}, Level {m['severity']}, State {m['state']}, "
                    f"Server {server}, Line 1"
                )
            elif m["number"] == 0:
                _out("")  # sqlcmd puts a blank line before "(N rows affected)"
            _out(m["text"])
        elif "resultset" in event:
            _print_rows(event["resultset"], values, flags)
        elif event.get("done"):
            break
    conn.close()
    return 1 if failed and "b" in flags else 0
