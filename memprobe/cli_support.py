"""What every memprobe / planner command shares: errors the user can fix become one line.

Torch-free (typer only), so that planner's CLI can use it too.

    app = make_app("what the tool does")

    @app.command()          # every command is guarded: MemprobeError -> "error: ..." + exit 1
    def fit(...): ...

    def main() -> int:
        return run_app(app)

Set MEMPROBE_DEBUG=1 to get the traceback instead of the one line.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from typing import Callable, Sequence

import typer

from memprobe.errors import MemprobeError

# Errors that come from user input (a path, a value, a file's contents), not from a bug.
USER_ERRORS = (MemprobeError, FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError, ValueError)


def _usage_error_types() -> tuple:
    # recent typer vendors click and raises typer.TyperException subclasses; older releases raise click's
    if hasattr(typer, "TyperException"):
        return (typer.TyperException,)
    import click

    return (click.ClickException,)


USAGE_ERRORS = _usage_error_types()


def one_line(text: str) -> str:
    """Collapse a message onto one line (a message with newlines would read as several errors)."""
    return " ".join(str(text).split())


def report_errors(work: Callable[[], object], show: Callable[[object], None]) -> int:
    """Exit code of a script's main: `show(work())` and 0, or a user error as one line on stderr and 1 (the
    benchmarks' mains, which are argparse scripts, not typer commands)."""
    try:
        result = work()
    except USER_ERRORS as e:
        print(f"error: {error_message(e)}", file=sys.stderr)
        return 1
    show(result)
    return 0


def error_message(exc: BaseException) -> str:
    """The line shown for a user error."""
    if isinstance(exc, MemprobeError):
        return one_line(str(exc))
    if isinstance(exc, FileNotFoundError) and exc.filename is not None:
        return f"file not found: {exc.filename}"
    if isinstance(exc, OSError) and exc.filename is not None:
        return f"cannot use {exc.filename}: {exc.strerror or exc}"
    return one_line(str(exc)) or type(exc).__name__


def parse_list(text: str | None, option: str, kind=int, noun: str | None = None) -> list | None:
    """'1,2,4,8' -> [1, 2, 4, 8] for a comma-separated option; None stays None (the default applies)."""
    if text is None:
        return None
    parts = [x.strip() for x in str(text).split(",") if x.strip()]
    try:
        values = [kind(x) for x in parts]
    except ValueError:
        values = []
    if not values:
        noun = noun or ("integers" if kind is int else "numbers" if kind is float else "values")
        raise MemprobeError(f"{option} must be comma-separated {noun}, got {text!r}")
    return values


def emit(as_json: bool, doc: dict, *renderables, console=None) -> None:
    """Every command's output: sorted JSON on stdout for scripts, or the rich report for people."""
    if as_json:
        typer.echo(json.dumps(doc, sort_keys=True, default=str))
        return
    if console is None:
        from rich.console import Console

        console = Console()
    for r in renderables:
        console.print(r)


def print_error(exc: BaseException) -> None:
    typer.echo(f"error: {error_message(exc)}", err=True)


def _debug() -> bool:
    return os.environ.get("MEMPROBE_DEBUG", "") not in ("", "0")


def guard(func: Callable) -> Callable:
    """Run a command; a user error prints one line on stderr and exits 1, without a traceback."""

    @functools.wraps(func)
    def guarded(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except USER_ERRORS as e:
            if _debug():
                raise
            print_error(e)
            raise typer.Exit(code=1) from None

    return guarded


class App(typer.Typer):
    """A typer app whose commands are all wrapped by `guard`."""

    def command(self, *args, **kwargs):
        register = super().command(*args, **kwargs)

        def decorator(func: Callable) -> Callable:
            register(guard(func))
            return func

        return decorator


def make_app(help: str) -> App:
    """A guarded app that always dispatches on a command name, even while it has only one command."""
    # no rich markup: help texts say "[default: ...]", which rich would read as a tag and drop
    app = App(help=help, no_args_is_help=True, add_completion=False, pretty_exceptions_show_locals=False,
              rich_markup_mode=None)

    @app.callback()
    def _root() -> None:
        pass

    _root.__doc__ = help
    return app


def run_app(app: typer.Typer, args: Sequence[str] | None = None, prog_name: str | None = None) -> int:
    """Run a typer app as a console script and return its exit code (the caller exits with it).

    Usage errors print click's usage message and return 2; user errors one line and 1;
    neither shows a traceback.
    """
    try:
        rv = app(args=list(args) if args is not None else None, prog_name=prog_name, standalone_mode=False)
    except typer.Exit as e:
        return e.exit_code
    except typer.Abort:
        typer.echo("error: aborted", err=True)
        return 1
    except USAGE_ERRORS as e:  # bad option, missing argument, no command: click's usage message
        e.show()
        return getattr(e, "exit_code", 2)
    except USER_ERRORS as e:  # raised outside a guarded command (e.g. in a callback)
        if _debug():
            raise
        print_error(e)
        return 1
    except KeyboardInterrupt:
        typer.echo("error: interrupted", err=True)
        return 130
    return rv if isinstance(rv, int) else 0
