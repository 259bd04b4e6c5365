"""Bandwidth limits: a job's own, shared fairly by its devices, and shared ones above it.

A :class:`RateLimit` is a token bucket on anyio's clock, in bytes per second
(``None``: no limit). Whoever moves ``n`` bytes first ``await limit.acquire(n)``:

* **Fair.** Waiters are served first come, first served (one FIFO lock): the devices
  of a job that all wait get equal turns, whatever their speed. Under a limit shared
  by several jobs the turns are the devices', so a job with more devices gets more,
  and a turn is one transfer: a job of 64 KiB transfers gets a sixteenth of the bytes
  of one of 1 MiB transfers (turns, not bytes, are shared; never a starved job).
* **Live.** ``set_rate(n | None)`` applies at once, also to a waiter already asleep:
  it is woken and recomputes its wait at the new rate (no polling).
* **Bounded burst.** The bucket holds at most ``burst`` seconds of the rate (0.25 s);
  a request larger than that waits for a full bucket and leaves the bucket in debt,
  which the next waiter pays back first. Over any window of ``T`` seconds at most
  ``rate * T + max(rate * burst, largest request)`` bytes pass, so a 5-second window
  is honoured within 10 % when the rate is at least twice the largest request per
  second (1 MiB transfers: from 2 MiB/s up).
* **Bounded and cancellable.** Every wait is an anyio wait for a computed time (the
  debt before it and its own bytes, at the rate: a few requests' worth), cancelled by
  the caller's scope like any other.

A transfer that must respect several limits at once (the job's own and the daemon's
global one) takes them in turn (:class:`Limits`): each is held only while it is
awaited, so no cycle of waits can form, and the transfer moves at the slowest one's
rate. :class:`Limits` is what a job hands its devices: ``active`` is a cheap check
(near-zero cost when nothing is limited), and ``release()`` lets every waiter go at
once (a job that aborts does not wait for tokens).

Shared limits reach jobs created deeper down (by ``operations``, on behalf of a
daemon) through :func:`sharing`: a context variable set in the job's own task, the
way ``storage.s3.observe_retries`` hooks metrics; a :class:`~vdistream.coordinator.Job`
takes the ones in effect when it is created.

Rates are written as :func:`parse_rate` reads them: bytes per second as a whole or
decimal number with an optional unit: ``K``, ``M``, ``G``, ``T`` (also ``KiB``...)
are powers of 1024 (as curl's ``--limit-rate`` and rsync's ``--bwlimit``), ``KB``,
``MB``, ``GB``, ``TB`` powers of 1000; an optional ``/s``. ``0``, ``off``, ``none``
and ``unlimited`` mean no limit.
"""

from __future__ import annotations

import contextlib
import contextvars
import re
from collections.abc import Iterable, Iterator

import anyio

from vdistream.errors import ConfigError

__all__ = (
    "BURST_SECONDS",
    "Limits",
    "RateLimit",
    "format_rate",
    "parse_rate",
    "shared_limits",
    "sharing",
)

#: How many seconds of its rate a bucket holds at most (the largest burst).
BURST_SECONDS = 0.25
#: The largest rate (a pebibyte per second): beyond it a rate is no limit in practice,
#: and the bucket's float arithmetic would overflow.
_MOST = 1024**5

_OFF = frozenset({"0", "off", "none", "unlimited", "no"})
_RATE = re.compile(
    r"^([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*(?:([kmgt])(i?b)?|(b))?(?:\s*/\s*s)?$", re.IGNORECASE
)
_POWERS = {"k": 1, "m": 2, "g": 3, "t": 4}
_HINT = (
    "give bytes per second like 500K, 200M or 1.5G (powers of 1024; KB, MB, GB "
    'are powers of 1000), or "off"'
)


