"""Validation of site train replies before aggregation: pure functions, no Flower runtime needed.

A reply is *accepted* only when it is exactly what our ClientApp sends for the round's global model: one
``arrays`` ArrayRecord with the global model's keys, shapes and dtypes and only finite values; one ``metrics``
MetricRecord with exactly :data:`~fedseg.common.fl.protocol.METRIC_KEYS` (a DP-SGD site adds both
:data:`~fedseg.common.fl.protocol.PRIVACY_METRIC_KEYS`), of the right types; ``num-examples`` a
positive integer no larger than the configured cap and than what the node declared in its first reply (pinned by
:class:`SiteRegistry` for the run); and a site name that the node used from the start and no other node uses. With
node authentication, the names registered with the sites' keys are locked: a node must carry its key's name, and
a registered name never passes to another node.
Everything else becomes a :class:`Rejected` with a one-line reason; nothing here raises.

:func:`norm_outliers` then applies the update-norm bound over the round's accepted replies, and
:func:`direction_outliers` the direction check (:func:`update_cosines`) over the replies still in.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord

from fedseg.common.fl.protocol import (
    ARRAYS_KEY,
    FAILURE_KEY,
    METRIC_KEYS,
    METRICS_KEY,
    PRIVACY_METRIC_KEYS,
    SITE_KEY,
    WEIGHT_KEY,
    record_keys,
    record_of,
)
from fedseg.server.run.spill import Spill

NDArray = np.ndarray
_INT_METRICS = (WEIGHT_KEY, "train-samples")
_FLOAT_METRICS = ("train-loss", "train-seconds")


@dataclass(frozen=True)
class Accepted:
    """A reply that passed validation, unpacked."""

    node: int
    site: str
    arrays: dict[str, NDArray]
    cases: int
    loss: float
    samples: int
    seconds: float
    bytes_in: int
    message: Message = field(repr=False, compare=False)
    epsilon: float | None = None  # the site's cumulative DP-SGD ε at delta (None: no DP)
    delta: float | None = None


@dataclass(frozen=True)
class Rejected:
    """A reply that was dropped, and why."""

    node: int
    site: str
    reason: str


@dataclass
class SiteRegistry:
    """Pins, for the whole run, each node's site name and the case count it declared in its first usable reply.

    ``locked``: node id -> site name registered with the site's key (``fed-server start`` with node
    authentication); see :meth:`lock`. Not part of the saved state: each start registers the keys afresh.
    """

    names: dict[int, str] = field(default_factory=dict)
    cases: dict[int, int] = field(default_factory=dict)
    locked: dict[int, str] = field(default_factory=dict)

    def lock(self, registered: Mapping[int, str]) -> None:
        """Bind each registered node id to its key's site name for good (a resumed run's pins follow the name)."""
        self.locked = dict(registered)
        for node, site in self.locked.items():
            self.hand_over(site, node)

    def hand_over(self, site: str, node: int) -> None:
        """Give ``site``'s name and its declared-cases pin to ``node``: the one rule for a site that comes back as
        a new node (a restarted ``fed-client join``, a registered key on a resumed run)."""
        for other in [o for o, name in self.names.items() if name == site and o != node]:
            del self.names[other]
            if other in self.cases:
                self.cases.setdefault(node, self.cases.pop(other))
        self.names[node] = site

    def declared(self, node: int, site: str) -> int | None:
        """The cases pinned for ``node``, or for the node that last carried ``site`` (None: not pinned yet)."""
        if node in self.cases:
            return self.cases[node]
        owner = next((n for n, name in self.names.items() if name == site), None)
        return self.cases.get(owner) if owner is not None else None

    def identity_problem(self, node: int, site: str, present: Collection[int]) -> str | None:
        """Why ``node`` may not call itself ``site`` (None when it may).

        A registered node must carry the name of its key, and a registered name belongs to its node only. Without
        registration, a name held by another node that also replied this round (``present``) is refused; a name
        whose node did not reply is handed over (a site restarted with ``fed-client join`` comes back as a new
        node).
        """
        registered = self.locked.get(node)
        if self.locked and registered is None:
            return f"node {node} has no registered site key"
        if registered is not None and registered != site:
            return f"node {node} is registered as site {registered!r} (its key) and claims to be {site!r}"
        owner = next((other for other, name in self.locked.items() if name == site), None)
        if owner is not None and owner != node:
            return f"site name {site!r} is registered to node {owner}'s key, not node {node}"
        pinned = self.names.get(node)
        if pinned is not None and pinned != site:
            return f"node {node} joined as site {pinned!r} and now claims to be {site!r}"
        for other, name in self.names.items():
            if other != node and name == site and other in present:
                return f"site name {site!r} belongs to node {other}"
        return None

    def pin(self, node: int, site: str, cases: int) -> None:
        """Remember ``node``'s name and declared cases (first time only; a rejoined site keeps its old cap)."""
        self.hand_over(site, node)
        self.cases.setdefault(node, cases)

    def to_json(self) -> dict[str, dict[str, object]]:
        """A JSON-able copy (strategy state)."""
        return {
            "names": {str(k): v for k, v in self.names.items()},
            "cases": {str(k): v for k, v in self.cases.items()},
        }

    @classmethod
    def from_json(cls, raw: Mapping[str, Mapping[str, object]]) -> SiteRegistry:
        """Inverse of :meth:`to_json`."""
        names = {int(k): str(v) for k, v in raw.get("names", {}).items()}
        cases = {int(k): int(str(v)) for k, v in raw.get("cases", {}).items()}
        return cls(names=names, cases=cases)


