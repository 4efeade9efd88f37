"""The export extra's packages, imported only where a format needs them, with one line saying how to install them."""

from __future__ import annotations

import importlib.util

from fedseg.common.errors import ConfigError

#: What ``pip install "fedseg[export]"`` brings, per use: package -> import name.
ONNX_PACKAGES = {"onnx": "onnx", "onnxruntime": "onnxruntime", "onnxscript": "onnxscript"}
#: ``python -m monai.bundle run`` needs Fire (its command line) and Ignite (its evaluator).
BUNDLE_RUN_PACKAGES = {"fire": "fire", "pytorch-ignite": "ignite"}
INSTALL_HINT = 'pip install "fedseg[export]"'


def missing(packages: dict[str, str]) -> list[str]:
    """The distributions among ``packages`` (name -> import name) that cannot be imported here."""
    return [name for name, module in packages.items() if importlib.util.find_spec(module) is None]


def require(packages: dict[str, str], purpose: str) -> None:
    """Raise a one-line ConfigError naming the missing packages and the extra that installs them.

    Raises:
        ConfigError: one of ``packages`` is not installed.
    """
    absent = missing(packages)
    if absent:
        raise ConfigError(f"{purpose} needs {', '.join(absent)}, which is not installed; run: {INSTALL_HINT}")
