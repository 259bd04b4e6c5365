"""The T-SQL the stand-in understands (Contract B), parsed as SQL Server would tokenize it.

Case-insensitive keywords, free whitespace and comments, ``N'..'``/``'..'`` strings with ``''``,
``[..]`` identifiers with ``]]`` and ``".."`` identifiers with ``""``; a batch is split on ``;``
(or where a new statement starts). A batch that does not parse runs nothing, as in SQL Server.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Union

__all__ = (
    "Backup",
    "Binary",
    "Cast",
    "Column",
    "Convert",
    "DropDatabase",
    "Expr",
    "Func",
    "IsNull",
    "Literal",
    "Not",
    "Restore",
    "Select",
    "SelectItem",
    "SetOption",
    "Statement",
    "TsqlError",
    "parse_batch",
)


class TsqlError(Exception):
    """A statement SQL Server would refuse at compile time: ``number`` and its text."""

    def __init__(self, number: int, text: str, severity: int = 15) -> None:
        super().__init__(text)
        self.number = number
        self.text = text
        self.severity = severity


# ---- tokens ---------------------------------------------------------------------------------

_TOKEN = re.compile(
    r"""
     (?P<ws>\s+)
    |(?P<lc>--[^\n]*)
    |(?P<bc>/\*.*?\*/)
    |(?P<nstr>[Nn]'(?:[^']|'')*')
    |(?P<str>'(?:[^']|'')*')
    |(?P<br>\[(?:[^\]]|\]\])*\])
    |(?P<dq>"(?:[^"]|"")*")
    |(?P<num>\d+)
    |(?P<var>@@?[^\W\d][\w@#$]*)
    |(?P<word>[^\W\d][\w@#$]*|\#[\w@#$]+)
    |(?P<op><>|!=|<=|>=|[(),;=.*<>+-])
    """,
    re.X | re.S,
)


@dataclass(frozen=True)
class Token:
    kind: str  # word, id (quoted identifier), str, num, var, op, end
    value: str
    raw: str

    def is_word(self, *words: str) -> bool:
        return self.kind == "word" and self.value.upper() in words

    def is_op(self, op: str) -> bool:
        return self.kind == "op" and self.value == op


def tokenize(text: str) -> list[Token]:
    tokens: list[Token] = []
    pos = 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            rest = text[pos:]
            if rest.startswith(("'", "N'", "n'")):
                body = rest.split("'", 1)[1]
                raise TsqlError(
                    105, f"Unclosed quotation mark after the character string '{body}'."
                )
            if rest.startswith(("[", '"')):
                raise TsqlError(
                    105, f"Unclosed quotation mark after the character string '{rest}'."
                )
            raise TsqlError(102, f"Incorrect syntax near '{rest[:1]}'.")
        kind = m.lastgroup or ""
        raw = m.group()
        pos = m.end()
        if kind in ("ws", "lc", "bc"):
            continue
        if kind == "nstr":
            tokens.append(Token("str", raw[2:-1].replace("''", "'"), raw))
        elif kind == "str":
            tokens.append(Token("str", raw[1:-1].replace("''", "'"), raw))
        elif kind == "br":
            tokens.append(Token("id", raw[1:-1].replace("]]", "]"), raw))
        elif kind == "dq":
            tokens.append(Token("id", raw[1:-1].replace('""', '"'), raw))
        else:
            tokens.append(Token(kind, raw, raw))
    tokens.append(Token("end", "", ""))
    return tokens


# ---- statements -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Backup:
    log: bool  # BACKUP LOG
    database: str
    devices: tuple[str, ...]
    name: str | None = None
    description: str | None = None
    differential: bool = False
    copy_only: bool = False
    checksum: bool = False
    block_size: int | None = None
    buffer_count: int | None = None
    max_transfer_size: int | None = None
    flags: frozenset[str] = frozenset()  # FORMAT, INIT, STATS, COMPRESSION, ... (accepted)


@dataclass(frozen=True)
class Restore:
    what: str  # DATABASE, LOG, VERIFYONLY, HEADERONLY, FILELISTONLY
    database: str | None
    devices: tuple[str, ...]
    replace: bool = False
    recovery: bool = True
    moves: tuple[tuple[str, str], ...] = ()
    stopat: str | None = None
    checksum: bool = False
    block_size: int | None = None
    buffer_count: int | None = None
    max_transfer_size: int | None = None
    flags: frozenset[str] = frozenset()


@dataclass(frozen=True)
class SetOption:
    name: str  # upper case, e.g. NOCOUNT
    on: bool


@dataclass(frozen=True)
class DropDatabase:
    names: tuple[str, ...]


@dataclass(frozen=True)
class Literal:
    value: object


@dataclass(frozen=True)
class Column:
    name: str  # last part, lower case


@dataclass(frozen=True)
class Func:
    name: str  # upper case
    args: tuple[Expr, ...]


@dataclass(frozen=True)
class Cast:
    expr: Expr
    type: str


@dataclass(frozen=True)
class Convert:
    type: str
    expr: Expr
    style: int | None


@dataclass(frozen=True)
class Binary:
    op: str  # =, <>, <, >, <=, >=, AND, OR
    left: Expr
    right: Expr


@dataclass(frozen=True)
class Not:
    expr: Expr


@dataclass(frozen=True)
class IsNull:
    expr: Expr
    negate: bool


Expr = Union[Literal, Column, Func, Cast, Convert, Binary, Not, IsNull]  # noqa: UP007


@dataclass(frozen=True)
class SelectItem:
    expr: Expr | None  # None: *
    alias: str | None


@dataclass(frozen=True)
class Select:
    items: tuple[SelectItem, ...]
    table: str | None  # "msdb.dbo.backupset", "sys.master_files", "sys.databases"
    where: Expr | None = None
    order: tuple[tuple[Expr, bool], ...] = ()  # (expression, descending)
    top: int | None = None


Statement = Union[Backup, Restore, SetOption, DropDatabase, Select]  # noqa: UP007

_STARTS = ("BACKUP", "RESTORE", "SET", "SELECT", "DROP")
_BACKUP_FLAGS = frozenset(
    {
        "FORMAT",
        "NOFORMAT",
        "INIT",
        "NOINIT",
        "SKIP",
        "NOSKIP",
        "STATS",
        "COMPRESSION",
        "NO_COMPRESSION",
        "NO_CHECKSUM",
        "CONTINUE_AFTER_ERROR",
        "STOP_ON_ERROR",
        "NOREWIND",
        "NOUNLOAD",
        "REWIND",
        "UNLOAD",
        "NORECOVERY",
        "NO_TRUNCATE",
    }
)
_RESTORE_FLAGS = frozenset(
    {
        "STATS",
        "NO_CHECKSUM",
        "CONTINUE_AFTER_ERROR",
        "STOP_ON_ERROR",
        "NOREWIND",
        "NOUNLOAD",
        "REWIND",
        "UNLOAD",
        "FILE",
        "KEEP_REPLICATION",
        "RESTRICTED_USER",
        "PARTIAL",
        "LOADHISTORY",
    }
)
_NUMERIC = frozenset({"BLOCKSIZE", "BUFFERCOUNT", "MAXTRANSFERSIZE", "STATS", "FILE"})
_CLAUSE_WORDS = frozenset({"FROM", "WHERE", "ORDER", "GROUP", "HAVING", "UNION", "AS", "INTO"})
_TABLES = {
    ("msdb", "dbo", "backupset"): "msdb.dbo.backupset",
    ("sys", "master_files"): "sys.master_files",
    ("sys", "databases"): "sys.databases",
}


@dataclass
class _Parser:
    tokens: list[Token]
    pos: int = 0
    last: Token = field(default_factory=lambda: Token("end", "", ""))

    # -- primitives

    def peek(self, ahead: int = 0) -> Token:
        return self.tokens[min(self.pos + ahead, len(self.tokens) - 1)]

    def next(self) -> Token:
        tok = self.peek()
        if tok.kind != "end":
            self.pos += 1
            self.last = tok
        return tok

    def error(self, tok: Token | None = None) -> TsqlError:
        tok = tok or self.peek()
        if tok.kind == "end":
            tok = self.last
        shown = tok.value if tok.kind in ("id", "str") else tok.raw
        return TsqlError(102, f"Incorrect syntax near '{shown}'.")

    def accept_word(self, *words: str) -> str | None:
        tok = self.peek()
        if tok.is_word(*words):
            self.next()
            return tok.value.upper()
        return None

    def expect_word(self, *words: str) -> str:
        word = self.accept_word(*words)
        if word is None:
            raise self.error()
        return word

    def accept_op(self, op: str) -> bool:
        if self.peek().is_op(op):
            self.next()
            return True
        return False

    def expect_op(self, op: str) -> None:
        if not self.accept_op(op):
            raise self.error()

    def identifier(self) -> str:
        tok = self.peek()
        if tok.kind in ("word", "id"):
            self.next()
            return tok.value
        raise self.error()

    def string(self) -> str:
        tok = self.peek()
        if tok.kind != "str":
            raise self.error()
        self.next()
        return tok.value

    def number(self) -> int:
        tok = self.peek()
        if tok.kind != "num":
            raise self.error()
        self.next()
        return int(tok.value)

    # -- batch

    def batch(self) -> list[Statement]:
        out: list[Statement] = []
        while True:
            while self.accept_op(";"):
                pass
            if self.peek().kind == "end":
                return out
            out.append(self.statement())
            tok = self.peek()
            if not (tok.kind == "end" or tok.is_op(";") or tok.is_word(*_STARTS)):
                raise self.error()

    def statement(self) -> Statement:
        word = self.accept_word(*_STARTS)
        if word == "BACKUP":
            return self.backup()
        if word == "RESTORE":
            return self.restore()
        if word == "SET":
            name = self.identifier().upper()
            on = self.expect_word("ON", "OFF") == "ON"
            return SetOption(name, on)
        if word == "SELECT":
            return self.select()
        if word == "DROP":
            self.expect_word("DATABASE")
            self.accept_word("IF") and self.expect_word("EXISTS")
            names = [self.identifier()]
            while self.accept_op(","):
                names.append(self.identifier())
            return DropDatabase(tuple(names))
        raise self.error()

    # -- BACKUP / RESTORE

    def devices(self) -> tuple[str, ...]:
        names: list[str] = []
        while True:
            self.expect_word("VIRTUAL_DEVICE")
            self.expect_op("=")
            names.append(self.string())
            if not (self.peek().is_op(",") and self.peek(1).is_word("VIRTUAL_DEVICE")):
                return tuple(names)
            self.next()

    def options(self, statement: str) -> list[tuple[str, object]]:
        """``WITH a, b = 1, MOVE 'x' TO 'y'`` as (NAME, value) pairs, value True when bare."""
        out: list[tuple[str, object]] = []
        if not self.accept_word("WITH"):
            return out
        while True:
            tok = self.next()
            if tok.kind != "word":
                raise self.error(tok)
            name = tok.value.upper()
            if name == "MOVE":
                logical = self.string()
                self.expect_word("TO")
                out.append((name, (logical, self.string())))
            elif self.accept_op("="):
                value = self.peek()
                if value.kind == "num":
                    out.append((name, int(self.next().value)))
                elif value.kind == "str":
                    out.append((name, self.next().value))
                else:
                    raise self.error()
            else:
                out.append((name, True))
            if not self.accept_op(","):
                return out

    def backup(self) -> Backup:
        log = self.expect_word("DATABASE", "LOG") == "LOG"
        database = self.identifier()
        self.expect_word("TO")
        devices = self.devices()
        kw: dict[str, object] = {}
        flags: set[str] = set()
        for name, value in self.options("BACKUP"):
            self._option(name, value, kw, flags, _BACKUP_FLAGS, "BACKUP")
            if name in ("DIFFERENTIAL", "COPY_ONLY", "CHECKSUM") and value is not True:
                raise self.error()
            if name in ("NAME", "DESCRIPTION") and not isinstance(value, str):
                raise self.error()
        return Backup(log, database, devices, flags=frozenset(flags), **kw)  # type: ignore[arg-type]

    def restore(self) -> Restore:
        what = self.expect_word(
            "DATABASE", "LOG", "VERIFYONLY", "HEADERONLY", "FILELISTONLY", "LABELONLY"
        )
        database = self.identifier() if what in ("DATABASE", "LOG") else None
        devices: tuple[str, ...] = ()
        if what not in ("DATABASE",) or self.peek().is_word("FROM"):
            self.expect_word("FROM")
            devices = self.devices()
        kw: dict[str, object] = {}
        flags: set[str] = set()
        moves: list[tuple[str, str]] = []
        for name, value in self.options("RESTORE"):
            if name == "MOVE":
                moves.append(value)  # type: ignore[arg-type]
            elif name in ("RECOVERY", "NORECOVERY") and value is True:
                kw["recovery"] = name == "RECOVERY"
            elif name == "STOPAT" and isinstance(value, str):
                kw["stopat"] = value
            else:
                self._option(name, value, kw, flags, _RESTORE_FLAGS, "RESTORE")
        return Restore(what, database, devices, moves=tuple(moves), flags=frozenset(flags), **kw)  # type: ignore[arg-type]

    def _option(
        self,
        name: str,
        value: object,
        kw: dict[str, object],
        flags: set[str],
        known: frozenset[str],
        statement: str,
    ) -> None:
        fields = {
            "NAME": "name",
            "DESCRIPTION": "description",
            "DIFFERENTIAL": "differential",
            "COPY_ONLY": "copy_only",
            "CHECKSUM": "checksum",
            "REPLACE": "replace",
            "BLOCKSIZE": "block_size",
            "BUFFERCOUNT": "buffer_count",
            "MAXTRANSFERSIZE": "max_transfer_size",
        }
        if statement == "RESTORE":
            for only_backup in ("NAME", "DESCRIPTION", "DIFFERENTIAL", "COPY_ONLY"):
                fields.pop(only_backup)
        else:
            fields.pop("REPLACE")
        if name in _NUMERIC and value is not True and not isinstance(value, int):
            raise self.error()
        if name in fields:
            if name in ("BLOCKSIZE", "BUFFERCOUNT", "MAXTRANSFERSIZE") and not isinstance(
                value, int
            ):
                raise self.error()
            kw[fields[name]] = value
        elif name in known:
            flags.add(name)
        else:
            raise TsqlError(155, f"'{name}' is not a recognized {statement} option.")

    # -- SELECT

    def select(self) -> Select:
        top = None
        if self.accept_word("TOP"):
            if self.accept_op("("):
                top = self.number()
                self.expect_op(")")
            else:
                top = self.number()
        items = [self.select_item()]
        while self.accept_op(","):
            items.append(self.select_item())
        table = None
        if self.accept_word("FROM"):
            table = self.table()
        where = None
        if self.accept_word("WHERE"):
            where = self.expr()
        order: list[tuple[Expr, bool]] = []
        if self.accept_word("ORDER"):
            self.expect_word("BY")
            while True:
                expr = self.expr()
                desc = self.accept_word("ASC", "DESC") == "DESC"
                order.append((expr, desc))
                if not self.accept_op(","):
                    break
        return Select(tuple(items), table, where, tuple(order), top)

    def select_item(self) -> SelectItem:
        if self.accept_op("*"):
            return SelectItem(None, None)
        expr = self.expr()
        alias = None
        if self.accept_word("AS"):
            alias = self.identifier() if self.peek().kind != "str" else self.string()
        elif self.peek().kind == "id" or (
            self.peek().kind == "word" and not self.peek().is_word(*_CLAUSE_WORDS, *_STARTS)
        ):
            alias = self.identifier()
        return SelectItem(expr, alias)

    def table(self) -> str:
        parts = [self.identifier()]
        while self.accept_op("."):
            parts.append("" if self.peek().is_op(".") else self.identifier())
        key = tuple(p.lower() for p in parts)
        if key[:1] == ("master",) and len(key) == 3:
            key = key[1:]
        if len(key) == 3 and key[1] == "":
            key = (key[0], "dbo", key[2])
        if key not in _TABLES:
            raise TsqlError(208, f"Invalid object name '{'.'.join(parts)}'.", severity=16)
        return _TABLES[key]

    def expr(self) -> Expr:
        left = self.and_expr()
        while self.accept_word("OR"):
            left = Binary("OR", left, self.and_expr())
        return left

    def and_expr(self) -> Expr:
        left = self.not_expr()
        while self.accept_word("AND"):
            left = Binary("AND", left, self.not_expr())
        return left

    def not_expr(self) -> Expr:
        if self.accept_word("NOT"):
            return Not(self.not_expr())
        left = self.primary()
        tok = self.peek()
        if tok.kind == "op" and tok.value in ("=", "<>", "!=", "<", ">", "<=", ">="):
            self.next()
            op = "<>" if tok.value == "!=" else tok.value
            return Binary(op, left, self.primary())
        if self.accept_word("IS"):
            negate = self.accept_word("NOT") is not None
            self.expect_word("NULL")
            return IsNull(left, negate)
        return left

    def type_name(self) -> str:
        name = self.identifier().lower()
        if self.accept_op("("):
            size = "max" if self.accept_word("MAX") else str(self.number())
            if self.accept_op(","):
                size += f",{self.number()}"
            self.expect_op(")")
            name += f"({size})"
        return name

    def primary(self) -> Expr:
        tok = self.peek()
        if tok.kind == "num":
            return Literal(self.number())
        if tok.kind == "str":
            return Literal(self.string())
        if tok.is_op("-") and self.peek(1).kind == "num":
            self.next()
            return Literal(-self.number())
        if tok.is_word("NULL"):
            self.next()
            return Literal(None)
        if self.accept_op("("):
            inner = self.expr()
            self.expect_op(")")
            return inner
        if tok.kind == "var":
            self.next()
            return Func(tok.value.upper(), ())
        if tok.is_word("CAST"):
            self.next()
            self.expect_op("(")
            inner = self.expr()
            self.expect_word("AS")
            type_ = self.type_name()
            self.expect_op(")")
            return Cast(inner, type_)
        if tok.is_word("CONVERT"):
            self.next()
            self.expect_op("(")
            type_ = self.type_name()
            self.expect_op(",")
            inner = self.expr()
            style = self.number() if self.accept_op(",") else None
            self.expect_op(")")
            return Convert(type_, inner, style)
        if tok.kind in ("word", "id") and not tok.is_word(*_CLAUSE_WORDS, *_STARTS):
            name = self.identifier()
            if tok.kind == "word" and self.accept_op("("):
                args: list[Expr] = []
                if not self.accept_op(")"):
                    args.append(self.expr())
                    while self.accept_op(","):
                        args.append(self.expr())
                    self.expect_op(")")
                return Func(name.upper(), tuple(args))
            while self.accept_op("."):
                name = self.identifier()
            return Column(name.lower())
        raise self.error()


def parse_batch(text: str) -> list[Statement]:
    """All statements of a batch; :class:`TsqlError` (nothing runs) when any does not parse."""
    return _Parser(tokenize(text)).batch()
