"""Central validation overlapped with the next round: the round goes on at once, rows still come in round order."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord
from torch import nn

from fedseg.common.engine.keeper import CheckpointKeeper
from fedseg.common.fl.weights import arrays_from_model
from fedseg.common.nn.model import ModelConfig, build_model
from fedseg.server.config import RunSpec, ServerConfig
from fedseg.server.run.history import History, read_history
from fedseg.server.run.loop import RoundEvaluator
from fedseg.server.run.overlap import Background
from fedseg.server.run.state import StrategyState, load_state
from fedseg.server.run.strategy import RoundStats

TINY = ModelConfig(feature_scale=16)


class BlockingValidator:
    """Scores the model's first weight (so each round's model is recognisable) once released."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.started = threading.Event()
        self.seen: list[float] = []

    def __call__(self, model: nn.Module) -> dict[str, float]:
        self.started.set()
        assert self.release.wait(60)
        first = float(next(iter(model.parameters())).detach().flatten()[0])
        self.seen.append(first)
        return {"mean": 0.5}


def _evaluator(
    tmp_path: Path, validator: BlockingValidator, background: Background | None, strategy_round: dict[str, int]
) -> RoundEvaluator:
    """A round evaluator whose strategy state names ``strategy_round["value"]`` at the moment it is taken."""
    spec = RunSpec(config=ServerConfig(model=TINY, output_dir=tmp_path / "run"))

    def state(global_round: int) -> StrategyState:
        return StrategyState(round=global_round, registry={"names": {"1": f"as of {strategy_round['value']}"}})

    evaluator = RoundEvaluator(
        spec,
        build_model(TINY),
        validator,  # type: ignore[arg-type]
        CheckpointKeeper(tmp_path / "run" / "checkpoints"),
        History(tmp_path / "run"),
        {1: RoundStats(sampled=3), 2: RoundStats(sampled=2)},
        state,
        background,
    )
    return evaluator


def _weights(value: float) -> ArrayRecord:
    torch.manual_seed(0)
    model = build_model(TINY)
    with torch.no_grad():
        next(iter(model.parameters())).fill_(value)
    return arrays_from_model(model)


def test_the_round_goes_on_while_it_is_scored_and_rows_keep_their_round(tmp_path: Path) -> None:
    validator = BlockingValidator()
    background = Background()
    strategy_round = {"value": 0}
    evaluator = _evaluator(tmp_path, validator, background, strategy_round)
    try:
        assert evaluator(1, _weights(1.0)) is None  # returned while validation blocks
        assert validator.started.wait(60)
        strategy_round["value"] = 2  # the strategy moves on (round 2)
        assert evaluator(2, _weights(2.0)) is None
        assert read_history(tmp_path / "run") == []  # nothing recorded yet: both rounds still being scored
        validator.release.set()
        background.drain()
    finally:
        background.close()
    rows = read_history(tmp_path / "run")
    assert [r.round for r in rows] == [1, 2]
    assert validator.seen == [1.0, 2.0]  # each round scored with its own weights
    assert [r.dice["mean"] for r in rows] == [0.5, 0.5]
    state = load_state(tmp_path / "run" / "checkpoints", 1)  # the state as it was when round 1 ended
    assert state.round == 1 and state.registry == {"names": {"1": "as of 0"}}


def test_without_a_worker_the_row_is_written_before_the_call_returns(tmp_path: Path) -> None:
    validator = BlockingValidator()
    validator.release.set()
    evaluator = _evaluator(tmp_path, validator, None, {"value": 0})
    result = evaluator(1, _weights(1.0))
    assert result is not None and result["mean"] == 0.5
    assert [r.round for r in read_history(tmp_path / "run")] == [1]


def test_a_failed_job_fails_the_run_at_the_next_submit_or_at_drain() -> None:
    background = Background()
    done: list[int] = []

    def fail() -> None:
        raise RuntimeError("validation broke")

    background.submit(fail)
    with pytest.raises(RuntimeError, match="validation broke"):
        background.drain()
    background.submit(fail)
    finished = threading.Event()
    background.submit(finished.set)
    assert finished.wait(60)  # the failed job has run by now (jobs run in order)
    with pytest.raises(RuntimeError, match="validation broke"):
        background.submit(lambda: done.append(1))
    background.drain()
    background.close()
    assert done == []
