"""Flower messages built outside a Flower runtime, to drive the ServerApp's strategy and the ClientApp's handlers
offline (the tests, ``bench/robustness.py``).

Inside a run Flower fills in each message's metadata; :func:`metadata` makes a plausible one (run 1, the server is
node 0). :func:`from_site` is a site's reply as the strategy receives it, :func:`to_site` an instruction as a
ClientApp handler receives it, :func:`train_reply` a whole train reply the way our ClientApp builds it.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MessageType, Metadata, MetricRecord, RecordDict

from fedseg.common.fl.protocol import ARRAYS_KEY, METRICS_KEY, SITE_KEY, WEIGHT_KEY

SERVER_NODE = 0
MetricValues = Mapping[str, int | float | list[int] | list[float]]


def metadata(src: int, dst: int, message_type: str = MessageType.TRAIN, reply_to: str = "x") -> Metadata:
    """The metadata of a message from node ``src`` to node ``dst`` in run 1 (``reply_to`` "": an instruction)."""
    return Metadata(
        run_id=1,
        message_id="",
        src_node_id=src,
        dst_node_id=dst,
        reply_to_message_id=reply_to,
        group_id="",
        created_at=time.time(),
        ttl=600.0,
        message_type=message_type,
    )


def _message(content: RecordDict | Error, meta: Metadata) -> Message:
    # Flower's typed constructors need a running app (a task identity or a message to reply to); this one does not.
    return Message(content, metadata=meta)  # type: ignore[call-overload,no-any-return]


def from_site(content: RecordDict | Error, node: int, message_type: str = MessageType.TRAIN) -> Message:
    """Site ``node``'s reply to the server (``content`` an :class:`Error`: a failed reply)."""
    return _message(content, metadata(node, SERVER_NODE, message_type))


def to_site(content: RecordDict, node: int, message_type: str = MessageType.TRAIN) -> Message:
    """The server's instruction to site ``node``."""
    return _message(content, metadata(SERVER_NODE, node, message_type, reply_to=""))


def train_reply(
    node: int,
    weights: Mapping[str, np.ndarray],
    cases: int,
    loss: float = 0.5,
    site: str | None = None,
    metrics: MetricValues | None = None,
) -> Message:
    """Site ``node``'s train reply: ``weights``, the four metrics (``metrics`` replaces them all) and, when given,
    the site name."""
    values = metrics if metrics is not None else {
        WEIGHT_KEY: cases, "train-loss": loss, "train-samples": 4 * cases, "train-seconds": 1.5
    }  # fmt: skip
    content = RecordDict(
        {
            ARRAYS_KEY: ArrayRecord({k: Array(np.asarray(v)) for k, v in weights.items()}),
            METRICS_KEY: MetricRecord(dict(values)),
        }
    )
    if site is not None:
        content[SITE_KEY] = ConfigRecord({"name": site})
    return from_site(content, node)
