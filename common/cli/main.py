"""`fed-eval` command-line entry point: assembles the commands, each defined in its own `cli_*` module."""

from __future__ import annotations

from fedseg.common.cli.datasets import datasets_app
from fedseg.common.cli.evaluate import evaluate_command
from fedseg.common.cli.export import export_command
from fedseg.common.cli.phantoms import phantoms_command
from fedseg.common.cli.predict import predict_command
from fedseg.common.cli.shell import make_app
from fedseg.common.cli.summary import summary_command
from fedseg.common.cli.train import train_command

app = make_app(
    "fed-eval",
    "Local tools: model summary, evaluation, prediction, export, single-site training, phantom data.",
)


# Command registrations (one line each, alphabetical):
app.add_typer(datasets_app, name="datasets")
app.command("evaluate")(evaluate_command)
app.command("export")(export_command)
app.command("phantoms")(phantoms_command)
app.command("predict")(predict_command)
app.command("summary")(summary_command)
app.command("train")(train_command)


def main() -> None:
    """Console-script entry point."""
    app()
