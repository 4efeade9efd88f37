"""Helpers for server tests: Flower messages built without a running Flower runtime."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Error, Message

from fedseg.common.fl.offline import from_site, train_reply


def error_reply(node: int, reason: str = "boom") -> Message:
    return from_site(Error(code=0, reason=reason), node)


@pytest.fixture
def weights() -> dict[str, np.ndarray]:
    return {"w": np.zeros((2, 2), np.float32), "n": np.array(3, dtype=np.int64)}


@pytest.fixture
def reply() -> object:
    """Factory of train replies: ``reply(node, weights, cases, loss=..., site=..., metrics=...)``
    (:func:`fedseg.common.fl.offline.train_reply`)."""
    return train_reply


@pytest.fixture
def failed_reply() -> object:
    """Factory of error replies: ``failed_reply(node, reason)``."""
    return error_reply


@pytest.fixture
def task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pretend to be inside a ServerApp process, so strategies can create instruction messages."""
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


@pytest.fixture(scope="session")
def phantoms(tmp_path_factory: pytest.TempPathFactory) -> object:
    """Two 16³ phantom sites (2 cases each) and a 1-case validation set, generated once per session."""
    from fedseg.common.synthetic.phantoms import generate_phantoms

    root = tmp_path_factory.mktemp("server-phantoms") / "data"
    generate_phantoms(root, sites=2, cases_per_site=2, val_cases=1, size=(16, 16, 16))
    return root


def trained(weights: dict[str, np.ndarray], step: float = 0.5) -> dict[str, np.ndarray]:
    """``weights`` after a (pretend) local training: every floating-point array moved by ``step``, since a reply
    that sends back the model it was sent is a free-rider and rejected."""
    return {k: (v + step).astype(v.dtype) if v.dtype.kind == "f" else v for k, v in weights.items()}
