"""Robustness benchmark: 3 phantom sites, one turns malicious from round 2; central Dice per round per aggregator.

Rounds run in-process with the server's own guard and aggregation code (:class:`RecordingStrategy`: reply
validation, update-norm bound, the Flower strategy) and the sites' own training function (``train_locally``), on a
tiny network and small phantoms. Attacks by the third site from round 2 on (it trains honestly first):

* ``x100``: every floating-point weight multiplied by 100 (of the global model it received: it does not train);
* ``nan``: one weight element set to NaN (likewise);
* ``sign-flip``: it trains, then sends w_global − (w_trained − w_global), its update reversed.

Trainings are cached by (global model, site, round): every federation shares round 1, and the federations of one
aggregator share round 2, which keeps ``--quick`` to about 50 local trainings.

Aggregators: FedAvg with validation (the default server), coordinate-wise median, trimmed mean, Krum (f = 1); the
reference is the honest 2-site FedAvg federation (the attacker left out). Prints Dice per round and the final
Dice difference to the honest federation.

    nice -n 10 python bench/robustness.py --quick     # 3 rounds x 3 steps, 32^3 phantoms
    nice -n 10 python bench/robustness.py             # 6 rounds x 10 steps, 48^3 phantoms
"""

from __future__ import annotations

import argparse
import hashlib
import tempfile
import time
from collections.abc import Callable
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
    return {k: (2 * glob[k] - v).astype(v.dtype) if v.dtype.kind == "f" else v for k, v in trained.items()}


ATTACKS: dict[str, Attack] = {"x100": _x100, "nan": _nan, "sign-flip": _flip}
TRAINS = {"x100": False, "nan": False, "sign-flip": True}
AGGREGATORS = {"fedavg+validation": "fedavg", "median": "median", "krum": "krum", "trimmed-mean": "trimmed-mean"}


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


def federation(sites: Sites, name: str, attack: str | None, n_sites: int, rounds: int) -> list[float]:
    """Dice after each round of one federation; the last site attacks from round 2 when ``attack`` is given."""
    torch.manual_seed(0)
    model = build_model(sites.task.model)
    cfg = ServerConfig(min_sites=n_sites, strategy=StrategyConfig(name=name))  # type: ignore[arg-type]
    inner: FedAvg = build_strategy(cfg)
    strategy = RecordingStrategy(inner, n_sites, 1, 1.0, limits=cfg.strategy)
    glob = arrays_from_model(model)
    dice = []
    for rnd in range(1, rounds + 1):
        strategy.begin_round(glob)
        reference = {k: a.numpy() for k, a in glob.items()}
        replies = []
        for site in range(1, n_sites + 1):
            if attack is not None and site == n_sites and rnd >= 2:
                trained, result = sites.train(glob, site, rnd) if TRAINS[attack] else (reference, sites.declared)
                trained = ATTACKS[attack](trained, reference)
            else:
                trained, result = sites.train(glob, site, rnd)
            replies.append(_message(10 + site, trained, result, f"site-{site}"))
        new, _ = strategy.aggregate_train(rnd, replies)
        glob = new if new is not None else glob
        load_arrays(model, glob)
        dice.append(validate(model, sites.val, sites.task.train.patch_size, "cpu")["dice_mean"])
    return dice


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3 rounds x 3 steps on 32^3 phantoms")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (2 oversubscribed ones crawl)")
    args = parser.parse_args()
    rounds, steps, size = (3, 3, 32) if args.quick else (6, 10, 48)
    torch.set_num_threads(args.threads)
    task = TrainTask(
        model=ModelConfig(feature_scale=16),
        train=TrainConfig(steps=steps, lr=3e-3, patch_size=(32, 32, 32), augment=False, amp=False),
        preprocess=PreprocessConfig(),
        deadline=3600.0,
    )
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "data"
        generate_phantoms(root, sites=3, cases_per_site=2, val_cases=1, size=(size, size, size))
        sites = Sites(root, 3, task)
        results: dict[tuple[str, str], list[float]] = {
            ("honest 2 sites", "-"): federation(sites, "fedavg", None, 2, rounds)
        }
        print("honest 2 sites:", " ".join(f"{d:.3f}" for d in results[("honest 2 sites", "-")]), flush=True)
        for label, strategy_name in AGGREGATORS.items():
            for attack_name in ATTACKS:
                results[(label, attack_name)] = federation(sites, strategy_name, attack_name, 3, rounds)
                print(
                    f"{label} / {attack_name}:", " ".join(f"{d:.3f}" for d in results[(label, attack_name)]), flush=True
                )
    honest = results[("honest 2 sites", "-")][-1]
    header = "| aggregator | attack | " + " | ".join(f"r{r}" for r in range(1, rounds + 1)) + " | final − honest |"
    print(f"\n{rounds} rounds x {steps} steps, {size}^3 phantoms, feature_scale 16, central mean Dice per round\n")
    print(header)
    print("|" + " --- |" * (rounds + 3))
    for (label, attack_name), dice in results.items():
        cells = " | ".join(f"{d:.3f}" for d in dice)
        print(f"| {label} | {attack_name} | {cells} | {dice[-1] - honest:+.3f} |")
    print(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
