"""Which cases go to which virtual hospital: the plan of a split, computed from case ids alone (no files).

* The central validation set is drawn first, from the seed and ``val_fraction`` only, so every scheme and site
  count with the same seed holds out the same cases and results stay comparable across splits.
* ``iid``: the other cases are shuffled with the seed and dealt round-robin; every site annotates every organ.
* ``by-organ`` (ConDistFL's setting): cases dealt as for ``iid``; site *k* annotates only organ *k* (cycling
  through the dataset's organs), the others are relabelled background in its files and its manifest says so.
* ``by-source``: each institution's cases stay together; institutions go, largest first, to the site holding
  the fewest cases so far (ties: lowest site number), so sizes come out as even as whole institutions allow.

Every bad combination is a :class:`ConfigError` naming the numbers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from fedseg.common.errors import ConfigError

Scheme = Literal["iid", "by-organ", "by-source"]


@dataclass(frozen=True)
class SitePlan:
    """One virtual hospital: its name, cases, the organs it annotates and, for ``by-source``, its institutions."""

    name: str
    cases: tuple[str, ...]
    annotated: tuple[str, ...]
    institutions: tuple[str, ...] = ()


@dataclass(frozen=True)
class SplitPlan:
    """A whole split: the scheme, seed, the held-out validation cases and the sites."""

    scheme: Scheme
    seed: int
    validation: tuple[str, ...]
    sites: tuple[SitePlan, ...]


@dataclass(frozen=True)
class SplitRequest:
    """What to split: the dataset's name, labelled case ids and organs; how (sites, scheme, seed, validation share)."""

    dataset: str
    case_ids: Sequence[str]
    organs: Sequence[str]
    sites: int
    scheme: Scheme = "iid"
    seed: int = 0
    val_fraction: float = 0.2


def plan_split(request: SplitRequest, institutions: Mapping[str, str] | None = None) -> SplitPlan:
    """The split of ``request`` (see the module docstring); ``institutions`` maps case id -> institution.

    Raises:
        ConfigError: fewer than one site, a validation share outside [0, 1), too few cases for the sites,
            ``by-organ`` on a one-organ dataset or with fewer sites than organs, ``by-source`` without an
            institution field, a case missing from it, or fewer institutions than sites.
    """
    if request.sites < 1:
        raise ConfigError(f"--sites must be at least 1, got {request.sites}")
    if not 0 <= request.val_fraction < 1:
        raise ConfigError(f"--val-fraction must be at least 0 and below 1, got {request.val_fraction:g}")
    validation, rest = held_out(request.case_ids, request.seed, request.val_fraction)
    if len(rest) < request.sites:
        raise ConfigError(
            f"{request.dataset} has {len(request.case_ids)} labelled cases; {len(validation)} held out for validation "
            f"leave {len(rest)}, fewer than --sites {request.sites}"
        )
    sites = _by_source(request, rest, institutions) if request.scheme == "by-source" else _dealt(request, rest)
    return SplitPlan(request.scheme, request.seed, validation, sites)


def held_out(case_ids: Sequence[str], seed: int, fraction: float) -> tuple[tuple[str, ...], list[str]]:
    """(validation cases, the rest), both sorted: ``ceil(fraction * n)`` cases drawn with ``seed`` alone."""
    ordered = sorted(case_ids)
    count = math.ceil(fraction * len(ordered) - 1e-9)
    drawn = np.random.default_rng([seed, 0]).permutation(len(ordered))[:count]
    chosen = {ordered[i] for i in drawn}
    return tuple(sorted(chosen)), [c for c in ordered if c not in chosen]


def _dealt(request: SplitRequest, cases: list[str]) -> tuple[SitePlan, ...]:
    """``iid`` and ``by-organ``: shuffle with the seed, deal round-robin."""
    organs = tuple(request.organs)
    if request.scheme == "by-organ":
        if len(organs) < 2:
            raise ConfigError(
                f"--scheme by-organ needs a dataset with several organs; {request.dataset} annotates only "
                f"{', '.join(organs)} (use --scheme iid, or a multi-organ dataset such as totalsegmentator)"
            )
        if request.sites < len(organs):
            raise ConfigError(
                f"--scheme by-organ gives each site one organ; {request.dataset} has {len(organs)} "
                f"({', '.join(organs)}), so --sites must be at least {len(organs)}, got {request.sites}"
            )
    order = np.random.default_rng([request.seed, 1]).permutation(len(cases))
    shuffled = [cases[i] for i in order]
    return tuple(
        SitePlan(
            f"site-{k + 1}",
            tuple(sorted(shuffled[k :: request.sites])),
            (organs[k % len(organs)],) if request.scheme == "by-organ" else organs,
        )
        for k in range(request.sites)
    )


def _by_source(request: SplitRequest, cases: list[str], institutions: Mapping[str, str] | None) -> tuple[SitePlan, ...]:
    if institutions is None:
        raise ConfigError(
            f"--scheme by-source splits by the dataset's own institution field and {request.dataset} has none "
            "(TotalSegmentator's meta.csv does); use --scheme iid or by-organ"
        )
    missing = [c for c in cases if c not in institutions]
    if missing:
        raise ConfigError(f"{request.dataset}: case {missing[0]} has no institution ({len(missing)} cases lack one)")
    groups: dict[str, list[str]] = {}
    for case in cases:
        groups.setdefault(institutions[case], []).append(case)
    if len(groups) < request.sites:
        raise ConfigError(
            f"--scheme by-source: {request.dataset}'s cases come from {len(groups)} institutions "
            f"({', '.join(sorted(groups))}), fewer than --sites {request.sites}"
        )
    members: list[list[str]] = [[] for _ in range(request.sites)]
    loads = [0] * request.sites
    for institution in sorted(groups, key=lambda name: (-len(groups[name]), name)):
        site = min(range(request.sites), key=lambda k: (loads[k], k))
        members[site].append(institution)
        loads[site] += len(groups[institution])
    organs = tuple(request.organs)
    return tuple(
        SitePlan(f"site-{k + 1}", tuple(sorted(c for i in names for c in groups[i])), organs, tuple(sorted(names)))
        for k, names in enumerate(members)
    )
