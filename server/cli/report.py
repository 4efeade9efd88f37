"""`fed-server report RUN_DIR`: write the run's self-contained HTML report."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from fedseg.common.cli.shell import guarded
from fedseg.common.console import console
from fedseg.server.control.report import write_report


@guarded
def report_command(
    run_dir: Annotated[Path, typer.Argument(help="A run's output folder (holds history.json).")],
) -> None:
    """Write RUN_DIR/report.html: Dice per round, site participation, cross-site matrix, config, versions."""
    path = write_report(run_dir)
    console.print(f"report written to [bold]{escape(str(path))}[/]")
