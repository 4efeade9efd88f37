"""Exceptions for problems a user can fix; the CLIs turn them into one red line and a non-zero exit code."""

from __future__ import annotations


class FedsegError(Exception):
    """Base class: a user-facing problem with a one-line, actionable message."""


class ConfigError(FedsegError):
    """A configuration file or command-line value is invalid."""


class DataError(FedsegError):
    """An image, label map or dataset folder cannot be used."""


class IncompatibleModelError(FedsegError):
    """Weights or a checkpoint do not fit the requested architecture or classes."""
