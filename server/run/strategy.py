"""Flower strategy selection plus a thin guarding/recording wrapper around it.

The aggregation itself is Flower's (``flwr.serverapp.strategy``). :class:`RecordingStrategy` delegates to the
chosen strategy and only adds what a federation of mutually distrusting sites needs around it:

* it waits at most ``site_wait_timeout`` seconds for ``min_sites`` connected sites (Flower's own wait has no
  timeout) and then fails the run with a clear message;
* it validates every reply (:mod:`fedseg.server.run.replies`), bounds its update norm and, with three or more
  replies, rejects an update pointing away from most of the others (``min_update_cosine``); a bad reply is
  dropped with its reason recorded, never aborting the round;
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

(A little over 300 lines because every one of these hooks meets Flower's ``Strategy`` interface here; each
hook's logic lives in its own module.)
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, FedProx, Strategy
from flwr.serverapp.strategy.fedopt import FedOpt

from fedseg.common.errors import FedsegError
from fedseg.common.fl.batchnorm import batchnorm_keys
from fedseg.common.fl.protocol import ARRAYS_KEY, METRICS_KEY, WEIGHT_KEY, Transport, policy_note
from fedseg.server.config import StrategyConfig
from fedseg.server.run import headavg
from fedseg.server.run.bn import is_bn_statistic, pooled_statistics
from fedseg.server.run.choice import build_strategy
from fedseg.server.run.crosssite import CrossSite, Matrix, matrix_of
from fedseg.server.run.history import Rejection, SiteRound
from fedseg.server.run.replies import (
    MIN_DIRECTION_REPLIES,
    Accepted,
    Rejected,
    SiteRegistry,
    check_reply,
    direction_outliers,
    norm_outliers,
    site_of,
    update_cosines,
    update_norm,
)
from fedseg.server.run.state import StrategyState, moments_of, restore_moments
from fedseg.server.run.transport import decode_reply, encode_messages

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


def site_round(reply: Accepted, norm: float, cosine: float = math.nan) -> SiteRound:
    """The per-site numbers of an accepted reply (a NaN cosine, not checked, is recorded as None)."""
    return SiteRound(
        site=reply.site,
        cases=reply.cases,
        loss=reply.loss,
        samples=reply.samples,
        seconds=reply.seconds,
        bytes_in=reply.bytes_in,
        update_norm=norm,
        update_cosine=None if math.isnan(cosine) else cosine,
    )


def clipped(
    arrays: Mapping[str, NDArray], reference: Mapping[str, NDArray], keys: list[str], clip: float
) -> dict[str, NDArray]:
    """``arrays[keys]`` with the update ``arrays − reference`` scaled down to L2 norm ``clip`` (0 = unchanged)."""
    out = {k: arrays[k] for k in keys}
    if clip <= 0:
        return out
    norm = update_norm(out, {k: reference[k] for k in keys})
    if norm <= clip:
        return out
    scale = clip / norm
    return {k: (reference[k] + (v - reference[k]) * scale).astype(reference[k].dtype) for k, v in out.items()}


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
    ) -> None:
        self.inner = inner
        self.min_sites = min_sites
        self.min_replies = min_replies
        self.site_wait_timeout = site_wait_timeout
        self.on_round = on_round
        self.limits = limits if limits is not None else StrategyConfig()
        self.round_offset = round_offset
        self.stats: dict[int, RoundStats] = {}
        self.registry = SiteRegistry()
        self._transport: Transport = "fp32"
        self.class_aware_head = type(inner) in (FedAvg, FedProx)  # see fedseg.server.run.headavg
        self.cross_site = cross_site
        self._reference: dict[str, NDArray] = {}

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
        return StrategyState(round=global_round, moments=moments_of(self.inner), registry=self.registry.to_json())

    def restore(self, state: StrategyState) -> None:
        """Continue from a saved state (resume)."""
        restore_moments(self.inner, state.moments)
        self.registry = SiteRegistry.from_json(state.registry)

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
        if isinstance(self.inner, FedOpt):  # its pseudo-gradient covers only what it aggregates
            self.inner.current_arrays = {k: self._reference[k] for k in self._weight_keys}

    def screen(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[list[Accepted], list[Rejected], list[float], list[float]]:
        """Validate every reply, then apply the update-norm bound and the direction check; returns (accepted,
        rejected, accepted norms, accepted cosines: NaN where not checked)."""
        accepted: list[Accepted] = []
        rejected: list[Rejected] = []
        replies = list(replies)
        present = {r.metadata.src_node_id for r in replies}
        for reply in replies:
            wire = reply.content.array_records.get(ARRAYS_KEY) if reply.has_content() else None
            problem = decode_reply(reply, self._transport, self._reference)  # unpacked, float32, before any check
            checked = (
                Rejected(reply.metadata.src_node_id, site_of(reply), problem)
                if problem is not None
                else check_reply(reply, self._reference, self.registry, self.limits.max_examples, present)
            )
            if isinstance(checked, Accepted):
                if note := policy_note(reply.content):
                    log.warning("round %d: %s trained under its site policy: %s", server_round, checked.site, note)
                wire_bytes = wire.count_bytes() if wire is not None else checked.bytes_in
                accepted.append(dataclasses.replace(checked, bytes_in=wire_bytes))  # what travelled
            else:
                rejected.append(checked)
        norms = [update_norm(a.arrays, self._reference) for a in accepted]
        problems = norm_outliers(norms, self.limits.max_update_ratio, self.limits.max_update_norm)
        kept = [(a, n) for a, n, p in zip(accepted, norms, problems, strict=True) if p is None]
        rejected += [Rejected(a.node, a.site, p) for a, p in zip(accepted, problems, strict=True) if p is not None]
        kept, cosines = self._directions(server_round, kept, rejected)
        for r in rejected:
            log.warning("round %d: rejected the reply of %s (node %d): %s", server_round, r.site, r.node, r.reason)
        return [a for a, _ in kept], rejected, [n for _, n in kept], cosines

    def _directions(
        self, server_round: int, kept: list[tuple[Accepted, float]], rejected: list[Rejected]
    ) -> tuple[list[tuple[Accepted, float]], list[float]]:
        """The direction check (``min_update_cosine``) over the replies within the norm bound: each update's
        agreement with the others (:func:`~fedseg.server.run.replies.update_cosines`), over the weights the
        strategy aggregates. Appends to ``rejected``; returns the replies kept and their cosines."""
        keys = self._weight_keys
        reference = {k: self._reference[k] for k in keys}
        cosines = update_cosines([{k: a.arrays[k] for k in keys} for a, _ in kept], reference)
        if len(kept) < MIN_DIRECTION_REPLIES and self.limits.min_update_cosine > -1:
            log.info(
                "round %d: direction check skipped: %d replies within the norm bound (needs %d)",
                server_round,
                len(kept),
                MIN_DIRECTION_REPLIES,
            )
        problems = direction_outliers(cosines, self.limits.min_update_cosine)
        rejected += [Rejected(a.node, a.site, p) for (a, _), p in zip(kept, problems, strict=True) if p is not None]
        chosen = [(k, c) for k, c, p in zip(kept, cosines, problems, strict=True) if p is None]
        return [k for k, _ in chosen], [c for _, c in chosen]

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Screen the replies, record per-site numbers, enforce ``min_replies``, then aggregate."""
        stats = self.stats.setdefault(server_round, RoundStats())
        accepted, rejected, norms, cosines = self.screen(server_round, replies)
        stats.sites = [site_round(a, n, c) for a, n, c in zip(accepted, norms, cosines, strict=True)]
        stats.rejected = [Rejection(site=r.site, reason=r.reason) for r in rejected]
        stats.bytes_in = sum(s.bytes_in for s in stats.sites)
        stats.failures = max(stats.sampled - len(accepted), 0)
        if self.on_round is not None:
            self.on_round(server_round, stats)
        if len(accepted) < self.min_replies:
            log.warning(
                "round %d: %d usable replies (< min_replies=%d); keeping the previous global model",
                server_round,
                len(accepted),
                self.min_replies,
            )
            return None, None
        return self.combine(server_round, accepted)

    def combine(self, server_round: int, accepted: list[Accepted]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The inner strategy's aggregate of the (clipped) weights, plus pooled BN statistics (under ``bn = "local"``
        the global BatchNorm unchanged), in the model's dtypes."""
        ref = self._reference
        keys = self._weight_keys
        messages = [self._sanitised(a, keys) for a in accepted]
        arrays, metrics = self.inner.aggregate_train(self.round_offset + server_round, messages)
        if arrays is None:
            return None, metrics
        merged = dict(ref)
        if self.limits.bn == "pooled":
            merged.update(pooled_statistics([a.arrays for a in accepted], [a.cases for a in accepted], ref))
        merged.update({k: arrays[k].numpy().astype(ref[k].dtype) for k in keys})
        if self.class_aware_head:
            merged.update(headavg.head_of_accepted(merged, ref, [(a.arrays, a.cases, a.message) for a in accepted]))
        bad = [k for k, v in merged.items() if v.dtype.kind == "f" and not bool(np.isfinite(v).all())]
        if bad:
            log.error(
                "round %d: the aggregate has non-finite values in %s; keeping the previous model",
                server_round,
                ", ".join(bad[:3]),
            )
            return None, None
        return ArrayRecord({k: Array(np.array(merged[k], order="C")) for k in ref}), metrics

    def _sanitised(self, reply: Accepted, keys: list[str]) -> Message:
        """The reply as the inner strategy sees it: the (clipped) weights of ``keys`` and the four metrics.

        A copy of the received message (same metadata) with new content: creating a fresh message would need a
        Flower task identity, which only the ServerApp process has.
        """
        weights = clipped(reply.arrays, self._reference, keys, self.limits.clip_norm)
        metrics: dict[str, int | float | list[int] | list[float]] = {
            WEIGHT_KEY: reply.cases,
            "train-loss": reply.loss,
            "train-samples": reply.samples,
            "train-seconds": reply.seconds,
        }
        message = copy.copy(reply.message)
        message.content = RecordDict(
            {
                ARRAYS_KEY: ArrayRecord({k: Array(v) for k, v in weights.items()}),
                METRICS_KEY: MetricRecord(metrics),
            }
        )
        return message

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
