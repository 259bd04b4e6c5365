"""What every ``vdistream`` command shares: the logging options, and :func:`run`,
which runs a command's async work under the command line's signal handling.

Signals. :func:`run` starts the work in a task group beside a task that receives
SIGTERM, SIGHUP and SIGINT (``anyio.open_signal_receiver``). The first of them
cancels the work's scope, which is the same path Ctrl-C always took: a running job
is aborted (``signal_abort`` on its device set, every pump drained, every sink
aborted, temporaries removed, the producer's or consumer's process group ended), and
nothing is published. Then one line says so on stderr and the exit code is
128 + the signal's number (130 SIGINT, 143 SIGTERM, 129 SIGHUP). Further signals
while that cleanup runs are received and ignored, so they cannot interrupt it or
print a traceback; the cleanup is bounded by the job's drain timeout and the
engine's terminate grace. A signal that arrives after the work finished changes
nothing. Only the command line installs these handlers, and only while a command
runs (the library never does); outside the main thread none are installed.

Logging. The library logs structlog events through stdlib ``logging``; by default
the command line drops all of them, so stderr carries only the progress display (on
a terminal) and the command's final line. ``-v`` shows info events, ``-vv`` debug
ones, ``--log-level LEVEL`` chooses exactly, ``--log-format json|console`` the
rendering (console by default); they go to stderr through
:func:`vdistream.service.logconfig.configure_logging`. The previous logging
configuration is restored when the command returns, so ``main()`` can be called
from a test or another program.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from typing import Any, TextIO, TypeVar

import anyio
import click

from vdistream.errors import VdistreamError
from vdistream.log import get_logger

__all__ = (
    "CommandError",
    "LogChoice",
    "Params",
    "beside",
    "logging_options",
    "options",
    "run",
    "runs",
    "say",
    "verbose",
)

_SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)
_LEVELS = ("debug", "info", "warning", "error")
_META = "vdistream.logging"
_F = TypeVar("_F", bound=Callable[..., Any])
_T = TypeVar("_T")
Params = dict[str, Any]

_log = get_logger("vdistream.cli")


class CommandError(Exception):
    """A command failed in a way it explains itself: ``vdistream: error: <message>`` on
    stderr, exit ``code`` (1: the operation failed)."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def say(text: str, *, err: bool = False, to: TextIO | None = None) -> None:
    """One line (or several) on stdout, on stderr with ``err``, or on ``to``."""
    stream = to or (sys.stderr if err else sys.stdout)
    stream.write(text if text.endswith("\n") else text + "\n")
    stream.flush()


@dataclasses.dataclass
class LogChoice:
    """What the logging options asked for."""

    verbose: int = 0
    log_level: str | None = None
    log_format: str | None = None

    @property
    def chosen_level(self) -> str | None:
        """The level to show, ``None``: show nothing."""
        if self.log_level is not None or not self.verbose:
            return self.log_level
        return "info" if self.verbose == 1 else "debug"


def _choice(ctx: click.Context) -> LogChoice:
    choice: LogChoice = ctx.find_root().meta.setdefault(_META, LogChoice())
    return choice


def verbose() -> bool:
    """Whether the running command was asked to show log events (``-v``,
    ``--log-level``): the commands that print nothing else show their summary then."""
    ctx = click.get_current_context(silent=True)
    return ctx is not None and _choice(ctx).chosen_level is not None


def _remember(ctx: click.Context, param: click.Parameter, value: Any) -> None:
    choice = _choice(ctx)
    if param.name == "verbose":
        choice.verbose += int(value or 0)
    elif param.name in ("log_level", "log_format") and value is not None:
        setattr(choice, param.name, str(value).lower())


def options(*decorators: Callable[[Any], Any]) -> Callable[[_F], _F]:
    """Several ``click.option`` decorators as one, listed in the order --help shows."""

    def decorate(f: _F) -> _F:
        for decorator in reversed(decorators):
            f = decorator(f)
        return f

    return decorate


def _log_option(*decls: str, **attrs: Any) -> Callable[[Any], Any]:
    return click.option(*decls, expose_value=False, callback=_remember, **attrs)


#: ``-v``, ``--log-level``, ``--log-format``: on the group and on every command, so
#: they can be given before or after the command's name.
logging_options = options(
    _log_option(
        "-v",
        "--verbose",
        count=True,
        help="Show the library's log events on stderr (-v info, -vv debug); "
        "default: none, only the final line.",
    ),
    _log_option(
        "--log-level",
        type=click.Choice(_LEVELS, case_sensitive=False),
        help="Show the library's log events from this level up on stderr.",
    ),
    _log_option(
        "--log-format",
        type=click.Choice(["console", "json"], case_sensitive=False),
        help="How log events shown by -v/--log-level look (default console).",
    ),
)


