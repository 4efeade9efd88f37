"""The egress ledger and the ClientApp mod that fills it: an honest ledger verifies, every tamper names its line,
appends are locked and refuse a torn tail, and each reply is recorded with its payload's hash before it leaves."""

from __future__ import annotations

import hashlib
import itertools
import json
import multiprocessing
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict

from fedseg.client import training as client_training
from fedseg.client.app import app as client_app
from fedseg.client.egress import describe, egress_mod, payload_digest
from fedseg.client.ledger import GENESIS, Entry, LedgerError, Sent, append, audit, head_path, ledger_path
from fedseg.common.data.preprocess import PreprocessConfig
from fedseg.common.engine.config import TrainConfig
from fedseg.common.engine.train import TrainReport
from fedseg.common.fl.offline import to_site
from fedseg.common.fl.protocol import ARRAYS_KEY, CONFIG_KEY, METRICS_KEY, ROUND_KEY, TrainTask, task_config
from fedseg.common.fl.weights import arrays_from_model
from fedseg.common.nn.model import ModelConfig, build_model
from tests.client.sites import phantom_node_config

START = datetime(2025, 3, 1, 9, 0, tzinfo=UTC)
TINY = ModelConfig(feature_scale=64)
TASK = TrainTask(
    model=TINY,
    train=TrainConfig(steps=2, patch_size=(16, 16, 16), augment=False),
    preprocess=PreprocessConfig(),
    deadline=120.0,
    round_offset=10,
)


def sent(n: int, run: int = 7) -> Sent:
    """The ``n``-th train reply of a DP run (ε grows by round)."""
    digest = hashlib.sha256(f"payload {n}".encode()).hexdigest()
    return Sent(run=run, round=n, kind="train", bytes=1000 + n, sha256=digest, epsilon=0.5 * n, delta=1e-5)


def honest(tmp_path: Path, count: int = 5) -> Path:
    ledger = ledger_path(tmp_path)
    for n in range(1, count + 1):
        append(ledger, sent(n), now=START + timedelta(minutes=n))
    return ledger


def lines(ledger: Path) -> list[str]:
    return ledger.read_text().splitlines(keepends=True)


def test_an_honest_ledger_verifies_and_each_entry_chains_to_the_one_before(tmp_path: Path) -> None:
    ledger = honest(tmp_path)
    result = audit(ledger)
    assert result.fault is None
    entries = [row.entry for row in result.rows]
    assert [e.seq for e in entries] == [1, 2, 3, 4, 5] and [row.line for row in result.rows] == [1, 2, 3, 4, 5]
    assert entries[0].prev == GENESIS
    assert all(later.prev == earlier.hash for earlier, later in itertools.pairwise(entries))
    body = json.loads(lines(ledger)[2])
    body.pop("hash")
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    assert entries[2].hash == hashlib.sha256(canonical).hexdigest()  # its own canonical JSON, without "hash"
    assert entries[2].epsilon == 1.5 and entries[2].time == "2025-03-01T09:03:00.000+00:00"
    assert json.loads(head_path(ledger).read_text()) == {"seq": 5, "hash": entries[-1].hash}
    assert result.head == entries[-1].hash


def _set(line: str, key: str, value: object) -> str:
    body = json.loads(line)
    body[key] = value
    return json.dumps(body, sort_keys=True, separators=(",", ":")) + "\n"


def _rehash(line: str) -> str:
    """The line with its hash recomputed, as someone who knows the format would do after an edit."""
    body = json.loads(line)
    body.pop("hash")
    return _set(line, "hash", Entry.model_validate({**body, "hash": GENESIS}).computed_hash())


