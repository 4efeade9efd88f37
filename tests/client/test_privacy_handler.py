"""The train handler under DP-SGD: ε and δ in the reply, the site's clamps said, the budget's last round refused,
and ε kept across a restarted ClientApp."""

from __future__ import annotations

from pathlib import Path

import pytest
from flwr.app import Context, Message, RecordDict

from fedseg.client.app import train
from fedseg.client.budget import BUDGET_FILE
from fedseg.client.policy import PrivacyPolicy
from fedseg.common.data.preprocess import PreprocessConfig
from fedseg.common.engine.config import TrainConfig
from fedseg.common.fl.offline import from_site, to_site
from fedseg.common.fl.protocol import (
    ARRAYS_KEY,
    CONFIG_KEY,
    FAILURE_KEY,
    METRICS_KEY,
    SITE_KEY,
    TrainTask,
    policy_note,
    task_config,
)
from fedseg.common.fl.weights import arrays_from_model
from fedseg.common.nn.model import ModelConfig, build_model
from fedseg.common.privacy.accounting import epsilon
from fedseg.common.privacy.config import PrivacyConfig
from fedseg.common.privacy.sampling import PoissonCases
from fedseg.server.run.replies import Accepted, check_content
from tests.client.sites import phantom_node_config

GROUP = ModelConfig(feature_scale=64, norm="group")
STEPS = 2


def _task(privacy: PrivacyConfig) -> TrainTask:
    train_cfg = TrainConfig(steps=STEPS, batch_size=1, patch_size=(16, 16, 16), augment=False, lr=1e-2)
    return TrainTask(model=GROUP, train=train_cfg, preprocess=PreprocessConfig(), deadline=600.0, privacy=privacy)


def _send(phantom_root: Path, workdir: Path, task: TrainTask, policy: PrivacyPolicy, server_round: int) -> Message:
    """One train message to a fresh ClientApp process of the phantom site (2 cases) with ``policy``."""
    node_config = phantom_node_config(phantom_root, workdir, privacy=policy)  # type: ignore[arg-type]
    config = task_config(task)
    config["server-round"] = server_round
    content = RecordDict({ARRAYS_KEY: arrays_from_model(build_model(GROUP)), CONFIG_KEY: config})
    context = Context(run_id=server_round, node_id=5, node_config=node_config, state=RecordDict(), run_config={})
    return train(to_site(content, 5), context)


def test_a_dp_round_reports_epsilon_and_the_last_affordable_round_is_the_last(
    phantom_root: Path, tmp_path: Path
) -> None:
    asked = PrivacyConfig(mode="dp-sgd", noise_multiplier=0.5, max_grad_norm=3.0).for_run(5, "/runs/fed-1")
    one, two = (epsilon([(1.0, 0.5, STEPS * k)], 1e-5) for k in (1, 2))
    policy = PrivacyPolicy(min_noise_multiplier=1.0, max_grad_norm=1.0, max_epsilon=(one + two) / 2)
    first = _send(phantom_root, tmp_path, _task(asked), policy, 1)
    metrics = dict(first.content[METRICS_KEY])
    assert abs(float(metrics["epsilon"]) - one) < 1e-9  # the accountant was told q = batch 1 / 2 cases
    assert (metrics["train-loss"], metrics["train-samples"]) == (0.0, STEPS)  # no non-private statistic leaves
    assert metrics["delta"] == 1e-5
    note = "max_grad_norm 3 -> 1 (privacy.max_grad_norm); noise_multiplier 0.5 -> 1 (privacy.min_noise_multiplier)"
    assert policy_note(first.content) == note
    log = (tmp_path / "logs" / "clientapp.log").read_text()
    assert f"site policy lowered the task: {note}" in log
    second = _send(phantom_root, tmp_path, _task(asked), policy, 2)  # a new process: ε comes from the file
    failure = str(second.content[SITE_KEY][FAILURE_KEY])
    assert failure.startswith(f"privacy budget: this round would take the site's epsilon from {one:.3f} to {two:.3f}")
    assert ARRAYS_KEY not in second.content and METRICS_KEY not in second.content
    assert "past its max_epsilon" in (tmp_path / "logs" / "clientapp.log").read_text()
    assert (tmp_path / BUDGET_FILE).is_file()


def test_require_dp_refuses_a_plain_task_and_a_plain_reply_has_no_epsilon(phantom_root: Path, tmp_path: Path) -> None:
    plain = _task(PrivacyConfig())
    refused = _send(phantom_root, tmp_path / "strict", plain, PrivacyPolicy(require_dp=True), 1)
    assert "require_dp" in str(refused.content[SITE_KEY][FAILURE_KEY])
    assert METRICS_KEY not in refused.content
    allowed = _send(phantom_root, tmp_path / "open", plain, PrivacyPolicy(), 1)
    assert not {"epsilon", "delta"} & set(allowed.content[METRICS_KEY])
    assert not (tmp_path / "open" / BUDGET_FILE).exists()


def test_a_batchnorm_model_is_refused_under_dp_in_one_line(phantom_root: Path, tmp_path: Path) -> None:
    task = _task(PrivacyConfig(mode="dp-sgd")).model_copy(update={"model": ModelConfig(feature_scale=64)})
    node_config = phantom_node_config(phantom_root, tmp_path)
    config = task_config(task)
    config["server-round"] = 1
    content = RecordDict({ARRAYS_KEY: arrays_from_model(build_model(task.model)), CONFIG_KEY: config})
    context = Context(run_id=1, node_id=5, node_config=node_config, state=RecordDict(), run_config={})
    reply = train(to_site(content, 5), context)
    assert str(reply.content[SITE_KEY][FAILURE_KEY]).startswith("DP-SGD cannot train model.norm = batch")


def test_a_round_that_drew_no_case_still_replies_and_is_accepted(
    phantom_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(PoissonCases, "draw", lambda self: [])  # every step of noise alone (probability q^0 ...)
    asked = PrivacyConfig(mode="dp-sgd").for_run(5, "/runs/fed-1")
    reply = _send(phantom_root, tmp_path, _task(asked), PrivacyPolicy(), 1)
    assert "loss nan" in (tmp_path / "logs" / "clientapp.log").read_text()  # the site knows; the server need not
    reference = {k: v.numpy() for k, v in reply.content[ARRAYS_KEY].items()}
    checked = check_content(from_site(reply.content, 5), reference, max_examples=10)
    assert isinstance(checked, Accepted) and checked.loss == 0.0 and checked.samples == STEPS


def test_a_client_dp_task_trains_as_without_dp_unless_the_site_requires_patient_level_dp(
    phantom_root: Path, tmp_path: Path
) -> None:
    task = _task(PrivacyConfig(mode="client-dp"))  # the server clips and noises; the site has nothing to add
    trained = _send(phantom_root, tmp_path / "open", task, PrivacyPolicy(), 1)
    assert ARRAYS_KEY in trained.content and not {"epsilon", "delta"} & set(trained.content[METRICS_KEY])
    refused = _send(phantom_root, tmp_path / "strict", task, PrivacyPolicy(require_dp=True), 1)
    assert "require_dp" in str(refused.content[SITE_KEY][FAILURE_KEY])