def site_of(reply: Message) -> str:
    """The site name a reply carries (``node-<id>`` when it carries none)."""
    if not reply.has_content():
        return f"node-{reply.metadata.src_node_id}"
    record = reply.content.config_records.get(SITE_KEY)
    name = record.get("name") if record is not None else None
    return str(name) if name else f"node-{reply.metadata.src_node_id}"


def _metrics_problem(metrics: Mapping[str, object], max_examples: int) -> str | None:
    keys = set(metrics)
    expected = set(METRIC_KEYS) | (set(PRIVACY_METRIC_KEYS) if keys & set(PRIVACY_METRIC_KEYS) else set())
    if keys != expected:
        extra, missing = sorted(keys - expected), sorted(expected - keys)
        return f"metric keys differ (extra {extra}, missing {missing})"
    for key in sorted(keys & set(PRIVACY_METRIC_KEYS)):
        value = metrics[key]
        if not isinstance(value, int | float) or isinstance(value, bool) or not 0 <= value < math.inf:
            return f"metric {key} must be a finite number >= 0, got {value!r}"
    for key in _INT_METRICS:
        value = metrics[key]
        if not isinstance(value, int) or isinstance(value, bool):
            return f"metric {key} must be an integer, got {value!r}"
    for key in _FLOAT_METRICS:
        value = metrics[key]
        if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
            return f"metric {key} must be a finite number, got {value!r}"
    cases = metrics[WEIGHT_KEY]
    assert isinstance(cases, int)
    if cases <= 0:
        return f"{WEIGHT_KEY} must be positive, got {cases}"
    if cases > max_examples:
        return f"{WEIGHT_KEY} {cases} exceeds max_examples {max_examples}"
    return None


def _arrays_problem(
    reply: Message, reference: Mapping[str, NDArray], given: Mapping[str, NDArray] | None
) -> tuple[str | None, dict[str, NDArray]]:
    record = record_of(reply.content, ARRAYS_KEY, ArrayRecord)
    assert record is not None  # check_content checked it
    keys = set(record.keys()) if given is None else set(given)
    if keys != set(reference):
        extra, missing = sorted(keys - set(reference))[:3], sorted(set(reference) - keys)[:3]
        return f"weight keys differ from the global model (extra {extra}, missing {missing})", {}
    arrays: dict[str, NDArray] = {}
    for key, ref in reference.items():
        try:
            value = record[key].numpy() if given is None else given[key]
        except Exception as err:  # a corrupt payload is the sender's problem, never the round's
            return f"weight {key!r} cannot be decoded ({type(err).__name__})", {}
        if value.shape != ref.shape:
            return f"weight {key!r} has shape {value.shape}, the global model {ref.shape}", {}
        if value.dtype != ref.dtype:
            return f"weight {key!r} has dtype {value.dtype}, the global model {ref.dtype}", {}
        if value.dtype.kind in "fc" and not bool(np.isfinite(value).all()):
            return f"weight {key!r} holds non-finite values", {}
        if key.endswith(".running_var") and bool((value < 0).any()):
            return f"weight {key!r} holds negative variances", {}
        arrays[key] = value
    return None, arrays