Tamper = Callable[[list[str]], list[str]]
TAMPERS: dict[str, tuple[Tamper, int | None, str]] = {
    "byte count edited": (lambda ls: [*ls[:2], _set(ls[2], "bytes", 1), *ls[3:]], 3, "edited: its content does not"),
    "ε edited": (lambda ls: [ls[0], _set(ls[1], "epsilon", 0.1), *ls[2:]], 2, "edited: its content does not"),
    "edited and rehashed": (
        lambda ls: [ls[0], _rehash(_set(ls[1], "bytes", 1)), *ls[2:]],
        2,
        "edited: its hash was recomputed, but line 3 records another hash for it",
    ),
    "middle entry removed": (lambda ls: [*ls[:2], *ls[3:]], 3, "removed: 1 entry before it (from seq 3)"),
    "first entry removed": (lambda ls: ls[1:], 1, "removed: 1 entry before it (from seq 1)"),
    "last entry removed": (
        lambda ls: ls[:-1],
        5,
        "removed: the ledger ends at seq 4, its head records seq 5 (1 entry removed from the end)",
    ),
    "two entries swapped": (
        lambda ls: [ls[0], ls[2], ls[1], *ls[3:]],
        2,
        "reordered: it follows line 3, not line 1",
    ),
    "first entry moved to the end": (lambda ls: [*ls[1:], ls[0]], 1, "reordered: it follows line 5, not the start"),
    "entry repeated": (lambda ls: [*ls[:3], ls[2], *ls[3:]], 4, "duplicated: the same entry as line 3"),
    "torn last line": (lambda ls: [*ls[:-1], ls[-1][:40]], 5, "torn: the last line is incomplete"),
    "garbage line": (lambda ls: [*ls[:3], "{not json\n", *ls[3:]], 4, "invalid: not a ledger entry"),
}


@pytest.mark.parametrize("name", list(TAMPERS))
def test_every_tamper_fails_naming_the_first_bad_line(name: str, tmp_path: Path) -> None:
    tamper, line, why = TAMPERS[name]
    ledger = honest(tmp_path)
    before = ledger.read_bytes()
    ledger.write_text("".join(tamper(lines(ledger))))
    assert ledger.read_bytes() != before  # the tamper happened
    fault = audit(ledger).fault
    assert fault is not None, name
    assert fault.line == line, fault
    assert fault.why.startswith(why), fault


def test_a_missing_head_or_ledger_is_a_fault_once_there_is_more_than_one_entry(tmp_path: Path) -> None:
    ledger = honest(tmp_path, count=2)
    head_path(ledger).unlink()
    assert str(audit(ledger).fault) == "egress.head: missing, though the ledger holds 2 entries"
    honest(tmp_path / "other", count=3).unlink()  # the whole ledger deleted, its head left behind
    fault = audit(ledger_path(tmp_path / "other")).fault
    assert fault is not None and fault.line == 1 and fault.why.startswith("removed: the ledger ends at seq 0")


def test_a_head_one_entry_behind_is_a_crash_between_the_two_writes_and_verifies(tmp_path: Path) -> None:
    ledger = honest(tmp_path, count=3)
    behind = head_path(ledger).read_bytes()
    append(ledger, sent(4))
    head_path(ledger).write_bytes(behind)
    assert audit(ledger).fault is None
    append(ledger, sent(5))  # the next append brings the head up to date
    assert json.loads(head_path(ledger).read_text())["seq"] == 5 and audit(ledger).fault is None


def test_a_rewritten_chain_verifies_only_until_its_head_is_compared_with_a_copy_kept_elsewhere(tmp_path: Path) -> None:
    ledger = honest(tmp_path, count=3)
    kept = audit(ledger).head
    forged = ledger_path(tmp_path / "forged")
    for n in range(1, 4):  # the same entries with a lower ε, written by someone who knows the format
        append(forged, sent(n).model_copy(update={"epsilon": 0.01}), now=START + timedelta(minutes=n))
    ledger.write_bytes(forged.read_bytes())
    head_path(ledger).write_bytes(head_path(forged).read_bytes())
    assert audit(ledger).fault is None  # what the chain alone cannot show (module docstring) ...
    assert audit(ledger).head != kept  # ... the kept head does


