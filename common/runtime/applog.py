"""Logging for Flower app processes (``flwr-serverapp`` / ``flwr-clientapp``), which our CLI does not configure."""

from __future__ import annotations

import logging
from pathlib import Path

_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def log_to_file(path: Path) -> logging.Handler:
    """Append fedseg's and Flower's INFO-and-above records of this process to ``path``.

    Returns:
        The handler; call ``detach(handler)`` when the app function returns.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter(_FORMAT))
    for name in ("fedseg", "flwr"):
        logging.getLogger(name).addHandler(handler)
    fedseg = logging.getLogger("fedseg")
    if fedseg.getEffectiveLevel() > logging.INFO:
        fedseg.setLevel(logging.INFO)
    return handler


def detach(handler: logging.Handler) -> None:
    """Remove a handler added by :func:`log_to_file` and close its file."""
    for name in ("fedseg", "flwr"):
        logging.getLogger(name).removeHandler(handler)
    handler.close()
