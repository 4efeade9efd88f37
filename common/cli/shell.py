"""Edge helpers shared by the three Typer apps: error mapping, value parsers, result tables and option conventions.

Conventions every CLI follows (documented once, in the README's "Local tools" section):

* sizes (patches, phantom grids, model inputs) are ``D,H,W`` = ``z,y,x``: slices, rows, columns, the order of
  fedseg's arrays (:mod:`fedseg.common.data.io`); :data:`SIZE_HELP` says so in every size option's help;
* ``--device`` defaults to :data:`DEFAULT_DEVICE` (``auto``: the first GPU when there is one, else the CPU);
* result tables go to stdout and fit the terminal; when stdout is not a terminal (a pipe or a log file) they are
  plain text (no colour, ASCII rules) at most :data:`PLAIN_WIDTH` columns wide, and wrap rather than cut values.
"""

from __future__ import annotations

import functools
import importlib.metadata
import logging
from collections.abc import Callable
from typing import ParamSpec, TypeVar

import typer
from pydantic import ValidationError
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from fedseg.common.cli.logs import setup_logging
from fedseg.common.console import console
from fedseg.common.errors import FedsegError, format_validation_error

P = ParamSpec("P")
R = TypeVar("R")

log = logging.getLogger(__name__)

#: Default of every ``--device`` option.
DEFAULT_DEVICE = "auto"
#: Help text of every ``--device`` option.
DEVICE_HELP = "cpu, cuda, cuda:N or auto (the first GPU if there is one, else the CPU)."
#: The axis order of every size option, for its help text.
SIZE_HELP = "D,H,W = z,y,x (slices, rows, columns)"
#: Width of result tables when stdout is not a terminal.
PLAIN_WIDTH = 80


def fedseg_version() -> str:
    """The installed fedseg's version (``pyproject.toml`` holds it: the one place it is written)."""
    return importlib.metadata.version("fedseg")


def _print_version(name: str) -> Callable[[bool], None]:
    def show(value: bool) -> None:
        if value:
            typer.echo(f"{name} (fedseg) {fedseg_version()}")
            raise typer.Exit()

    return show


def make_app(name: str, help_text: str) -> typer.Typer:
    """A Typer app with the shared root options (``--verbose``, ``--version``) and no shell-completion noise."""
    app = typer.Typer(
        name=name, help=help_text, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False
    )

    @app.callback()
    def _root(
        verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging and full tracebacks."),
        version: bool = typer.Option(
            False, "--version", callback=_print_version(name), is_eager=True, help="Print fedseg's version and exit."
        ),
    ) -> None:
        setup_logging(verbose)

    return app


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print one red error line and return the Exit to raise."""
    console.print(f"[bold red]error:[/] {escape(message)}", markup=True, highlight=False, soft_wrap=True)
    return typer.Exit(code)


def guarded(func: Callable[P, R]) -> Callable[P, R]:
    """Wrap a CLI command: FedsegError / ValidationError / KeyboardInterrupt become one line + exit code."""

    @functools.wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return func(*args, **kwargs)
        except FedsegError as err:
            log.debug("command failed", exc_info=True)
            raise fail(str(err)) from None
        except ValidationError as err:
            raise fail(format_validation_error(err)) from None
        except KeyboardInterrupt:
            raise fail("interrupted", code=130) from None

    return wrapper


def parse_triple(text: str, name: str) -> tuple[int, int, int]:
    """Parse ``"D,H,W"`` into three positive ints; raise ``typer.BadParameter`` with the value seen."""
    try:
        values = tuple(int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        raise typer.BadParameter(f"{name} must be three integers like 96,96,64, got {text!r}") from None
    if len(values) != 3 or min(values) <= 0:
        raise typer.BadParameter(f"{name} must be three positive integers like 96,96,64, got {text!r}")
    return values[0], values[1], values[2]


def stdout_console() -> Console:
    """Console for command results: the terminal as it is, or plain text :data:`PLAIN_WIDTH` wide otherwise."""
    out = Console()
    if out.is_terminal:
        return out
    return Console(width=PLAIN_WIDTH, color_system=None, highlight=False, emoji=False)


def result_table(out: Console, title: str) -> Table:
    """A compact table for ``out``: light rules on a terminal, ASCII rules (markdown-like) in plain output."""
    return Table(
        title=title,
        title_justify="left",
        box=box.SIMPLE_HEAD if out.is_terminal else box.MARKDOWN,
        show_edge=False,
        pad_edge=False,
        padding=(0, 1),
    )