def test_an_append_after_a_torn_line_refuses_and_writes_nothing(tmp_path: Path) -> None:
    ledger = honest(tmp_path, count=2)
    ledger.write_bytes(ledger.read_bytes() + b'{"bytes":10')
    before = ledger.read_bytes(), head_path(ledger).read_bytes()
    with pytest.raises(LedgerError, match=r"ends in an incomplete line .*fed-client audit --workdir"):
        append(ledger, sent(3))
    assert (ledger.read_bytes(), head_path(ledger).read_bytes()) == before


def _append_many(ledger: Path, run: int, count: int) -> None:
    for n in range(count):
        append(ledger, sent(n + 1, run=run))


def test_appends_from_processes_at_once_never_interleave(tmp_path: Path) -> None:
    ledger = ledger_path(tmp_path)
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_append_many, args=(ledger, run, 25)) for run in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
    assert [w.exitcode for w in workers] == [0, 0, 0, 0]
    result = audit(ledger)
    assert result.fault is None
    assert [row.entry.seq for row in result.rows] == list(range(1, 101))
    assert sorted(row.entry.run for row in result.rows) == sorted([0, 1, 2, 3] * 25)


# --- the mod ------------------------------------------------------------------------------------------------


def _reference_digest(content: RecordDict) -> tuple[int, str]:
    """The canonical payload as the egress module documents it, written out again independently."""
    out = b""
    for key in sorted(content.keys()):
        record = content[key]
        if isinstance(record, ArrayRecord):
            for name in sorted(record.keys()):
                a = record[name]
                head = {"array": name, "dtype": a.dtype, "nbytes": len(a.data), "record": key, "shape": list(a.shape)}
                out += json.dumps({**head, "stype": a.stype}, separators=(",", ":")).encode() + b"\n" + a.data
        else:
            kind = "metrics" if isinstance(record, MetricRecord) else "config"
            values = dict(sorted(record.items()))
            out += json.dumps({"record": key, "type": kind, "values": values}, separators=(",", ":")).encode() + b"\n"
    return len(out), hashlib.sha256(out).hexdigest()


def _site_context(tmp_path: Path) -> Context:
    node_config = {"site": "site-1", "data": str(tmp_path / "data"), "workdir": str(tmp_path / "site")}
    return Context(run_id=42, node_id=5, node_config=node_config, state=RecordDict(), run_config={})


def _instruction(message_type: str = MessageType.TRAIN) -> Message:
    config = task_config(TASK)
    config[ROUND_KEY] = 3
    return to_site(RecordDict({CONFIG_KEY: config}), 5, message_type)


def test_the_mod_records_the_reply_with_its_payload_hash_before_returning_it(tmp_path: Path) -> None:
    context, instruction = _site_context(tmp_path), _instruction()
    ledger = ledger_path(tmp_path / "site")
    weights = {"b.weight": np.arange(12, dtype=np.float32).reshape(3, 4), "a.bias": np.ones(5, dtype=np.float16)}
    metrics = MetricRecord({"num-examples": 4, "train-loss": 0.25, "epsilon": 2.5, "delta": 1e-5})
    seen: list[bool] = []

    def handler(msg: Message, ctx: Context) -> Message:
        seen.append(ledger.exists())
        arrays = ArrayRecord({k: Array(v) for k, v in weights.items()})
        site = ConfigRecord({"name": "site-1", "annotated": [True, False]})
        return Message(RecordDict({ARRAYS_KEY: arrays, METRICS_KEY: metrics, "site": site}), reply_to=msg)

    reply = egress_mod(instruction, context, handler)
    assert seen == [False]  # nothing is recorded before the reply exists ...
    (row,) = audit(ledger).rows  # ... and it is recorded by the time the mod hands the reply on
    size, digest = _reference_digest(reply.content)
    assert (row.entry.sha256, row.entry.bytes) == (digest, size)
    assert size > sum(w.nbytes for w in weights.values())
    assert (row.entry.run, row.entry.round, row.entry.kind) == (42, 13, "train")  # round_offset 10 + round 3
    assert (row.entry.epsilon, row.entry.delta) == (2.5, 1e-5)


