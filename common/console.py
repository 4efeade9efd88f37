"""The rich console shared by log output and progress bars, so they do not overwrite each other."""

from __future__ import annotations

from rich.console import Console

#: stderr console; the CLIs attach the log handler to it (``fedseg.common.cli.logs``), progress bars draw on it.
console = Console(stderr=True)
