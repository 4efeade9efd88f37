"""The server accepts a DP-SGD site's ε and δ in its reply metrics, and nothing half or malformed."""

from __future__ import annotations

import numpy as np
import pytest

from fedseg.common.fl.offline import train_reply
from fedseg.common.fl.protocol import WEIGHT_KEY
from fedseg.server.run.replies import Accepted, Rejected, check_content

WEIGHTS = {"w": np.zeros((2, 2), np.float32)}
BASE = {WEIGHT_KEY: 3, "train-loss": 0.5, "train-samples": 6, "train-seconds": 1.0}


def _check(extra: dict[str, float]) -> Accepted | Rejected:
    return check_content(train_reply(1, WEIGHTS, 3, metrics={**BASE, **extra}), WEIGHTS, max_examples=100)


def test_a_reply_with_epsilon_and_delta_is_accepted() -> None:
    assert isinstance(_check({"epsilon": 2.5, "delta": 1e-5}), Accepted)
    assert isinstance(_check({}), Accepted)


@pytest.mark.parametrize(
    ("extra", "reason"),
    [
        ({"epsilon": 2.5}, "metric keys differ (extra [], missing ['delta'])"),
        ({"epsilon": -1.0, "delta": 1e-5}, "metric epsilon must be a finite number >= 0, got -1.0"),
        ({"epsilon": float("nan"), "delta": 1e-5}, "metric epsilon must be a finite number >= 0, got nan"),
        ({"epsilon": 1.0, "delta": 1e-5, "sigma": 1.0}, "metric keys differ (extra ['sigma'], missing [])"),
    ],
)
def test_half_or_malformed_privacy_metrics_are_rejected(extra: dict[str, float], reason: str) -> None:
    result = _check(extra)
    assert isinstance(result, Rejected) and result.reason == reason
