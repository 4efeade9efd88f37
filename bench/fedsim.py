"""In-process federated training for the accuracy benchmarks (``payoff.py``, ``partial_labels.py``).

A loopback Flower federation costs about two minutes of process start-up per round on a 2-core machine
(``federation.py`` part (a) measures it), which rules out the long budgets and repeated seeds an accuracy
comparison needs. Here every site trains in this process with the same trainer the ClientApp calls
(:func:`fedseg.common.engine.train.train_model`) and the server step is the one ``fed-server`` runs by default,
through :class:`fedseg.server.run.offline.OfflineAggregator` (reply screens, capped case weights, Flower's
strategy, BatchNorm statistics pooled by the law of total variance, the class-aware head where sites declare
their classes).

What a recipe may change (one thing at a time in the benchmark):

* ``local_steps`` per round (rounds follow from the total budget);
* ``schedule``: ``constant`` (what a site does today) or ``poly`` decayed over the whole federation;
* ``keep_optimizer``: each site's Adam state carried across rounds instead of a fresh optimiser per round;
* ``prox_mu``: FedProx's proximal term;
* ``bn``: ``pooled`` (BatchNorm averaged) or ``local`` (FedBN: each site keeps its own BatchNorm tensors; the
  global model evaluated centrally carries the pooled ones).
"""

from __future__ import annotations

import argparse
import copy
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from torch import nn

from fedseg.common.data.io import Volume
from fedseg.common.data.manifest import GLOBAL_CLASSES, LabelManifest
from fedseg.common.data.preprocess import PreparedCase, PreprocessConfig, preprocess_case
from fedseg.common.engine.config import TrainConfig
from fedseg.common.engine.device import CpuBf16
from fedseg.common.engine.train import make_optimizer, train_model
from fedseg.common.engine.validation import validate
from fedseg.common.fl.protocol import round_seed
from fedseg.common.synthetic.anatomy import ORGANS
from fedseg.common.synthetic.phantoms import NEUTRAL_ACQUISITION, render_case, site_acquisition
from fedseg.server.config import ServerConfig
from fedseg.server.run.offline import OfflineAggregator, SiteReply

ORGAN_NAMES = GLOBAL_CLASSES[1:]
State = dict[str, torch.Tensor]
#: (steps taken, Dice per organ on the validation set) after each evaluation.
Curve = list[tuple[int, dict[str, float]]]
#: The server step: (site states, each site's cases, the round's global state) -> the new global state.
Aggregate = Callable[[Sequence[State], Sequence[Sequence[PreparedCase]], State], State]


def make_case(
    size: int, site: int, case: int, seed: int, annotated: Sequence[str] = ORGAN_NAMES,
    preprocess: PreprocessConfig | None = None,
) -> PreparedCase:  # fmt: skip
    """Render phantom ``case`` as site ``site`` scans it (0 = the neutral scanner), keeping the ``annotated`` organs.

    ``preprocess`` defaults to :class:`PreprocessConfig`'s defaults; under ``normalization="site"`` pass a site's
    cases through :func:`~fedseg.common.data.sitecache.site_normalised` as the site cache does.

    ``seed`` draws both the anatomy and the site's acquisition (spacing, field of view, HU calibration, noise,
    blur, orientation), so another seed means other patients at other hospitals.
    """
    acq = NEUTRAL_ACQUISITION if site == 0 else site_acquisition(site, seed)
    image, organs = render_case((size, size, size), acq, (seed, 2, site, case))
    table = np.zeros(max(ORGANS) + 1, np.uint8)
    for organ_id, name in ORGANS.items():
        if name in annotated:
            table[organ_id] = GLOBAL_CLASSES.index(name)
    label = Volume(table[organs.array], organs.spacing, organs.origin, organs.direction)
    manifest = LabelManifest(
        labels={GLOBAL_CLASSES.index(n): n for n in ORGAN_NAMES}, annotated=[n for n in ORGAN_NAMES if n in annotated]
    )
    return preprocess_case(image, label, manifest, preprocess or PreprocessConfig(), case_id=f"s{site}_{case}")


