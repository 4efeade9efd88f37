"""`fed-eval` command-line entry point: assembles the commands, each defined in its own `cli_*` module."""

from __future__ import annotations

import typer

from fedseg.common.cli_evaluate import evaluate_command
from fedseg.common.cli_phantoms import phantoms_command
from fedseg.common.cli_summary import summary_command
from fedseg.common.logs import setup_logging

app = typer.Typer(
    name="fed-eval",
    help="Local tools: model summary, evaluation, prediction, single-site training, phantom data.",
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
app.command("evaluate")(evaluate_command)
app.command("phantoms")(phantoms_command)
app.command("summary")(summary_command)


def main() -> None:
    """Console-script entry point."""
    app()
