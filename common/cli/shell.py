"""Edge helpers shared by the three Typer apps: error mapping and small value parsers."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import ParamSpec, TypeVar

import typer
from pydantic import ValidationError
from rich.markup import escape

from fedseg.common.cli.logs import setup_logging
from fedseg.common.console import console
from fedseg.common.errors import FedsegError, format_validation_error

P = ParamSpec("P")
R = TypeVar("R")

log = logging.getLogger(__name__)


def make_app(name: str, help_text: str) -> typer.Typer:
    """A Typer app with the shared root options (``--verbose``) and no shell-completion noise."""
    app = typer.Typer(
        name=name, help=help_text, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False
    )

    @app.callback()
    def _root(
        verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging and full tracebacks."),
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
