"""One round's train replies, screened as they arrive, without holding them.

:meth:`RoundScreen.intake` takes each reply the moment it is pulled: it puts the weights back in per-tensor
float32 (:func:`~fedseg.server.run.transport.decoded_weights`: for a packed reply, views of its own bytes), checks
the content (:func:`~fedseg.server.run.replies.check_content`), measures the update norm, writes the weights the
strategy aggregates to the round's :class:`~fedseg.server.run.spill.Spill` and keeps only what is small: the
metrics, the BatchNorm running statistics and the output head's rows (for pooling and class-aware head averaging). The
message's weights are dropped, so a round holds about one reply in memory whatever the number of sites.

:meth:`RoundScreen.finish` then does what needs every reply: the identity checks (a name may not be claimed by
another node that replied this round), the update-norm bound (relative to the round's median) and the direction
check (the cosines from the spilled updates' Gram matrix).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ArrayRecord, Message

from fedseg.common.fl.protocol import ARRAYS_KEY, Transport, policy_note, record_of
from fedseg.common.runtime.memory import release_freed_memory
from fedseg.server.config import StrategyConfig
from fedseg.server.run.bn import is_bn_statistic
from fedseg.server.run.headavg import head_keys
from fedseg.server.run.replies import (
    MIN_DIRECTION_REPLIES,
    Accepted,
    Rejected,
    SiteRegistry,
    check_content,
    check_identity,
    cosines_from_gram,
    direction_outliers,
    norm_outliers,
    site_of,
    update_norm,
)
from fedseg.server.run.spill import Spill
from fedseg.server.run.transport import decoded_weights
from fedseg.server.run.weighting import aggregation_weights, pin_problem

log = logging.getLogger(__name__)

NDArray = np.ndarray


@dataclass(frozen=True)
class Kept:
    """A reply that passed every check: its small arrays and metrics, its spill row, its update norms (over every
    floating-point array; over the aggregated weights only, the one screened and clipped; over the pooled BatchNorm
    running statistics), its cosine, its aggregation weight (:mod:`fedseg.server.run.weighting`) and, under FLTrust
    (:mod:`fedseg.server.run.fltrust`), its trust score and the factor its update is rescaled by."""

    reply: Accepted
    row: int
    norm: float
    weight_norm: float
    cosine: float = math.nan
    weight: float = 1.0
    bn_norm: float = 0.0
    screen_loss: float = math.nan
    trust: float = math.nan
    scale: float = 1.0


@dataclass
class Screened:
    """What a round's screening leaves: the replies kept (in node-id order) and the ones rejected."""

    kept: list[Kept] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)