def organ_dice(
    model: nn.Module, val: Sequence[PreparedCase], patch: tuple[int, int, int], cpu_bf16: CpuBf16 = "auto"
) -> dict[str, float]:
    """Mean Dice per organ of ``model`` on ``val`` (sliding window, bf16 autocast as ``cpu_bf16`` says)."""
    dice = validate(model, list(val), patch, "cpu", cpu_bf16=cpu_bf16)
    return {organ: float(dice[f"dice_{organ}"]) for organ in ORGAN_NAMES}


@dataclass(frozen=True)
class Recipe:
    """How the federation trains (see the module docstring)."""

    local_steps: int = 30
    schedule: Literal["constant", "poly"] = "constant"
    keep_optimizer: bool = False
    prox_mu: float = 0.0
    bn: Literal["pooled", "local"] = "pooled"

    def label(self) -> str:
        """A short description for tables."""
        parts = [f"E={self.local_steps}", self.schedule]
        if self.keep_optimizer:
            parts.append("keep-opt")
        if self.prox_mu:
            parts.append(f"mu={self.prox_mu:g}")
        if self.bn == "local":
            parts.append("FedBN")
        return " ".join(parts)


def _numpy(state: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy() for k, v in state.items()}


def server_average(
    states: Sequence[State], site_cases: Sequence[Sequence[PreparedCase]], reference: State, class_aware: bool = False
) -> State:
    """``fed-server``'s default aggregation of one round (:class:`fedseg.server.run.offline.OfflineAggregator`: the
    same reply screens, capped case weights, BatchNorm pooling; with ``class_aware`` each site declares the classes
    its cases annotate, so the output head is averaged class-aware). A round that keeps the previous model returns
    ``reference``."""
    replies = [
        SiteReply(
            f"site-{i}",
            _numpy(state),
            len(cases),
            tuple(any(c.annotated[j] for c in cases) for j in range(len(cases[0].annotated))) if class_aware else None,
        )
        for i, (state, cases) in enumerate(zip(states, site_cases, strict=True), start=1)
    ]
    merged, _ = OfflineAggregator(ServerConfig(min_sites=1))(_numpy(reference), replies)
    return {k: torch.from_numpy(np.ascontiguousarray(merged[k])).to(reference[k].dtype) for k in reference}


def add_cpu_bf16_option(parser: argparse.ArgumentParser) -> None:
    """``--cpu-bf16 auto|on|off``: bf16 autocast on the CPU for training and evaluation (auto: where native)."""
    help_text = "bf16 autocast on the CPU for training and inference (auto: on with AVX-512 BF16/AMX)"
    parser.add_argument("--cpu-bf16", choices=("auto", "on", "off"), default="auto", help=help_text)


def bf16_setting(choice: str) -> CpuBf16:
    """``--cpu-bf16`` auto/on/off as a ``cpu_bf16`` setting."""
    return "auto" if choice == "auto" else choice == "on"


def bn_keys(model: nn.Module) -> set[str]:
    """State-dict keys of every BatchNorm layer (affine weights and running statistics)."""
    return {
        f"{name}.{key}" if name else key
        for name, module in model.named_modules()
        if isinstance(module, nn.modules.batchnorm._BatchNorm)
        for key in module.state_dict()
    }


@dataclass
class _Site:
    name: str
    cases: list[PreparedCase]
    model: nn.Module
    optimizer: torch.optim.Optimizer | None = None
    own_bn: State = field(default_factory=dict)


