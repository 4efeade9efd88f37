"""The server's aggregation, offline: one round of exactly what ``fed-server`` does with the sites' replies
(validation, the norm, direction and loss screens or FLTrust, aggregation weights, the strategy, BatchNorm pooling, the
class-aware head), driven from plain arrays without a Flower runtime.

The benchmarks (``bench/fedsim.py`` and those built on it, ``bench/robustness.py``) and the tests aggregate
through :class:`OfflineAggregator`, so a bench row describes a setup ``fed-server`` can run.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping

from fedseg.common.fl.offline import train_reply
from fedseg.common.fl.protocol import SITE_KEY
from fedseg.server.config import ServerConfig
from fedseg.server.run.fltrust import RootTrust
from fedseg.server.run.loop import private_driver, screening_limits
from fedseg.server.run.lossscreen import LossScreen
from fedseg.server.run.strategy import RecordingStrategy, RoundStats, build_strategy

NDArray = np.ndarray


@dataclass(frozen=True)
class SiteReply:
    """One site's train reply as plain data: its name, trained weights (every key of the global model), declared
    cases and, for a partially labelled site, its annotated classes (background first)."""

    site: str
    weights: Mapping[str, NDArray]
    cases: int
    annotated: Sequence[bool] | None = None
    loss: float = 0.5


def reply_message(node: int, reply: SiteReply) -> Message:
    """``reply`` as the Flower message our ClientApp would send from node ``node``."""
    message = train_reply(node, reply.weights, reply.cases, loss=reply.loss, site=reply.site)
    if reply.annotated is not None:
        message.content[SITE_KEY] = ConfigRecord({"name": reply.site, "annotated": list(reply.annotated)})
    return message


class OfflineAggregator:
    """Successive rounds of the server's aggregation (module docstring).

    Args:
        cfg: the server configuration (its ``strategy`` table and ``min_replies``).
        loss_screen: the loss screen on the server's data (None: off).
        root_trust: FLTrust's reference update on the server's root set (None: off).
        pins: site name -> cases pinned in ``sites.toml``.
    """

    def __init__(
        self,
        cfg: ServerConfig,
        loss_screen: LossScreen | None = None,
        pins: Mapping[str, int] | None = None,
        root_trust: RootTrust | None = None,
    ) -> None:
        self.recording = RecordingStrategy(
            build_strategy(cfg),
            1,
            cfg.min_replies,
            1.0,
            limits=screening_limits(cfg),
            loss_screen=loss_screen,
            pins=pins,
            root_trust=root_trust,
        )
        self.strategy = private_driver(cfg, self.recording)  # Flower's DP wrapper under client-dp
        self.round = 0

    def __call__(
        self, reference: Mapping[str, NDArray], replies: Sequence[SiteReply]
    ) -> tuple[dict[str, NDArray], RoundStats]:
        """The next round's global model from ``reference`` and ``replies`` (``reference`` itself when the round
        keeps the previous model), and what the round recorded. Site ``i`` of ``replies`` is node ``i + 1``."""
        self.round += 1
        arrays = ArrayRecord({k: Array(np.asarray(v)) for k, v in reference.items()})
        self.recording.begin_round(arrays)
        if isinstance(self.strategy, DifferentialPrivacyServerSideFixedClipping):
            self.strategy.current_arrays = arrays  # what its configure_train would set: the updates' origin
        messages = [reply_message(node, r) for node, r in enumerate(replies, start=1)]
        new, _ = self.strategy.aggregate_train(self.round, messages)
        stats = self.recording.stats[self.round]
        if new is None:
            return {k: np.array(v) for k, v in reference.items()}, stats
        return {k: new[k].numpy() for k in new}, stats
