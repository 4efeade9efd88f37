"""Robustness benchmark: 3 phantom sites, one turns malicious from round 2; central Dice per round per aggregator.

Rounds run in-process with the server's own guard and aggregation code (:class:`RecordingStrategy`: reply
validation, update-norm bound, direction check, the Flower strategy) and the sites' own training function
(``train_locally``), on a tiny network and small phantoms. Attacks by the third site from round 2 on (it trains
honestly first):

* ``x100``: every floating-point weight multiplied by 100 (of the global model it received: it does not train);
* ``nan``: one weight element set to NaN (likewise);
* ``sign-flip``: it trains, then sends w_global − (w_trained − w_global), its update reversed (the weights; its
  BatchNorm running statistics as trained, so that no negative variance gives it away);
* ``x1.5`` / ``x3``: it trains, then sends its update scaled by 1.5 or 3;
* ``lie``: "a little is enough" (Baruch et al. 2019): every weight coordinate at the honest sites' mean update
  minus one standard deviation of their updates (it sees the honest updates: the strongest form);
* ``orthogonal``: a payload orthogonal to its honest update, of the same length;
* ``label-flip``: it trains honestly on its own cases with the organ labels permuted;
* ``free-rider``: it sends back the model it received and claims 100000 cases (from round 1 on: it trains
  honestly in round 1 only, with that claim);
* ``bn-var``: it trains honestly, then raises every BatchNorm ``running_var`` ×3;
* ``case-liar``: it trains honestly, adds a secret offset (+0.01 on every weight) and claims 100000 cases in
  every reply, its first included;
* ``none``: it stays honest (measures the honest sites' update cosines over every round).

Each row also prints the attacker's mean share of the aggregate over the rounds it attacked (its aggregation
weight over the round's total; 0 when rejected; an equal mix of three sites is 0.33).

The reference of each aggregator is the same federation in which site 3 simply **leaves** from round 2 on (same
start, same round 1 with all three sites, then the two honest sites; same seeds): "final − ref" is what the attack
costs beyond losing the site. Trainings are cached by (global model, site, round), so rows that end up with the
same global models (an attacker rejected every round) cost no extra training.

Aggregators: FedAvg with validation and the loss screen on the central set (the default server), FedAvg with
the loss screen and FLTrust (a reference update trained each round on a root set of two other phantom cases),
FedAvg without the loss screen, coordinate-wise median, trimmed mean, Krum (f = 1); each robust rule also with the
direction check off (``min_update_cosine = -1``); every one validates replies. Prints Dice per round, the sites'
update cosines and rejections, and the final Dice difference to the reference.

    nice -n 10 python bench/robustness.py --quick     # 3 rounds x 3 steps, 32^3 phantoms
    nice -n 10 python bench/robustness.py             # 6 rounds x 10 steps, 48^3 phantoms, every row (743 s)
    nice -n 10 python bench/robustness.py --aggregators fedavg+validation --attacks x100,nan,sign-flip,none
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Message
from flwr.serverapp.strategy import FedAvg

from fedseg.client.training import train_locally
from fedseg.common.data.manifest import site_manifest
from fedseg.common.data.preprocess import PreparedCase, PreprocessConfig
from fedseg.common.data.sitecache import prepare_labelled
from fedseg.common.engine.config import TrainConfig
from fedseg.common.engine.validation import validate
from fedseg.common.fl.offline import from_site
from fedseg.common.fl.protocol import LocalResult, TrainTask, reply_content, round_seed
from fedseg.common.fl.weights import arrays_from_model, load_arrays
from fedseg.common.nn.model import ModelConfig, build_model
from fedseg.common.synthetic.phantoms import generate_phantoms
from fedseg.server.config import ServerConfig, StrategyConfig
from fedseg.server.run.bn import is_bn_statistic
from fedseg.server.run.fltrust import RootTrust
from fedseg.server.run.lossscreen import LossScreen, screen_patches
from fedseg.server.run.strategy import RecordingStrategy, build_strategy

Attack = Callable[[dict[str, np.ndarray], dict[str, np.ndarray]], dict[str, np.ndarray]]


def _x100(trained: dict[str, np.ndarray], glob: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: (v * 100).astype(v.dtype) if v.dtype.kind == "f" else v for k, v in trained.items()}


def _nan(trained: dict[str, np.ndarray], glob: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = {k: v.copy() for k, v in trained.items()}
    first = next(k for k, v in out.items() if v.dtype.kind == "f" and v.size)
    out[first].reshape(-1)[0] = np.nan
    return out


def _flip(trained: dict[str, np.ndarray], glob: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The weights' update reversed; the BatchNorm running statistics stay as trained (flipped too, a variance
    goes negative in most rounds and validation rejects the reply before any direction check)."""
    return {
        k: (2 * glob[k] - v).astype(v.dtype) if v.dtype.kind == "f" and not is_bn_statistic(k) else v
        for k, v in trained.items()
    }


