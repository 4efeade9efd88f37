"""`fed-client` command-line entry point: assembles the commands, each defined in its own `cli_*` module."""

from __future__ import annotations

import typer

from fedseg.client.cli_check import check_command
from fedseg.common.logs import setup_logging

app = typer.Typer(
    name="fed-client",
    help="Run a hospital site: check its data and join a federation.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging and full tracebacks."),
) -> None:
    setup_logging(verbose)


# Command registrations (one line each, alphabetical):
app.command("check")(check_command)


def main() -> None:
    """Console-script entry point."""
    app()
