"""The offline entry point aggregates exactly as the ServerApp's strategy does (benches and tests use it)."""

from __future__ import annotations

import numpy as np

from fedseg.server.config import ServerConfig
from fedseg.server.run.offline import OfflineAggregator, SiteReply

GLOBAL = {"w": np.zeros(3, np.float32), "step": np.array(2, np.int64)}


def test_one_round_is_the_capped_weighted_mean() -> None:
    replies = [
        SiteReply("a", {"w": np.full(3, 1.0, np.float32), "step": np.array(3)}, cases=1),
        SiteReply("b", {"w": np.full(3, 4.0, np.float32), "step": np.array(3)}, cases=30),
    ]
    merged, stats = OfflineAggregator(ServerConfig(min_sites=1))(GLOBAL, replies)
    # capped: b counts at most 2 x the low median (1 case): weights 1 and 2
    np.testing.assert_allclose(merged["w"], np.full(3, (1.0 + 2 * 4.0) / 3), rtol=1e-6)
    assert [(s.site, s.share) for s in stats.sites] == [("a", 1 / 3), ("b", 2 / 3)]


def test_a_round_without_usable_replies_keeps_the_model() -> None:
    aggregate = OfflineAggregator(ServerConfig(min_sites=1))
    merged, stats = aggregate(GLOBAL, [SiteReply("a", dict(GLOBAL), cases=2)])  # a free-rider only
    np.testing.assert_array_equal(merged["w"], GLOBAL["w"])
    assert [r.site for r in stats.rejected] == ["a"] and aggregate.round == 1