def test_a_failure_a_cross_site_reply_and_a_raising_handler_are_recorded_too(tmp_path: Path) -> None:
    context = _site_context(tmp_path)
    failure = RecordDict({"site": ConfigRecord({"name": "site-1", "failure": "refused: budget spent"})})
    egress_mod(_instruction(), context, lambda msg, ctx: Message(failure, reply_to=msg))
    scores = RecordDict({METRICS_KEY: MetricRecord({"num-examples": 2, "dice-liver-mean": float("nan")})})
    egress_mod(_instruction(MessageType.EVALUATE), context, lambda msg, ctx: Message(scores, reply_to=msg))

    def raising(msg: Message, ctx: Context) -> Message:
        raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        egress_mod(_instruction(), context, raising)
    rows = audit(ledger_path(tmp_path / "site")).rows
    assert [r.entry.kind for r in rows] == ["failure", "evaluate", "error"]
    assert [r.entry.epsilon for r in rows] == [None, None, None]
    assert rows[1].entry.sha256 == payload_digest(scores)[1]
    reason = b"<class 'RuntimeError'>:<'out of memory'>"
    assert rows[2].entry.sha256 == hashlib.sha256(reason).hexdigest()


def test_the_reply_does_not_leave_when_the_ledger_cannot_take_it(tmp_path: Path) -> None:
    context = _site_context(tmp_path)
    ledger = ledger_path(tmp_path / "site")
    ledger.parent.mkdir()
    ledger.write_bytes(b'{"torn')
    reply = Message(RecordDict({METRICS_KEY: MetricRecord({"x": 1})}), reply_to=_instruction())
    with pytest.raises(LedgerError):
        egress_mod(_instruction(), context, lambda msg, ctx: reply)


def test_the_payload_hash_covers_every_array_byte_and_record_value() -> None:
    base = RecordDict({ARRAYS_KEY: ArrayRecord({"w": Array(np.zeros(4, np.float32))}), METRICS_KEY: MetricRecord()})
    changed = RecordDict({ARRAYS_KEY: ArrayRecord({"w": Array(np.array([0, 0, 0, 1e-7], np.float32))})})
    changed[METRICS_KEY] = MetricRecord()
    metric = RecordDict({ARRAYS_KEY: base[ARRAYS_KEY], METRICS_KEY: MetricRecord({"epsilon": 1.0})})
    digests = {payload_digest(c)[1] for c in (base, changed, metric)}
    assert len(digests) == 3
    assert payload_digest(base) == payload_digest(
        RecordDict({METRICS_KEY: MetricRecord(), ARRAYS_KEY: base[ARRAYS_KEY]})
    )


def test_the_real_client_app_writes_one_train_entry_per_round(
    phantom_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def quick(*args: object, **kwargs: object) -> TrainReport:  # the weights go back as received
        return TrainReport(mean_loss=0.5, samples=4, steps=2, seconds=0.1)

    monkeypatch.setattr(client_training, "train_model", quick)
    node_config = phantom_node_config(phantom_root, tmp_path)
    context = Context(run_id=9, node_id=5, node_config=node_config, state=RecordDict(), run_config={})
    arrays = arrays_from_model(build_model(TINY))
    replies = []
    for server_round in (1, 2):
        config = task_config(TASK)
        config[ROUND_KEY] = server_round
        replies.append(client_app(to_site(RecordDict({ARRAYS_KEY: arrays, CONFIG_KEY: config}), 5), context))
    rows = audit(ledger_path(tmp_path)).rows
    assert [(r.entry.kind, r.entry.round) for r in rows] == [("train", 11), ("train", 12)]
    for row, reply in zip(rows, replies, strict=True):
        assert describe(reply, 9, row.entry.round).sha256 == row.entry.sha256
        assert row.entry.sha256 == _reference_digest(reply.content)[1]
