"""FedBN benchmark: central Dice of the global model under ``bn = "pooled"`` and ``bn = "local"``, and under ``local``
the Dice on the same validation set with each site's own BatchNorm (what the cross-site matrix measures).

Two phantom sites, in-process: the server's own aggregation (:class:`RecordingStrategy`, FedAvg) and the sites' own
training function (``train_locally`` with a ``context.state`` per site), tiny network.

    nice -n 10 python bench/fedbn.py --quick     # 3 rounds x 3 steps, 32^3 phantoms
    nice -n 10 python bench/fedbn.py             # 6 rounds x 10 steps, 32^3 phantoms
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from flwr.app import ArrayRecord, RecordDict

from fedseg.client.localbn import own_start
from fedseg.client.training import train_locally
from fedseg.common.data.manifest import site_manifest
from fedseg.common.data.preprocess import PreparedCase, PreprocessConfig
from fedseg.common.data.sitecache import prepare_labelled
from fedseg.common.engine.config import TrainConfig
from fedseg.common.engine.validation import validate
from fedseg.common.fl.offline import from_site
from fedseg.common.fl.protocol import BatchNormMode, TrainTask, reply_content, round_seed
from fedseg.common.fl.weights import arrays_from_model, load_arrays
from fedseg.common.nn.model import ModelConfig, build_model
from fedseg.common.synthetic.phantoms import generate_phantoms
from fedseg.server.config import ServerConfig, StrategyConfig
from fedseg.server.run.strategy import RecordingStrategy, build_strategy

PATCH = (32, 32, 32)


def _cases(folder: Path, cache: Path, preprocess: PreprocessConfig) -> list[PreparedCase]:
    manifest = site_manifest(folder, str(folder / "labels.toml"))
    return prepare_labelled(folder, manifest, preprocess, cache, role=folder.name, use="train")


def federation(
    bn: BatchNormMode, sites: list[list[PreparedCase]], val: list[PreparedCase], rounds: int, steps: int
) -> list[tuple[float, list[float]]]:
    """Per round: central Dice of the global model, and (``local``) Dice with each site's own BatchNorm."""
    task = TrainTask(
        model=ModelConfig(feature_scale=16),
        train=TrainConfig(steps=steps, lr=3e-3, patch_size=PATCH, augment=False, amp=False),
        preprocess=PreprocessConfig(),
        deadline=3600.0,
        bn=bn,
    )
    torch.manual_seed(0)
    model = build_model(task.model)
    cfg = ServerConfig(min_sites=len(sites), strategy=StrategyConfig(bn=bn))
    strategy = RecordingStrategy(build_strategy(cfg), len(sites), 1, 1.0, limits=cfg.strategy)
    glob: ArrayRecord = arrays_from_model(model)
    states = [RecordDict() for _ in sites]
    out = []
    for rnd in range(1, rounds + 1):
        strategy.begin_round(glob)
        replies = []
        for i, (cases, state) in enumerate(zip(sites, states, strict=True), start=1):
            seed = round_seed(0, rnd, f"site-{i}")
            arrays, result = train_locally(glob, task, cases, "cpu", seed, state=state)
            replies.append(from_site(reply_content(arrays, result, f"site-{i}"), 10 + i))
        new, _ = strategy.aggregate_train(rnd, replies)
        glob = new if new is not None else glob
        load_arrays(model, glob)
        central = validate(model, val, PATCH, "cpu")["dice_mean"]
        own = []
        if bn == "local":
            for state in states:
                load_arrays(model, own_start(glob, state))
                own.append(validate(model, val, PATCH, "cpu")["dice_mean"])
        out.append((central, own))
        print(f"bn={bn} round {rnd}: central {central:.3f} own {' '.join(f'{d:.3f}' for d in own)}", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3 rounds x 3 steps")
    args = parser.parse_args()
    rounds, steps = (3, 3) if args.quick else (6, 10)
    torch.set_num_threads(1)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "data"
        generate_phantoms(root, sites=2, cases_per_site=2, val_cases=1, size=(32, 32, 32))
        pre = PreprocessConfig()
        sites = [_cases(root / f"site-{i}", root / "cache" / f"s{i}", pre) for i in (1, 2)]
        val = _cases(root / "validation", root / "cache" / "v", pre)
        pooled = federation("pooled", sites, val, rounds, steps)
        local = federation("local", sites, val, rounds, steps)
    print(f"\n{rounds} rounds x {steps} steps, 2 sites, 32^3 phantoms, feature_scale 16, FedAvg; mean Dice on the")
    print("central validation case after each round\n")
    print("| round | pooled: global model | local: global model (global BN) | local: site-1 own BN | site-2 own BN |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for rnd, ((p, _), (c, own)) in enumerate(zip(pooled, local, strict=True), start=1):
        print(f"| {rnd} | {p:.3f} | {c:.3f} | {own[0]:.3f} | {own[1]:.3f} |")
    print(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
