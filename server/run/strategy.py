"""Flower strategy selection plus a thin guarding/recording wrapper around it.

The aggregation itself is Flower's (``flwr.serverapp.strategy``). :class:`RecordingStrategy` delegates to the
chosen strategy and only adds what a federation of mutually distrusting sites needs around it:

* it waits at most ``site_wait_timeout`` seconds for ``min_sites`` connected sites (Flower's own wait has no
  timeout) and then fails the run with a clear message;
* it screens every reply as it arrives (:mod:`fedseg.server.run.screen`): validates it
  (:mod:`fedseg.server.run.replies`), writes its weights to disk (:mod:`fedseg.server.run.spill`) and lets the
  message go, so the server's memory does not grow with the number of sites; it bounds its update norm and, with
  three or more replies, rejects an update pointing away from most of the others (``min_update_cosine``); a bad
  reply is dropped with its reason recorded, never aborting the round;
* with central data, it rejects a reply whose model is far worse on it (:mod:`fedseg.server.run.lossscreen`), or
  with a root set of the server's own it weights every reply by its trust (:mod:`fedseg.server.run.fltrust`);
* it weights each accepted reply by its capped or pinned cases (:mod:`fedseg.server.run.weighting`), the same
  weight everywhere one is used;
* it optionally clips each accepted update to ``clip_norm``;
* it gives the chosen strategy only the floating-point weights: BatchNorm running statistics are pooled by
  :mod:`fedseg.server.run.bn` (under ``bn = "local"`` every BatchNorm tensor, γ and β too, keeps the global value:
  the sites keep their own), integer buffers keep the global value, and every array keeps the model's dtype;
* it keeps the previous global model when fewer than ``min_replies`` sites answered usably or when the aggregate
  is not finite;
* it records, per round, each site's name, cases, loss, samples, seconds, update norm and cosine and payload bytes;
* it decodes half-precision transport before validation (:mod:`fedseg.server.run.transport`), averages the output
  head class-aware under FedAvg/FedProx (:mod:`fedseg.server.run.headavg`) and sends cross-site validation
  messages when due (:mod:`fedseg.server.run.crosssite`).

How the chosen strategy is driven (the mean computed here, the mean handed over, or every reply) is its
:class:`~fedseg.server.run.choice.Family`, decided in one place. Each hook's logic lives in its own module.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Strategy
from flwr.serverapp.strategy.fedopt import FedOpt

from fedseg.common.errors import FedsegError
from fedseg.common.fl.batchnorm import batchnorm_keys
from fedseg.common.fl.protocol import ARRAYS_KEY, METRICS_KEY, WEIGHT_KEY, Transport
from fedseg.server.config import StrategyConfig
from fedseg.server.run import headavg
from fedseg.server.run.bn import is_bn_statistic, pooled_statistics
from fedseg.server.run.choice import build_strategy, family_of
from fedseg.server.run.crosssite import CrossSite, Matrix, matrix_of
from fedseg.server.run.fltrust import RootTrust, trust_replies
from fedseg.server.run.history import Rejection, SiteRound
from fedseg.server.run.lossscreen import LossScreen, screen_replies
from fedseg.server.run.replies import SiteRegistry
from fedseg.server.run.screen import Kept, RoundScreen, with_weights
from fedseg.server.run.spill import Spill
from fedseg.server.run.state import StrategyState, moments_of, restore_moments
from fedseg.server.run.transport import encode_messages
from fedseg.server.run.weighting import shares

__all__ = ["RecordingStrategy", "RoundStats", "build_strategy", "wait_for_sites"]

log = logging.getLogger(__name__)

NDArray = np.ndarray


@dataclass
class RoundStats:
    """What happened in one training round, as seen by the server."""

    sampled: int = 0
    sites: list[SiteRound] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)
    failures: int = 0
    bytes_out: int = 0
    bytes_in: int = 0
    cross_site: Matrix = field(default_factory=dict)


def site_round(kept: Kept, share: float | None = None) -> SiteRound:
    """The per-site numbers of an accepted reply (a NaN cosine, not checked, is recorded as None)."""
    reply, norm, cosine = kept.reply, kept.norm, kept.cosine
    return SiteRound(
        site=reply.site,
        cases=reply.cases,
        share=share,
        loss=reply.loss,
        samples=reply.samples,
        seconds=reply.seconds,
        bytes_in=reply.bytes_in,
        update_norm=norm,
        update_cosine=None if math.isnan(cosine) else cosine,
        screen_loss=None if math.isnan(kept.screen_loss) else kept.screen_loss,
        trust=None if math.isnan(kept.trust) else kept.trust,
        epsilon=reply.epsilon,
        delta=reply.delta,
    )


def clip_scale(norm: float, clip: float) -> float:
    """The factor that scales an update of L2 norm ``norm`` down to ``clip`` (1: unchanged; ``clip`` 0 = off)."""
    return clip / norm if 0 < clip < norm else 1.0


MetricValues = Mapping[str, int | float | list[int] | list[float]]


def reply_metrics(kept: Kept) -> MetricValues:
    """The four train metrics of an accepted reply, as our ClientApp sends them, but with its aggregation weight as
    ``num-examples``: what Flower's own weighted averages (multi-krum, the metrics) then weight by."""
    reply = kept.reply
    return {
        WEIGHT_KEY: kept.weight,
        "train-loss": reply.loss,
        "train-samples": reply.samples,
        "train-seconds": reply.seconds,
    }


