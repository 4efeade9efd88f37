"""The site policy's caps on what makes a task expensive: the patch, the network, the target spacing and cross-site
scoring are refused, the deadline and the batch clamped; the default federation passes all of them unchanged.

Every refusal is checked against the policy before these caps (``OLD``: steps and batch only), which took the
attack task as it came: a server asked for a 512³ patch, feature scale 1, 0.1 mm and a deadline of 1e9 s.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from flwr.app import Context, RecordDict

from fedseg.client import training as client_training
from fedseg.client.app import evaluate
from fedseg.client.policy import SitePolicy, parameter_count
from fedseg.common.data.preprocess import PreprocessConfig
from fedseg.common.engine.config import TrainConfig
from fedseg.common.fl.protocol import FAILURE_KEY, METRICS_KEY, SITE_KEY, TrainTask, policy_note, task_config
from fedseg.common.fl.weights import arrays_from_model
from fedseg.common.nn.model import ModelConfig, build_model, count_parameters
from fedseg.server.config import RunSpec, ServerConfig
from fedseg.server.control.demo import DEMO_SETTINGS
from fedseg.server.run.loop import train_task
from tests.client.sites import phantom_node_config
from tests.client.test_app_handlers import _train_message
from tests.client.test_policy import TINY, _run_handler, _task

#: What the policy allowed before these caps: no patch, network, spacing, deadline or batch limit at all.
OLD = SitePolicy(
    max_batch=10**9, max_deadline=1e12, max_patch_voxels=10**12, max_parameters=10**15, min_spacing_mm=1e-9
)
ATTACK = TrainTask(
    model=ModelConfig(feature_scale=1),
    train=TrainConfig(steps=250, batch_size=2, patch_size=(512, 512, 512)),
    preprocess=PreprocessConfig(target_spacing=(0.1, 0.1, 0.1)),
    deadline=1e9,
)


def _one_expensive(field: str) -> TrainTask:
    """The default task with only ``field`` as the attack asks for it."""
    task = TrainTask(model=ModelConfig(), train=TrainConfig(), preprocess=PreprocessConfig(), deadline=3600.0)
    part = {"patch": "train", "model": "model", "spacing": "preprocess"}[field]
    return task.model_copy(update={part: getattr(ATTACK, part)})


@pytest.mark.parametrize(
    ("field", "reason"),
    [
        ("patch", "patch 512x512x512 is 134217728 voxels (max_patch_voxels 4194304)"),
        (
            "model",
            "the attention-unet (feature_scale 1, 1 channels in, 5 classes) has 103458947 parameters "
            "(max_parameters 10000000)",
        ),
        ("spacing", "target spacing 0.1 mm is finer than min_spacing_mm 0.5"),
    ],
)
def test_each_refusing_cap_refuses_its_part_of_the_attack_which_the_old_policy_ran(field: str, reason: str) -> None:
    task = _one_expensive(field)
    review = SitePolicy().review(task)
    assert review.refusal == f"the site policy refuses the task: {reason}"
    assert SitePolicy().review(task, evaluate=True).refusal == review.refusal  # cross-site scoring too
    assert OLD.review(task).refusal is None and OLD.review(task).task == task  # the old policy took it as it came


def test_the_deadline_and_the_batch_are_clamped_not_refused() -> None:
    task = _task(steps=5, batch=64).model_copy(update={"deadline": 1e9})
    review = SitePolicy().review(task)
    assert review.refusal is None
    assert review.notes == ("batch 64 -> 4 (max_batch)", "deadline 1e+09 s -> 7200 s (max_deadline)")
    assert (review.task.train.batch_size, review.task.deadline) == (4, 7200.0)
    assert (review.seconds, review.limit) == (7200.0, "deadline 7200 s")  # the watchdog's budget
    capped = SitePolicy(max_seconds=900).review(task)
    assert (capped.seconds, capped.limit) == (900.0, "max_seconds 900")
    assert SitePolicy().review(task, evaluate=True).notes == ("deadline 1e+09 s -> 7200 s (max_deadline)",)
    assert OLD.review(task).notes == () and OLD.review(task).seconds == 1e9  # a ClientApp for 31 years


def test_the_default_federation_and_the_demo_pass_unchanged() -> None:
    for cfg in (ServerConfig(), ServerConfig.model_validate(DEMO_SETTINGS)):
        task = train_task(RunSpec(config=cfg))
        for evaluating in (False, True):
            review = SitePolicy().review(task, evaluate=evaluating)
            assert (review.task, review.notes, review.refusal) == (task, (), None)


def test_the_parameter_count_is_exact_and_allocates_nothing() -> None:
    for cfg in (ModelConfig(), ModelConfig(arch="unet", feature_scale=16, n_classes=14, in_channels=2)):
        assert parameter_count(cfg) == count_parameters(build_model(cfg))
    assert parameter_count(ModelConfig(n_classes=10**9)) is None  # 4e18 weights in the head: not even shapes
    refusal = SitePolicy().review(_task(1, 1).model_copy(update={"model": ModelConfig(n_classes=10**9)})).refusal
    assert refusal is not None and "cannot be sized (max_parameters 10000000)" in refusal


def test_the_attack_is_refused_before_any_work_and_the_site_says_why(
    phantom_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_cases(*args: object) -> None:
        raise AssertionError("a refused task must not preprocess")

    monkeypatch.setattr("fedseg.client.app.load_training_cases", no_cases)
    reply, reports = _run_handler(phantom_root, tmp_path, monkeypatch, ATTACK)
    assert reports == [] and not reply.has_error() and list(reply.content.array_records) == []
    failure = str(reply.content[SITE_KEY][FAILURE_KEY])
    assert failure.startswith("the site policy refuses the task: patch 512x512x512 is 134217728 voxels")
    assert "has 103458947 parameters" in failure and "0.1 mm is finer than min_spacing_mm 0.5" in failure
    assert "\n" not in failure
    assert policy_note(reply.content).startswith("deadline 1e+09 s -> 7200 s (max_deadline); the site policy refuses")
    log_text = (tmp_path / "logs" / "clientapp.log").read_text()
    assert f"site site-1 round 2: {failure}; replying with the reason" in log_text
    events = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert any(e["kind"] == "policy" and failure in e["note"] for e in events)  # join's terminal says it too
    assert next(e for e in events if e["kind"] == "round_end")["ok"] is False


def test_a_site_may_refuse_cross_site_scoring(phantom_root: Path, tmp_path: Path) -> None:
    node_config = phantom_node_config(phantom_root, tmp_path, cross_site=False)
    config = task_config(_task(1, 1))
    context = Context(run_id=1, node_id=5, node_config=node_config, state=RecordDict(), run_config={})
    reply = evaluate(_train_message(arrays_from_model(build_model(TINY)), config), context)
    assert not reply.has_error() and METRICS_KEY not in reply.content
    reason = "the site policy refuses the task: this site does not score models for other sites (cross_site = false)"
    assert reply.content[SITE_KEY][FAILURE_KEY] == reason


def test_the_time_limit_covers_preparing_the_cases_of_cross_site_scoring(phantom_root: Path, tmp_path: Path) -> None:
    node_config = phantom_node_config(phantom_root, tmp_path, max_seconds=1e-3)
    context = Context(run_id=1, node_id=5, node_config=node_config, state=RecordDict(), run_config={})
    reply = evaluate(_train_message(arrays_from_model(build_model(TINY)), task_config(_task(1, 1))), context)
    assert METRICS_KEY not in reply.content
    failure = str(reply.content[SITE_KEY][FAILURE_KEY])
    assert failure.startswith("stopped by the site's time limit (max_seconds 0.001) after ")
    assert failure.endswith("s, while preparing the cases")


def test_cross_site_scoring_stops_between_cases_at_the_time_limit(phantom_root: Path, tmp_path: Path) -> None:
    from fedseg.client.crosssite import score_cases
    from fedseg.client.site import SiteConfig, load_training_cases

    site = SiteConfig(site="s", data=phantom_root / "site-1", workdir=tmp_path)
    site = site.model_copy(update={"labels": str(phantom_root / "site-1" / "labels.toml")})
    cases = load_training_cases(site, PreprocessConfig())
    torch.manual_seed(0)
    model = build_model(TINY)
    assert score_cases(model, cases, (16, 16, 16), "cpu").cases == 2
    assert score_cases(model, cases, (16, 16, 16), "cpu", time_limit=0.0).cases == 1  # the first always runs


def test_train_locally_under_an_exhausted_budget_does_not_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(client_training, "train_model", lambda *a, **k: pytest.fail("training started"))
    watchdog = client_training.Watchdog(1.0, "max_seconds 1", started=0.0)  # arrived long ago
    with pytest.raises(client_training.BudgetExceeded, match=r"\(max_seconds 1\)"):
        client_training.train_locally(
            arrays_from_model(build_model(TINY)), _task(1, 1), [], "cpu", 0, watchdog=watchdog
        )
