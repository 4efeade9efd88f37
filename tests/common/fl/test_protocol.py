"""The train-message contract: task encoding, FedProx μ, per-round seeds, reply layout."""

from __future__ import annotations

import pytest
from flwr.app import ArrayRecord, ConfigRecord

from fedseg.common.data.preprocess import PreprocessConfig
from fedseg.common.engine.config import TrainConfig
from fedseg.common.errors import ConfigError
from fedseg.common.fl.protocol import LocalResult, TrainTask, read_task, reply_content, round_seed, task_config
from fedseg.common.nn.model import ModelConfig

TASK = TrainTask(model=ModelConfig(), train=TrainConfig(steps=3), preprocess=PreprocessConfig(), deadline=60.0)


def test_task_round_trips_with_round_and_mu() -> None:
    config = task_config(TASK)
    task, server_round = read_task(config)
    assert task == TASK and server_round == 0
    config["server-round"] = 4
    config["proximal-mu"] = 0.01
    task, server_round = read_task(config)
    assert server_round == 4
    assert task.train.prox_mu == 0.01
    assert task.train.steps == 3
    resumed = TASK.model_copy(update={"round_offset": 10})
    config = task_config(resumed)
    config["server-round"] = 2
    assert read_task(config) == (resumed, 12)
    older = ConfigRecord({"fedseg-task": TASK.model_dump_json(exclude={"packed"})})  # a server before packing
    assert read_task(older)[0].packed is False


def test_missing_or_invalid_task_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="train message has no 'fedseg-task'"):
        read_task(ConfigRecord({"server-round": 1}))
    with pytest.raises(ConfigError, match=r"train task from the server is invalid \(deadline: Field required\)"):
        read_task(ConfigRecord({"fedseg-task": TASK.model_dump_json(exclude={"deadline"})}))


def test_round_seed_is_stable_and_differs_per_round_and_site() -> None:
    assert round_seed(0, 1, "a") == round_seed(0, 1, "a")
    seeds = {round_seed(0, r, s) for r in (1, 2) for s in ("a", "b")}
    assert len(seeds) == 4
    assert all(0 <= s < 2**31 for s in seeds)


def test_reply_content_layout() -> None:
    content = reply_content(ArrayRecord(), LocalResult(cases=3, loss=0.5, samples=12, seconds=2.0), "site-9")
    assert dict(content["metrics"]) == {
        "num-examples": 3,
        "train-loss": 0.5,
        "train-samples": 12,
        "train-seconds": 2.0,
    }
    assert content["site"]["name"] == "site-9"
    assert list(content.array_records) == ["arrays"]
