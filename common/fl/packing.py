"""The weights of a message as ONE array: far fewer objects (and HTTP requests) for Flower to move.

Flower 1.42 moves every ``Array`` of an ``ArrayRecord`` as its own object (plus at least one chunk), one request
each: a state dict of a few hundred tensors costs hundreds of requests per message. :func:`pack_arrays` puts the
whole record into a single uint8 array under :data:`PACKED_KEY`: a 32-byte layout digest, then every entry's raw
little-endian bytes in the record's order (a model's state-dict order). Packing comes *after* the transport
encoding (:func:`fedseg.common.fl.weights.encode_arrays`) and unpacking *before* decoding, so a packed record
holds exactly the bytes the per-tensor record would.

The receiver does not need the sender's key names or shapes: it knows its own model. :func:`wire_layout` turns
the receiver's reference state dict and the transport into ``[(key, shape, wire dtype)]``, and
:func:`unpack_arrays` cuts the buffer along it (:func:`unpack_views` without copying it). The digest covers the
sender's keys, order, shapes and dtypes, so a buffer laid out for another model (renamed, reordered or another
precision) is refused with a clear error, never misread; a buffer of the wrong length is refused naming both sizes.
"""

from __future__ import annotations

import hashlib
import io
from collections import OrderedDict
from collections.abc import Mapping

import numpy as np
import numpy.lib.format as npformat
import torch
from flwr.app import Array, ArrayRecord
from torch import Tensor

from fedseg.common.errors import IncompatibleModelError
from fedseg.common.fl.protocol import Transport

#: The single key of a packed ``ArrayRecord``.
PACKED_KEY = "fedseg-packed"
#: Bytes of the layout digest at the start of a packed buffer.
DIGEST_BYTES = 32

#: One entry of a packed buffer: state-dict key, shape, dtype on the wire.
Slot = tuple[str, tuple[int, ...], np.dtype]
Layout = list[Slot]

_HALF = {"fp16": np.dtype(np.float16), "bf16": np.dtype(np.int16)}  # bf16 travels as its 16-bit patterns


def _little(dtype: np.dtype) -> np.dtype:
    return dtype.newbyteorder("<") if dtype.itemsize > 1 else dtype


def _numpy_dtype(value: np.ndarray | Tensor) -> np.dtype:
    if isinstance(value, np.ndarray):
        return value.dtype
    return torch.empty(0, dtype=value.dtype).numpy().dtype


def wire_layout(reference: Mapping[str, np.ndarray] | Mapping[str, Tensor], transport: Transport) -> Layout:
    """How the weights of a model like ``reference`` travel: floating entries in ``transport`` precision
    (fp32: their own dtype), integer buffers (``num_batches_tracked``) in their own dtype, in ``reference``'s order.
    """
    layout: Layout = []
    for key, value in reference.items():
        dtype = _numpy_dtype(value)
        if dtype.kind == "f" and transport in _HALF:
            dtype = _HALF[transport]
        layout.append((key, tuple(int(n) for n in value.shape), _little(dtype)))
    return layout


def _digest(layout: Layout) -> bytes:
    text = ";".join(f"{key}:{'x'.join(map(str, shape))}:{dtype.str}" for key, shape, dtype in layout)
    return hashlib.sha256(text.encode()).digest()


def _size(layout: Layout) -> int:
    return DIGEST_BYTES + sum(int(np.prod(shape, dtype=np.int64)) * dtype.itemsize for _, shape, dtype in layout)


def is_packed(arrays: ArrayRecord) -> bool:
    """Whether ``arrays`` is a packed record (its only key is :data:`PACKED_KEY`)."""
    return list(arrays.keys()) == [PACKED_KEY]


