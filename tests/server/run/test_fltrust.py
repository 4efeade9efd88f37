"""FLTrust: replies weighted by their cosine with the server's own reference update and rescaled to its length."""

from __future__ import annotations

import math
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord
from pydantic import ValidationError

from fedseg.client.training import train_locally
from fedseg.common.data.manifest import site_manifest
from fedseg.common.data.preprocess import PreprocessConfig
from fedseg.common.data.sitecache import prepare_labelled
from fedseg.common.engine.config import TrainConfig
from fedseg.common.errors import ConfigError
from fedseg.common.fl.offline import train_reply
from fedseg.common.fl.protocol import TrainTask
from fedseg.common.fl.weights import arrays_from_model
from fedseg.common.nn.model import ModelConfig, build_model
from fedseg.server.config import ServerConfig, StrategyConfig
from fedseg.server.run.fltrust import Reference, RootTrust
from fedseg.server.run.loop import root_trust
from fedseg.server.run.strategy import RecordingStrategy, build_strategy
from tests.server.run.test_rogue_replies import GLOBAL, FakeGrid, Weights, honest

pytestmark = pytest.mark.usefixtures("task_identity")

#: Only FLTrust decides: the norm bounds and the direction check are off.
UNBOUNDED = StrategyConfig(max_update_ratio=0, min_update_ratio=0, max_bn_update_ratio=0, min_update_cosine=-1)


class FixedTrust(RootTrust):
    """A root trust whose reference update is given, not trained."""

    def __init__(self, update: Mapping[str, np.ndarray]) -> None:
        self.update = {k: np.asarray(v, np.float64) for k, v in update.items()}
        self.calls = 0

    def reference(self, glob: Mapping[str, np.ndarray], keys: Sequence[str], server_round: int) -> Reference:
        self.calls += 1
        norm = math.sqrt(sum(float(np.vdot(v, v)) for v in self.update.values()))
        return Reference({k: self.update[k] for k in keys}, norm)


def aggregate(
    replies: dict[int, Weights], trust: RootTrust | None, cases: dict[int, int] | None = None
) -> tuple[RecordingStrategy, dict[str, np.ndarray]]:
    strategy = RecordingStrategy(
        build_strategy(ServerConfig(min_sites=1)), 1, 1, 1.0, limits=UNBOUNDED, root_trust=trust
    )
    arrays = ArrayRecord({k: Array(v) for k, v in GLOBAL.items()})
    list(strategy.configure_train(1, arrays, ConfigRecord(), FakeGrid(replies)))  # type: ignore[arg-type]
    counts = cases or {}
    new, _ = strategy.aggregate_train(
        1, [train_reply(n, w, counts.get(n, 3), site=f"site-{n}") for n, w in replies.items()]
    )
    assert new is not None
    return strategy, {k: new[k].numpy() for k in new}


def test_the_aggregate_is_the_hand_computed_fltrust_rule() -> None:
    g = GLOBAL["conv.weight"].astype(np.float64)
    updates = {n: honest(n)["conv.weight"].astype(np.float64) - g for n in (1, 2)}
    scaled = {k: v.copy() for k, v in honest(3).items()}
    scaled["conv.weight"] = (GLOBAL["conv.weight"] + 100 * (honest(3)["conv.weight"] - g)).astype(np.float32)
    updates[3] = scaled["conv.weight"].astype(np.float64) - g
    g0 = updates[1] + updates[2]
    strategy, new = aggregate({1: honest(1), 2: honest(2), 3: scaled}, FixedTrust({"conv.weight": g0}), {3: 100_000})

    def cosine(u: np.ndarray) -> float:
        return float(np.vdot(u, g0) / (np.linalg.norm(u) * np.linalg.norm(g0)))

    trust = {n: max(cosine(u), 0.0) for n, u in updates.items()}
    kept = [n for n in (1, 2, 3) if trust[n] > 0]
    rescaled = {n: updates[n] * np.linalg.norm(g0) / np.linalg.norm(updates[n]) for n in kept}
    # capped weights: 3, 3 and the liar's 100000 capped at 2 x the low median (3)
    weight = {1: 3 * trust[1], 2: 3 * trust[2], 3: 6 * trust[3]}
    expected = g + sum(weight[n] * rescaled[n] for n in kept) / sum(weight[n] for n in kept)
    np.testing.assert_allclose(new["conv.weight"], expected, rtol=0, atol=1e-6)
    recorded = {s.site: s.trust for s in strategy.stats[1].sites}
    assert recorded == {f"site-{n}": pytest.approx(trust[n], abs=1e-6) for n in kept}
    # the x100 reply counts with the reference's length, not its own
    assert np.linalg.norm(new["conv.weight"] - g) <= np.linalg.norm(g0) * (1 + 1e-6)


