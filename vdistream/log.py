"""How the library logs: structlog events handed to stdlib ``logging``.

The library never configures logging. Events go to the stdlib logger named after
the module (``vdistream.coordinator``, ...) with the event name as the message and
the bound fields as ``extra``; with no handler configured, Python shows only warnings
and errors. ``vdistream serve`` (and any host application) decides how they are
rendered, e.g. with ``structlog.stdlib.ProcessorFormatter``; the other commands of the
command line drop them unless ``-v``/``--log-level`` asks for them
(:mod:`vdistream.cli.framework`).

Event names are stable: ``job_started``, ``device_opened``, ``abort_signalled``,
``sink_committed``, ``sink_aborted``, ``job_finished``, ...
"""

from __future__ import annotations

import logging
from typing import Any

import structlog

__all__ = ("get_logger",)


def get_logger(name: str, **bound: Any) -> structlog.stdlib.BoundLogger:
    logger: structlog.stdlib.BoundLogger = structlog.wrap_logger(
        logging.getLogger(name),
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.stdlib.render_to_log_kwargs,
        ],
        wrapper_class=structlog.stdlib.BoundLogger,
    )
    return logger.bind(**bound) if bound else logger
