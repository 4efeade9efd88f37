"""The ClientApp mod that writes every reply into the site's egress ledger (:mod:`fedseg.client.ledger`) before
the reply leaves.

The payload of a reply is its content, serialized canonically: the records in sorted key order; an ArrayRecord as,
per array in sorted name order, one line of canonical JSON (``record``, ``array``, ``dtype``, ``shape``,
``stype``, ``nbytes``) followed by the array's bytes exactly as Flower sends them; a MetricRecord or ConfigRecord as
one line of canonical JSON (``record``, ``type``, ``values``; bytes values as ``{"base64": ...}``, non-finite
floats as ``NaN``/``Infinity``). The entry's ``bytes`` is that serialization's length (the arrays' bytes plus a
line per array and per record) and ``sha256`` its hash, so anyone holding the reply can recompute both
(:func:`payload_digest`). A reply that is an Error is ``{"code", "reason"}``; a handler that raises is recorded
as kind ``error`` with the reason Flower's deployment runtime sends for it, then the exception goes on.

If the entry cannot be written the mod raises instead of returning the reply: nothing leaves unrecorded.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import math
from collections.abc import Iterator
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp.typing import ClientAppCallable

from fedseg.client.ledger import Sent, append, ledger_path
from fedseg.client.simulated import site_for
from fedseg.common.errors import ConfigError
from fedseg.common.fl.protocol import CONFIG_KEY, FAILURE_KEY, ROUND_KEY, SITE_KEY, read_task, record_of

log = logging.getLogger(__name__)

#: Reply metric keys of the site's cumulative privacy budget (written under differential privacy).
EPSILON_KEY = "epsilon"
DELTA_KEY = "delta"


def egress_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Run the handler, append what its reply carries to ``<workdir>/egress.jsonl``, then return the reply.

    Raises:
        LedgerError: the entry could not be written (the reply is not sent; Flower sends the error instead).
    """
    server_round = _round_of(msg)
    try:
        reply = call_next(msg, context)
    except Exception as err:
        _record_raised(err, context, server_round)
        raise
    sent = describe(reply, context.run_id, server_round)
    entry = append(ledger_path(site_for(context.node_config, context.run_config).workdir), sent)
    log.debug("egress ledger: entry %d, %s round %s, %d bytes, sha256 %s", entry.seq, sent.kind,
              sent.round, sent.bytes, sent.sha256)  # fmt: skip
    return reply


def _record_raised(err: Exception, context: Context, server_round: int | None) -> None:
    """Record the error reply Flower sends for a handler that raised (the reason names the exception)."""
    reason = f"{type(err)}:<'{err}'>"  # the wording of flwr's run_clientapp
    size, digest = _digest(iter([reason.encode("utf-8")]))
    sent = Sent(run=context.run_id, round=server_round, kind="error", bytes=size, sha256=digest)
    try:
        append(ledger_path(site_for(context.node_config, context.run_config).workdir), sent)
    except Exception:
        log.exception("egress ledger: could not record the error reply for %s", type(err).__name__)


def describe(reply: Message, run: int, server_round: int | None) -> Sent:
    """The ledger's view of ``reply``: its kind, payload size and hash, and the ε and δ it reports."""
    if reply.has_error():
        error = {"code": int(reply.error.code), "reason": reply.error.reason}
        size, digest = _digest(iter([_canonical(error)]))
        return Sent(run=run, round=server_round, kind="error", bytes=size, sha256=digest)
    content = reply.content
    size, digest = payload_digest(content)
    return Sent(
        run=run,
        round=server_round,
        kind=_kind(reply),
        bytes=size,
        sha256=digest,
        epsilon=_number(content, EPSILON_KEY),
        delta=_number(content, DELTA_KEY),
    )


def payload_digest(content: RecordDict) -> tuple[int, str]:
    """Length and SHA-256 of ``content``'s canonical serialization (see the module docstring)."""
    return _digest(canonical_chunks(content))


def canonical_chunks(content: RecordDict) -> Iterator[bytes]:
    """``content``'s canonical serialization, piece by piece (the arrays' bytes are not copied)."""
    for key in sorted(content.keys()):
        record = content[key]
        if isinstance(record, ArrayRecord):
            for name in sorted(record.keys()):
                array = record[name]
                shape = list(array.shape)
                header = {"record": key, "array": name, "dtype": array.dtype, "shape": shape, "stype": array.stype}
                yield _canonical({**header, "nbytes": len(array.data)}) + b"\n"
                yield array.data
        else:
            kind = "metrics" if isinstance(record, MetricRecord) else "config"
            values = {k: _plain(v) for k, v in record.items()}
            yield _canonical({"record": key, "type": kind, "values": values}) + b"\n"


def _digest(chunks: Iterator[bytes]) -> tuple[int, str]:
    hasher, size = hashlib.sha256(), 0
    for chunk in chunks:
        hasher.update(chunk)
        size += len(chunk)
    return size, hasher.hexdigest()


def _canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _plain(value: Any) -> Any:
    """A record value as JSON can hold it (bytes as base64)."""
    if isinstance(value, bytes):
        return {"base64": base64.b64encode(value).decode("ascii")}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _kind(reply: Message) -> str:
    """``failure`` for fedseg's failure replies, else the message type (``train``, ``evaluate``, ...)."""
    site = record_of(reply.content, SITE_KEY, ConfigRecord)
    if site is not None and FAILURE_KEY in site:
        return "failure"
    return str(reply.metadata.message_type)


def _number(content: RecordDict, key: str) -> float | None:
    """The first finite number under ``key`` in the metric and config records (sorted by record key)."""
    for name in sorted(content.keys()):
        record = content[name]
        value = record.get(key) if isinstance(record, MetricRecord | ConfigRecord) else None
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
    return None


def _round_of(msg: Message) -> int | None:
    """The global round of the task ``msg`` carries (Flower's ``server-round`` without a fedseg task)."""
    config = None if msg.has_error() else record_of(msg.content, CONFIG_KEY, ConfigRecord)
    if config is None:
        return None
    try:
        return read_task(config)[1]
    except ConfigError:
        raw = config.get(ROUND_KEY)
        return int(raw) if isinstance(raw, int) and not isinstance(raw, bool) else None
