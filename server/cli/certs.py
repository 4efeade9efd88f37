"""`fed-server certs`: make a private CA and the server certificate; print the one file sites need."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from fedseg.common.cli.shell import guarded
from fedseg.common.console import console
from fedseg.server.control.certs import make_certificates, server_names


@guarded
def certs_command(
    out: Annotated[Path, typer.Option("--out", help="Folder for ca.crt, ca.key, server.pem, server.key.")],
    host: Annotated[list[str], typer.Option("--host", help="Name or IP address sites dial (repeat for several).")],
    force: Annotated[
        bool, typer.Option("--force", help="Replace an existing CA (sites must get the new ca.crt).")
    ] = False,
) -> None:
    """Make a CA and a server certificate for the public name(s) and loopback."""
    files = make_certificates(out, host, force=force)
    names = ", ".join(server_names(host))
    console.print(f"server certificate for {escape(names)}: {escape(str(files.cert))} (key {escape(str(files.key))})")
    console.print(f'server.toml:  [tls] ca = "{files.ca}"  cert = "{files.cert}"  key = "{files.key}"')
    console.print(f"keep {escape(str(files.ca_key))} offline; give every site only this file:")
    console.print(f"[bold]{escape(str(files.ca))}[/]  (fed-client join --root-certificates ca.crt)")
