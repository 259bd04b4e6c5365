"""The command line's value types: every number is checked where it is parsed.

Each type turns the text the user typed into a value, or fails with
:class:`OptionValueError`, which carries the text and the reason in the user's terms;
:mod:`vdistream.cli.app` prints it as one line naming the option
(``vdistream: error: --block-size 3000: must be a power of two from 512 to 65536``)
and exits 2. The VDI limits come from :mod:`vdistream.protocol.config`, so the
command line and the device set can never disagree about them.

Sizes are bytes or a number with a binary unit: ``K``/``KiB``, ``M``/``MiB``,
``G``/``GiB`` (powers of 1024, case-insensitive; a trailing ``B`` is optional, so
``64KB`` is 64 KiB, never 64,000). Durations are ``30s``, ``90m``, ``36h``, ``14d``,
``2w`` or sums like ``1d12h``; where plain seconds make sense (``--stall-timeout``)
a bare number is seconds too. A :class:`Duration` keeps the text as written, so a
value is shown back the way the user wrote it (``keep_within=14d``).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import click

from vdistream.errors import ConfigError
from vdistream.pipeline.spec import CompressionSpec, parse_compression
from vdistream.protocol.config import (
    BLOCK_SIZE_MAX,
    BLOCK_SIZE_MIN,
    DEVICE_COUNT_MAX,
    TRANSFER_SIZE_MAX,
    TRANSFER_UNIT,
    valid_block_size,
    valid_max_transfer_size,
)

__all__ = (
    "BLOCK_SIZE",
    "BUFFER_COUNT",
    "BUFFER_COUNT_MAX",
    "COMPRESSION",
    "DEVICES",
    "DURATION",
    "JOB_LIMIT",
    "KEEP_LAST",
    "MAX_TRANSFER_SIZE",
    "MIN_AGE",
    "MOVE",
    "POINT_IN_TIME",
    "SECONDS",
    "TIME_OR_LATEST",
    "Duration",
    "OptionValueError",
    "format_duration",
    "format_size",
    "parse_size",
)

#: The most buffers a backup may ask for. VDI itself sets no bound; this one keeps a
#: typo (``--buffer-count 100000``) from asking for hundreds of GiB of buffer area.
BUFFER_COUNT_MAX = 4096

_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}
_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*(?:([kmg])(?:i?b)?|b)?\s*$", re.IGNORECASE)
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION_PART = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([smhdw])\s*", re.IGNORECASE)


class OptionValueError(click.BadParameter):
    """A value the option does not accept: ``value`` as typed, ``reason`` why."""

    def __init__(self, value: str, reason: str) -> None:
        super().__init__(f"{value}: {reason}")
        self.value = value
        self.reason = reason


def format_size(size: int) -> str:
    """``1048576`` -> ``1M``; a size that is no whole number of a unit stays bytes."""
    for unit, factor in (("G", 1024**3), ("M", 1024**2), ("K", 1024)):
        if size and size % factor == 0:
            return f"{size // factor}{unit}"
    return str(size)


def parse_size(text: str) -> int | None:
    """The bytes ``text`` means (module doc), or ``None`` when it is no size."""
    match = _SIZE.match(text)
    if match is None:
        return None
    value = float(match[1]) * _UNITS[(match[2] or "").lower()]
    return int(value) if value.is_integer() else None


def format_duration(seconds: float) -> str:
    """``1209600`` -> ``14d``, ``129600`` -> ``36h``: the largest unit that divides."""
    if seconds > 0 and float(seconds).is_integer():
        whole = int(seconds)
        for unit in ("d", "h", "m"):
            if whole % _DURATION_UNITS[unit] == 0:
                return f"{whole // _DURATION_UNITS[unit]}{unit}"
        return f"{whole}s"
    return f"{seconds:g}s"


@dataclasses.dataclass(frozen=True)
class Duration:
    """A duration and the text it was written as."""

    text: str
    delta: timedelta

    @property
    def seconds(self) -> float:
        return self.delta.total_seconds()

    def __str__(self) -> str:
        return self.text


class _Checked(click.ParamType[Any, Any]):
    """A value type: ``check`` turns the text typed into the value, or raises
    :class:`OptionValueError`."""

    def __init__(self, name: str, check: Callable[[str], Any]) -> None:
        self.name = name
        self.check = check

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, Duration | CompressionSpec | datetime | tuple):
            return value  # converted already
        return self.check(str(value))


def _count(low: int, high: int) -> Callable[[str], int]:
    """A whole number in ``low..high``."""

    def check(text: str) -> int:
        if not re.fullmatch(r"[+-]?[0-9]+", text.strip()) or not low <= int(text) <= high:
            raise OptionValueError(text, f"must be a whole number from {low} to {high}")
        return int(text)

    return check


def _size(reason: str, valid: Callable[[int], bool]) -> Callable[[str], int]:
    """A size in bytes, checked by ``valid`` (``reason``: what it takes)."""

    def check(text: str) -> int:
        size = parse_size(text)
        if size is None:
            raise OptionValueError(
                text, f"not a size; write bytes or a number with K, M or G ({reason})"
            )
        if not valid(size):
            raise OptionValueError(text, reason)
        return size

    return check


def _seconds(text: str) -> float:
    """A positive number of seconds, or a duration with a unit (``90s``, ``5m``)."""
    try:
        seconds = float(text)
    except ValueError:
        duration = _parse_duration(text.strip())
        if duration is None:
            raise OptionValueError(
                text, "must be a number of seconds above 0, or a duration like 90s, 5m"
            ) from None
        seconds = duration.total_seconds()
    if not (math.isfinite(seconds) and seconds > 0):
        raise OptionValueError(text, "must be a number of seconds above 0")
    return seconds


def _parse_duration(text: str) -> timedelta | None:
    seconds = 0.0
    pos = 0
    if not text.strip():
        return None
    while pos < len(text):
        match = _DURATION_PART.match(text, pos)
        if match is None:
            return None
        seconds += float(match[1]) * _DURATION_UNITS[match[2].lower()]
        pos = match.end()
    return timedelta(seconds=seconds)


def _duration(*, zero_ok: bool = False) -> Callable[[str], Duration]:
    """A duration with its unit (``30s``, ``1h``, ``14d``, ``1d12h``); ``zero_ok``
    also takes ``0`` (no minimum)."""

    def check(text: str) -> Duration:
        written = text.strip()
        if zero_ok and re.fullmatch(r"0+(\.0*)?[smhdw]?", written, re.IGNORECASE):
            return Duration(written, timedelta(0))
        delta = _parse_duration(written)
        example = "30s, 90m, 36h, 14d or 1d12h" + (" (0: no minimum)" if zero_ok else "")
        if delta is None:
            raise OptionValueError(text, f"not a duration; write a number and a unit: {example}")
        if delta <= timedelta(0) and not zero_ok:
            raise OptionValueError(text, "must be longer than 0")
        return Duration(written, delta)

    return check


def _compression(text: str) -> CompressionSpec:
    try:
        return parse_compression(text, setting="--compress")
    except ConfigError as exc:
        raise OptionValueError(text, str(exc).removeprefix(f"--compress={text!r}: ")) from None


def _rate(text: str) -> int | None:
    """``--max-rate``: bytes per second (``vdistream.throttle.parse_rate``); None: off."""
    from vdistream.throttle import parse_rate

    try:
        return parse_rate(text, what="--max-rate")
    except ConfigError as exc:
        reason = str(exc).removeprefix("--max-rate: ").removeprefix(f"{text!r} ")
        raise OptionValueError(text, reason) from None


DEVICES = _Checked("devices", _count(1, DEVICE_COUNT_MAX))
BUFFER_COUNT = _Checked("count", _count(1, BUFFER_COUNT_MAX))
MAX_TRANSFER_SIZE = _Checked(
    "size",
    _size(
        f"must be a multiple of {format_size(TRANSFER_UNIT)} from {format_size(TRANSFER_UNIT)} "
        f"to {format_size(TRANSFER_SIZE_MAX)}",
        valid_max_transfer_size,
    ),
)
BLOCK_SIZE = _Checked(
    "size",
    _size(f"must be a power of two from {BLOCK_SIZE_MIN} to {BLOCK_SIZE_MAX}", valid_block_size),
)
SECONDS = _Checked("seconds", _seconds)
DURATION = _Checked("duration", _duration())
MIN_AGE = _Checked("duration", _duration(zero_ok=True))
COMPRESSION = _Checked("compression", _compression)
KEEP_LAST = _Checked("count", _count(1, 1_000_000))
RATE = _Checked("rate", _rate)
JOB_LIMIT = _Checked("count", _count(1, 1000))


def _point_in_time(*, latest: bool) -> Callable[[str], datetime | str]:
    """An ISO 8601 time (``2026-12-06T10:00:00``, ``2026-12-06 10:00``, with ``Z`` or an
    offset; without one it is UTC, as vdistream records times); ``latest`` also takes
    ``latest`` (returned as the string ``"latest"``)."""

    def check(text: str) -> datetime | str:
        written = text.strip()
        if latest and written.lower() == "latest":
            return "latest"
        try:
            when = datetime.fromisoformat(written.replace("Z", "+00:00").replace("z", "+00:00"))
        except ValueError:
            other = " or latest" if latest else ""
            raise OptionValueError(
                text, f"not a time; write ISO 8601 such as 2026-12-06T10:00:00 (UTC){other}"
            ) from None
        return when if when.tzinfo is not None else when.replace(tzinfo=UTC)

    return check


def _move(text: str) -> tuple[str, str]:
    logical, eq, path = text.partition("=")
    if not eq or not logical.strip() or not path.strip():
        raise OptionValueError(text, "write LOGICAL=PATH (a file's logical name and its new path)")
    return logical.strip(), path.strip()


POINT_IN_TIME = _Checked("time", _point_in_time(latest=False))
TIME_OR_LATEST = _Checked("time|latest", _point_in_time(latest=True))
MOVE = _Checked("logical=path", _move)
