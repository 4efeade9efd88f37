"""``bn = "local"`` (FedBN) at a site: its own BatchNorm is kept in ``context.state`` across rounds, laid over the
received global weights, used for cross-site scoring, and never sent (the reply carries the received BatchNorm)."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Context, MessageType, RecordDict
from flwr.common.config import parse_config_args

from fedseg.client import app as client_app
from fedseg.client import training as client_training
from fedseg.client.crosssite import Scores
from fedseg.client.localbn import LOCAL_BN_KEY, keep_own, own_start, shared_only
from fedseg.client.site import load_training_cases, write_node_config
from fedseg.client.training import train_locally
from fedseg.common.data.preprocess import PreprocessConfig
from fedseg.common.fl.batchnorm import batchnorm_keys
from fedseg.common.fl.offline import to_site
from fedseg.common.fl.packing import pack_arrays, unpacked
from fedseg.common.fl.protocol import ARRAYS_KEY, CONFIG_KEY, task_config
from fedseg.common.fl.weights import arrays_from_model, decode_arrays, encode_arrays
from fedseg.common.nn.model import build_model
from tests.client.test_app_handlers import TASK as HANDLER_TASK
from tests.client.test_app_handlers import TINY, _site

TASK = HANDLER_TASK.model_copy(update={"bn": "local", "train": HANDLER_TASK.train.model_copy(update={"steps": 1})})


def _record(values: dict[str, float]) -> ArrayRecord:
    return ArrayRecord(OrderedDict((k, Array(np.full(2, v, np.float32))) for k, v in values.items()))


def _np(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: record[k].numpy() for k in record}


def test_the_merge_keeps_the_sites_batchnorm_and_takes_the_rest_from_the_global_model() -> None:
    keys = {"c.weight": 0.0, "n.weight": 0.0, "n.bias": 0.0, "n.running_mean": 0.0, "n.running_var": 0.0}
    state = RecordDict()
    round1 = _record({k: 1.0 for k in keys})
    assert own_start(round1, state) is round1  # round 1: nothing kept, the global BatchNorm
    keep_own(_record({k: 2.0 for k in keys}), state)  # trained: every entry 2
    assert set(state[LOCAL_BN_KEY]) == {"n.weight", "n.bias", "n.running_mean", "n.running_var"}
    start = _np(own_start(_record({k: 3.0 for k in keys}), state))  # round 2's global: every entry 3
    assert {k: float(v[0]) for k, v in start.items()} == {
        "c.weight": 3.0,
        "n.weight": 2.0,
        "n.bias": 2.0,
        "n.running_mean": 2.0,
        "n.running_var": 2.0,
    }
    sent = _np(shared_only(_record({k: 4.0 for k in keys}), _record({k: 3.0 for k in keys})))
    assert {k: float(v[0]) for k, v in sent.items()} == {"c.weight": 4.0, **{k: 3.0 for k in keys if k[0] == "n"}}


def test_kept_batchnorm_that_does_not_fit_falls_back_to_the_global_one() -> None:
    state = RecordDict({LOCAL_BN_KEY: _record({"other.running_mean": 2.0})})
    received = _record({"n.running_mean": 1.0, "n.weight": 1.0})
    assert own_start(received, state) is received


def test_two_rounds_train_from_the_sites_own_batchnorm_and_send_only_the_global_one(
    phantom_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    starts: list[dict[str, torch.Tensor]] = []
    real = client_training.train_model

    def spy(model: torch.nn.Module, *args: object, **kwargs: object) -> object:
        starts.append({k: v.clone() for k, v in model.state_dict().items()})
        return real(model, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(client_training, "train_model", spy)
    cases = load_training_cases(_site(phantom_root, tmp_path), PreprocessConfig())
    torch.manual_seed(0)
    received = arrays_from_model(build_model(TINY))
    bn = batchnorm_keys(received)
    state = RecordDict()  # Flower hands the same context.state to the next message's ClientApp

    reply, _ = train_locally(received, TASK, cases, "cpu", seed=1, state=state)
    kept = _np(state[LOCAL_BN_KEY])
    assert set(kept) == bn
    for key in bn:  # round 1 started from the global BatchNorm; the reply carries it unchanged
        np.testing.assert_array_equal(starts[0][key].numpy(), received[key].numpy())
        np.testing.assert_array_equal(reply[key].numpy(), received[key].numpy())
    assert not np.array_equal(kept["conv1.conv1.1.running_mean"], received["conv1.conv1.1.running_mean"].numpy())
    assert not np.array_equal(reply["conv1.conv1.0.weight"].numpy(), received["conv1.conv1.0.weight"].numpy())

    torch.manual_seed(1)
    round2 = arrays_from_model(build_model(TINY))  # another global model, its BatchNorm included
    half = TASK.model_copy(update={"packed": True, "transport": "fp16"})  # round 2 arrives packed, in fp16
    packed2, _ = train_locally(pack_arrays(encode_arrays(round2, "fp16")), half, cases, "cpu", seed=2, state=state)
    reply2 = decode_arrays(unpacked(packed2, {k: round2[k].numpy() for k in round2}, "fp16"), "fp16")
    round2 = decode_arrays(encode_arrays(round2, "fp16"), "fp16")  # what the site received
    for key in bn:  # round 2 started from the site's own BatchNorm, not the new global one
        np.testing.assert_array_equal(starts[1][key].numpy(), kept[key])
        np.testing.assert_array_equal(reply2[key].numpy(), round2[key].numpy())
    np.testing.assert_array_equal(starts[1]["conv1.conv1.0.weight"].numpy(), round2["conv1.conv1.0.weight"].numpy())

    pooled, _ = train_locally(round2, TASK.model_copy(update={"bn": "pooled"}), cases, "cpu", seed=2, state=state)
    np.testing.assert_array_equal(starts[2]["conv1.conv1.1.weight"].numpy(), round2["conv1.conv1.1.weight"].numpy())
    assert not np.array_equal(pooled["conv1.conv1.1.weight"].numpy(), round2["conv1.conv1.1.weight"].numpy())


def test_cross_site_scoring_uses_the_sites_own_batchnorm(
    phantom_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    scored: list[dict[str, torch.Tensor]] = []

    def fake_score(model: torch.nn.Module, *args: object) -> Scores:
        scored.append(model.state_dict())
        return Scores({"dice-liver-n": 0}, 2)

    monkeypatch.setattr(client_app, "score_cases", fake_score)
    site = _site(phantom_root, tmp_path)
    node_config = parse_config_args([str(write_node_config(site, tmp_path / "node.toml"))])
    received = arrays_from_model(build_model(TINY))
    own = {k: Array(received[k].numpy() + 1) for k in batchnorm_keys(received) if k.endswith("running_var")}
    state = RecordDict({LOCAL_BN_KEY: ArrayRecord(OrderedDict(own))})
    content = RecordDict({ARRAYS_KEY: received, CONFIG_KEY: task_config(TASK)})
    message = to_site(content, 5, MessageType.EVALUATE)
    context = Context(run_id=1, node_id=5, node_config=node_config, state=state, run_config={})
    client_app.evaluate(message, context)
    var = "conv1.conv1.1.running_var"
    np.testing.assert_array_equal(scored[0][var].numpy(), received[var].numpy())  # kept set does not fit: global
    keep_own(arrays_from_model(build_model(TINY)), state)
    state[LOCAL_BN_KEY][var] = Array(np.full_like(received[var].numpy(), 7.0))
    client_app.evaluate(message, context)
    np.testing.assert_array_equal(scored[1][var].numpy(), np.full_like(received[var].numpy(), 7.0))
    content[ARRAYS_KEY] = pack_arrays(received)  # the same model, packed
    client_app.evaluate(to_site(content, 5, MessageType.EVALUATE), context)
    for key, value in scored[1].items():
        np.testing.assert_array_equal(scored[2][key].numpy(), value.numpy())