def wait_for_sites(grid: Grid, needed: int, timeout: float, poll: float = 1.0) -> int:
    """Wait until ``needed`` sites are connected; return how many are.

    Raises:
        FedsegError: fewer than ``needed`` were connected after ``timeout`` seconds.
    """
    start = time.monotonic()
    announced = -1
    while True:
        connected = len(list(grid.get_node_ids()))
        if connected >= needed:
            return connected
        if time.monotonic() - start > timeout:
            raise FedsegError(
                f"only {connected} of the {needed} required sites were connected after {timeout:.0f} s; "
                "start more sites with fed-client join or lower min_sites"
            )
        if connected != announced:
            log.info("waiting for sites: %d connected, %d required", connected, needed)
            announced = connected
        time.sleep(poll)


class RecordingStrategy(Strategy):
    """Delegates to ``inner`` and guards/records each round (see the module docstring).

    Args:
        inner: the Flower strategy that samples and aggregates.
        min_sites: connected sites required before a round starts.
        min_replies: usable replies required to replace the global model.
        site_wait_timeout: seconds to wait for ``min_sites`` before failing the run.
        on_round: optional callback with (server round, stats) after each aggregation.
        limits: the reply bounds and clipping (``max_examples``, ``max_update_ratio``, ``max_update_norm``,
            ``clip_norm``).
        round_offset: added to Flower's round number (a resumed run): FedAdam's bias correction counts on.
        cross_site: when to run cross-site validation at the sites; None = never.
        spill_dir: where a round's replies are spilled while it is screened (None: the system's temporary
            directory; :mod:`fedseg.server.run.spill`).
        pins: site name -> cases pinned by the operator in ``sites.toml`` (:mod:`fedseg.server.run.weighting`).
        loss_screen: scores each reply's model on the server's own data (:mod:`fedseg.server.run.lossscreen`);
            None = off.
        root_trust: FLTrust's reference update on the server's root set (:mod:`fedseg.server.run.fltrust`);
            None = off.
    """

    def __init__(
        self,
        inner: FedAvg,
        min_sites: int,
        min_replies: int,
        site_wait_timeout: float,
        on_round: Callable[[int, RoundStats], None] | None = None,
        limits: StrategyConfig | None = None,
        round_offset: int = 0,
        cross_site: CrossSite | None = None,
        spill_dir: Path | None = None,
        pins: Mapping[str, int] | None = None,
        loss_screen: LossScreen | None = None,
        root_trust: RootTrust | None = None,
    ) -> None:
        self.inner = inner
        self.loss_screen = loss_screen
        self.root_trust = root_trust
        self.pins = dict(pins or {})
        self.spill_dir = spill_dir
        self.min_sites = min_sites
        self.min_replies = min_replies
        self.site_wait_timeout = site_wait_timeout
        self.on_round = on_round
        self.limits = limits if limits is not None else StrategyConfig()
        self.round_offset = round_offset
        self.stats: dict[int, RoundStats] = {}
        self.registry = SiteRegistry()
        self._transport: Transport = "fp32"
        self.family = family_of(inner)
        self.cross_site = cross_site
        self._reference: dict[str, NDArray] = {}
        self.accountant_state: dict[str, object] = {}  # client-level DP (fedseg.server.run.clientdp), saved with it

    @property
    def _weight_keys(self) -> list[str]:
        """The keys the inner strategy aggregates: floating-point, not BatchNorm running statistics (under
        ``bn = "local"`` no BatchNorm tensor at all)."""
        local = batchnorm_keys(self._reference) if self.limits.bn == "local" else set()
        return [
            k for k, v in self._reference.items() if v.dtype.kind == "f" and not is_bn_statistic(k) and k not in local
        ]

    def summary(self) -> None:
        """Log the inner strategy's summary."""
        self.inner.summary()

    def state(self, global_round: int) -> StrategyState:
        """The state to save with the checkpoint of ``global_round``."""
        return StrategyState(
            round=global_round,
            moments=moments_of(self.inner),
            registry=self.registry.to_json(),
            accountant=dict(self.accountant_state),
        )

    def restore(self, state: StrategyState) -> None:
        """Continue from a saved state (resume)."""
        restore_moments(self.inner, state.moments)
        self.registry = SiteRegistry.from_json(state.registry)
        self.accountant_state = dict(state.accountant)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Wait (bounded) for enough sites, then let the inner strategy sample and build the messages."""
        wait_for_sites(grid, self.min_sites, self.site_wait_timeout)
        messages = self.inner.configure_train(server_round, arrays, config, grid)
        messages, self._transport = encode_messages(messages, config)  # fp16/bf16 on the wire when asked
        self.begin_round(arrays)
        sent = messages[0].content.array_records[ARRAYS_KEY].count_bytes() if messages else 0
        self.stats[server_round] = RoundStats(sampled=len(messages), bytes_out=sent * len(messages))
        return messages

    def begin_round(self, arrays: ArrayRecord) -> None:
        """Take ``arrays`` as the round's global model that replies are checked and aggregated against."""
        self._reference = {k: a.numpy() for k, a in arrays.items()}
        if isinstance(self.inner, FedOpt):  # its pseudo-gradient covers only what it aggregates (Family)
            self.inner.current_arrays = {k: self._reference[k] for k in self._weight_keys}

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Screen the replies as they arrive, record per-site numbers, enforce ``min_replies``, then aggregate."""
        stats = self.stats.setdefault(server_round, RoundStats())
        run_round = self.round_offset + server_round  # what logs and the inner strategy see (resumed runs count on)
        with Spill(self._reference, self._weight_keys, self.spill_dir) as spill:
            screen = RoundScreen(
                self._reference, self._weight_keys, self._transport, self.limits, self.registry, spill, self.pins
            )
            for reply in replies:
                screen.intake(reply)
            screened = screen.finish(run_round)
            if self.loss_screen is not None:
                screened.kept = screen_replies(self.loss_screen, self._reference, screened, spill, run_round)
            if self.root_trust is not None:
                screened.kept = trust_replies(self.root_trust, self._reference, screened, spill, run_round)
            kept = with_weights(screened.kept, self.limits, self.pins)
            portions = shares([k.weight for k in kept])
            stats.sites = [site_round(k, share) for k, share in zip(kept, portions, strict=True)]
            stats.rejected = [Rejection(site=r.site, reason=r.reason) for r in screened.rejected]
            stats.bytes_in = sum(s.bytes_in for s in stats.sites)
            stats.failures = max(stats.sampled - len(kept), 0)
            if self.on_round is not None:
                self.on_round(server_round, stats)
            if len(kept) < self.min_replies:
                log.warning(
                    "round %d: %d usable replies (< min_replies=%d); keeping the previous global model",
                    run_round,
                    len(kept),
                    self.min_replies,
                )
                return None, None
            return self.combine(run_round, kept, spill)

    def combine(self, run_round: int, kept: list[Kept], spill: Spill) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The inner strategy's aggregate of the (clipped) weights for the run's round ``run_round``, plus pooled BN
        statistics (under ``bn = "local"`` the global BatchNorm unchanged), in the model's dtypes."""
        ref = self._reference
        keys = self._weight_keys
        if self.family.mean:  # FedAvg/FedProx aggregate to the weighted mean itself
            mean = self._mean(kept, spill)
            arrays = {k: mean.pop(k) for k in keys}
            metrics: MetricRecord | None = self._metrics(kept)
        else:
            record, metrics = self.inner.aggregate_train(run_round, self._inputs(kept, spill))
            if record is None:
                return None, metrics
            arrays = {k: record[k].numpy() for k in keys}
            del record
        merged = dict(ref)
        if self.limits.bn == "pooled":
            sites, weights = [k.reply.arrays for k in kept], [k.weight for k in kept]
            merged.update(pooled_statistics(sites, weights, ref, self.family.bn_pooling, self.limits.trim_beta))
        merged.update({k: arrays.pop(k).astype(ref[k].dtype, copy=False) for k in keys})
        if self.family.class_aware_head:
            heads = [(k.reply.arrays, k.weight, k.reply.message) for k in kept]
            merged.update(headavg.head_of_accepted(merged, ref, heads))
        bad = [k for k, v in merged.items() if v.dtype.kind == "f" and not bool(np.isfinite(v).all())]
        if bad:
            log.error(
                "round %d: the aggregate has non-finite values in %s; keeping the previous model",
                run_round,
                ", ".join(bad[:3]),
            )
            return None, None
        return ArrayRecord({k: Array(np.array(merged.pop(k), order="C")) for k in ref}), metrics

    def _mean(self, kept: list[Kept], spill: Spill) -> dict[str, NDArray]:
        """The replies' weighted mean of the (clipped) weights, slice by slice from the spill: what Flower's
        weighted average gives, without every reply in memory at once."""
        return spill.weighted_mean([k.row for k in kept], [k.weight for k in kept], self._scales(kept))

    def _scales(self, kept: list[Kept]) -> list[float]:
        """Each reply's update factor: FLTrust's rescaling, then clipping of the rescaled update."""
        return [k.scale * clip_scale(k.weight_norm * k.scale, self.limits.clip_norm) for k in kept]

    def _metrics(self, kept: list[Kept]) -> MetricRecord:
        """The replies' metrics aggregated by the inner strategy's own function (case-weighted means)."""
        records = [RecordDict({METRICS_KEY: MetricRecord(dict(reply_metrics(k)))}) for k in kept]
        return self.inner.train_metrics_aggr_fn(records, self.inner.weighted_by_key)

    def _inputs(self, kept: list[Kept], spill: Spill) -> list[Message]:
        """What the inner strategy aggregates: a FedOpt strategy (FedAdam, FedYogi) the streamed mean as one reply
        (it starts from that mean), a robust rule every reply's (clipped) weights."""
        if self.family.streams:
            metrics = {WEIGHT_KEY: sum(k.weight for k in kept), **self._metrics(kept)}
            return [self._as_reply(kept[0].reply.message, self._mean(kept, spill), metrics)]
        return [
            self._as_reply(k.reply.message, spill.load(k.row, scale), reply_metrics(k))
            for k, scale in zip(kept, self._scales(kept), strict=True)
        ]

    def _as_reply(self, message: Message, weights: dict[str, NDArray], metrics: MetricValues) -> Message:
        """A copy of a received message (same metadata) with ``weights`` and ``metrics`` as its content: creating a
        fresh message would need a Flower task identity, which only the ServerApp process has."""
        out = copy.copy(message)
        out.content = RecordDict(
            {
                ARRAYS_KEY: ArrayRecord({k: Array(weights.pop(k)) for k in list(weights)}),
                METRICS_KEY: MetricRecord(dict(metrics)),
            }
        )
        return out

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Cross-site validation messages when due (see :mod:`fedseg.server.run.crosssite`), else none."""
        if self.cross_site is not None:  # the weights travel like the train task's (precision, packing)
            return encode_messages(self.cross_site.messages(server_round, arrays, config, grid), config)[0]
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Record the cross-site matrix of the replies in the round's stats (no aggregate metrics)."""
        if self.cross_site is not None:
            self.stats.setdefault(server_round, RoundStats()).cross_site = matrix_of(replies)
            return None
        return self.inner.aggregate_evaluate(server_round, replies)
