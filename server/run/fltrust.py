"""A reference update the server trusts: FLTrust (Cao et al., NDSS 2021) on a small root set of the server's own.

Screening against the round's median cannot tell which of two hospitals lies, and the loss screen
(:mod:`fedseg.server.run.lossscreen`) only rejects replies far worse than the others. FLTrust instead gives the
server its own direction: each round it trains the global model on a small labelled **root set** the operator names
(``strategy.root_data``, never the validation cases), exactly as a site would (the sites' training function, the
round's task, ``root_steps`` steps), and takes the change of the aggregated weights as the reference update ``g0``.
Every reply's update ``g_i`` then gets

* a trust score ``max(0, cos(g_i, g0))``: a reply whose update does not point the server's way at all is rejected
  (its score is 0), with the cosine in the reason;
* a rescaling to the reference's length, ``‖g0‖ / ‖g_i‖``: a scaled update (×3, ×100) counts no more than an honest
  one, and a near-zero one (a free-rider's) no less, so neither the length nor the case count buys weight.

The aggregation weight becomes the trust score × the reply's capped case weight (:mod:`fedseg.server.run.weighting`),
used everywhere a weight is used (the mean, BatchNorm pooling, the class-aware head). With FedAvg this is FLTrust's
rule, ``Σ TS_i ‖g0‖/‖g_i‖ g_i / Σ TS_i``, except that unequal sites keep their (bounded) case weights. BatchNorm
running statistics are not rescaled: they are bounded and pooled as without FLTrust.

The cost is one local training on the server per round (``root_steps`` steps on the root cases) plus a dot product
per reply; ``bench/robustness.py`` prints it next to the loss screen's.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from fedseg.common.data.preprocess import PreparedCase
from fedseg.common.engine.config import TrainConfig
from fedseg.common.engine.train import train_model
from fedseg.common.nn.model import ModelConfig, build_model
from fedseg.server.run.replies import Rejected
from fedseg.server.run.screen import Kept, Screened
from fedseg.server.run.spill import Spill

log = logging.getLogger(__name__)
_REJECTED = "round %d: rejected the reply of %s (node %d): %s"

NDArray = np.ndarray


@dataclasses.dataclass(frozen=True)
class Reference:
    """The round's reference update over the aggregated weights, and its norm."""

    update: dict[str, NDArray]
    norm: float


class RootTrust:
    """Trains the server's reference update each round on the root cases.

    Args:
        cases: the root set (labelled, prepared like the sites' cases).
        model: the federation's network.
        train: the sites' training recipe (loss, optimiser, patch, batch); its steps are replaced by ``steps``.
        steps: optimiser steps of the reference update (None: the sites' own).
        device: where the server trains it.
    """

    def __init__(
        self,
        cases: Sequence[PreparedCase],
        model: ModelConfig,
        train: TrainConfig,
        steps: int | None = None,
        device: str = "cpu",
    ) -> None:
        self.cases = [c for c in cases if c.label is not None]
        if not self.cases:
            raise ValueError("FLTrust needs at least one labelled root case")
        self.model = model
        self.train = train if steps is None else train.model_copy(update={"steps": steps})
        self.device = device

    def reference(self, glob: Mapping[str, NDArray], keys: Sequence[str], server_round: int) -> Reference:
        """``g0``: the change of ``keys`` when the global weights ``glob`` train on the root set in round
        ``server_round`` (seeded by the recipe's seed and the round)."""
        net = build_model(self.model)
        net.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in glob.items()})
        recipe = self.train.model_copy(update={"seed": self.train.seed + 7919 * server_round})
        train_model(net, self.cases, recipe, self.device, progress=False)
        trained = {k: v.detach().cpu().numpy() for k, v in net.state_dict().items()}
        update = {k: trained[k].astype(np.float64) - glob[k].astype(np.float64) for k in keys}
        norm = math.sqrt(math.fsum(float(np.vdot(v, v)) for v in update.values()))
        return Reference(update, norm)


def trust_replies(
    trust: RootTrust, glob: Mapping[str, NDArray], screened: Screened, spill: Spill, run_round: int
) -> list[Kept]:
    """The replies of ``screened`` whose update has a positive cosine with the round's reference update, each with
    its trust score and rescaling (module docstring); the others appended to ``screened.rejected``. When the
    reference itself is unusable (zero or not finite) the round is not trust-weighted, with a warning."""
    if not screened.kept:
        return screened.kept
    started = time.perf_counter()
    ref = trust.reference(glob, spill.keys, run_round)
    if not (math.isfinite(ref.norm) and ref.norm > 0):
        log.warning("round %d: reference update unusable (norm %g): no trust weights", run_round, ref.norm)
        return screened.kept
    dots = spill.dots([k.row for k in screened.kept], ref.update)
    kept = []
    for k, dot in zip(screened.kept, dots, strict=True):
        cosine = dot / (k.weight_norm * ref.norm) if k.weight_norm > 0 else math.nan
        if not cosine > 0:  # NaN too
            reason = f"its update's cosine with the server's reference update is {cosine:.3f} (FLTrust trust 0)"
            screened.rejected.append(Rejected(k.reply.node, k.reply.site, reason))
            log.warning(_REJECTED, run_round, k.reply.site, k.reply.node, reason)
            continue
        kept.append(dataclasses.replace(k, trust=min(cosine, 1.0), scale=ref.norm / k.weight_norm))
    log.info(
        "round %d: FLTrust in %.1f s (reference norm %.4g): %s",
        run_round,
        time.perf_counter() - started,
        ref.norm,
        ", ".join(f"{k.reply.site} trust {k.trust:.3f} x{k.scale:.3g}" for k in kept) or "no reply trusted",
    )
    return kept
