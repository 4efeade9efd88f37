"""`fed-client keygen`: make this site's SuperNode key pair."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from fedseg.client.keys import make_site_key
from fedseg.common.cli.shell import guarded
from fedseg.common.console import console


@guarded
def keygen_command(
    out: Annotated[Path, typer.Option("--out", help="Folder for site-key (private) and site-key.pub.")],
    site: Annotated[str, typer.Option("--site", help="Site name, written as the key's comment.")] = "",
) -> None:
    """Make an ECDSA P-384 key pair for node authentication."""
    private, public = make_site_key(out, site)
    console.print(f"private key (stays here, `fed-client join --auth-key`): {escape(str(private))}")
    console.print(
        f"send this file to the server operator (`fed-server sites add NAME`): [bold]{escape(str(public))}[/]"
    )
