"""FedBN at a site (``bn = "local"``): the site's own BatchNorm tensors, kept across rounds in ``context.state``.

Flower starts a new ClientApp process for every message. The SuperNode keeps the run's :class:`~flwr.app.Context`
in memory: each ClientApp process pulls it with its message and pushes it back when it ends, also after an
exception (flwr 1.42, ``PullTaskInput`` / ``PushTaskOutput``), so a record put into ``context.state`` in round r is
there in round r + 1. It lives as long as the SuperNode and the run: a restarted site or a new run (``--resume``
too) starts again from the global BatchNorm, as round 1 does.

Round 1 trains from the global BatchNorm; afterwards :func:`own_start` lays the kept BatchNorm over the received
global weights, :func:`keep_own` stores the trained BatchNorm, and :func:`shared_only` puts the *received*
BatchNorm entries into the reply, so the key set the server validates stays exact and nothing of the site's own
BatchNorm travels.
"""

from __future__ import annotations

import logging
from collections import OrderedDict

from flwr.app import ArrayRecord, RecordDict

from fedseg.common.fl.batchnorm import batchnorm_keys

log = logging.getLogger(__name__)

#: The ``context.state`` ArrayRecord that holds the site's own BatchNorm tensors (float32).
LOCAL_BN_KEY = "fedseg-local-bn"


def _replaced(base: ArrayRecord, source: ArrayRecord, keys: set[str]) -> ArrayRecord:
    return ArrayRecord(OrderedDict((k, source[k] if k in keys else base[k]) for k in base))


def own_start(received: ArrayRecord, state: RecordDict) -> ArrayRecord:
    """The weights to train or score with: ``received`` with its BatchNorm entries replaced by the kept ones.

    ``received`` itself when nothing is kept (round 1, a restarted site) or what is kept does not fit (another
    model: logged).
    """
    kept = state.array_records.get(LOCAL_BN_KEY)
    if kept is None:
        return received
    keys = batchnorm_keys(received)
    if set(kept) != keys or any(tuple(kept[k].shape) != tuple(received[k].shape) for k in keys):
        log.warning("the kept BatchNorm tensors do not fit the received model; using the global BatchNorm")
        return received
    log.info("using this site's own BatchNorm (%d tensors) over the global weights", len(keys))
    return _replaced(received, kept, keys)


def keep_own(trained: ArrayRecord, state: RecordDict) -> None:
    """Store the BatchNorm entries of ``trained`` (full precision) in ``state`` for the next message."""
    keys = batchnorm_keys(trained)
    state[LOCAL_BN_KEY] = ArrayRecord(OrderedDict((k, trained[k]) for k in trained if k in keys))


def shared_only(reply: ArrayRecord, received: ArrayRecord) -> ArrayRecord:
    """``reply`` with its BatchNorm entries replaced by the received global ones (what the site sends)."""
    return _replaced(reply, received, batchnorm_keys(reply))