def federate(
    recipe: Recipe,
    sites: Mapping[str, list[PreparedCase]],
    model: nn.Module,
    train_cfg: TrainConfig,
    total_steps: int,
    evaluate: Callable[[nn.Module], dict[str, float]] | None = None,
    eval_every: int = 0,
    aggregate: Aggregate | None = None,
    tally: Counter[str] | None = None,
) -> tuple[nn.Module, Curve, float]:
    """Federate ``model`` (changed in place) over ``sites`` until every site has taken ``total_steps`` steps.

    Returns the global model, the curve ``(steps per site, Dice)`` evaluated every ``eval_every`` rounds (and at
    the end) when ``evaluate`` is given, and the wall seconds. ``aggregate`` defaults to :func:`server_average`.
    ``tally`` counts the sites' ``steps``, ``skipped`` (non-finite) steps and ``fp32_retries`` (bf16 steps
    computed again in fp32).
    """
    aggregate = aggregate or server_average
    start = time.perf_counter()
    rounds = max(1, total_steps // recipe.local_steps)
    bn = bn_keys(model)
    crew = [_Site(name, cases, copy.deepcopy(model)) for name, cases in sites.items()]
    curve: Curve = []
    for server_round in range(1, rounds + 1):
        reference = {k: v.detach().clone() for k, v in model.state_dict().items()}
        states = [_local_round(site, reference, recipe, train_cfg, (server_round, rounds), bn, tally) for site in crew]
        model.load_state_dict(aggregate(states, [s.cases for s in crew], reference))
        if evaluate is not None and ((eval_every and server_round % eval_every == 0) or server_round == rounds):
            curve.append((server_round * recipe.local_steps, evaluate(model)))
    return model, curve, time.perf_counter() - start


def _local_round(
    site: _Site, reference: State, recipe: Recipe, train_cfg: TrainConfig, progress: tuple[int, int],
    bn: set[str], tally: Counter[str] | None,
) -> State:  # fmt: skip
    """One site's round ``progress`` = (round, rounds): take the global weights (its own BatchNorm under FedBN),
    train, return its state."""
    server_round, rounds = progress
    incoming = dict(reference)
    if recipe.bn == "local" and site.own_bn:
        incoming.update(site.own_bn)
    site.model.load_state_dict(incoming)  # copies in place: a kept optimiser still points at these parameters
    cfg = train_cfg.model_copy(
        update={
            "steps": recipe.local_steps,
            "seed": round_seed(train_cfg.seed, server_round, site.name),
            "prox_mu": recipe.prox_mu,
            "lr_schedule": recipe.schedule,
        }
    )
    optimizer = site.optimizer if recipe.keep_optimizer else None
    if optimizer is None:
        optimizer = make_optimizer(site.model, cfg)
    schedule = ((server_round - 1) * recipe.local_steps, rounds * recipe.local_steps)
    report = train_model(site.model, site.cases, cfg, "cpu", optimizer=optimizer, schedule=schedule, progress=False)
    if tally is not None:
        tally.update(steps=report.steps, skipped=report.skipped_steps, fp32_retries=report.fp32_retries)
    if recipe.keep_optimizer:
        site.optimizer = optimizer
    state = {k: v.detach().clone() for k, v in site.model.state_dict().items()}
    if recipe.bn == "local":
        site.own_bn = {k: state[k] for k in bn}
    return state


def train_single(
    cases: Sequence[PreparedCase],
    model: nn.Module,
    train_cfg: TrainConfig,
    total_steps: int,
    evaluate: Callable[[nn.Module], dict[str, float]] | None = None,
    eval_every: int = 0,
) -> tuple[nn.Module, Curve, float]:
    """Train one model on ``cases`` for ``total_steps`` steps (the schedule spans them all); same returns."""
    start = time.perf_counter()
    optimizer = make_optimizer(model, train_cfg)
    curve: Curve = []
    chunk = eval_every if evaluate is not None and eval_every else total_steps
    done = 0
    while done < total_steps:
        steps = min(chunk, total_steps - done)
        cfg = train_cfg.model_copy(update={"steps": steps, "seed": train_cfg.seed + done})
        train_model(model, cases, cfg, "cpu", optimizer=optimizer, schedule=(done, total_steps), progress=False)
        done += steps
        if evaluate is not None:
            curve.append((done, evaluate(model)))
    return model, curve, time.perf_counter() - start
