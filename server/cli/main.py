"""`fed-server` command-line entry point: assembles the commands, each defined in its own `cli_*` module."""

from __future__ import annotations

from fedseg.common.cli.shell import make_app
from fedseg.server.cli.certs import certs_command
from fedseg.server.cli.demo import demo_command
from fedseg.server.cli.report import report_command
from fedseg.server.cli.simulate import simulate_command
from fedseg.server.cli.sites import sites_app
from fedseg.server.cli.start import start_command

app = make_app(
    "fed-server",
    "Run the federation server (Flower SuperLink + our ServerApp), or a whole demo federation on this machine.",
)


# Command registrations (one line each, alphabetical):
app.command("certs")(certs_command)
app.command("demo")(demo_command)
app.command("simulate")(simulate_command)
app.add_typer(sites_app, name="sites")
app.command("report")(report_command)
app.command("start")(start_command)


def main() -> None:
    """Console-script entry point."""
    app()