class RoundScreen:
    """Screens one round's replies (module docstring) into ``spill``.

    Args:
        reference: the round's global weights.
        weight_keys: the entries the strategy aggregates (spilled).
        transport: the precision the weights travel in.
        limits: ``max_examples``, the norm bounds and ``min_update_cosine``.
        registry: the run's site names and declared cases.
        spill: where the aggregated weights of each valid reply go.
        pins: site name -> the cases its operator pinned in ``sites.toml`` (a reply declaring more is rejected).
    """

    def __init__(
        self,
        reference: Mapping[str, NDArray],
        weight_keys: Sequence[str],
        transport: Transport,
        limits: StrategyConfig,
        registry: SiteRegistry,
        spill: Spill,
        pins: Mapping[str, int] | None = None,
    ) -> None:
        self.pins = dict(pins or {})
        self.reference = reference
        self.weight_keys = list(weight_keys)
        self.weight_reference = {k: reference[k] for k in self.weight_keys}
        self.transport = transport
        self.limits = limits
        self.registry = registry
        self.spill = spill
        self.small_keys = {k for k in reference if is_bn_statistic(k)} | set(head_keys(set(reference)))
        pooled = limits.bn == "pooled"  # under "local" the replies carry the BatchNorm they were sent
        self.bn_reference = {
            k: v for k, v in reference.items() if pooled and is_bn_statistic(k) and v.dtype.kind == "f"
        }
        self.present: set[int] = set()
        self.valid: list[Kept] = []
        self.rejected: list[Rejected] = []

    def intake(self, reply: Message) -> None:
        """Check one reply's content, spill its weights and keep only its small parts."""
        self.present.add(reply.metadata.src_node_id)
        wire = record_of(reply.content, ARRAYS_KEY, ArrayRecord) if reply.has_content() else None
        wire_bytes = wire.count_bytes() if wire is not None else 0
        del wire
        problem, weights = decoded_weights(reply, self.transport, self.reference)  # float32, before any check
        checked = (
            Rejected(reply.metadata.src_node_id, site_of(reply), problem)
            if problem is not None
            else check_content(reply, self.reference, self.limits.max_examples, weights)
        )
        del weights
        if isinstance(checked, Rejected):
            self.rejected.append(checked)
            return
        arrays = checked.arrays
        norm = update_norm(arrays, self.reference)
        weight_norm = update_norm({k: arrays[k] for k in self.weight_keys}, self.weight_reference)
        row = self.spill.add(arrays)
        small = {k: np.array(arrays[k]) for k in self.small_keys}  # copies: views would keep the whole reply
        reply.content[ARRAYS_KEY] = ArrayRecord()  # the weights now live in the spill only
        kept = dataclasses.replace(checked, arrays=small, bytes_in=wire_bytes or checked.bytes_in)
        bn_norm = update_norm({k: arrays[k] for k in self.bn_reference}, self.bn_reference)
        self.valid.append(Kept(kept, row, norm, weight_norm, bn_norm=bn_norm))
        del checked, arrays
        release_freed_memory()  # the reply's buffers: else the heap keeps them and grows with every site

    def finish(self, server_round: int) -> Screened:
        """The identity checks (in arrival order), then the norm bound and the direction check over the round's
        valid replies in node-id order: floating-point sums (BLAS uses fused multiply-adds) depend on the order of
        their terms, so in arrival order (which Flower's random sampling also shuffles) the same replies gave
        another global model in the last bits, and a resumed run was not the straight one.
        """
        out = Screened(rejected=list(self.rejected))
        named: list[Kept] = []
        for kept in self.valid:
            problem = pin_problem(kept.reply.site, kept.reply.cases, self.pins) or check_identity(
                kept.reply, self.registry, self.present
            )
            if problem is not None:
                out.rejected.append(Rejected(kept.reply.node, kept.reply.site, problem))
                continue
            if note := policy_note(kept.reply.message.content):
                log.warning("round %d: %s trained under its site policy: %s", server_round, kept.reply.site, note)
            named.append(kept)
        named.sort(key=lambda k: k.reply.node)
        out.kept = self._bounded(named, out.rejected)
        out.kept = self._directions(server_round, out.kept, out.rejected)
        for r in out.rejected:
            log.warning("round %d: rejected the reply of %s (node %d): %s", server_round, r.site, r.node, r.reason)
        return out

    def _bounded(self, named: list[Kept], rejected: list[Rejected]) -> list[Kept]:
        """The norm bounds, on the aggregated weights' update and then, separately, on the BatchNorm statistics'
        (which would dominate a norm over both: ×3 on every weight raised that one only 1.28×)."""
        lim = self.limits
        weights = norm_outliers(
            [k.weight_norm for k in named], lim.max_update_ratio, lim.max_update_norm, lim.min_update_ratio
        )
        kept = _split(named, weights, rejected)
        if not self.bn_reference:
            return kept
        what = "BatchNorm statistics update"
        stats = norm_outliers([k.bn_norm for k in kept], lim.max_bn_update_ratio, 0.0, 0.0, what)
        return _split(kept, stats, rejected)

    def _bn_directions(self, kept: list[Kept], rejected: list[Rejected]) -> list[Kept]:
        """The direction check of the BatchNorm statistics' updates (``min_bn_cosine``), from the small arrays."""
        if not self.bn_reference or self.limits.min_bn_cosine <= -1 or len(kept) < MIN_DIRECTION_REPLIES:
            return kept
        deltas = np.stack([self._bn_delta(k) for k in kept])
        cosines = cosines_from_gram(deltas @ deltas.T)
        what = "BatchNorm statistics update"
        return _split(kept, direction_outliers(cosines, self.limits.min_bn_cosine, what, "min_bn_cosine"), rejected)

    def _bn_delta(self, kept: Kept) -> NDArray:
        """A reply's change of the BatchNorm running statistics, flattened (float64)."""
        arrays = kept.reply.arrays
        return np.concatenate([(arrays[k] - ref).astype(np.float64).ravel() for k, ref in self.bn_reference.items()])

    def _directions(self, server_round: int, bounded: list[Kept], rejected: list[Rejected]) -> list[Kept]:
        """The direction check (``min_update_cosine``) over the replies within the norm bound; appends to
        ``rejected`` and returns the replies kept, with their cosines."""
        if len(bounded) < MIN_DIRECTION_REPLIES:
            if self.limits.min_update_cosine > -1:
                log.info(
                    "round %d: direction check skipped: %d replies within the norm bound (needs %d)",
                    server_round,
                    len(bounded),
                    MIN_DIRECTION_REPLIES,
                )
            return bounded
        cosines = cosines_from_gram(self.spill.gram([k.row for k in bounded]))
        problems = direction_outliers(cosines, self.limits.min_update_cosine)
        with_cosines = [dataclasses.replace(k, cosine=c) for k, c in zip(bounded, cosines, strict=True)]
        return self._bn_directions(_split(with_cosines, problems, rejected), rejected)


def _split(items: list[Kept], problems: Sequence[str | None], rejected: list[Rejected]) -> list[Kept]:
    """The items without a problem; the others appended to ``rejected`` with theirs."""
    rejected += [Rejected(k.reply.node, k.reply.site, p) for k, p in zip(items, problems, strict=True) if p]
    return [k for k, p in zip(items, problems, strict=True) if p is None]


def with_weights(kept: list[Kept], limits: StrategyConfig, pins: Mapping[str, int]) -> list[Kept]:
    """``kept`` with each reply's aggregation weight (:mod:`fedseg.server.run.weighting`), times its FLTrust score
    where it has one."""
    weights = aggregation_weights(
        [k.reply.cases for k in kept], limits.weighting, limits.max_weight_ratio, [k.reply.site in pins for k in kept]
    )
    return [
        dataclasses.replace(k, weight=w if math.isnan(k.trust) else w * k.trust)
        for k, w in zip(kept, weights, strict=True)
    ]
