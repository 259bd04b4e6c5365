"""Logging of ``vdistream serve``: the only place that configures logging.

``configure_logging(log_format, level)`` sends every stdlib log record (vdistream's
``vdistream.*`` loggers, which receive structlog events through
``render_to_log_kwargs``, and aiohttp's and asyncio's) through one
``structlog.stdlib.ProcessorFormatter`` on one handler:

* ``json``: one JSON object per line on standard output (journald, a collector), with
  ``timestamp`` (ISO 8601, UTC), ``level``, ``logger``, ``event`` and the event's
  fields; tracebacks as structured dicts;
* ``console``: structlog's ``ConsoleRenderer`` on standard error, for people;
* ``auto``: console when standard error is a terminal, JSON otherwise.

``structlog.get_logger()`` loggers go the same way (``structlog.configure`` with
``ProcessorFormatter.wrap_for_formatter``). An embedding application never calls
this; it configures logging itself.
"""

from __future__ import annotations

import logging
import sys
from typing import TextIO

import structlog
import structlog.tracebacks
from structlog.typing import Processor

__all__ = ("configure_logging",)

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


def configure_logging(log_format: str, level: str, *, stream: TextIO | None = None) -> str:
    """Configure the process's logging (module doc); returns the format chosen."""
    if log_format not in ("json", "console", "auto"):
        raise ValueError(f"log_format must be json, console or auto, not {log_format!r}")
    if level not in _LEVELS:
        raise ValueError(f"log_level must be one of {', '.join(_LEVELS)}, not {level!r}")
    chosen = log_format
    if chosen == "auto":
        chosen = "console" if sys.stderr.isatty() else "json"
    out = stream if stream is not None else (sys.stdout if chosen == "json" else sys.stderr)
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
    ]
    final: list[Processor]
    if chosen == "json":
        final = [
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            # no frame locals: they can hold a webhook URL's token or a request's headers
            structlog.processors.ExceptionRenderer(
                structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
            ),
            structlog.processors.JSONRenderer(default=str),
        ]
    else:
        final = [
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.dev.ConsoleRenderer(colors=out.isatty()),  # no escape codes in files
        ]
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*shared, structlog.stdlib.ExtraAdder()],
        processors=final,
    )
    handler = logging.StreamHandler(out)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(_LEVELS[level])
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        cache_logger_on_first_use=True,
    )
    return chosen
