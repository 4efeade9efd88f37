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

``context.state`` lives only in the SuperNode's memory, so after every round the train handler also writes the
site's FedBN state to ``<workdir>/fedbn-state.pt`` (:func:`keep_on_disk`, atomically): the global weights it
received that round, its own BatchNorm tensors after training on them, and the task that says what they are.
``fed-client export-model`` builds the site's own model from it (:func:`read_from_disk`); training never reads it.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, RecordDict
from pydantic import ValidationError

from fedseg.common.errors import DataError
from fedseg.common.fl.batchnorm import batchnorm_keys
from fedseg.common.fl.packing import unpacked
from fedseg.common.fl.protocol import TrainTask
from fedseg.common.fl.weights import state_dict_from_arrays
from fedseg.common.nn.model import build_model

log = logging.getLogger(__name__)

#: The ``context.state`` ArrayRecord that holds the site's own BatchNorm tensors (float32).
LOCAL_BN_KEY = "fedseg-local-bn"
#: The site's FedBN state on disk, relative to its workdir, and the format tag inside it.
STATE_FILE = "fedbn-state.pt"
STATE_FORMAT = "fedseg-fedbn-state"
STATE_VERSION = 1


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


@dataclass(frozen=True)
class SiteState:
    """What :func:`keep_on_disk` wrote: the round's global weights, the site's BatchNorm, the round's task."""

    task: TrainTask
    round: int
    global_weights: dict[str, torch.Tensor]
    local_bn: dict[str, torch.Tensor]


def keep_on_disk(workdir: Path, received: ArrayRecord, state: RecordDict, task: TrainTask, server_round: int) -> None:
    """Write the FedBN state of the round just trained to ``<workdir>/fedbn-state.pt`` (temporary file + rename).

    ``received`` is the train message's weights as they arrived (packed, half precision: decoded here). Nothing is
    written when ``state`` keeps no BatchNorm; a failed write is logged and never fails the round.
    """
    kept = state.array_records.get(LOCAL_BN_KEY)
    if kept is None:
        return
    reference = build_model(task.model).state_dict()
    weights = state_dict_from_arrays(unpacked(received, reference, task.transport), reference)
    payload = {
        "format": STATE_FORMAT,
        "format_version": STATE_VERSION,
        "task": task.model_dump(mode="json"),
        "round": server_round,
        "global": dict(weights),
        "local_bn": {key: torch.from_numpy(kept[key].numpy()) for key in kept},
    }
    path = workdir / STATE_FILE
    try:
        _write_atomically(path, payload)
    except OSError as err:
        log.warning("could not keep this site's BatchNorm in %s (%s); fed-client export-model will lack it", path, err)
        return
    log.info("kept this site's own BatchNorm of round %d in %s", server_round, path)


def _write_atomically(path: Path, payload: dict[str, Any]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_from_disk(workdir: Path) -> SiteState:
    """The FedBN state :func:`keep_on_disk` left in ``workdir``.

    Raises:
        DataError: no workdir, no state in it (no round trained with ``bn = "local"``), or an unreadable one.
    """
    if not workdir.is_dir():
        raise DataError(f"--workdir {workdir} is not a folder; pass the site's workdir (fed-client join --workdir)")
    path = workdir / STATE_FILE
    if not path.is_file():
        raise DataError(
            f'{workdir} holds no {STATE_FILE}: this site has not finished a round with bn = "local" (FedBN) '
            "since it kept its BatchNorm on disk"
        )
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a torn or foreign file
        why = type(err).__name__
        raise DataError(f"{path} is not readable ({why}); train another round to write it again") from err
    if not isinstance(payload, dict) or payload.get("format") != STATE_FORMAT:
        raise DataError(f"{path} is not a fedseg FedBN state")
    if payload.get("format_version") != STATE_VERSION:
        raise DataError(f"{path} has format {payload.get('format_version')}, this fedseg reads {STATE_VERSION}")
    try:
        task = TrainTask.model_validate(payload["task"])
        return SiteState(task, int(payload["round"]), dict(payload["global"]), dict(payload["local_bn"]))
    except (KeyError, TypeError, ValueError, ValidationError) as err:
        raise DataError(f"{path} is incomplete or from another fedseg version ({type(err).__name__})") from err
