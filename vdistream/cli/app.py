"""The ``vdistream`` command line: the root group, its commands, and ``main``.

The contract scripts rely on (README, "The command line"):

* **stdout** carries the result a script consumes: ``backup`` prints the bare backup
  id; ``list``, ``verify``, ``jobs``, ... their rows; ``--json`` exactly one JSON
  document (an array for ``list``) instead.
* **stderr** carries the progress display (only when it is a terminal) and one final
  line: the summary of a success or the error (``vdistream: error: ...``). Log events
  appear only with ``-v``/``--log-level`` (:mod:`vdistream.cli.framework`).
* **Exit codes**: 0 success; 1 the operation failed (or the daemon is unreachable);
  2 bad usage: an option's value, a missing argument, an unknown URL scheme, always
  one line naming the option in the user's terms, never a traceback; 3 ``storage
  audit`` found debris it did not remove; 128 + N after signal N (130 Ctrl-C, 143
  SIGTERM, 129 SIGHUP), after the running job was aborted cleanly.

Parsing, validation, help and shell completion come from click
(``eval "$(_VDISTREAM_COMPLETE=bash_source vdistream)"``; ``zsh_source``,
``fish_source``).
"""

from __future__ import annotations

from collections.abc import Sequence

import click

from vdistream._version import __version__
from vdistream.cli.framework import CommandError, logging_options, say
from vdistream.cli.params import OptionValueError

__all__ = ("build_parser", "cli", "main")

_USAGE = 2


# Command name -> (the module of the command line that defines it, its attribute), in
# the order ``--help`` lists them. A command's module is imported only when that
# command runs (or help lists them all): ``vdistream backup`` does not load the
# daemon's client or ``prune``, ``vdistream serve`` not the local commands.
_COMMANDS: dict[str, tuple[str, str]] = {
    "backup": ("local", "backup"),
    "restore": ("local", "restore"),
    "verify": ("local", "verify"),
    "list": ("local", "list_"),
    "storage": ("local", "storage"),
    "keygen": ("local", "keygen"),
    "key": ("keys", "key"),
    "demo": ("local", "demo"),
    "feed": ("external", "feed"),
    "drain": ("external", "drain"),
    "prune": ("prune", "prune"),
    "serve": ("daemon", "serve"),
    "status": ("daemon", "status"),
    "jobs": ("daemon", "jobs"),
    "job": ("daemon", "job"),
    "abort": ("daemon", "abort"),
    "throttle": ("daemon", "throttle"),
    "submit": ("daemon", "submit"),
}


def _load(name: str) -> click.Command:
    """The command ``name`` of :data:`_COMMANDS`, its module imported now."""
    module, attr = _COMMANDS[name]
    if module == "local":
        from vdistream.cli import local

        command = getattr(local, attr)
    elif module == "prune":
        from vdistream.cli import prune

        command = getattr(prune, attr)
    elif module == "keys":
        from vdistream.cli import keys

        command = keys.key
    elif module == "external":
        from vdistream.cli import external

        command = getattr(external, attr)
    else:
        from vdistream.cli import daemon

        command = getattr(daemon, attr)
    assert isinstance(command, click.Command)
    return command


class _LazyGroup(click.Group):
    """The root group: a command is registered the first time it is looked up."""

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.commands and cmd_name in _COMMANDS:
            self.add_command(_load(cmd_name))
        return self.commands.get(cmd_name)

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*self.commands, *_COMMANDS})

    def resolve_command(
        self, ctx: click.Context, args: list[str]
    ) -> tuple[str | None, click.Command | None, list[str]]:
        try:
            return super().resolve_command(ctx, args)
        except click.exceptions.NoSuchCommand as exc:
            # click suggests from the registered commands only: most are not yet
            raise click.exceptions.NoSuchCommand(
                exc.command_name, possibilities=self.list_commands(ctx), ctx=ctx
            ) from None


@click.group(
    "vdistream",
    cls=_LazyGroup,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    epilog="stdout: the result (backup: the id; --json: one JSON document). stderr: "
    "progress on a terminal and one final line. Exit codes: 0 success, 1 failure, "
    "2 bad usage, 3 storage audit found debris, 128+N after signal N (the job is "
    "aborted cleanly first). Shell completion: "
    'eval "$(_VDISTREAM_COMPLETE=bash_source vdistream)".',
)
@click.version_option(
    __version__, "--version", prog_name="vdistream", message="%(prog)s %(version)s"
)
@logging_options
def cli() -> None:
    """Stream database backups through virtual devices, the way SQL Server's VDI does."""


def build_parser() -> click.Group:
    """The root command group with every command registered (their modules imported;
    :func:`main` registers only the command it runs)."""
    for name in _COMMANDS:
        cli.get_command(click.Context(cli), name)
    return cli


def _param_name(param: click.Parameter) -> str:
    if isinstance(param, click.Option):
        longs = [opt for opt in param.opts if opt.startswith("--")]
        return (longs or param.opts)[0]
    return param.human_readable_name


def _usage_line(exc: click.UsageError) -> str:
    """One line for a usage error, in the user's terms."""
    if isinstance(exc, OptionValueError) and exc.param is not None:
        line = f"{_param_name(exc.param)} {exc.value}: {exc.reason}"
    elif (
        isinstance(exc, click.BadParameter)
        and not isinstance(exc, click.MissingParameter)
        and exc.param is not None
    ):
        line = f"{_param_name(exc.param)}: {exc.message}"
    elif isinstance(exc, click.exceptions.NoArgsIsHelpError):
        where = exc.ctx.command_path if exc.ctx is not None else "vdistream"
        line = f"{where} needs a command (`{where} --help` lists them)"
    else:
        line = exc.format_message()
    return " ".join(line.split())


def _leaf(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line on ``argv`` (default: ``sys.argv[1:]``); the exit code."""
    from vdistream.catalog import CatalogError
    from vdistream.errors import ConfigError, StorageURLError, VdistreamError

    try:
        code = cli.main(
            args=list(argv) if argv is not None else None,
            prog_name="vdistream",
            standalone_mode=False,
        )
    except click.UsageError as exc:
        say(f"vdistream: error: {_usage_line(exc)}", err=True)
        return _USAGE
    except click.ClickException as exc:
        say(f"vdistream: error: {' '.join(exc.format_message().split())}", err=True)
        return exc.exit_code
    except click.Abort:  # Ctrl-C while click itself was reading or prompting
        say("vdistream: interrupted by SIGINT", err=True)
        return 130
    except Exception as raised:
        error = _leaf(raised)
        text = " ".join(str(error).split()) or type(error).__name__
        code = 1
        if isinstance(error, CommandError):
            code = error.code
        elif isinstance(error, ConfigError | StorageURLError):
            code = _USAGE
        elif not isinstance(error, CatalogError | VdistreamError | OSError):
            text = f"unexpected {type(error).__name__}: {text} (a bug; -vv shows the traceback)"
        say(f"vdistream: error: {text}", err=True)
        return code
    return code if isinstance(code, int) else 0