def pack_arrays(arrays: ArrayRecord) -> ArrayRecord:
    """``arrays`` (already transport-encoded) as one uint8 array: layout digest + every entry's bytes, in order."""
    values = [arrays[key].numpy() for key in arrays]
    layout = [(key, tuple(v.shape), _little(v.dtype)) for key, v in zip(arrays.keys(), values, strict=True)]
    parts = [np.frombuffer(_digest(layout), np.uint8)]
    parts += [
        v.astype(dtype, copy=False).reshape(-1).view(np.uint8) for v, (_, _, dtype) in zip(values, layout, strict=True)
    ]
    return ArrayRecord(OrderedDict([(PACKED_KEY, Array(np.concatenate(parts)))]))


def array_view(array: Array) -> np.ndarray:
    """A Flower ``Array`` as a read-only numpy view of its own bytes (``Array.numpy()`` copies them): a reply's
    weights can be checked and cut into tensors without a second copy of the model in memory."""
    if array.stype != "numpy.ndarray":
        raise IncompatibleModelError(f"expected a numpy array, got serialisation {array.stype!r}")
    stream = io.BytesIO(array.data)
    version = npformat.read_magic(stream)
    header = npformat.read_array_header_1_0 if version == (1, 0) else npformat.read_array_header_2_0
    shape, fortran, dtype = header(stream)
    if fortran or dtype.hasobject:
        raise IncompatibleModelError("packed weights must be a C-ordered array of plain numbers")
    count = int(np.prod(shape, dtype=np.int64))
    return np.frombuffer(array.data, dtype=dtype, count=count, offset=stream.tell()).reshape(shape)


def unpack_views(arrays: ArrayRecord, layout: Layout) -> dict[str, np.ndarray]:
    """The tensors a packed ``arrays`` holds, cut along ``layout`` (the receiver's :func:`wire_layout`), as
    read-only views of the record's own bytes, in ``layout``'s order and wire dtypes.

    Raises:
        IncompatibleModelError: not a packed record, a buffer of another length, or laid out for another model.
    """
    if not is_packed(arrays):
        raise IncompatibleModelError(f"expected packed weights under {PACKED_KEY!r}, got {len(arrays)} entries")
    buffer = array_view(arrays[PACKED_KEY])
    if buffer.dtype != np.uint8 or buffer.ndim != 1:
        raise IncompatibleModelError(f"packed weights must be a flat uint8 array, got {buffer.dtype} {buffer.shape}")
    expected = _size(layout)
    if buffer.size != expected:
        raise IncompatibleModelError(
            f"packed weights are {buffer.size} bytes, the model needs {expected} ({len(layout)} tensors); "
            "check that server and site use the same model settings"
        )
    if buffer[:DIGEST_BYTES].tobytes() != _digest(layout):
        raise IncompatibleModelError(
            "packed weights were laid out for another model (tensor names, order, shapes or precision differ); "
            "check that server and site use the same model settings and fedseg version"
        )
    views: dict[str, np.ndarray] = {}
    offset = DIGEST_BYTES
    for key, shape, dtype in layout:
        count = int(np.prod(shape, dtype=np.int64))
        views[key] = np.frombuffer(buffer, dtype=dtype, count=count, offset=offset).reshape(shape)
        offset += count * dtype.itemsize
    return views


def unpack_arrays(arrays: ArrayRecord, layout: Layout) -> ArrayRecord:
    """The per-tensor record a packed ``arrays`` holds, cut along ``layout`` (:func:`unpack_views`, in native
    byte order).

    Raises:
        IncompatibleModelError: not a packed record, a buffer of another length, or laid out for another model.
    """
    views = unpack_views(arrays, layout)
    return ArrayRecord(
        OrderedDict((k, Array(v.astype(v.dtype.newbyteorder("="), copy=False))) for k, v in views.items())
    )


def unpacked(
    arrays: ArrayRecord, reference: Mapping[str, np.ndarray] | Mapping[str, Tensor], transport: Transport
) -> ArrayRecord:
    """``arrays`` as a per-tensor record: unpacked along ``reference``'s wire layout when packed, else unchanged."""
    return unpack_arrays(arrays, wire_layout(reference, transport)) if is_packed(arrays) else arrays
