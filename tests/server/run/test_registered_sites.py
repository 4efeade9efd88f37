"""With node authentication a site's name is its key's: a reply carrying another name is rejected, and a registered
name never passes to another node (driven through the strategy with hand-made replies, no Flower runtime)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message

from fedseg.common.errors import ConfigError
from fedseg.server.app import registered_sites
from fedseg.server.config import RunSpec, ServerConfig, TLSConfig
from fedseg.server.control.runs import SPEC_ENV
from fedseg.server.control.sites import NODE_SITES_FILE
from fedseg.server.run.strategy import RecordingStrategy, build_strategy
from tests.server.conftest import trained

pytestmark = pytest.mark.usefixtures("task_identity")

Reply = Callable[..., Message]
REGISTERED = {11: "hospital-a", 12: "hospital-b"}


class FakeGrid:
    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes

    def get_node_ids(self) -> list[int]:
        return self.nodes


def _round(strategy: RecordingStrategy, rnd: int, weights: dict[str, np.ndarray], replies: list[Message]) -> None:
    arrays = ArrayRecord({k: Array(v) for k, v in weights.items()})
    list(strategy.configure_train(rnd, arrays, ConfigRecord(), FakeGrid([11, 12, 13])))  # type: ignore[arg-type]
    strategy.aggregate_train(rnd, replies)


def _locked() -> RecordingStrategy:
    strategy = RecordingStrategy(build_strategy(ServerConfig(min_sites=1)), 1, 1, 1.0)
    strategy.registry.lock(REGISTERED)
    return strategy


def test_a_registered_site_reporting_another_sites_name_is_rejected(
    reply: Reply, weights: dict[str, np.ndarray], caplog: pytest.LogCaptureFixture
) -> None:
    strategy = _locked()
    # hospital-b's node is silent this round: without the lock its name would be free to take
    _round(strategy, 1, weights, [reply(11, trained(weights), 2, site="hospital-b")])
    stats = strategy.stats[1]
    assert stats.sites == []
    assert [(r.site, r.reason) for r in stats.rejected] == [
        ("hospital-b", "node 11 is registered as site 'hospital-a' (its key) and claims to be 'hospital-b'")
    ]
    assert any("rejected the reply of hospital-b (node 11)" in r.getMessage() for r in caplog.records)
    _round(strategy, 2, weights, [reply(11, trained(weights), 2, site="hospital-a")])
    assert [s.site for s in strategy.stats[2].sites] == ["hospital-a"]


def test_a_registered_name_never_passes_to_another_node(reply: Reply, weights: dict[str, np.ndarray]) -> None:
    strategy = _locked()
    _round(
        strategy,
        1,
        weights,
        [reply(11, trained(weights), 2, site="hospital-a"), reply(12, trained(weights), 3, site="hospital-b")],
    )
    # round 2: hospital-a's node is silent; an unregistered node and hospital-b's node both claim its name
    _round(
        strategy,
        2,
        weights,
        [reply(13, trained(weights), 2, site="hospital-a"), reply(12, trained(weights), 3, site="hospital-a")],
    )
    assert strategy.stats[2].sites == []
    assert [r.reason for r in strategy.stats[2].rejected] == [
        "node 13 has no registered site key",
        "node 12 is registered as site 'hospital-b' (its key) and claims to be 'hospital-a'",
    ]
    assert strategy.registry.names == REGISTERED


def test_a_resumed_runs_pins_follow_the_names_to_the_newly_registered_nodes(
    reply: Reply, weights: dict[str, np.ndarray]
) -> None:
    strategy = RecordingStrategy(build_strategy(ServerConfig(min_sites=1)), 1, 1, 1.0)
    strategy.registry.names, strategy.registry.cases = {1: "hospital-a", 2: "hospital-b"}, {1: 2, 2: 3}
    strategy.registry.lock(REGISTERED)  # a new start registered the keys again: new node ids
    assert strategy.registry.names == REGISTERED and strategy.registry.cases == {11: 2, 12: 3}
    _round(strategy, 1, weights, [reply(12, trained(weights), 4, site="hospital-b")])
    assert [r.reason for r in strategy.stats[1].rejected] == [
        "num-examples 4 exceeds the 3 cases this site declared first"
    ]


def test_the_serverapp_reads_the_registered_sites_next_to_the_spec(tmp_path: Path) -> None:
    tls = TLSConfig(ca=tmp_path / "ca.pem", cert=tmp_path / "cert.pem", key=tmp_path / "key.pem")
    spec = RunSpec(config=ServerConfig(tls=tls, supernode_auth=True, output_dir=tmp_path))
    env = {SPEC_ENV: str(tmp_path / "run-spec.json")}
    with pytest.raises(ConfigError, match="registered no site; run refused"):
        registered_sites(spec, env)
    (tmp_path / NODE_SITES_FILE).write_text(json.dumps({str(k): v for k, v in REGISTERED.items()}))
    assert registered_sites(spec, env) == REGISTERED
    assert registered_sites(RunSpec(config=ServerConfig(output_dir=tmp_path)), env) == {}
    (tmp_path / NODE_SITES_FILE).write_text("[1, 2]")
    with pytest.raises(ConfigError, match="is not a node id -> site name map"):
        registered_sites(spec, env)
