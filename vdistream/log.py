"""How the library logs: structlog events handed to stdlib ``logging``.

The library never configures logging. Events go to the stdlib logger named after
the module (``vdistream.coordinator``, ...) with the event name as the message and
the bound fields as ``extra``; with no handler configured, Python shows only warnings
and errors. ``vdistream serve`` (and any host application) decides how they are
rendered, e.g. with ``structlog.stdlib.ProcessorFormatter``; the other commands of the
command line drop them unless ``-v``/``--log-level`` asks for them
(:mod:`vdistream.cli.framework`).

:func:`get_logger` returns a stand-in for ``structlog.stdlib.BoundLogger`` that
imports structlog (and, through it, whatever structlog loads: ``rich`` when it is
installed) only when an event is at a level the stdlib logger lets through, or when
anything but ``bind`` and the level methods is used: a command that logs nothing
does not pay for the import. An event at a disabled level is dropped before any
processor runs, which is what the stdlib logger would do with it anyway (the
processors have no side effects).

Event names are stable: ``job_started``, ``device_opened``, ``abort_signalled``,
``sink_committed``, ``sink_aborted``, ``job_finished``, ...
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    import structlog

__all__ = ("get_logger",)

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "warn": logging.WARNING,
    "error": logging.ERROR,
    "exception": logging.ERROR,
    "critical": logging.CRITICAL,
    "fatal": logging.CRITICAL,
}


class _Logger:
    """``structlog.stdlib.BoundLogger`` for ``logging.getLogger(name)``, built on first
    real use (module doc)."""

    __slots__ = ("_bound", "_logger", "_real")

    def __init__(self, logger: logging.Logger, bound: dict[str, Any]) -> None:
        self._logger = logger
        self._bound = bound
        self._real: Any = None

    def _build(self) -> Any:
        if self._real is None:
            import structlog

            real = structlog.wrap_logger(
                self._logger,
                processors=[
                    structlog.contextvars.merge_contextvars,
                    structlog.stdlib.render_to_log_kwargs,
                ],
                wrapper_class=structlog.stdlib.BoundLogger,
            )
            self._real = real.bind(**self._bound) if self._bound else real
        return self._real

    def bind(self, **fields: Any) -> _Logger:
        return _Logger(self._logger, {**self._bound, **fields})

    def log(self, level: int, event: str | None = None, *args: Any, **kw: Any) -> Any:
        if not self._logger.isEnabledFor(level):
            return None
        return self._build().log(level, event, *args, **kw)

    def __getattr__(self, name: str) -> Any:
        if name in _OWN or name.startswith("__"):
            # copy/pickle probe dunders on an instance whose slots are not set yet:
            # forwarding them would recurse through _build (and import structlog)
            raise AttributeError(name)
        level = _LEVELS.get(name)
        if level is not None and not self._logger.isEnabledFor(level):
            return _drop
        return getattr(self._build(), name)


_OWN = frozenset(_Logger.__slots__)


def _drop(*args: Any, **kw: Any) -> None:
    """An event at a level the stdlib logger does not let through."""


def get_logger(name: str, **bound: Any) -> structlog.stdlib.BoundLogger:
    """The library's logger for module ``name``, with ``bound`` fields (module doc)."""
    return cast("structlog.stdlib.BoundLogger", _Logger(logging.getLogger(name), bound))
