"""TorchScript export by tracing, checked at a second shape and batch size so the trace is known to generalise.

``torch.jit.script`` cannot compile the networks (their input checks are plain Python), so the eval-mode model is
traced. The trace keeps every shape computation symbolic (the attention gates resize α to the skip's size read
at run time); the checks that tracing turns into constants are the input validation and the gates' "resize the
gating signal if its grid differs" branch, which never fires for sides that are multiples of 16.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedseg.common.errors import IncompatibleModelError
from fedseg.common.nn.model import SIZE_MULTIPLE

log = logging.getLogger(__name__)

#: The contract's name inside the TorchScript archive (``torch.jit.load(..., _extra_files=...)`` reads it).
CONTRACT_ENTRY = "fedseg.json"
#: Largest difference tolerated between the trace and the model on the second shape.
TRACE_TOLERANCE = 1e-4


def example_input(model: nn.Module, sides: tuple[int, int, int], batch: int = 1) -> torch.Tensor:
    """A seeded random input of ``sides`` (D, H, W) for ``model`` (its ``in_channels``)."""
    generator = torch.Generator().manual_seed(0)
    channels = int(getattr(model, "in_channels", 1))
    return torch.randn(batch, channels, *sides, generator=generator)


def trace(model: nn.Module) -> torch.jit.ScriptModule:
    """Trace the eval-mode ``model`` on a 32³ input and check it on another shape and batch size.

    Raises:
        IncompatibleModelError: the trace does not reproduce the model on the second shape.
    """
    model = model.eval()
    side = 2 * SIZE_MULTIPLE
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings for the constant checks (module docstring), deprecation
        traced: torch.jit.ScriptModule = torch.jit.trace(  # type: ignore[no-untyped-call]  # untyped in torch
            model, example_input(model, (side, side, side)), check_trace=False
        )
    difference = trace_difference(model, traced)
    if difference > TRACE_TOLERANCE:
        raise IncompatibleModelError(
            f"the traced model differs from the network by {difference:.2e} on another input shape; "
            "it cannot be exported as TorchScript"
        )
    log.debug("traced the model; %.2e max difference at batch 2, 16x32x48", difference)
    return traced


def trace_difference(model: nn.Module, traced: Any) -> float:
    """Largest absolute difference of logits between ``model`` and ``traced`` at batch 2, 16 x 32 x 48."""
    x = example_input(model, (SIZE_MULTIPLE, 2 * SIZE_MULTIPLE, 3 * SIZE_MULTIPLE), batch=2)
    with torch.no_grad():
        return float((model(x) - traced(x)).abs().max())


def load(path: Path) -> torch.jit.ScriptModule:
    """Load a TorchScript file on the CPU."""
    module: torch.jit.ScriptModule = torch.jit.load(str(path), map_location="cpu")  # type: ignore[no-untyped-call]
    return module


def save(traced: torch.jit.ScriptModule, path: Path, contract: dict[str, Any]) -> Path:
    """Write ``traced`` with ``contract`` inside it as :data:`CONTRACT_ENTRY`."""
    torch.jit.save(traced, str(path), _extra_files={CONTRACT_ENTRY: json.dumps(contract, indent=2)})
    return path
