"""Robustness benchmark: 3 phantom sites, one turns malicious from round 2; central Dice per round per aggregator.

Rounds run in-process with the server's own guard and aggregation code (:class:`RecordingStrategy`: reply
validation, update-norm bound, direction check, the Flower strategy) and the sites' own training function
(``train_locally``), on a tiny network and small phantoms. Attacks by the third site from round 2 on (it trains
honestly first):

* ``x100``: every floating-point weight multiplied by 100 (of the global model it received: it does not train);
* ``nan``: one weight element set to NaN (likewise);
* ``sign-flip``: it trains, then sends w_global − (w_trained − w_global), its update reversed (the weights; its
  BatchNorm running statistics as trained, so that no negative variance gives it away);
* ``none``: it stays honest (measures the honest sites' update cosines over every round).

The reference of each aggregator is the same federation in which site 3 simply **leaves** from round 2 on (same
start, same round 1 with all three sites, then the two honest sites; same seeds): "final − ref" is what the attack
costs beyond losing the site. Trainings are cached by (global model, site, round), so rows that end up with the
same global models (an attacker rejected every round) cost no extra training.

Aggregators: FedAvg with validation (the default server), coordinate-wise median, trimmed mean, Krum (f = 1);
each also with the direction check off (``min_update_cosine = -1``); every one validates replies. Prints Dice per
round, the sites' update cosines and rejections, and the final Dice difference to the reference.

    nice -n 10 python bench/robustness.py --quick     # 3 rounds x 3 steps, 32^3 phantoms
    nice -n 10 python bench/robustness.py             # 6 rounds x 10 steps, 48^3 phantoms, every row (743 s)
    nice -n 10 python bench/robustness.py --aggregators fedavg+validation --attacks x100,nan,sign-flip,none
"""

from __future__ import annotations

import argparse
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


LEAVES = "leaves"
ATTACKS: dict[str, Attack] = {"x100": _x100, "nan": _nan, "sign-flip": _flip, "none": _honest}
TRAINS = {"x100": False, "nan": False, "sign-flip": True, "none": True}
#: label -> (strategy name, min_update_cosine)
AGGREGATORS: dict[str, tuple[str, float]] = {
    "fedavg+validation": ("fedavg", 0.0),
    "fedavg+validation (cosine off)": ("fedavg", -1.0),
    "median": ("median", 0.0),
    "median (cosine off)": ("median", -1.0),
    "trimmed-mean": ("trimmed-mean", 0.0),
    "trimmed-mean (cosine off)": ("trimmed-mean", -1.0),
    "krum": ("krum", 0.0),
    "krum (cosine off)": ("krum", -1.0),
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
        self.declared = LocalResult(cases=len(self.cases[-1]), loss=0.5, samples=task.train.batch_size, seconds=1.0)
        self._cache: dict[tuple[str, int, int], tuple[dict[str, np.ndarray], LocalResult]] = {}

    def train(self, glob: ArrayRecord, site: int, rnd: int) -> tuple[dict[str, np.ndarray], LocalResult]:
        digest = hashlib.sha256(b"".join(glob[k].data for k in glob)).hexdigest()
        key = (digest, site, rnd)
        if key not in self._cache:
            seed = round_seed(self.task.train.seed, rnd, f"site-{site}")
            arrays, result = train_locally(glob, self.task, self.cases[site - 1], "cpu", seed)
            self._cache[key] = ({k: a.numpy() for k, a in arrays.items()}, result)
        return self._cache[key]


@dataclass
class Outcome:
    """One federation: Dice after each round, and per round the accepted sites' cosines and the rejections."""

    dice: list[float] = field(default_factory=list)
    cosines: list[dict[str, float | None]] = field(default_factory=list)
    rejected: list[dict[str, str]] = field(default_factory=list)


def federation(sites: Sites, name: str, min_cosine: float, attack: str, rounds: int) -> Outcome:
    """One federation of three sites; the last one attacks (or leaves: ``attack = LEAVES``) from round 2."""
    n_sites = 3
    torch.manual_seed(0)
    model = build_model(sites.task.model)
    limits = StrategyConfig(name=name, min_update_cosine=min_cosine)  # type: ignore[arg-type]
    cfg = ServerConfig(min_sites=n_sites, strategy=limits)
    inner: FedAvg = build_strategy(cfg)
    strategy = RecordingStrategy(inner, n_sites, 1, 1.0, limits=cfg.strategy)
    glob = arrays_from_model(model)
    out = Outcome()
    for rnd in range(1, rounds + 1):
        strategy.begin_round(glob)
        reference = {k: a.numpy() for k, a in glob.items()}
        replies = []
        for site in range(1, n_sites + 1):
            if site == n_sites and rnd >= 2:
                if attack == LEAVES:
                    continue
                trained, result = sites.train(glob, site, rnd) if TRAINS[attack] else (reference, sites.declared)
                trained = ATTACKS[attack](trained, reference)
            else:
                trained, result = sites.train(glob, site, rnd)
            replies.append(_message(10 + site, trained, result, f"site-{site}"))
        new, _ = strategy.aggregate_train(rnd, replies)
        glob = new if new is not None else glob
        load_arrays(model, glob)
        out.dice.append(validate(model, sites.val, sites.task.train.patch_size, "cpu")["dice_mean"])
        stats = strategy.stats[rnd]
        out.cosines.append({s.site: s.update_cosine for s in stats.sites})
        out.rejected.append({r.site: r.reason for r in stats.rejected})
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
        sites = Sites(root, 3, task)
        for label in labels:
            name, min_cosine = AGGREGATORS[label]
            for attack in [LEAVES, *attacks]:
                results[(label, attack)] = federation(sites, name, min_cosine, attack, rounds)
                _report(label, attack, results[(label, attack)])
    header = "| aggregator | site 3 from r2 | " + " | ".join(f"r{r}" for r in range(1, rounds + 1)) + " | final − ref |"
    print(f"\n{rounds} rounds x {steps} steps, {size}^3 phantoms, feature_scale 16, central mean Dice per round")
    print("ref: the same aggregator's federation in which site 3 leaves from round 2\n")
    print(header)
    print("|" + " --- |" * 2 + " ---: |" * (rounds + 1))
    for (label, attack), outcome in results.items():
        cells = " | ".join(f"{d:.3f}" for d in outcome.dice)
        ref = results[(label, LEAVES)].dice[-1]
        print(f"| {label} | {attack} | {cells} | {outcome.dice[-1] - ref:+.3f} |")
    honest = _honest_cosines(results)
    if honest:
        print(
            f"\nhonest sites' update cosines (checked rounds, distinct federations): min {min(honest):.3f}, median "
            f"{float(np.median(honest)):.3f}, max {max(honest):.3f} over {len(honest)}"
        )
    print(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
