"""The weights on the wire, server side: half precision when asked, packed into one array when the task says so.

The strategy (and any state it keeps, e.g. FedAdam's current weights) only ever sees float32, per-tensor records:
train messages are built from the float32 global model and then get the encoded (and packed) copy, and replies
are unpacked and decoded before validation and aggregation. Replies are accepted packed or per-tensor, whatever
was sent. See :mod:`fedseg.common.fl.weights` for the encoding and :mod:`fedseg.common.fl.packing` for packing.

``FEDSEG_PACK=0`` in the ServerApp's environment sends per-tensor weights (``bench/federation.py --no-pack``).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message

from fedseg.common.errors import ConfigError, IncompatibleModelError
from fedseg.common.fl.packing import is_packed, pack_arrays, unpack_views, wire_layout
from fedseg.common.fl.protocol import ARRAYS_KEY, Transport, read_task, record_of
from fedseg.common.fl.weights import decode_arrays, decode_values, encode_arrays

#: Set to ``0`` to send every tensor as its own array (the per-tensor form, for before/after measurements).
PACK_ENV = "FEDSEG_PACK"


def pack_wanted() -> bool:
    """Whether the server packs the weights of its train messages (yes unless ``FEDSEG_PACK=0``)."""
    return os.environ.get(PACK_ENV, "1").strip() != "0"


def encode_messages(messages: Iterable[Message], config: ConfigRecord) -> tuple[list[Message], Transport]:
    """Train messages with their weights in the precision the task asks for (packed when it says so), and that
    transport.

    All messages share one encoded ``ArrayRecord`` (the same global model goes to every site).
    """
    out = list(messages)
    try:
        task = read_task(config)[0]
    except ConfigError:
        return out, "fp32"
    if not out or (task.transport == "fp32" and not task.packed):
        return out, task.transport
    encoded = encode_arrays(out[0].content.array_records[ARRAYS_KEY], task.transport)
    if task.packed:
        encoded = pack_arrays(encoded)
    for message in out:
        message.content[ARRAYS_KEY] = encoded
    return out, task.transport


def decoded_weights(
    reply: Message, transport: Transport, reference: Mapping[str, np.ndarray]
) -> tuple[str | None, dict[str, np.ndarray] | None]:
    """A packed train reply's weights, per tensor in float32 (fp32 transport: read-only views of the message's own
    bytes, no copy); returns (why that failed, None) or (None, the weights).

    ``reference`` is the round's global model: the reply is cut along its layout in ``transport``. A per-tensor
    reply gives (None, None) after its half-precision weights were put back in float32 in place: validation reads
    them from the message (as it does a reply without weights, which it rejects with its own reason).
    """
    record = record_of(reply.content, ARRAYS_KEY, ArrayRecord) if reply.has_content() else None
    if record is None or (not is_packed(record) and transport == "fp32"):
        return None, None
    try:
        if not is_packed(record):
            reply.content[ARRAYS_KEY] = decode_arrays(record, transport)
            return None, None
    except (TypeError, ValueError, RuntimeError) as err:
        return f"its weights are not in the {transport} transport encoding ({err})", None
    try:
        views = unpack_views(record, wire_layout(reference, transport))
    except IncompatibleModelError as err:
        return str(err), None
    except Exception as err:  # a corrupt payload is the sender's problem, never the round's
        return f"its packed weights cannot be decoded ({type(err).__name__})", None
    try:
        return None, decode_values(views, transport)
    except (TypeError, ValueError, RuntimeError) as err:
        return f"its weights are not in the {transport} transport encoding ({err})", None
