"""``bn = "local"`` (FedBN) at the server: BatchNorm tensors (γ, β, running statistics) keep the incoming global values,
everything else is aggregated as usual; ``bn = "pooled"`` still pools them."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message

from fedseg.common.fl.batchnorm import batchnorm_keys
from fedseg.common.fl.protocol import read_task, task_config
from fedseg.common.nn.model import ModelConfig, build_model
from fedseg.server.config import RunSpec, ServerConfig, StrategyConfig
from fedseg.server.run.loop import train_task
from fedseg.server.run.strategy import RecordingStrategy, build_strategy
from tests.server.run.test_strategy import FakeGrid

pytestmark = pytest.mark.usefixtures("task_identity")

GLOBAL = {
    "conv.weight": np.ones((2, 3), np.float32),
    "conv.bias": np.zeros(2, np.float32),
    "bn.weight": np.ones(3, np.float32),
    "bn.bias": np.zeros(3, np.float32),
    "bn.running_mean": np.zeros(3, np.float32),
    "bn.running_var": np.ones(3, np.float32),
    "bn.num_batches_tracked": np.array(4, np.int64),
}
BN = ("bn.weight", "bn.bias", "bn.running_mean", "bn.running_var", "bn.num_batches_tracked")


def _site(value: float) -> dict[str, np.ndarray]:
    """Every floating-point entry ``value`` (a site's BatchNorm far from the global one), step count 9."""
    out = {k: np.full_like(v, value) for k, v in GLOBAL.items()}
    out["bn.num_batches_tracked"] = np.array(9, np.int64)
    return out


def _round(bn: str, name: str, reply: Callable[..., Message]) -> dict[str, np.ndarray]:
    cfg = ServerConfig(min_sites=3, strategy=StrategyConfig(name=name, bn=bn))  # type: ignore[arg-type]
    strategy = RecordingStrategy(build_strategy(cfg), 3, 1, 1.0, limits=cfg.strategy)
    arrays = ArrayRecord({k: Array(v) for k, v in GLOBAL.items()})
    list(strategy.configure_train(1, arrays, ConfigRecord(), FakeGrid([1, 2, 3])))  # type: ignore[arg-type]
    replies = [reply(n, _site(v), cases=c, site=f"s{n}") for n, v, c in ((1, 2.0, 1), (2, 6.0, 3), (3, 4.0, 2))]
    out, _ = strategy.aggregate_train(1, replies)
    assert out is not None
    return {k: out[k].numpy() for k in out}


def test_the_model_has_batchnorm_keys_and_only_those_are_named() -> None:
    keys = build_model(ModelConfig(feature_scale=16)).state_dict()
    bn = batchnorm_keys(keys)
    assert len(bn) == 28 * 5  # 28 BatchNorm3d layers, five entries each
    assert "conv1.conv1.1.weight" in bn and "conv1.conv1.0.weight" not in bn  # BN γ yes, the conv before it no
    assert batchnorm_keys(GLOBAL) == set(BN)


@pytest.mark.parametrize("name", ["fedavg", "fedadam", "median"])
def test_local_bn_keeps_the_global_batchnorm_and_aggregates_the_rest(name: str, reply: Callable[..., Message]) -> None:
    out = _round("local", name, reply)
    for key in BN:
        np.testing.assert_array_equal(out[key], GLOBAL[key], err_msg=key)
        assert out[key].dtype == GLOBAL[key].dtype
    if name == "fedavg":  # (1·2 + 3·6 + 2·4) / 6 = 28/6
        np.testing.assert_allclose(out["conv.weight"], np.full((2, 3), 28 / 6), rtol=1e-6)
    elif name == "median":
        np.testing.assert_array_equal(out["conv.bias"], np.full(2, 4.0))
    else:
        assert (out["conv.weight"] > 1).all()  # the server optimiser moved the rest towards the sites


def test_pooled_bn_still_pools_the_sites_batchnorm(reply: Callable[..., Message]) -> None:
    out = _round("pooled", "fedavg", reply)
    np.testing.assert_allclose(out["bn.weight"], np.full(3, 28 / 6), rtol=1e-6)  # γ is FedAvg-ed
    np.testing.assert_allclose(out["bn.running_mean"], np.full(3, 28 / 6), rtol=1e-6)
    assert int(out["bn.num_batches_tracked"]) == 9


def test_the_train_task_tells_the_sites_the_mode() -> None:
    spec = RunSpec(config=ServerConfig(strategy=StrategyConfig(bn="local")))
    task, _ = read_task(task_config(train_task(spec)))
    assert task.bn == "local"
    assert read_task(task_config(train_task(RunSpec(config=ServerConfig()))))[0].bn == "pooled"
