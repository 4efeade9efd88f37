"""A site whose local training diverged replies with the reason instead of weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict

from fedseg.client import training as client_training
from fedseg.client.app import train
from fedseg.client.training import TrainingDiverged, train_locally
from fedseg.common.data.preprocess import PreprocessConfig
from fedseg.common.engine.config import TrainConfig
from fedseg.common.engine.train import TrainReport
from fedseg.common.fl.offline import to_site
from fedseg.common.fl.protocol import ARRAYS_KEY, CONFIG_KEY, FAILURE_KEY, SITE_KEY, TrainTask, task_config
from fedseg.common.fl.weights import arrays_from_model
from fedseg.common.nn.model import ModelConfig, build_model
from tests.client.sites import phantom_node_config

TINY = ModelConfig(feature_scale=64)
TASK = TrainTask(
    model=TINY,
    train=TrainConfig(steps=4, patch_size=(16, 16, 16), augment=False, max_skipped_steps=2),
    preprocess=PreprocessConfig(),
    deadline=120.0,
)


def _diverging(skipped: int) -> object:
    def fake(model: torch.nn.Module, cases: object, cfg: TrainConfig, *args: object, **kwargs: object) -> TrainReport:
        return TrainReport(mean_loss=0.5, samples=8, steps=4, seconds=1.0, skipped_steps=skipped)

    return fake


def test_train_locally_raises_only_past_max_skipped_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    arrays = arrays_from_model(build_model(TINY))
    monkeypatch.setattr(client_training, "train_model", _diverging(2))
    _, result = train_locally(arrays, TASK, [], "cpu", seed=0)
    assert result.loss == 0.5
    monkeypatch.setattr(client_training, "train_model", _diverging(3))
    with pytest.raises(TrainingDiverged, match=r"3 of 4 local steps had a non-finite loss or gradient \(max_skipped"):
        train_locally(arrays, TASK, [], "cpu", seed=0)


def test_the_site_log_counts_steps_retried_in_fp32_and_skipped(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    arrays = arrays_from_model(build_model(TINY))

    def fake(model: torch.nn.Module, cases: object, cfg: TrainConfig, *args: object, **kwargs: object) -> TrainReport:
        return TrainReport(mean_loss=0.5, samples=8, steps=4, seconds=1.0, skipped_steps=1, fp32_retries=2)

    monkeypatch.setattr(client_training, "train_model", fake)
    with caplog.at_level("INFO", logger=client_training.__name__):
        train_locally(arrays, TASK, [], "cpu", seed=0)
    assert "trained 4 steps on 0 cases in 1.0 s, mean loss 0.5000, 2 computed again in fp32 (not finite in bf16), " \
        "1 skipped (not finite)" in caplog.text  # fmt: skip


def test_the_handler_replies_with_the_failure_reason(
    phantom_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(client_training, "train_model", _diverging(3))
    node_config = phantom_node_config(phantom_root, tmp_path)
    arrays: ArrayRecord = arrays_from_model(build_model(TINY))
    config: ConfigRecord = task_config(TASK)
    message = to_site(RecordDict({ARRAYS_KEY: arrays, CONFIG_KEY: config}), 5)
    context = Context(run_id=1, node_id=5, node_config=node_config, state=RecordDict(), run_config={})
    reply = train(message, context)
    assert not reply.has_error()
    assert list(reply.content.array_records) == [] and list(reply.content.metric_records) == []
    assert reply.content[SITE_KEY]["name"] == "site-1"
    assert str(reply.content[SITE_KEY][FAILURE_KEY]).startswith("3 of 4 local steps had a non-finite loss")