def check_content(
    reply: Message, reference: Mapping[str, NDArray], max_examples: int, weights: Mapping[str, NDArray] | None = None
) -> Accepted | Rejected:
    """The checks of one train reply that need nothing but the reply and the round's global weights
    ``reference``: records, metrics, ``num-examples`` within ``max_examples``, and every weight (see the module
    docstring). The site's identity and its declared cases are :func:`check_identity`'s.

    ``weights``: the reply's weights already decoded (a packed reply's views); None: read from its record.
    """
    node = reply.metadata.src_node_id
    site = site_of(reply)
    if reply.has_error():
        return Rejected(node, site, f"error: {reply.error.reason}")
    content = reply.content
    site_record = content.config_records.get(SITE_KEY)
    if site_record is not None and FAILURE_KEY in site_record:
        return Rejected(node, site, f"site failure: {site_record[FAILURE_KEY]!s}")
    if record_keys(content, ArrayRecord) != {ARRAYS_KEY} or record_keys(content, MetricRecord) != {METRICS_KEY}:
        return Rejected(node, site, f"expected one '{ARRAYS_KEY}' ArrayRecord and one '{METRICS_KEY}' MetricRecord")
    metrics = content[METRICS_KEY]
    problem = _metrics_problem(dict(metrics), max_examples)
    arrays: dict[str, NDArray] = {}
    if problem is None:
        problem, arrays = _arrays_problem(reply, reference, weights)
    if problem is not None:
        return Rejected(node, site, problem)
    numbers = {k: _number(metrics[k]) for k in METRIC_KEYS}  # types checked above
    return Accepted(
        node=node,
        site=site,
        arrays=arrays,
        cases=int(numbers[WEIGHT_KEY]),
        loss=numbers["train-loss"],
        samples=int(numbers["train-samples"]),
        seconds=numbers["train-seconds"],
        bytes_in=content[ARRAYS_KEY].count_bytes(),
        message=reply,
        epsilon=_optional_number(metrics.get("epsilon")),
        delta=_optional_number(metrics.get("delta")),
    )


