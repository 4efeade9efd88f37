"""Exact resume: a run of 3 rounds and a run of 2 rounds resumed for a third end with identical weights and
identical strategy state (FedAdam moments, pinned sites); rejections and update norms reach the history files."""

from __future__ import annotations

import hashlib
import logging
import random
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message

from fedseg.common.engine.checkpoint import load_checkpoint
from fedseg.common.fl.packing import pack_arrays, unpacked
from fedseg.common.fl.protocol import LocalResult, read_task, reply_content
from fedseg.common.nn.model import build_model
from fedseg.server.configfile import load_server_config
from fedseg.server.control.runs import new_spec, resume_spec, save_config
from fedseg.server.run.history import read_history
from fedseg.server.run.loop import serve
from fedseg.server.run.state import load_state

pytestmark = pytest.mark.usefixtures("task_identity")


class ArithmeticGrid:
    """Sites whose "training" is a fixed function of the received weights; node 13 sends NaN from round 2 on."""

    def __init__(self, rogue: bool = False, reverse: bool = False) -> None:
        self.nodes = [11, 12, 13] if rogue else [11, 12]
        if reverse:  # with the same random state, Flower's sampling then sends (and pulls) in the other order
            self.nodes.reverse()
        self.calls = 0
        self.pending: dict[str, Message] = {}

    def get_node_ids(self) -> list[int]:
        return self.nodes

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        return self.pull_messages(self.push_messages(messages))

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        """Flower's push half: every site "trains" at once; the replies wait for :meth:`pull_messages`."""
        self.calls += 1
        ids = []
        for message in messages:
            message_id = f"m{self.calls}-{message.metadata.dst_node_id}"
            message.metadata.__dict__["_message_id"] = message_id
            self.pending[message_id] = self._reply(message)
            ids.append(message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        return [self.pending.pop(i) for i in list(message_ids) if i in self.pending]

    def _reply(self, message: Message) -> Message:
        node = message.metadata.dst_node_id
        task, _ = read_task(message.content.config_records["config"])
        layout = build_model(task.model).state_dict()  # as our ClientApp does: unpack along its own model
        received = unpacked(message.content.array_records["arrays"], layout, task.transport)
        out = {}
        for key in received:
            value = received[key].numpy()
            if value.dtype.kind == "f":
                value = (value + 0.01 * np.cos(value + node)).astype(value.dtype)
                if node == 13 and self.calls >= 2 and key.endswith("conv1.0.weight"):
                    value.reshape(-1)[0] = np.nan
            out[key] = value
        arrays = ArrayRecord({k: Array(v) for k, v in out.items()})
        assert task.packed  # the server packs; so does the site
        arrays = pack_arrays(arrays)
        result = LocalResult(cases=node - 10, loss=0.5, samples=4, seconds=1.0)
        reply = Message(reply_content(arrays, result, f"site-{node}"), reply_to=message)
        reply.metadata.__dict__["_src_node_id"] = node
        return reply


def _digest(path: Path) -> str:
    state = load_checkpoint(path).model.state_dict()
    h = hashlib.sha256()
    for key in sorted(state):
        h.update(key.encode())
        h.update(state[key].contiguous().numpy().tobytes())
    return h.hexdigest()


def _overrides(out: Path, rounds: int) -> list[str]:
    return [f"rounds={rounds}", f"output_dir={out}", "model.feature_scale=64", 'strategy.name="fedadam"']


def test_the_global_model_does_not_depend_on_the_order_replies_arrive_in(tmp_path: Path) -> None:
    digests = []
    for reverse in (False, True):
        cfg = load_server_config(None, _overrides(tmp_path / str(reverse), 3))
        save_config(cfg)
        random.seed(0)
        serve(ArithmeticGrid(reverse=reverse), new_spec(cfg))  # type: ignore[arg-type]
        digests.append(_digest(tmp_path / str(reverse) / "checkpoints" / "last.pt"))
    assert digests[0] == digests[1]


def test_resume_continues_with_identical_weights_and_strategy_state(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    straight = tmp_path / "straight"
    cfg = load_server_config(None, _overrides(straight, 3))
    save_config(cfg)
    serve(ArithmeticGrid(), new_spec(cfg))  # type: ignore[arg-type]

    split = tmp_path / "split"
    cfg = load_server_config(None, _overrides(split, 2))
    save_config(cfg)
    serve(ArithmeticGrid(), new_spec(cfg))  # type: ignore[arg-type]
    assert _digest(split / "checkpoints" / "last.pt") != _digest(straight / "checkpoints" / "last.pt")
    caplog.clear()
    caplog.set_level(logging.INFO, logger="fedseg")
    serve(ArithmeticGrid(), resume_spec(split, ["rounds=3"]))  # type: ignore[arg-type]
    screening = [r.getMessage() for r in caplog.records if "direction check" in r.getMessage()]
    assert screening == ["round 3: direction check skipped: 2 replies within the norm bound (needs 3)"]

    assert _digest(split / "checkpoints" / "last.pt") == _digest(straight / "checkpoints" / "last.pt")
    a, b = load_state(straight / "checkpoints", 3), load_state(split / "checkpoints", 3)
    assert a.moments["m_t"] and a.moments["v_t"]
    assert not any(k.endswith("running_var") for k in a.moments["v_t"])  # BN statistics bypass the optimiser
    assert a.digest() == b.digest()
    assert a.registry["names"] == {"11": "site-11", "12": "site-12"}
    assert sorted(p.name for p in (split / "checkpoints" / "state").iterdir()) == ["round-0002.npz", "round-0003.npz"]


def test_a_nan_site_is_rejected_and_recorded_and_the_model_stays_finite(tmp_path: Path) -> None:
    out = tmp_path / "run"
    cfg = load_server_config(None, ["rounds=2", f"output_dir={out}", "model.feature_scale=64", "min_sites=3"])
    save_config(cfg)
    serve(ArithmeticGrid(rogue=True), new_spec(cfg))  # type: ignore[arg-type]
    rows = read_history(out)
    assert [len(r.sites) for r in rows] == [0, 3, 2]
    assert [(r.site, r.reason) for r in rows[2].rejected] == [
        ("site-13", "weight 'conv1.conv1.0.weight' holds non-finite values")
    ]
    assert rows[2].failures == 1
    assert all(s.update_norm is not None and s.update_norm > 0 for s in rows[2].sites)
    header, *lines = (out / "metrics.csv").read_text().splitlines()
    columns = header.split(",")
    last = dict(zip(columns, lines[-1].split(","), strict=True))
    assert last["rejected"] == "1"
    assert last["rejected_site-13"] == "weight 'conv1.conv1.0.weight' holds non-finite values"
    assert float(last["update_norm_site-11"]) > 0
    assert load_checkpoint(out / "checkpoints" / "last.pt").meta.round == 2


def test_a_run_folder_without_strategy_state_resumes_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "old"
    cfg = load_server_config(None, _overrides(out, 1))
    save_config(cfg)
    serve(ArithmeticGrid(), new_spec(cfg))  # type: ignore[arg-type]
    for path in (out / "checkpoints" / "state").iterdir():
        path.unlink()
    serve(ArithmeticGrid(), resume_spec(out, ["rounds=2"]))  # type: ignore[arg-type]
    assert [r.round for r in read_history(out)] == [0, 1, 2]
    assert any("round-0001.npz" in r.message and "starts afresh" in r.message for r in caplog.records)
