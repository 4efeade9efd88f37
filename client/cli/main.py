"""`fed-client` command-line entry point: assembles the commands, each defined in its own `cli_*` module."""

from __future__ import annotations

from fedseg.client.cli.audit import audit_command
from fedseg.client.cli.check import check_command
from fedseg.client.cli.export_model import export_model_command
from fedseg.client.cli.join import join_command
from fedseg.client.cli.keygen import keygen_command
from fedseg.common.cli.shell import make_app

app = make_app(
    "fed-client",
    "Run a hospital site: check its data, join a federation, audit what it sent and export its own model.",
)


# Command registrations (one line each, alphabetical):
app.command("audit")(audit_command)
app.command("check")(check_command)
app.command("export-model")(export_model_command)
app.command("join")(join_command)
app.command("keygen")(keygen_command)


def main() -> None:
    """Console-script entry point."""
    app()
