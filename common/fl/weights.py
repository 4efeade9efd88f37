"""Model weights <-> Flower ``ArrayRecord``, keyed by state-dict name (used by the ServerApp and the ClientApp).

An ``ArrayRecord`` built from a *list* renames the keys to "0", "1", ..., which no longer loads into a model,
so records are always built from a state dict. Weighted averaging turns integer buffers (BatchNorm's
``num_batches_tracked``) into floats; :func:`state_dict_from_arrays` casts every entry back to the dtype of the
model it is loaded into.

Transport (``transport`` = ``fp16`` / ``bf16``) halves the bytes on the wire: :func:`encode_arrays` casts the
floating-point entries to half precision before sending, :func:`decode_arrays` turns them back into float32
on arrival, so the server aggregates and keeps its global model in float32. numpy has no bfloat16, so bf16
travels as its raw 16-bit patterns in an int16 array; the receiver knows the transport (it is part of the task)
and :func:`state_dict_from_arrays` reads an int16 array aimed at a floating-point weight as bf16.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import ArrayRecord
from torch import Tensor, nn

from fedseg.common.errors import IncompatibleModelError
from fedseg.common.fl.protocol import Transport

_MAX_NAMED = 3

_WIRE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def arrays_from_model(model: nn.Module) -> ArrayRecord:
    """The model's full state dict (parameters and buffers, on CPU) as an ``ArrayRecord``."""
    state = OrderedDict((k, v.detach().cpu()) for k, v in model.state_dict().items())
    return ArrayRecord(state)


def encode_arrays(arrays: ArrayRecord, transport: Transport) -> ArrayRecord:
    """``arrays`` ready to send: floating-point entries in ``transport`` precision (fp32: unchanged)."""
    if transport == "fp32":
        return arrays
    wire = _WIRE_DTYPES[transport]
    state: OrderedDict[str, Tensor] = OrderedDict()
    for key in arrays:
        value = torch.from_numpy(arrays[key].numpy())
        if value.is_floating_point():
            value = value.to(wire)
            if wire == torch.bfloat16:
                value = value.view(torch.int16)
        state[key] = value
    return ArrayRecord(state)


def _as_float(value: Tensor) -> Tensor:
    """A received entry as float32 if it is a half-precision weight (int16 = bf16 bit patterns)."""
    if value.dtype == torch.int16:
        return value.view(torch.bfloat16).float()
    return value.float() if value.dtype in (torch.float16, torch.bfloat16) else value


def decode_values(values: Mapping[str, np.ndarray], transport: Transport) -> dict[str, np.ndarray]:
    """:func:`decode_arrays` for numpy arrays (read-only views of a packed reply too)."""
    if transport == "fp32":
        return dict(values)
    return {key: _as_float(torch.from_numpy(np.array(value))).numpy() for key, value in values.items()}


def decode_arrays(arrays: ArrayRecord, transport: Transport) -> ArrayRecord:
    """Received ``arrays`` with every half-precision weight back in float32 (fp32: unchanged)."""
    if transport == "fp32":
        return arrays
    return ArrayRecord(OrderedDict((key, _as_float(torch.from_numpy(arrays[key].numpy()))) for key in arrays))


def _names(keys: set[str]) -> str:
    shown = sorted(keys)[:_MAX_NAMED]
    more = f" and {len(keys) - _MAX_NAMED} more" if len(keys) > _MAX_NAMED else ""
    return ", ".join(shown) + more


def state_dict_from_arrays(arrays: ArrayRecord, reference: Mapping[str, Tensor]) -> OrderedDict[str, Tensor]:
    """Convert an ``ArrayRecord`` into a state dict that matches ``reference`` in keys, shapes and dtypes.

    Args:
        arrays: weights received from Flower.
        reference: the target model's ``state_dict()``.

    Returns:
        Tensors on CPU, in ``reference``'s key order, cast to ``reference``'s dtypes.

    Raises:
        IncompatibleModelError: keys or shapes differ (the message names a few of them).
    """
    missing = set(reference) - set(arrays)
    unexpected = set(arrays) - set(reference)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {_names(missing)}")
        if unexpected:
            parts.append(f"unexpected {_names(unexpected)}")
        raise IncompatibleModelError(
            f"received weights do not fit the configured model ({'; '.join(parts)}); "
            "check that server and site use the same model settings"
        )
    state: OrderedDict[str, Tensor] = OrderedDict()
    for key, ref in reference.items():
        value = torch.from_numpy(arrays[key].numpy())
        if ref.is_floating_point():
            value = _as_float(value)
        if tuple(value.shape) != tuple(ref.shape):
            raise IncompatibleModelError(
                f"received weight {key!r} has shape {tuple(value.shape)}, the model expects {tuple(ref.shape)}"
            )
        state[key] = value.to(dtype=ref.dtype)
    return state


def load_arrays(model: nn.Module, arrays: ArrayRecord) -> None:
    """Load weights from an ``ArrayRecord`` into ``model`` in place.

    Raises:
        IncompatibleModelError: the record does not match the model.
    """
    model.load_state_dict(state_dict_from_arrays(arrays, model.state_dict()))
