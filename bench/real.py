"""Real public CT: the federated and the pooled Attention U-Net on fetched datasets, Dice per organ beside the
literature's numbers.

Each ``--dataset`` (fetched with ``fed-eval datasets fetch NAME --out DATA``) is split with ``fed-eval datasets
split``'s own code into ``--sites`` virtual hospitals and a held-out share (``--val-fraction``, drawn from the seed
alone); the held-out cases of every dataset together are the central validation set, each case scored only on the
organs its dataset annotates. Several single-organ datasets (``--dataset msd-liver --dataset msd-pancreas
--dataset msd-spleen --dataset kits23``, one site each) are ConDistFL's partial-label setting; ``totalsegmentator
--scheme by-organ --sites 4`` is the same setting within one dataset.

* federated: every round each site trains ``--local-steps`` with the ClientApp's trainer
  (:func:`fedseg.client.training.train_locally`) and the server aggregates with ``fed-server``'s default step
  (:class:`fedseg.server.run.offline.OfflineAggregator`: reply screens, capped case weights, FedAvg, the
  class-aware head for partially labelled sites), as ``bench/fedsim.py`` does;
* pooled: one model on every site's cases together, for as many steps as all sites took in the federation
  (same patches seen), with the same trainer and recipe.

Without a fetched dataset it prints the command that fetches one and exits 0.

    python bench/real.py --data data --dataset msd-spleen --device cuda --rounds 50 --local-steps 100
    python bench/real.py --data data --dataset msd-liver --dataset msd-pancreas --dataset msd-spleen \\
        --dataset kits23 --sites 1 --device cuda --rounds 100 --local-steps 100 --json real.json
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from torch import nn

from fedseg.client.training import train_locally
from fedseg.common.data.manifest import GLOBAL_CLASSES, site_manifest
from fedseg.common.data.preprocess import PreparedCase, PreprocessConfig
from fedseg.common.data.sitecache import prepare_labelled
from fedseg.common.datasets.fetch import PROVENANCE
from fedseg.common.datasets.partition import SplitRequest
from fedseg.common.datasets.registry import load_registry
from fedseg.common.datasets.split import split_dataset
from fedseg.common.engine.config import TrainConfig
from fedseg.common.engine.train import train_model
from fedseg.common.engine.validation import validate
from fedseg.common.fl.protocol import TrainTask, round_seed
from fedseg.common.fl.weights import arrays_from_model, load_arrays
from fedseg.common.nn.model import ModelConfig, build_model
from fedseg.server.config import ServerConfig
from fedseg.server.run.offline import OfflineAggregator, SiteReply

ORGANS = GLOBAL_CLASSES[1:]
#: Published Dice per organ: (source, setting) -> organ -> Dice.
LITERATURE: dict[tuple[str, str], dict[str, float]] = {
    ("Oktay et al. 2018, Attention U-Net", "CT-150, pooled"): {"pancreas": 0.840},
    ("Oktay et al. 2018, U-Net baseline", "CT-150, pooled"): {"pancreas": 0.814},
    ("ConDistFL (Wang et al. 2023)", "MSD + KiTS19, federated, partial labels"): {
        "pancreas": 0.782, "spleen": 0.962, "kidney": 0.953, "liver": 0.956,
    },
}  # fmt: skip
NDArray = np.ndarray


def fetched(data: Path, names: Sequence[str]) -> list[str]:
    """The ``names`` (all registry datasets when empty) fetched under ``data``."""
    wanted = list(names) or list(load_registry())
    return [name for name in wanted if (data / name / PROVENANCE).is_file()]


def sites_and_validation(
    data: Path, names: Sequence[str], args: argparse.Namespace, work: Path
) -> tuple[dict[str, list[PreparedCase]], list[PreparedCase]]:
    """Split each dataset (hard links under ``work``) and prepare its sites' and held-out cases."""
    registry = load_registry()
    cfg = PreprocessConfig(target_spacing=tuple(args.spacing))
    sites: dict[str, list[PreparedCase]] = {}
    validation: list[PreparedCase] = []
    for name in names:
        request = SplitRequest(name, (), registry[name].organs, args.sites, args.scheme, args.seed, args.val_fraction)
        result = split_dataset(registry[name], data, work / name, request)
        for folder in [*(s.name for s in result.plan.sites), "validation"]:
            root = work / name / folder
            if not root.is_dir():
                continue
            role = f"{name}/{folder}"
            cases = prepare_labelled(root, site_manifest(root), cfg, work / "cache" / name / folder, role=role,
                                     use="train on")  # fmt: skip
            if folder == "validation":
                validation += cases
            else:
                sites[role] = cases
    return sites, validation


def _record(weights: dict[str, NDArray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.require(v, requirements="C")) for k, v in weights.items()})  # keeps 0-d arrays 0-d


