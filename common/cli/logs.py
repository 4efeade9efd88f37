"""Logging set-up for the command-line tools (never called at import time)."""

from __future__ import annotations

import logging

from rich.logging import RichHandler

from fedseg.common.console import console


def setup_logging(verbose: bool = False) -> None:
    """Attach one rich handler to the root logger; DEBUG with ``verbose``, INFO otherwise."""
    level = logging.DEBUG if verbose else logging.INFO
    root = logging.getLogger()
    root.handlers[:] = [RichHandler(console=console, show_path=verbose, rich_tracebacks=verbose, markup=False)]
    root.setLevel(level)
    for noisy in ("flwr", "matplotlib", "PIL", "urllib3", "httpx"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))
