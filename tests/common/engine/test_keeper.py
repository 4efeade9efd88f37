"""Keeping last.pt and best.pt by score; non-finite models are never written."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from fedseg.common.data.preprocess import PreprocessConfig
from fedseg.common.engine.checkpoint import CheckpointMeta, load_checkpoint, read_meta
from fedseg.common.engine.keeper import CheckpointKeeper, is_better, last_round, stored_score
from fedseg.common.nn.model import ModelConfig, build_model

TINY = ModelConfig(feature_scale=64)


@pytest.mark.parametrize(
    ("score", "best", "expected"),
    [
        (0.5, None, True),
        (0.5, 0.4, True),
        (0.4, 0.5, False),
        (0.5, 0.5, False),
        (math.nan, None, False),
        (None, None, False),
    ],
)
def test_is_better(score: float | None, best: float | None, expected: bool) -> None:
    assert is_better(score, best) is expected


def _meta(round_: int, dice: float | None) -> CheckpointMeta:
    return CheckpointMeta(
        model=TINY,
        class_names=("background", "pancreas", "spleen", "kidney", "liver"),
        preprocess=PreprocessConfig(),
        patch_size=(16, 16, 16),
        config_hash="0" * 16,
        seed=0,
        metrics={} if dice is None else {"dice_mean": dice},
        score=dice,
        round=round_,
    )


def test_last_follows_every_round_and_best_only_improvements(tmp_path: Path) -> None:
    model = build_model(TINY)
    keeper = CheckpointKeeper(tmp_path)
    flags = []
    for round_, dice in enumerate([None, 0.2, 0.5, 0.3], start=0):
        with torch.no_grad():
            next(model.parameters()).fill_(float(round_))
        flags.append(keeper.save(model, _meta(round_, dice)))
    assert flags == [False, True, True, False]
    assert last_round(tmp_path) == 3
    assert read_meta(keeper.best_path).round == 2
    assert stored_score(keeper.best_path) == 0.5
    best = load_checkpoint(keeper.best_path, expect=TINY).model
    assert float(next(best.parameters()).detach().flatten()[0]) == 2.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "last.pt"]


def test_a_resumed_keeper_must_beat_the_stored_best(tmp_path: Path) -> None:
    model = build_model(TINY)
    CheckpointKeeper(tmp_path).save(model, _meta(1, 0.6))
    resumed = CheckpointKeeper(tmp_path)
    assert resumed.best == 0.6
    assert not resumed.save(model, _meta(2, 0.55))
    assert resumed.save(model, _meta(3, 0.7))
    assert last_round(tmp_path) == 3


def test_empty_folder_has_no_round_and_no_score(tmp_path: Path) -> None:
    assert last_round(tmp_path) is None
    assert stored_score(tmp_path / "best.pt") is None


def test_a_non_finite_model_is_never_written(tmp_path: Path) -> None:
    model = build_model(TINY)
    keeper = CheckpointKeeper(tmp_path)
    keeper.save(model, _meta(1, 0.4))
    before = (tmp_path / "last.pt").read_bytes()
    for bad in (math.nan, math.inf):
        with torch.no_grad():
            next(model.parameters()).view(-1)[0] = bad
        assert not keeper.save(model, _meta(2, 0.9))
    assert (tmp_path / "last.pt").read_bytes() == before
    assert last_round(tmp_path) == 1
    assert stored_score(keeper.best_path) == 0.4