def federate(sites: dict[str, list[PreparedCase]], task: TrainTask, rounds: int, device: str) -> nn.Module:
    """``rounds`` rounds: each site's ``train_locally``, then the server's aggregation."""
    torch.manual_seed(task.train.seed)
    model = build_model(task.model)
    aggregate = OfflineAggregator(ServerConfig(min_sites=len(sites)))
    weights = {k: a.numpy() for k, a in arrays_from_model(model).items()}
    for rnd in range(1, rounds + 1):
        started, replies = time.perf_counter(), []
        for name, cases in sites.items():
            seed = round_seed(task.train.seed, rnd, name)
            arrays, result = train_locally(_record(weights), task, cases, device, seed)
            replies.append(SiteReply(name, {k: a.numpy() for k, a in arrays.items()}, result.cases, result.annotated,
                                     result.loss))  # fmt: skip
        weights, stats = aggregate(weights, replies)
        print(f"  round {rnd}/{rounds}: {time.perf_counter() - started:.0f} s, rejected {len(stats.rejected)}",
              flush=True)  # fmt: skip
    load_arrays(model, _record(weights))
    return model


def pooled(sites: dict[str, list[PreparedCase]], task: TrainTask, steps: int, device: str) -> nn.Module:
    """One model on every site's cases, ``steps`` steps, the same recipe."""
    torch.manual_seed(task.train.seed)
    model = build_model(task.model)
    cases = [c for site in sites.values() for c in site]
    train_model(model, cases, task.train.model_copy(update={"steps": steps}), device, progress=True)
    return model


def organ_dice(
    model: nn.Module, val: Sequence[PreparedCase], patch: tuple[int, int, int], device: str
) -> dict[str, float]:
    dice = validate(model, list(val), patch, device)
    return {organ: float(dice[f"dice_{organ}"]) for organ in ORGANS}


def render(rows: dict[str, dict[str, float]]) -> str:
    """A markdown table: one row per model and published result, one column per organ."""
    lines = ["| model | setting | " + " | ".join(ORGANS) + " |", "| --- | --- |" + " ---: |" * len(ORGANS)]
    for label, dice in rows.items():
        cells = ["" if math.isnan(dice.get(o, math.nan)) else f"{dice[o]:.3f}" for o in ORGANS]
        lines.append(f"| {label} | this run | " + " | ".join(cells) + " |")
    for (source, setting), dice in LITERATURE.items():
        lines.append(
            f"| {source} | {setting} | " + " | ".join(f"{dice[o]:.3f}" if o in dice else "" for o in ORGANS) + " |"
        )
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=Path("data"), help="fed-eval datasets fetch's --out folder")
    parser.add_argument("--dataset", action="append", default=[], help="a fetched dataset (repeatable; default: all)")
    parser.add_argument("--sites", type=int, default=3, help="virtual hospitals per dataset")
    parser.add_argument("--scheme", choices=("iid", "by-organ", "by-source"), default="iid")
    parser.add_argument("--val-fraction", type=float, default=0.2)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--local-steps", type=int, default=50, help="steps per site and round")
    parser.add_argument("--patch", type=int, nargs=3, default=(96, 96, 96), help="D H W = z y x")
    parser.add_argument("--spacing", type=float, nargs=3, default=(2.0, 2.0, 2.0), help="z y x mm")
    parser.add_argument("--feature-scale", type=int, default=4, help="4 is the paper's network")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the results here")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    names = fetched(args.data, args.dataset)
    if not names:
        wanted = args.dataset[0] if args.dataset else "msd-spleen"
        print(f"no fetched dataset under {args.data}: run `fed-eval datasets fetch {wanted} --out {args.data}` "
              f"(fed-eval datasets list shows them all), then this script again")  # fmt: skip
        return
    patch = tuple(args.patch)
    train = TrainConfig(steps=args.local_steps, lr=args.lr, batch_size=args.batch_size, patch_size=patch,
                        seed=args.seed)  # fmt: skip
    task = TrainTask(model=ModelConfig(feature_scale=args.feature_scale), train=train,
                     preprocess=PreprocessConfig(target_spacing=tuple(args.spacing)), deadline=1e6)  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="fedseg-real-", dir=args.data) as work:  # same file system: hard links
        sites, val = sites_and_validation(args.data, names, args, Path(work))
        print(f"{', '.join(names)}: {len(sites)} sites ({sum(map(len, sites.values()))} cases), {len(val)} held out")
        started = time.perf_counter()
        rows = {"federated": organ_dice(federate(sites, task, args.rounds, args.device), val, patch, args.device)}
        fed_seconds = time.perf_counter() - started
        steps = args.rounds * args.local_steps * len(sites)
        rows["pooled"] = organ_dice(pooled(sites, task, steps, args.device), val, patch, args.device)
    print(render(rows))
    print(f"federated {fed_seconds:.0f} s on {args.device}; pooled {steps} steps")
    if args.json:
        args.json.write_text(json.dumps({"datasets": names, "args": vars(args) | {"data": str(args.data),
                                         "json": str(args.json)}, "dice": rows}, indent=2) + "\n")  # fmt: skip


if __name__ == "__main__":
    main()
