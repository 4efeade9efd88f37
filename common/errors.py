"""Exceptions for problems a user can fix; the CLIs turn them into one red line and a non-zero exit code."""

from __future__ import annotations

from pydantic import ValidationError


class FedsegError(Exception):
    """Base class: a user-facing problem with a one-line, actionable message."""


class ConfigError(FedsegError):
    """A configuration file or command-line value is invalid."""


class DataError(FedsegError):
    """An image, label map or dataset folder cannot be used."""


class IncompatibleModelError(FedsegError):
    """Weights or a checkpoint do not fit the requested architecture or classes."""


def format_validation_error(err: ValidationError) -> str:
    """Turn a pydantic error into ``field: message`` parts on one line."""
    parts = []
    for item in err.errors():
        where = ".".join(str(x) for x in item["loc"]) or "value"
        parts.append(f"{where}: {item['msg']}")
    return "; ".join(parts)