def _honest(trained: dict[str, np.ndarray], glob: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return trained


def _weights_only(fn: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> Attack:
    """An attack that changes the aggregated weights' update ``u`` to ``fn(u, key)``, BatchNorm statistics as
    trained."""

    def attack(trained: dict[str, np.ndarray], glob: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {
            k: (glob[k] + fn(v - glob[k], glob[k])).astype(v.dtype)
            if v.dtype.kind == "f" and not is_bn_statistic(k)
            else v
            for k, v in trained.items()
        }

    return attack


def _orthogonal(trained: dict[str, np.ndarray], glob: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    keys = [k for k, v in trained.items() if v.dtype.kind == "f" and not is_bn_statistic(k)]
    update = np.concatenate([(trained[k] - glob[k]).ravel() for k in keys]).astype(np.float64)
    noise = np.random.default_rng(0).standard_normal(update.size)
    noise -= update * (noise @ update) / (update @ update)
    noise *= np.linalg.norm(update) / np.linalg.norm(noise)
    out, at = dict(trained), 0
    for k in keys:
        n = trained[k].size
        out[k] = (glob[k] + noise[at : at + n].reshape(glob[k].shape)).astype(trained[k].dtype)
        at += n
    return out


def _bn_var(trained: dict[str, np.ndarray], glob: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: (v * 3).astype(v.dtype) if k.endswith(".running_var") else v for k, v in trained.items()}


def little_is_enough(
    honest: list[dict[str, np.ndarray]], trained: dict[str, np.ndarray], glob: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """Every aggregated weight at the honest updates' mean minus one standard deviation (BatchNorm as trained)."""
    out = dict(trained)
    for k, v in trained.items():
        if v.dtype.kind == "f" and not is_bn_statistic(k):
            updates = np.stack([h[k] - glob[k] for h in honest]).astype(np.float64)
            out[k] = (glob[k] + updates.mean(axis=0) - updates.std(axis=0)).astype(v.dtype)
    return out


LEAVES = "leaves"
ATTACKS: dict[str, Attack] = {
    "x100": _x100,
    "nan": _nan,
    "sign-flip": _flip,
    "x1.5": _weights_only(lambda u, g: 1.5 * u),
    "x3": _weights_only(lambda u, g: 3 * u),
    "lie": _honest,  # replaced by little_is_enough in federation(): it needs the honest updates
    "orthogonal": _orthogonal,
    "label-flip": _honest,
    "free-rider": lambda trained, glob: dict(glob),
    "bn-var": _bn_var,
    "case-liar": _weights_only(lambda u, g: u + 0.01),
    "none": _honest,
}
TRAINS = {"x100": False, "nan": False, "free-rider": False}
LIAR_CASES = {"free-rider": 100_000, "case-liar": 100_000}
#: label -> (strategy name, min_update_cosine, the server's own screen: loss, fltrust or off)
AGGREGATORS: dict[str, tuple[str, float, str]] = {
    "fedavg (default)": ("fedavg", 0.0, "loss"),
    "fedavg fltrust": ("fedavg", 0.0, "fltrust"),
    "fedavg no-loss-screen": ("fedavg", 0.0, "off"),
    "fedavg no-loss-screen cosine-off": ("fedavg", -1.0, "off"),
    "median": ("median", 0.0, "off"),
    "median (cosine off)": ("median", -1.0, "off"),
    "trimmed-mean": ("trimmed-mean", 0.0, "off"),
    "trimmed-mean (cosine off)": ("trimmed-mean", -1.0, "off"),
    "krum": ("krum", 0.0, "off"),
    "krum (cosine off)": ("krum", -1.0, "off"),
}


def _message(node: int, arrays: dict[str, np.ndarray], result: LocalResult, site: str) -> Message:
    record = ArrayRecord({k: Array(np.array(v, order="C")) for k, v in arrays.items()})
    return from_site(reply_content(record, result, site), node)


class Sites:
    """The phantom sites' prepared cases and a cache of their trainings (same global model + seed = same result)."""

    def __init__(self, root: Path, n_sites: int, task: TrainTask) -> None:
        self.task = task
        self.cases: list[list[PreparedCase]] = []
        for i in range(1, n_sites + 1):
            folder = root / f"site-{i}"
            manifest = site_manifest(folder, str(folder / "labels.toml"))
            self.cases.append(
                prepare_labelled(folder, manifest, task.preprocess, root / "cache" / f"s{i}", role="site", use="train")
            )
        val = root / "validation"
        self.val = prepare_labelled(
            val, site_manifest(val, str(val / "labels.toml")), task.preprocess, root / "cache" / "v", role="v", use="v"
        )
        own = root / "root" / "site-1"  # the server's FLTrust root set: other cases from the same generator
        self.root = prepare_labelled(
            own, site_manifest(own, str(own / "labels.toml")), task.preprocess, root / "cache" / "r", role="r", use="r"
        )
        self.declared = LocalResult(cases=len(self.cases[-1]), loss=0.5, samples=task.train.batch_size, seconds=1.0)
        self._cache: dict[tuple[str, int, int, bool], tuple[dict[str, np.ndarray], LocalResult]] = {}

    def train(
        self, glob: ArrayRecord, site: int, rnd: int, flipped: bool = False
    ) -> tuple[dict[str, np.ndarray], LocalResult]:
        """Site ``site``'s training of round ``rnd`` from ``glob`` (``flipped``: on its cases with organ labels
        permuted 1->2->3->4->1)."""
        digest = hashlib.sha256(b"".join(glob[k].data for k in glob)).hexdigest()
        key = (digest, site, rnd, flipped)
        if key not in self._cache:
            seed = round_seed(self.task.train.seed, rnd, f"site-{site}")
            cases = self.cases[site - 1]
            if flipped:
                permute = np.array([0, 2, 3, 4, 1], np.uint8)
                cases = [dataclasses.replace(c, label=permute[c.label]) for c in cases if c.label is not None]
            arrays, result = train_locally(glob, self.task, cases, "cpu", seed)
            self._cache[key] = ({k: a.numpy() for k, a in arrays.items()}, result)
        return self._cache[key]


@dataclass
class Outcome:
    """One federation: Dice after each round, and per round the accepted sites' cosines and the rejections."""

    dice: list[float] = field(default_factory=list)
    cosines: list[dict[str, float | None]] = field(default_factory=list)
    rejected: list[dict[str, str]] = field(default_factory=list)
    shares: list[float] = field(default_factory=list)
    norms: list[dict[str, float | None]] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)


def _attacked(sites: Sites, glob: ArrayRecord, rnd: int, attack: str) -> tuple[dict[str, np.ndarray], LocalResult]:
    """Site 3's reply (weights and metrics) under ``attack`` in round ``rnd``."""
    reference = {k: a.numpy() for k, a in glob.items()}
    if TRAINS.get(attack, True):
        trained, result = sites.train(glob, 3, rnd, flipped=attack == "label-flip")
    else:
        trained, result = reference, sites.declared
    if attack == "lie":
        trained = little_is_enough([sites.train(glob, s, rnd)[0] for s in (1, 2)], trained, reference)
    else:
        trained = ATTACKS[attack](trained, reference)
    return trained, dataclasses.replace(result, cases=LIAR_CASES.get(attack, result.cases))


def federation(sites: Sites, name: str, min_cosine: float, screen: str, attack: str, rounds: int) -> Outcome:
    """One federation of three sites; the last one attacks (or leaves: ``attack = LEAVES``) from round 2."""
    n_sites = 3
    torch.manual_seed(0)
    model = build_model(sites.task.model)
    limits = StrategyConfig(name=name, min_update_cosine=min_cosine)  # type: ignore[arg-type]
    cfg = ServerConfig(min_sites=n_sites, strategy=limits)
    inner: FedAvg = build_strategy(cfg)
    patches = screen_patches(sites.val, sites.task.train.patch_size, 2)
    screen_model = build_model(sites.task.model)
    loss_screen = LossScreen(patches, screen_model, limits.max_loss_ratio) if screen != "off" else None
    trust = RootTrust(sites.root, sites.task.model, sites.task.train) if screen == "fltrust" else None
    strategy = RecordingStrategy(inner, n_sites, 1, 1.0, limits=cfg.strategy, loss_screen=loss_screen, root_trust=trust)
    glob = arrays_from_model(model)
    out = Outcome()
    for rnd in range(1, rounds + 1):
        strategy.begin_round(glob)
        replies = []
        for site in range(1, n_sites + 1):
            if site == n_sites and rnd >= 2:
                if attack == LEAVES:
                    continue
                trained, result = _attacked(sites, glob, rnd, attack)
            else:
                trained, result = sites.train(glob, site, rnd)
                if site == n_sites:  # a case liar claims its cases from its first reply on
                    result = dataclasses.replace(result, cases=LIAR_CASES.get(attack, result.cases))
            replies.append(_message(10 + site, trained, result, f"site-{site}"))
        started = time.perf_counter()
        new, _ = strategy.aggregate_train(rnd, replies)
        out.seconds.append(time.perf_counter() - started)
        glob = new if new is not None else glob
        load_arrays(model, glob)
        out.dice.append(validate(model, sites.val, sites.task.train.patch_size, "cpu")["dice_mean"])
        stats = strategy.stats[rnd]
        out.cosines.append({s.site: s.update_cosine for s in stats.sites})
        out.norms.append({s.site: s.update_norm for s in stats.sites})
        out.rejected.append({r.site: r.reason for r in stats.rejected})
        if rnd >= 2:
            out.shares.append(next((s.share or 0.0 for s in stats.sites if s.site == f"site-{n_sites}"), 0.0))
    return out


def _report(label: str, attack: str, outcome: Outcome) -> None:
    print(f"{label} / {attack}:", " ".join(f"{d:.4f}" for d in outcome.dice), flush=True)
    for rnd, (cosines, rejected) in enumerate(zip(outcome.cosines, outcome.rejected, strict=True), start=1):
        cells = [f"{site} {'-' if c is None else f'{c:.3f}'}" for site, c in cosines.items()]
        cells += [f"{site} rejected: {reason}" for site, reason in rejected.items()]
        print(f"    r{rnd}: " + "; ".join(cells), flush=True)


def _honest_cosines(results: dict[tuple[str, str], Outcome]) -> list[float]:
    """The honest sites' cosines (site 3's too when it stays honest), once per distinct federation."""
    seen: dict[tuple[float, ...], list[float]] = {}
    for (_, attack), outcome in results.items():
        honest = [
            c
            for cosines in outcome.cosines
            for site, c in cosines.items()
            if c is not None and (site != "site-3" or attack in (LEAVES, "none"))
        ]
        seen.setdefault(tuple(outcome.dice), honest)
    return [c for values in seen.values() for c in values]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3 rounds x 3 steps on 32^3 phantoms")
    parser.add_argument("--rounds", type=int, help="rounds (default 6, --quick 3)")
    parser.add_argument("--steps", type=int, help="local steps per round (default 10, --quick 3)")
    parser.add_argument("--size", type=int, help="phantom edge in voxels (default 48, --quick 32)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (2 oversubscribed ones crawl)")
    parser.add_argument("--aggregators", default=",".join(AGGREGATORS), help="comma-separated, of: %(default)s")
    parser.add_argument("--attacks", default=",".join(ATTACKS), help="comma-separated, of: %(default)s")
    args = parser.parse_args()
    rounds, steps, size = (3, 3, 32) if args.quick else (6, 10, 48)
    rounds, steps, size = args.rounds or rounds, args.steps or steps, args.size or size
    labels, attacks = args.aggregators.split(","), args.attacks.split(",")
    unknown = [x for x in labels if x not in AGGREGATORS] + [x for x in attacks if x not in ATTACKS]
    if unknown:
        parser.error(f"unknown aggregator or attack: {', '.join(unknown)}")
    torch.set_num_threads(args.threads)
    task = TrainTask(
        model=ModelConfig(feature_scale=16),
        train=TrainConfig(steps=steps, lr=3e-3, patch_size=(32, 32, 32), augment=False, amp=False),
        preprocess=PreprocessConfig(),
        deadline=3600.0,
    )
    start = time.perf_counter()
    results: dict[tuple[str, str], Outcome] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "data"
        generate_phantoms(root, sites=3, cases_per_site=2, val_cases=1, size=(size, size, size))
        generate_phantoms(root / "root", sites=1, cases_per_site=2, val_cases=0, size=(size, size, size), seed=1)
        sites = Sites(root, 3, task)
        for label in labels:
            name, min_cosine, screen = AGGREGATORS[label]
            for attack in [LEAVES, *attacks]:
                results[(label, attack)] = federation(sites, name, min_cosine, screen, attack, rounds)
                _report(label, attack, results[(label, attack)])
    rounds_header = " | ".join(f"r{r}" for r in range(1, rounds + 1))
    header = f"| aggregator | site 3 from r2 | {rounds_header} | final − ref | attacker share | rejected rounds |"
    print(f"\n{rounds} rounds x {steps} steps, {size}^3 phantoms, feature_scale 16, central mean Dice per round")
    print("ref: the same aggregator's federation in which site 3 leaves from round 2\n")
    print(header)
    print("|" + " --- |" * 2 + " ---: |" * (rounds + 3))
    for (label, attack), outcome in results.items():
        cells = " | ".join(f"{d:.3f}" for d in outcome.dice)
        ref = results[(label, LEAVES)].dice[-1]
        share = f"{np.mean(outcome.shares):.3f}" if attack != LEAVES and outcome.shares else "-"
        caught = sum("site-3" in r for r in outcome.rejected[1:])
        print(f"| {label} | {attack} | {cells} | {outcome.dice[-1] - ref:+.3f} | {share} | {caught}/{rounds - 1} |")
    for label in labels:
        seconds = [t for (lab, _), o in results.items() if lab == label for t in o.seconds]
        print(f"{label}: aggregation (screens included) {np.mean(seconds):.2f} s per round on average")
    ratios = [
        n / float(np.median([v for v in norms.values() if v]))
        for (_, attack), o in results.items()
        if attack in (LEAVES, "none")
        for norms in o.norms
        for n in norms.values()
        if n and len(norms) >= 3
    ]
    if ratios:
        print(f"\nhonest update norms / their round's median: {min(ratios):.2f}-{max(ratios):.2f} over {len(ratios)}")
    honest = _honest_cosines(results)
    if honest:
        print(
            f"\nhonest sites' update cosines (checked rounds, distinct federations): min {min(honest):.3f}, median "
            f"{float(np.median(honest)):.3f}, max {max(honest):.3f} over {len(honest)}"
        )
    print(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