def test_an_update_pointing_away_from_the_reference_is_rejected() -> None:
    g = GLOBAL["conv.weight"]
    flipped = dict(honest(1))
    flipped["conv.weight"] = (2 * g - honest(1)["conv.weight"]).astype(np.float32)  # its update reversed
    trust = FixedTrust({"conv.weight": honest(1)["conv.weight"] - g})
    strategy, new = aggregate({1: honest(1), 2: flipped}, trust)
    reasons = {r.site: r.reason for r in strategy.stats[1].rejected}
    assert reasons == {"site-2": "its update's cosine with the server's reference update is -1.000 (FLTrust trust 0)"}
    np.testing.assert_allclose(new["conv.weight"], honest(1)["conv.weight"], atol=1e-6)  # cosine 1, scale 1
    assert trust.calls == 1


def test_without_fltrust_the_scaled_reply_owns_the_update() -> None:
    """The attack of the hand-computed test fires without FLTrust: its update dominates the mean."""
    g = GLOBAL["conv.weight"]
    scaled = dict(honest(3))
    scaled["conv.weight"] = (g + 100 * (honest(3)["conv.weight"] - g)).astype(np.float32)
    _, new = aggregate({1: honest(1), 2: honest(2), 3: scaled}, None)
    assert np.linalg.norm(new["conv.weight"] - g) > 10 * np.linalg.norm(honest(1)["conv.weight"] - g)


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fedseg.common.synthetic.phantoms import generate_phantoms

    root = tmp_path_factory.mktemp("fltrust") / "data"
    generate_phantoms(root, sites=2, cases_per_site=2, val_cases=1, size=(32, 32, 32))
    return root


def _cases(folder: Path, cache: Path) -> list:  # type: ignore[type-arg]
    manifest = site_manifest(folder, str(folder / "labels.toml"))
    return prepare_labelled(folder, manifest, PreprocessConfig(), cache, role="test", use="test")


def test_two_real_sites_one_reversed_end_on_the_honest_sites_rescaled_update(phantoms: Path) -> None:
    model_cfg = ModelConfig(feature_scale=16)
    train = TrainConfig(steps=3, lr=3e-3, patch_size=(32, 32, 32), augment=False, amp=False)
    task = TrainTask(model=model_cfg, train=train, preprocess=PreprocessConfig(), deadline=600.0)
    torch.manual_seed(0)
    record = arrays_from_model(build_model(model_cfg))
    glob = {k: a.numpy() for k, a in record.items()}
    trained, result = train_locally(record, task, _cases(phantoms / "site-1", phantoms / "c1"), "cpu", 0)
    honest_w = {k: a.numpy() for k, a in trained.items()}
    trust = RootTrust(_cases(phantoms / "site-2", phantoms / "c2"), model_cfg, train)
    strategy = RecordingStrategy(
        build_strategy(ServerConfig(min_sites=2)), 2, 1, 1.0, limits=StrategyConfig(), root_trust=trust
    )
    list(strategy.configure_train(1, record, ConfigRecord(), FakeGrid([1, 2])))  # type: ignore[arg-type]
    keys = strategy._weight_keys
    liar = dict(honest_w)
    liar.update({k: (2 * glob[k] - honest_w[k]).astype(glob[k].dtype) for k in keys})  # the honest update reversed
    replies = [train_reply(1, honest_w, result.cases, site="honest"), train_reply(2, liar, 100_000, site="liar")]
    new, _ = strategy.aggregate_train(1, replies)
    assert new is not None
    assert [r.site for r in strategy.stats[1].rejected] == ["liar"]
    assert "cosine with the server's reference update" in strategy.stats[1].rejected[0].reason
    update = {k: honest_w[k].astype(np.float64) - glob[k] for k in keys}
    norm = math.sqrt(sum(float(np.vdot(v, v)) for v in update.values()))
    reference = trust.reference(glob, keys, 1)  # seeded: the same update the round used
    (site,) = strategy.stats[1].sites
    assert site.trust is not None and 0 < site.trust <= 1
    for k in keys:
        np.testing.assert_allclose(new[k].numpy(), glob[k] + update[k] * reference.norm / norm, atol=1e-5, err_msg=k)


def test_fltrust_needs_a_root_set_apart_from_the_validation_set(phantoms: Path, tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match=r"needs strategy\.root_data"):
        ServerConfig(strategy=StrategyConfig(screen="fltrust"))
    val = phantoms / "validation"
    with pytest.raises(ValidationError, match=r"must not be validation\.data"):
        ServerConfig(strategy=StrategyConfig(screen="fltrust", root_data=val), validation={"data": val})  # type: ignore[arg-type]
    copy = tmp_path / "root"
    shutil.copytree(val, copy)  # another folder, the same cases
    cfg = ServerConfig(strategy=StrategyConfig(screen="fltrust", root_data=copy), validation={"data": val})  # type: ignore[arg-type]
    validator = SimpleNamespace(cases=_cases(val, tmp_path / "cv"))
    with pytest.raises(ConfigError, match="is validation case"):
        root_trust(cfg, validator, tmp_path / "cache")  # type: ignore[arg-type]
    other = ServerConfig(strategy=StrategyConfig(screen="fltrust", root_data=phantoms / "site-2"))
    made = root_trust(other, validator, tmp_path / "cache2")  # type: ignore[arg-type]
    assert made is not None and len(made.cases) == 2