@contextlib.contextmanager
def _configured_logging(choice: LogChoice) -> Iterator[None]:
    """The process's logging as ``choice`` says (module doc), restored afterwards."""
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    saved_disable = logging.root.manager.disable
    # structlog not imported yet: nothing configured it (importing it costs start-up)
    loaded = sys.modules.get("structlog")
    saved_structlog = loaded.get_config() if loaded and loaded.is_configured() else None
    level = choice.chosen_level
    if level is None:
        logging.disable(logging.CRITICAL)
    else:
        from vdistream.service.logconfig import configure_logging

        configure_logging(choice.log_format or "console", level, stream=sys.stderr)
    try:
        yield
    finally:
        logging.disable(saved_disable)
        if level is not None:
            for handler in root.handlers[:]:
                root.removeHandler(handler)
            for handler in saved_handlers:
                root.addHandler(handler)
            root.setLevel(saved_level)
            import structlog  # configure_logging imported it

            if saved_structlog is not None:
                structlog.configure(**saved_structlog)
            else:
                structlog.reset_defaults()


def run(work: Callable[[], Awaitable[int]], *, interrupted: str) -> int:
    """Run ``work`` (module doc); its exit code, or 128 + N after signal N.

    ``interrupted`` completes the line printed after a signal: ``vdistream:
    interrupted by SIGTERM; <interrupted>``.
    """
    ctx = click.get_current_context(silent=True)
    choice = _choice(ctx) if ctx is not None else LogChoice()
    with _configured_logging(choice):
        try:
            return anyio.run(_supervise, work, interrupted, backend="asyncio")
        except KeyboardInterrupt:
            # SIGINT before the handlers were installed or after they were removed
            return _interrupted(signal.SIGINT, interrupted)
        except (CommandError, VdistreamError, OSError):
            raise  # explained by its one line
        except Exception:
            _log.exception("cli_failed")  # a bug: its traceback, shown with -v only
            raise


def runs(
    interrupted: str | Callable[[Params], str],
) -> Callable[[Callable[[Params], Awaitable[int]]], Callable[..., int]]:
    """Make ``async def work(params)`` a command's callback: :func:`run` on the parsed
    parameters (its docstring is the command's help). ``interrupted`` may depend on
    the parameters."""

    def decorate(work: Callable[[Params], Awaitable[int]]) -> Callable[..., int]:
        @functools.wraps(work)
        def command(**params: Any) -> int:
            note = interrupted(params) if callable(interrupted) else interrupted
            return run(lambda: work(params), interrupted=note)

        return command

    return decorate


def _interrupted(signum: signal.Signals, note: str) -> int:
    say(f"vdistream: interrupted by {signum.name}; {note}", err=True)
    return 128 + int(signum)


async def beside(
    work: Callable[[], Awaitable[_T]], companion: Callable[..., Coroutine[Any, Any, Any]]
) -> _T:
    """``await work()`` while ``companion`` runs beside it: started first (it reports
    through ``task_status``), cancelled when the work ends. The work's error is raised
    as itself, not wrapped in an exception group."""
    result: list[_T] = []
    failure: list[Exception] = []
    async with anyio.create_task_group() as tg:
        await tg.start(companion)
        try:
            result.append(await work())
        except Exception as exc:  # re-raised below, outside the group
            failure.append(exc)
        finally:
            tg.cancel_scope.cancel()
    if failure:
        raise failure[0]
    return result[0]


async def _supervise(work: Callable[[], Awaitable[int]], note: str) -> int:
    caught: list[signal.Signals] = []
    work_scope = anyio.CancelScope()

    async def scoped() -> int | None:
        with work_scope:
            return await work()
        return None  # cancelled by a signal

    code = await beside(scoped, functools.partial(_receive_signals, work_scope, caught))
    if code is None:  # only the first signal cancels the work's scope
        return _interrupted(caught[0], note)
    return code


async def _receive_signals(
    work_scope: anyio.CancelScope,
    caught: list[signal.Signals],
    *,
    task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    # restored afterwards: main() may run inside a program with handlers of its own
    previous = {signum: signal.getsignal(signum) for signum in _SIGNALS}
    try:
        receiver = anyio.open_signal_receiver(*_SIGNALS)
        signals = receiver.__enter__()
    except (ValueError, RuntimeError, NotImplementedError):
        # not the main thread (an embedding program's worker): no handlers, no harm
        task_status.started()
        await anyio.sleep_forever()
        return
    try:
        task_status.started()
        async for signum in signals:
            if not caught:
                caught.append(signum)
                work_scope.cancel()
            # later signals: received and ignored while the abort finishes
    finally:
        receiver.__exit__(None, None, None)
        for signum, handler in previous.items():
            if handler is not None:
                signal.signal(signum, handler)