def parse_rate(value: str | int | None, *, what: str = "rate") -> int | None:
    """Bytes per second from ``value`` (module doc), ``None`` for no limit.

    ``value`` may be an integer (``0``: no limit) or text. ``ConfigError`` names
    ``what`` (the option or setting) and the value when it is no rate, is negative, or
    is below 1 byte per second.
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ConfigError(f"{what}: expected a rate like 200M, got {type(value).__name__}")
    if isinstance(value, int):
        if value < 0:
            raise ConfigError(f"{what}: {value} is negative; {_HINT}")
        if value > _MOST:
            raise ConfigError(f"{what}: {_shown(value)} is more than 1024T (a pebibyte) per second")
        return value or None
    text = value.strip()
    if text.lower() in _OFF:
        return None
    match = _RATE.match(text)
    if match is None:
        raise ConfigError(f"{what}: {value!r} is not a rate; {_HINT}")
    number, unit, suffix = float(match[1]), (match[2] or "").lower(), (match[3] or "").lower()
    base = 1000 if suffix == "b" else 1024  # "MB": decimal; "M", "MiB": binary
    rate = number * base ** _POWERS[unit] if unit else number
    if rate == 0:
        return None
    if rate < 1:
        raise ConfigError(f"{what}: {value!r} is less than 1 byte per second; {_HINT}")
    if rate > _MOST:  # also what float() made infinite of a few hundred digits
        raise ConfigError(f"{what}: {_shown(value)} is more than 1024T (a pebibyte) per second")
    return round(rate)


def _shown(value: str | int) -> str:
    """``value`` as an error message names it: a few hundred digits are cut short."""
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:32]}...({len(text)} characters)"


def format_rate(rate: int | None) -> str:
    """``209715200`` -> ``200M/s``, ``None`` -> ``unlimited``; :func:`parse_rate` reads
    it back (a rate that is no whole number of a unit stays in bytes)."""
    if rate is None:
        return "unlimited"
    for unit, power in (("T", 4), ("G", 3), ("M", 2), ("K", 1)):
        if rate % 1024**power == 0:
            return f"{rate // 1024**power}{unit}/s"
    return f"{rate}/s"


def _checked(rate: int | None) -> int | None:
    if rate is None:
        return None
    if isinstance(rate, bool) or not isinstance(rate, int) or not 0 <= rate <= _MOST:
        raise ValueError(
            f"a rate is bytes per second, a positive integer up to 1024**5, or None: {rate!r}"
        )
    return rate or None


class RateLimit:
    """A token bucket of ``rate`` bytes per second (``None``: unlimited); module doc.

    Made outside an event loop or inside one; used by the tasks of one event loop.
    ``name`` says whose limit it is in logs and views (``job``, ``global``).
    """

    def __init__(
        self, rate: int | None = None, *, name: str = "limit", burst: float = BURST_SECONDS
    ) -> None:
        self.name = name
        self._rate = _checked(rate)
        self._burst = burst
        self._tokens = 0.0  # may be negative: the debt of a request larger than the bucket
        self._stamp: float | None = None  # anyio time the tokens were counted at
        self._turn = anyio.Lock()  # FIFO: the waiters' order
        self._changed = anyio.Event()
        self._waiting = 0

    def __repr__(self) -> str:
        return f"RateLimit({format_rate(self._rate)}, name={self.name!r})"

    @property
    def rate(self) -> int | None:
        """Bytes per second now; ``None``: unlimited."""
        return self._rate

    @property
    def waiting(self) -> int:
        """How many tasks wait on this limit now."""
        return self._waiting

    def set_rate(self, rate: int | None) -> None:
        """Change the rate at once (``None`` or ``0``: unlimited); a waiter asleep wakes
        and waits anew at the new rate. The tokens counted so far are kept (debt too),
        but never more than the new rate's burst; a limit that was off starts empty."""
        rate = _checked(rate)
        if rate == self._rate:
            return
        if self._rate is not None and self._stamp is not None:
            self._refill()  # (no stamp: nothing earned yet, and maybe no event loop here)
        else:
            self._tokens, self._stamp = 0.0, None
        self._rate = rate
        if rate is not None:
            self._tokens = min(self._tokens, rate * self._burst)
        self._changed.set()
        self._changed = anyio.Event()

    def _refill(self) -> float:
        """Count the tokens earned since the last count; the time now."""
        now = anyio.current_time()
        rate = self._rate
        if rate is not None and self._stamp is not None:
            earned = (now - self._stamp) * rate
            self._tokens = min(self._tokens + earned, rate * self._burst)
        self._stamp = now
        return now

    async def acquire(self, amount: int) -> None:
        """Wait until ``amount`` bytes may move (module doc); at once when unlimited."""
        if self._rate is None or amount <= 0:
            return
        self._waiting += 1
        try:
            async with self._turn:
                while (rate := self._rate) is not None:
                    self._refill()
                    need = min(float(amount), rate * self._burst)
                    if self._tokens + 1 >= need:  # a byte short is float rounding
                        self._tokens -= amount
                        return
                    changed = self._changed
                    with anyio.move_on_after((need - self._tokens) / rate):
                        await changed.wait()
        finally:
            self._waiting -= 1


class Limits:
    """The limits one transfer must respect, in the order they are taken (the job's
    own first, then the shared ones); what a job hands its devices (module doc)."""

    __slots__ = ("_released", "_scopes", "limits")

    def __init__(self, limits: Iterable[RateLimit]) -> None:
        self.limits = tuple(dict.fromkeys(limits))  # once each, in order
        self._released = False
        self._scopes: set[anyio.CancelScope] = set()

    @property
    def active(self) -> bool:
        """Whether a limit is set now (checked per transfer: under a microsecond, and
        ``take`` is not even entered when nothing is limited)."""
        return not self._released and any(limit.rate is not None for limit in self.limits)

    @property
    def waiting(self) -> bool:
        """Whether a transfer waits on these limits now (a job that waits is not
        stalled)."""
        return bool(self._scopes)

    async def take(self, amount: int) -> None:
        """Wait until ``amount`` bytes may move under every limit; at once after
        ``release()``."""
        if self._released:
            return
        with anyio.CancelScope() as scope:
            self._scopes.add(scope)
            try:
                for limit in self.limits:
                    await limit.acquire(amount)
            finally:
                self._scopes.discard(scope)

    def release(self) -> None:
        """Let every waiter go now, and every later transfer pass (the job aborts)."""
        self._released = True
        for scope in self._scopes:
            scope.cancel()


_SHARED: contextvars.ContextVar[tuple[RateLimit, ...]] = contextvars.ContextVar(
    "vdistream_shared_limits", default=()
)


@contextlib.contextmanager
def sharing(*limits: RateLimit) -> Iterator[None]:
    """Within this block (this task, and tasks it starts), jobs created also respect
    ``limits`` (module doc); blocks nest, adding to the limits in effect."""
    token = _SHARED.set((*_SHARED.get(), *limits))
    try:
        yield
    finally:
        _SHARED.reset(token)


def shared_limits() -> tuple[RateLimit, ...]:
    """The limits :func:`sharing` put in effect here."""
    return _SHARED.get()
