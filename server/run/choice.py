"""Which Flower strategy aggregates: ``[strategy] name`` in ``server.toml`` mapped to Flower's own classes, and the
one place that says how each family of strategies is driven (:class:`Family`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypedDict

from flwr.serverapp.strategy import (
    Bulyan,
    FedAdam,
    FedAvg,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    MultiKrum,
    Strategy,
)
from flwr.serverapp.strategy.fedopt import FedOpt

from fedseg.common.fl.protocol import ARRAYS_KEY, WEIGHT_KEY
from fedseg.server.config import ServerConfig, StrategyConfig
from fedseg.server.run.bn import Pooling


@dataclass(frozen=True)
class Family:
    """How :class:`~fedseg.server.run.strategy.RecordingStrategy` drives a strategy.

    Attributes:
        mean: its aggregate is the weighted mean itself (FedAvg, FedProx): computed here, slice by slice.
        streams: it needs only that mean (the above, and FedAdam/FedYogi, which start from it): one reply.
        class_aware_head: the output head is averaged class-aware (the averaging rules whose head rows are means).
        server_optimizer: it keeps server-side moments over the weights it aggregates (FedOpt).
        bn_pooling: how BatchNorm statistics are pooled: weighted under the averaging rules, robustly otherwise.
    """

    mean: bool
    streams: bool
    class_aware_head: bool
    server_optimizer: bool
    bn_pooling: Pooling


def family_of(strategy: Strategy) -> Family:
    """The family of a Flower strategy (by its exact class: a subclass may aggregate otherwise)."""
    mean = type(strategy) in (FedAvg, FedProx)
    optimizer = isinstance(strategy, FedOpt)
    streams = mean or optimizer
    pooling: Pooling = "trimmed" if isinstance(strategy, FedTrimmedAvg) else "mean" if streams else "median"
    return Family(mean=mean, streams=streams, class_aware_head=mean, server_optimizer=optimizer, bn_pooling=pooling)


class _Sampling(TypedDict):
    fraction_train: float
    fraction_evaluate: float
    min_train_nodes: int
    min_evaluate_nodes: int
    min_available_nodes: int
    weighted_by_key: str
    arrayrecord_key: str


def build_strategy(cfg: ServerConfig) -> FedAvg:
    """The Flower strategy named in ``cfg.strategy`` with our sampling settings (no client-side evaluation).

    ``min_sites`` is both the minimum sample and the minimum number of connected sites; ``fraction`` of the
    connected sites (at least ``min_sites``) train each round.
    """
    common = _Sampling(
        fraction_train=cfg.fraction,
        fraction_evaluate=0.0,
        min_train_nodes=cfg.min_sites,
        min_evaluate_nodes=0,
        min_available_nodes=cfg.min_sites,
        weighted_by_key=WEIGHT_KEY,
        arrayrecord_key=ARRAYS_KEY,
    )
    s = cfg.strategy
    f = s.num_malicious
    builders: dict[str, Callable[[], FedAvg]] = {
        "fedavg": lambda: FedAvg(**common),
        "fedprox": lambda: FedProx(**common, proximal_mu=s.proximal_mu),
        "fedadam": lambda: FedAdam(**common, **_adaptive(s, cfg.train.lr)),
        "fedyogi": lambda: FedYogi(**common, **_adaptive(s, cfg.train.lr)),
        "median": lambda: FedMedian(**common),
        "trimmed-mean": lambda: FedTrimmedAvg(**common, beta=s.trim_beta),
        "krum": lambda: Krum(**common, num_malicious_nodes=f),
        "multi-krum": lambda: MultiKrum(**common, num_malicious_nodes=f, num_nodes_to_select=s.krum_select),
        "bulyan": lambda: Bulyan(**common, num_malicious_nodes=f),
    }
    return builders[s.name]()


class _Adaptive(TypedDict):
    eta: float
    eta_l: float
    beta_1: float
    beta_2: float
    tau: float


def _adaptive(s: StrategyConfig, site_lr: float) -> _Adaptive:
    return _Adaptive(eta=s.server_lr, eta_l=site_lr, beta_1=s.beta_1, beta_2=s.beta_2, tau=s.tau)