def _optional_number(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def check_identity(reply: Accepted, registry: SiteRegistry, present: Collection[int] = ()) -> str | None:
    """Why an otherwise valid reply may not count (its site name, or more cases than its site declared first),
    or None; then its node's name and case count are pinned in ``registry`` (first time only).

    ``present``: the nodes that replied this round (a name held by one of them cannot be claimed by another).
    """
    problem = registry.identity_problem(reply.node, reply.site, present)
    if problem is not None:
        return problem
    declared = registry.declared(reply.node, reply.site)  # a rejoined site inherits the cap its name declared
    if declared is not None and reply.cases > declared:
        return f"{WEIGHT_KEY} {reply.cases} exceeds the {declared} cases this site declared first"
    registry.pin(reply.node, reply.site, reply.cases)
    return None


def check_reply(
    reply: Message,
    reference: Mapping[str, NDArray],
    registry: SiteRegistry,
    max_examples: int,
    present: Collection[int] = (),
) -> Accepted | Rejected:
    """Validate one train reply: :func:`check_content`, then :func:`check_identity`."""
    checked = check_content(reply, reference, max_examples)
    if isinstance(checked, Rejected):
        return checked
    problem = check_identity(checked, registry, present)
    return checked if problem is None else Rejected(checked.node, checked.site, problem)


def _number(value: object) -> float:
    return float(value) if isinstance(value, int | float) else math.nan


def update_norm(arrays: Mapping[str, NDArray], reference: Mapping[str, NDArray]) -> float:
    """‖w_site − w_global‖ over the floating-point arrays, computed in float64."""
    total = 0.0
    for key, ref in reference.items():
        if ref.dtype.kind == "f":
            diff = arrays[key].astype(np.float64) - ref.astype(np.float64)
            total += float(np.dot(diff.ravel(), diff.ravel()))
    return math.sqrt(total)


def norm_outliers(
    norms: Sequence[float], max_ratio: float, max_norm: float, min_ratio: float = 0.0, what: str = "update"
) -> list[str | None]:
    """For each update norm: why it is out of bounds, or None.

    Bounds: never zero (the global model sent back: a free-rider), ``max_norm`` (absolute; 0 = off), at most
    ``max_ratio`` × the median of ``norms`` and at least ``min_ratio`` × it (each 0 = off; both need at least
    three replies, since with two the median is their mean and bounds nothing). ``what`` names the norm.
    """
    median = statistics.median(norms) if norms else 0.0
    relative = len(norms) >= 3
    out: list[str | None] = []
    for norm in norms:
        if norm == 0:
            out.append(f"the {what} is zero: the reply is the model it was sent (nothing trained)")
        elif max_norm > 0 and norm > max_norm:
            out.append(f"{what} norm {norm:.4g} exceeds max_update_norm {max_norm:.4g}")
        elif relative and max_ratio > 0 and norm > max_ratio * median:
            out.append(f"{what} norm {norm:.4g} exceeds {max_ratio:g} x the round's median {median:.4g}")
        elif relative and min_ratio > 0 and norm < min_ratio * median:
            out.append(f"{what} norm {norm:.4g} is below {min_ratio:g} x the round's median {median:.4g}")
        else:
            out.append(None)
    return out


#: Fewer replies than this leave the direction check out: with two, each is the other's only peer, and a reversed
#: update cannot be told from an honest one that disagrees with it.
MIN_DIRECTION_REPLIES = 3


def update_cosines(updates: Sequence[Mapping[str, NDArray]], reference: Mapping[str, NDArray]) -> list[float]:
    """How well each update ``w_i − w_global`` agrees with the round's other updates: the cosine that at least half
    of them reach, i.e. the ⌈(n−1)/2⌉-th largest of its n−1 pairwise cosines (the larger one of two with three
    replies).

    An honest update points roughly the way the other honest ones do (a positive cosine with each); a reversed
    one (sign flip) points away from all of them. With n − f honest updates, f < n/2 of them hostile, an honest
    one keeps ⌈(n−1)/2⌉ positive cosines and a hostile one has at most f − 1. (The coordinate-wise median is no
    good reference at three sites: it takes the attacker's coordinate wherever it lies between the honest ones,
    and small noisy updates, pairwise cosines of 0.02-0.3 in ``bench/robustness.py``, gave a reversed update a
    cosine of 0.25-0.39 with it against 0.47-0.68 for honest ones.)

    Only the keys of ``reference`` count (the caller passes the gradient-like weights: no BatchNorm running
    statistics or step counters). Computed in float64 from the float32 weights, slice by slice
    (:class:`~fedseg.server.run.spill.Spill`). A zero update has no direction: NaN, and cosine 0 with the others.
    All NaN with fewer than :data:`MIN_DIRECTION_REPLIES` updates.
    """
    if len(updates) < MIN_DIRECTION_REPLIES:
        return [math.nan] * len(updates)
    with Spill(reference, list(reference)) as spill:
        return cosines_from_gram(spill.gram([spill.add(u) for u in updates]))


def cosines_from_gram(gram: NDArray) -> list[float]:
    """:func:`update_cosines` from the updates' matrix of dot products (n × n, n ≥ :data:`MIN_DIRECTION_REPLIES`)."""
    n = len(gram)
    norms = np.sqrt(np.diag(gram))
    rank = math.ceil((n - 1) / 2)
    out = []
    for i in range(n):
        if norms[i] == 0:
            out.append(math.nan)
            continue
        others = [gram[i, j] / (norms[i] * norms[j]) if norms[j] > 0 else 0.0 for j in range(n) if j != i]
        out.append(float(sorted(others, reverse=True)[rank - 1]))
    return out


def direction_outliers(
    cosines: Sequence[float], min_cosine: float, what: str = "update", setting: str = "min_update_cosine"
) -> list[str | None]:
    """For each cosine (:func:`update_cosines`): why its update points away from the other updates, or None.

    ``min_cosine = -1`` is off (no cosine is below −1, and nothing is rejected); otherwise a NaN (a zero update:
    no direction at all) is rejected too. The caller checks directions only with
    :data:`MIN_DIRECTION_REPLIES` or more replies.
    """
    off = min_cosine <= -1
    return [
        None
        if off or (not math.isnan(c) and c >= min_cosine)
        else f"{what} has no direction (zero)"
        if math.isnan(c)
        else f"{what} direction: half of the other updates reach only cosine {c:.3f} with it, "
        f"below {setting} {min_cosine:g}"
        for c in cosines
    ]
