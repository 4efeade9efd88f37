"""Half-precision transport on the server side: cast the outgoing weights once, restore float32 on arrival.

The strategy (and any state it keeps, e.g. FedAdam's current weights) only ever sees float32: train
messages are built from the float32 global model and then get the encoded copy, and replies are decoded
before validation and aggregation. See :mod:`fedseg.common.fl.weights` for the encoding.
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ConfigRecord, Message

from fedseg.common.fl.protocol import ARRAYS_KEY, Transport, task_transport
from fedseg.common.fl.weights import decode_arrays, encode_arrays


def encode_messages(messages: Iterable[Message], config: ConfigRecord) -> tuple[list[Message], Transport]:
    """Train messages with their weights in the precision the task asks for, and that transport.

    All messages share one encoded ``ArrayRecord`` (the same global model goes to every site).
    """
    out = list(messages)
    transport = task_transport(config)
    if transport == "fp32" or not out:
        return out, transport
    encoded = encode_arrays(out[0].content.array_records[ARRAYS_KEY], transport)
    for message in out:
        message.content[ARRAYS_KEY] = encoded
    return out, transport


def decode_reply(reply: Message, transport: Transport) -> str | None:
    """Put a train reply's weights back in float32 in place; returns why that failed, or None.

    A reply without weights is left as it is (validation rejects it with its own reason).
    """
    if transport == "fp32" or not reply.has_content() or ARRAYS_KEY not in reply.content.array_records:
        return None
    try:
        reply.content[ARRAYS_KEY] = decode_arrays(reply.content.array_records[ARRAYS_KEY], transport)
    except (TypeError, ValueError, RuntimeError) as err:
        return f"its weights are not in the {transport} transport encoding ({err})"
    return None
