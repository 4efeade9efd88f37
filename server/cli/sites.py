"""`fed-server sites add|list|remove`: the allow-list of site keys (used when node authentication is on)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from fedseg.common.cli.shell import guarded
from fedseg.common.console import console
from fedseg.server.control.sites import add_site, read_sites, remove_site

sites_app = typer.Typer(help="Allowed sites: name -> SuperNode public key (sites.toml).", no_args_is_help=True)

FileOption = Annotated[
    Path, typer.Option("--file", help="The allow-list (server.toml's sites_file; default ./sites.toml).")
]


@sites_app.command("add")
@guarded
def add_command(
    name: Annotated[str, typer.Argument(help="Site name, as results will report it.")],
    key: Annotated[Path, typer.Argument(help="The site's public key (site-key.pub from `fed-client keygen`).")],
    file: FileOption = Path("sites.toml"),
    cases: Annotated[
        int | None,
        typer.Option(
            "--cases",
            help="Training cases agreed with the site out of band: replies declaring more are rejected, and the "
            "site's aggregation weight is this number.",
        ),
    ] = None,
) -> None:
    """Allow a site's key (takes effect at the next `fed-server start`)."""
    add_site(file, name, key, cases)
    pinned = f" with {cases} cases pinned" if cases is not None else ""
    console.print(f"site [bold]{escape(name)}[/] allowed in {escape(str(file))}{pinned}")


@sites_app.command("list")
@guarded
def list_command(file: FileOption = Path("sites.toml")) -> None:
    """List the allowed sites."""
    sites = read_sites(file)
    if not sites:
        console.print(f"no site allowed in {escape(str(file))}")
    for site in sites:
        pinned = f"  cases={site.cases}" if site.cases is not None else ""
        console.print(f"{escape(site.name)}  {escape(site.key[:40])}…{pinned}")


@sites_app.command("remove")
@guarded
def remove_command(
    name: Annotated[str, typer.Argument(help="Site name to remove.")], file: FileOption = Path("sites.toml")
) -> None:
    """Remove a site (takes effect at the next `fed-server start`)."""
    remove_site(file, name)
    console.print(f"site [bold]{escape(name)}[/] removed from {escape(str(file))}")
