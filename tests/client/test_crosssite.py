"""Cross-site validation at a site: aggregates by hand (prediction patched), and the evaluate handler."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from flwr.app import Context, RecordDict
from flwr.common.config import parse_config_args

from fedseg.client import crosssite
from fedseg.client.app import evaluate
from fedseg.client.crosssite import score_cases
from fedseg.client.site import write_node_config
from fedseg.common.data.preprocess import Grid, PreparedCase, SourceGeometry
from fedseg.common.fl.protocol import METRICS_KEY, SITE_KEY, read_scores, task_config
from fedseg.common.fl.weights import arrays_from_model
from fedseg.common.nn.model import build_model
from tests.client.test_app_handlers import TASK, TINY, _site, _train_message

GRID = Grid((8, 8, 8), (2.0, 2.0, 2.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))


def _case(name: str, label: np.ndarray, annotated: tuple[bool, ...]) -> PreparedCase:
    return PreparedCase(name, np.zeros((8, 8, 8), np.float32), label, annotated, SourceGeometry(GRID, GRID))


def _blocks(*classes: int) -> np.ndarray:
    label = np.zeros((8, 8, 8), np.uint8)
    if 1 in classes:
        label[1:3, 1:3, 1:3] = 1
    if 2 in classes:
        label[5:7, 5:7, 5:7] = 2
    return label


def test_scores_by_hand(monkeypatch: pytest.MonkeyPatch) -> None:
    both = (True, True, True, False, False)  # pancreas and spleen annotated, kidney and liver not
    cases = [
        _case("perfect", _blocks(1, 2), both),
        _case("misses-spleen", _blocks(1, 2), both),
        _case("pancreas-only-site", _blocks(1), (True, True, False, False, False)),
    ]
    predictions = {"perfect": _blocks(1, 2), "misses-spleen": _blocks(1), "pancreas-only-site": _blocks(1, 2)}
    order = iter(predictions.values())
    monkeypatch.setattr(
        crosssite, "sliding_window_predict", lambda model, image, patch, device: SimpleNamespace(labels=next(order))
    )

    scored = score_cases(torch.nn.Identity(), cases, (16, 16, 16), "cpu")
    assert scored.cases == 3
    scores = scored.scores
    # pancreas: perfect in all three cases. spleen: scored on the first two only (the third does not annotate it,
    # so its predicted spleen is not held against the model): Dice 1 and 0 -> mean 0.5, sd sqrt(0.5).
    assert scores["dice-pancreas-mean"] == 1.0 and scores["dice-pancreas-n"] == 3 and scores["dice-pancreas-sd"] == 0
    assert scores["dice-spleen-mean"] == 0.5 and scores["dice-spleen-n"] == 2
    assert scores["dice-spleen-sd"] == pytest.approx(math.sqrt(0.5))
    # HD95 exists only where both masks have voxels: spleen once (0 mm), so no sd is sent.
    assert scores["hd95-spleen-mean"] == 0.0 and scores["hd95-spleen-n"] == 1 and "hd95-spleen-sd" not in scores
    assert not any("kidney" in k or "liver" in k for k in scores)
    table = read_scores(scores)
    assert table["spleen"]["dice"] == {"mean": 0.5, "sd": pytest.approx(math.sqrt(0.5)), "n": 2.0}


def test_evaluate_handler_replies_with_aggregates_only(phantom_root: Path, tmp_path: Path) -> None:
    site = _site(phantom_root, tmp_path)
    node_config = parse_config_args([str(write_node_config(site, tmp_path / "node.toml"))])
    config = task_config(TASK)
    config["server-round"] = 2
    torch.manual_seed(0)
    message = _train_message(arrays_from_model(build_model(TINY)), config)
    context = Context(run_id=1, node_id=5, node_config=node_config, state=RecordDict(), run_config={})
    reply = evaluate(message, context)
    assert not reply.has_error()
    assert len(reply.content.array_records) == 0  # no weights, images or labels go back
    metrics = dict(reply.content[METRICS_KEY])
    assert metrics["num-examples"] == 2
    organs = read_scores(metrics)  # type: ignore[arg-type]
    assert set(organs) == {"pancreas", "spleen", "kidney", "liver"}
    assert all(organs[o]["dice"]["n"] <= 2 for o in organs)
    assert reply.content[SITE_KEY]["name"] == "site-1"
    assert "cross-site scores of the global model on 2 cases" in (tmp_path / "logs" / "clientapp.log").read_text()
