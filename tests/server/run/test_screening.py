"""Screening that sees a careful liar: a free-rider's zero update, a near-zero one, BatchNorm statistics raised
within the old combined norm bound, and, with the server's own data, a ×100 site in a federation of two."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord

from fedseg.client.training import train_locally
from fedseg.common.data.manifest import site_manifest
from fedseg.common.data.preprocess import PreprocessConfig
from fedseg.common.data.sitecache import prepare_labelled
from fedseg.common.engine.config import TrainConfig
from fedseg.common.fl.offline import train_reply
from fedseg.common.fl.protocol import TrainTask
from fedseg.common.fl.weights import arrays_from_model
from fedseg.common.nn.model import ModelConfig, build_model
from fedseg.server.config import ServerConfig, StrategyConfig
from fedseg.server.run.lossscreen import LossScreen, masked_cross_entropy, screen_patches
from fedseg.server.run.replies import update_norm
from fedseg.server.run.strategy import RecordingStrategy, build_strategy
from tests.server.run.test_rogue_replies import GLOBAL, FakeGrid, Weights, honest

pytestmark = pytest.mark.usefixtures("task_identity")


def one_round(
    replies: dict[int, Weights], cases: dict[int, int] | None = None, limits: StrategyConfig | None = None, **kw: object
) -> RecordingStrategy:
    limits = limits or StrategyConfig()
    strategy = RecordingStrategy(build_strategy(ServerConfig(min_sites=1)), 1, 1, 1.0, limits=limits, **kw)  # type: ignore[arg-type]
    arrays = ArrayRecord({k: Array(v) for k, v in GLOBAL.items()})
    list(strategy.configure_train(1, arrays, ConfigRecord(), FakeGrid(replies)))  # type: ignore[arg-type]
    counts = cases or {}
    messages = [train_reply(n, w, counts.get(n, 3), site=f"site-{n}") for n, w in replies.items()]
    strategy.aggregate_train(1, messages)
    return strategy


def reasons(strategy: RecordingStrategy) -> dict[str, str]:
    return {r.site: r.reason for r in strategy.stats[1].rejected}


@pytest.mark.parametrize("n_sites", [2, 3])
def test_a_free_rider_sending_back_the_global_model_is_rejected(n_sites: int) -> None:
    replies = {n: honest(n) for n in range(1, n_sites)} | {n_sites: dict(GLOBAL)}
    strategy = one_round(replies, cases={n_sites: 100_000})
    assert reasons(strategy) == {
        f"site-{n_sites}": "the update is zero: the reply is the model it was sent (nothing trained)"
    }


def test_a_near_zero_update_is_rejected_with_three_replies() -> None:
    lazy = {k: (GLOBAL[k] + 1e-4 * (honest(3)[k] - GLOBAL[k])).astype(v.dtype) for k, v in GLOBAL.items()}
    strategy = one_round({1: honest(1), 2: honest(2), 3: lazy})
    assert "is below 0.01 x the round's median" in reasons(strategy)["site-3"]


def test_raised_batchnorm_variances_are_caught_apart_from_the_weights() -> None:
    raised = honest(3)
    raised["bn.running_var"] = raised["bn.running_var"] + 3.0  # the honest weights, every variance raised
    replies = {1: honest(1), 2: honest(2), 3: raised}
    totals = [update_norm(w, GLOBAL) for w in replies.values()]
    assert max(totals) < 10 * float(np.median(totals))  # inside the old combined bound: the attack passed it
    strategy = one_round(replies)
    assert reasons(strategy)["site-3"].startswith("BatchNorm statistics update norm")
    assert [s.site for s in strategy.stats[1].sites] == ["site-1", "site-2"]


def test_masked_cross_entropy_counts_only_the_annotated_classes() -> None:
    logits = torch.zeros(1, 3, 1, 1, 2)
    logits[0, 0, 0, 0, 0] = 10.0  # voxel 0 (background): confidently right
    label = torch.tensor([[[[0, 2]]]])  # voxel 1: class 2, which the site does not annotate
    both = masked_cross_entropy(logits, label, None)
    only_background = masked_cross_entropy(logits, label, (True, True, False))
    expected_voxel0 = float(np.log(1 + 2 * np.exp(-10.0)))
    assert only_background == pytest.approx(expected_voxel0, rel=1e-3)
    assert both == pytest.approx((expected_voxel0 + np.log(3)) / 2, rel=1e-4)


@pytest.fixture(scope="module")
def two_site_setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[LossScreen, TrainTask, list, dict]:  # type: ignore[type-arg]
    from fedseg.common.synthetic.phantoms import generate_phantoms

    root = tmp_path_factory.mktemp("screen") / "data"
    generate_phantoms(root, sites=1, cases_per_site=2, val_cases=1, size=(32, 32, 32))
    pre = PreprocessConfig()

    def cases(folder: Path, role: str) -> list:  # type: ignore[type-arg]
        manifest = site_manifest(folder, str(folder / "labels.toml"))
        return prepare_labelled(folder, manifest, pre, root / "cache" / role, role=role, use="test")

    model_cfg = ModelConfig(feature_scale=16)
    task = TrainTask(
        model=model_cfg,
        train=TrainConfig(steps=4, lr=3e-3, patch_size=(32, 32, 32), augment=False, amp=False),
        preprocess=pre,
        deadline=600.0,
    )
    torch.manual_seed(0)
    glob = {k: a.numpy() for k, a in arrays_from_model(build_model(model_cfg)).items()}
    screen = LossScreen(screen_patches(cases(root / "validation", "v"), (32, 32, 32), 2), build_model(model_cfg), 100.0)
    return screen, task, cases(root / "site-1", "s"), glob


@pytest.mark.parametrize("attack", ["x100", "nan"])
def test_two_sites_with_a_scaled_site_end_on_the_honest_sites_model(two_site_setup: tuple, attack: str) -> None:  # type: ignore[type-arg]
    screen, task, site_cases, glob = two_site_setup
    record = ArrayRecord({k: Array(v) for k, v in glob.items()})
    trained, result = train_locally(record, task, site_cases, "cpu", 0)
    honest_w = {k: a.numpy() for k, a in trained.items()}
    liar = {k: (v * 100).astype(v.dtype) if v.dtype.kind == "f" else v for k, v in honest_w.items()}
    if attack == "nan":
        liar["final.bias"] = np.full_like(honest_w["final.bias"], np.nan)

    def run(loss_screen: LossScreen | None) -> tuple[RecordingStrategy, dict[str, np.ndarray]]:
        strategy = RecordingStrategy(build_strategy(ServerConfig(min_sites=2)), 2, 1, 1.0, loss_screen=loss_screen)
        list(strategy.configure_train(1, record, ConfigRecord(), FakeGrid([1, 2])))  # type: ignore[arg-type]
        replies = [train_reply(1, honest_w, result.cases, site="honest"), train_reply(2, liar, 100_000, site="liar")]
        new, _ = strategy.aggregate_train(1, replies)
        assert new is not None
        return strategy, {k: new[k].numpy() for k in new}

    if attack == "x100":
        _, unscreened = run(None)
        assert max(float(np.abs(v).max()) for v in unscreened.values() if v.dtype.kind == "f") > 2.0  # it fires
    strategy, screened = run(screen)
    assert [r.site for r in strategy.stats[1].rejected] == ["liar"]
    expected = {"x100": "its model's loss on the server's screening data is", "nan": "holds non-finite values"}[attack]
    assert expected in strategy.stats[1].rejected[0].reason
    for key, value in honest_w.items():
        np.testing.assert_allclose(screened[key], value, rtol=0, atol=1e-6, err_msg=key)
    assert strategy.stats[1].sites[0].screen_loss is not None


def test_the_loss_rule_is_hand_computed(two_site_setup: tuple) -> None:  # type: ignore[type-arg]
    screen = two_site_setup[0]
    assert LossScreen.reference([0.7, 13.75, float("inf")]) == 13.75  # upper median of the finite ones
    assert LossScreen.reference([0.7, 0.75, 24.0, 30.0]) == 24.0
    assert screen.problem(200.0, 2.0) is None  # exactly 100 x: kept
    assert screen.problem(250.0, 2.0) == (
        "its model's loss on the server's screening data is 250, 125 x the round's median 2 (max_loss_ratio 100)"
    )
    assert screen.problem(float("inf"), 2.0) == "its model's loss on the server's screening data is not finite"
    assert screen.problem(float("nan"), 2.0) is None  # no voxel of the site's classes: nothing to compare


def test_a_well_calibrated_liar_cannot_get_the_honest_sites_rejected(two_site_setup: tuple) -> None:  # type: ignore[type-arg]
    """A liar whose model has a far lower cross-entropy than the honest, Dice-trained ones: with the best reply as
    the reference, both honest sites were rejected and the liar's model became the global one."""
    screen, task, site_cases, glob = two_site_setup
    record = ArrayRecord({k: Array(v) for k, v in glob.items()})
    honest_states = [
        {k: a.numpy() for k, a in train_locally(record, task, site_cases, "cpu", s)[0].items()} for s in (0, 1)
    ]
    losses = [screen.loss(h) for h in honest_states]
    calibrated = dict(glob)  # the untrained model: uniform-ish, far lower cross-entropy than honest Dice training
    assert screen.loss(calibrated) * 10 < min(losses)  # the attack's premise holds here
    strategy = RecordingStrategy(build_strategy(ServerConfig(min_sites=3)), 3, 1, 1.0, loss_screen=screen)
    list(strategy.configure_train(1, record, ConfigRecord(), FakeGrid([1, 2, 3])))  # type: ignore[arg-type]
    nudged = {k: (v + 1e-3).astype(v.dtype) if v.dtype.kind == "f" else v for k, v in calibrated.items()}
    replies = [
        train_reply(n, w, 2, site=f"site-{n}") for n, w in ((1, honest_states[0]), (2, honest_states[1]), (3, nudged))
    ]
    strategy.aggregate_train(1, replies)
    assert not [r for r in strategy.stats[1].rejected if "screening data" in r.reason]
