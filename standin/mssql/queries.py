"""SELECTs over the catalog views the stand-in knows, with SQL Server's output formats."""

from __future__ import annotations

import functools
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from standin.mssql import tsql
from standin.mssql.data import Store
from standin.mssql.messages import StatementFailed, error

__all__ = ("PRODUCT_VERSION", "as_datetime", "format_value", "run_select", "sql_datetime")

PRODUCT_VERSION = "16.0.4135.4"  # shaped like SQL Server 2022's

Row = dict[str, Any]


def sql_datetime(value: datetime) -> datetime:
    """Round to SQL Server's ``datetime`` precision (1/300 s), as msdb stores its dates."""
    ticks = round(value.microsecond * 300 / 1_000_000)
    return value.replace(microsecond=0) + timedelta(microseconds=round(ticks * 1_000_000 / 300))


def as_datetime(text: str) -> datetime:
    return datetime.fromisoformat(text)


def _ms(value: datetime) -> str:
    return f"{value.microsecond // 1000:03d}"


def format_value(value: Any) -> str | None:
    """A value as sqlcmd shows it (NULL stays None)."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S.") + _ms(value)
    return str(value)


def _style_126(value: datetime) -> str:
    # style 126 leaves the fraction out when the milliseconds are 0
    base = value.strftime("%Y-%m-%dT%H:%M:%S")
    return base if value.microsecond // 1000 == 0 else f"{base}.{_ms(value)}"


def _backupset(store: Store) -> list[Row]:
    rows = []
    for r in store.msdb:
        row = {k: r.get(k) for k in _BACKUPSET_COLUMNS}
        row["backup_start_date"] = as_datetime(r["backup_start_date"])
        row["backup_finish_date"] = as_datetime(r["backup_finish_date"])
        row["backup_set_uuid"] = r["backup_set_guid"]
        # msdb's offset of the server's local time from UTC, in 15-minute steps: the
        # stand-in's clock is UTC
        row["time_zone"] = r.get("time_zone", 0)
        rows.append(row)
    return rows


_BACKUPSET_COLUMNS = (
    "backup_set_id",
    "backup_set_uuid",
    "name",
    "description",
    "database_name",
    "server_name",
    "type",
    "is_copy_only",
    "first_lsn",
    "last_lsn",
    "checkpoint_lsn",
    "database_backup_lsn",
    "differential_base_lsn",
    "backup_start_date",
    "backup_finish_date",
    "backup_size",
    "has_backup_checksums",
    "family_guid",
    "recovery_model",
    "position",
    "time_zone",
)


def _master_files(store: Store) -> list[Row]:
    rows = []
    for db in store.databases.values():
        for file_id, f in enumerate(db.files, start=1):
            rows.append(
                {
                    "database_id": db.database_id,
                    "file_id": file_id,
                    "type": 0 if f.type_desc == "ROWS" else 1,
                    "type_desc": f.type_desc,
                    "name": f.logical,
                    "physical_name": f.physical,
                    "state": 0 if db.state == "ONLINE" else 1,
                    "state_desc": db.state,
                    "size": db.size_pages if f.type_desc == "ROWS" else 1024,
                }
            )
    return rows


def _databases(store: Store) -> list[Row]:
    return [
        {
            "name": db.name,
            "database_id": db.database_id,
            "state": 0 if db.state == "ONLINE" else 1,
            "state_desc": db.state,
            "recovery_model": 1,
            "recovery_model_desc": "FULL",
            "create_date": sql_datetime(
                datetime.fromtimestamp(db.create_date, UTC).replace(tzinfo=None)
            ),
        }
        for db in store.databases.values()
    ]


_TABLES: dict[str, Callable[[Store], list[Row]]] = {
    "msdb.dbo.backupset": _backupset,
    "sys.master_files": _master_files,
    "sys.databases": _databases,
}


class _Eval:
    def __init__(self, store: Store, server_name: str) -> None:
        self.store = store
        self.server_name = server_name

    def __call__(self, expr: tsql.Expr, row: Row) -> Any:
        if isinstance(expr, tsql.Literal):
            return expr.value
        if isinstance(expr, tsql.Column):
            if expr.name not in row:
                raise StatementFailed(error(207, f"Invalid column name '{expr.name}'."))
            return row[expr.name]
        if isinstance(expr, tsql.Func):
            return self.func(expr, row)
        if isinstance(expr, tsql.Cast):
            return self.convert(expr.type, self(expr.expr, row), None)
        if isinstance(expr, tsql.Convert):
            return self.convert(expr.type, self(expr.expr, row), expr.style)
        if isinstance(expr, tsql.Not):
            value = self(expr.expr, row)
            return None if value is None else not value
        if isinstance(expr, tsql.IsNull):
            return (self(expr.expr, row) is None) != expr.negate
        return self.binary(expr, row)

    def binary(self, expr: tsql.Binary, row: Row) -> Any:
        left = self(expr.left, row)
        if expr.op == "AND":
            return bool(left) and bool(self(expr.right, row))
        if expr.op == "OR":
            return bool(left) or bool(self(expr.right, row))
        right = self(expr.right, row)
        if left is None or right is None:
            return None  # unknown: not true
        if isinstance(left, str) and isinstance(right, str):
            # the default collation is case-insensitive
            left, right = left.casefold(), right.casefold()
        elif isinstance(left, datetime) and isinstance(right, str):
            right = as_datetime(right)
        elif isinstance(left, int) and isinstance(right, str):
            right = int(right)
        ops: dict[str, Callable[[Any, Any], bool]] = {
            "=": lambda a, b: a == b,
            "<>": lambda a, b: a != b,
            "<": lambda a, b: a < b,
            ">": lambda a, b: a > b,
            "<=": lambda a, b: a <= b,
            ">=": lambda a, b: a >= b,
        }
        return ops[expr.op](left, right)

    def func(self, expr: tsql.Func, row: Row) -> Any:
        args = [self(a, row) for a in expr.args]
        name = expr.name
        if name == "SERVERPROPERTY":
            return {
                "productversion": PRODUCT_VERSION,
                "productlevel": "RTM",
                "edition": "Developer Edition (64-bit)",
                "engineedition": 3,
                "servername": self.server_name,
                "machinename": self.server_name,
            }.get(str(args[0]).casefold())
        if name == "DB_ID":
            db = self.store.get(str(args[0])) if args and args[0] is not None else None
            return db.database_id if db else None
        if name == "DB_NAME":
            for db in self.store.databases.values():
                if db.database_id == args[0]:
                    return db.name
            return None
        if name in ("GETUTCDATE", "SYSUTCDATETIME"):
            return sql_datetime(datetime.now(UTC).replace(tzinfo=None))
        if name == "@@SERVERNAME":
            return self.server_name
        if name == "@@VERSION":
            return f"Microsoft SQL Server 2022 (stand-in) - {PRODUCT_VERSION} (X64)"
        raise StatementFailed(error(195, f"'{name}' is not a recognized built-in function name."))

    def convert(self, type_: str, value: Any, style: int | None) -> Any:
        if value is None:
            return None
        base = type_.split("(")[0]
        if base in ("varchar", "nvarchar", "char", "nchar", "sysname"):
            if isinstance(value, datetime):
                text = _style_126(value) if style in (126, 127) else format_value(value)
            else:
                text = format_value(value)
            size = type_[len(base) + 1 : -1] if "(" in type_ else "30"
            return text if size == "max" or text is None else text[: int(size)]
        if base in ("int", "bigint", "numeric", "decimal"):
            return int(value)
        return value


def run_select(
    store: Store, select: tsql.Select, server_name: str
) -> tuple[list[str], list[list[Any]]]:
    """Columns and rows (values formatted as sqlcmd prints them) of one SELECT."""
    evaluate = _Eval(store, server_name)
    with store.lock:
        rows = _TABLES[select.table](store) if select.table else [{}]
    if select.where is not None:
        rows = [r for r in rows if evaluate(select.where, r)]
    for expr, desc in reversed(select.order):

        def key(r: Row, expr: tsql.Expr = expr) -> tuple[int, Any]:
            v = evaluate(expr, r)
            return (0, 0) if v is None else (1, v.casefold() if isinstance(v, str) else v)

        rows.sort(key=functools.cmp_to_key(lambda a, b: _cmp(key(a), key(b))), reverse=desc)
    if select.top is not None:
        rows = rows[: select.top]
    columns: list[str] = []
    for item in select.items:
        if item.expr is None:
            columns += list(rows[0]) if rows else []
        else:
            columns.append(
                item.alias or (item.expr.name if isinstance(item.expr, tsql.Column) else "")
            )
    out: list[list[Any]] = []
    for r in rows:
        values: list[Any] = []
        for item in select.items:
            if item.expr is None:
                values += [format_value(v) for v in r.values()]
            else:
                values.append(format_value(evaluate(item.expr, r)))
        out.append(values)
    return columns, out


def _cmp(a: tuple[int, Any], b: tuple[int, Any]) -> int:
    return (a > b) - (a < b)
