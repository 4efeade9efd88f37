"""ONNX export (torch.onnx's dynamo exporter, opset 18) with dynamic batch and spatial axes, and an onnxruntime
session wrapped as a module so fedseg's own sliding window can drive it.

The spatial axes are declared as ``16*d``, ``16*h``, ``16*w`` (``torch.export`` derived dimensions), so the
graph states the multiple-of-16 rule itself and the exporter proves the model valid for every such size. What
needed care in the attention gates: α is resized to the skip's size read from the tensor at run time (an ONNX
``Resize`` fed by ``Shape``, not a constant), and the gating signal's "resize if the grids differ" branch is
resolved at export, since for multiples of 16 the grids always match; the parity check (:mod:`.parity`) runs
the exported graph over a whole CT at many window positions and a second shape.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fedseg.common.errors import IncompatibleModelError
from fedseg.common.export.contract import INPUT_NAME, OUTPUT_NAME
from fedseg.common.export.deps import ONNX_PACKAGES, require
from fedseg.common.export.torchscript import example_input
from fedseg.common.nn.model import SIZE_MULTIPLE

log = logging.getLogger(__name__)

OPSET = 18
#: Loggers of the exporter and its graph optimiser, which report every pass at INFO (kept for ``-v``).
EXPORTER_LOGGERS = ("torch.onnx", "onnx_ir", "onnxscript")


def dynamic_shapes() -> dict[str, dict[int, Any]]:
    """``torch.export`` dimensions of the input: any batch, every spatial side a multiple of 16."""
    dim = torch.export.Dim
    return {
        "x": {
            0: dim("batch", min=1),
            2: SIZE_MULTIPLE * dim("d", min=1),
            3: SIZE_MULTIPLE * dim("h", min=1),
            4: SIZE_MULTIPLE * dim("w", min=1),
        }
    }


def export_onnx(model: nn.Module, path: Path) -> Path:
    """Export the eval-mode ``model`` to ``path`` and check it with ``onnx.checker`` (full check).

    Raises:
        ConfigError: the export extra is not installed.
        IncompatibleModelError: the exporter or the checker rejects the model.
    """
    require(ONNX_PACKAGES, "--format onnx")
    import onnx  # the export extra, checked above

    model = model.eval()
    example = (example_input(model, (2 * SIZE_MULTIPLE,) * 3, batch=2),)
    chatter = io.StringIO()
    try:
        with _quiet(), warnings.catch_warnings(), contextlib.redirect_stdout(chatter), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model,
                example,
                str(path),
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                opset_version=OPSET,
                dynamic_shapes=dynamic_shapes(),
                dynamo=True,
                external_data=False,  # one self-contained file (fine below protobuf's 2 GB)
                verbose=False,
            )
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as err:  # the exporter and checker raise many types; each becomes one line
        log.debug("torch.onnx output:\n%s", chatter.getvalue(), exc_info=True)
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise IncompatibleModelError(f"ONNX export failed: {first}") from err
    log.debug("torch.onnx output:\n%s", chatter.getvalue())
    return path


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Raise the exporter's loggers to ERROR for the export, unless fedseg logs at DEBUG (``-v``)."""
    loggers = [logging.getLogger(name) for name in EXPORTER_LOGGERS]
    saved = [logger.level for logger in loggers]
    if not logging.getLogger().isEnabledFor(logging.DEBUG):
        for logger in loggers:
            logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, saved, strict=True):
            logger.setLevel(level)


class OnnxModule(nn.Module):
    """An onnxruntime (CPU) session that behaves like the network: (B, C, D, H, W) float32 in, logits out."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        require(ONNX_PACKAGES, "running the ONNX model")
        import onnxruntime as ort  # the export extra, checked above

        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        options.log_severity_level = 3  # errors only
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Run the session on ``x`` (any memory format) and return its logits as a CPU tensor."""
        array = np.ascontiguousarray(x.detach().cpu().float().numpy())
        (logits,) = self.session.run([OUTPUT_NAME], {INPUT_NAME: array})
        return torch.from_numpy(np.asarray(logits))
