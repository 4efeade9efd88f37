"""FedBN benchmark: central Dice of the global model under ``bn = "pooled"`` and ``bn = "local"``, and under ``local``
the Dice on the same validation set with each site's own BatchNorm (what the cross-site matrix measures); then,
per site, on that site's held-out cases: the site model ``fed-client export-model`` writes (the last global weights
with the site's own BatchNorm, built by the command's own :func:`site_model`) against the global model of the
``pooled`` federation (pooled BatchNorm statistics) and the ``local`` federation's global model.

Phantom sites (they differ in slice thickness, HU calibration, blur and noise), in-process: the server's own
aggregation (:class:`RecordingStrategy`, FedAvg) and the sites' own training function (``train_locally`` with a
``context.state`` per site), tiny network. Held-out split: each site's cases sorted by case id; the last ``--held``
train nothing and are scored only at the end.

    nice -n 10 python bench/fedbn.py --quick     # 2 sites x (2 train + 1 held out), 3 rounds x 3 steps, 32^3
    nice -n 10 python bench/fedbn.py             # 3 sites x (3 train + 2 held out), 6 rounds x 10 steps, 32^3
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from flwr.app import ArrayRecord, RecordDict

from fedseg.client.cli.export_model import site_model
from fedseg.client.localbn import LOCAL_BN_KEY, SiteState, own_start
from fedseg.client.training import train_locally
from fedseg.common.data.manifest import site_manifest
from fedseg.common.data.preprocess import PreparedCase, PreprocessConfig
from fedseg.common.data.sitecache import prepare_labelled
from fedseg.common.engine.config import TrainConfig
from fedseg.common.engine.validation import validate
from fedseg.common.fl.offline import from_site
from fedseg.common.fl.protocol import BatchNormMode, TrainTask, reply_content, round_seed
from fedseg.common.fl.weights import arrays_from_model, load_arrays, state_dict_from_arrays
from fedseg.common.nn.model import ModelConfig, build_model
from fedseg.common.synthetic.phantoms import generate_phantoms
from fedseg.server.config import ServerConfig, StrategyConfig
from fedseg.server.run.strategy import RecordingStrategy, build_strategy

PATCH = (32, 32, 32)


def _cases(folder: Path, cache: Path, preprocess: PreprocessConfig) -> list[PreparedCase]:
    manifest = site_manifest(folder, str(folder / "labels.toml"))
    return prepare_labelled(folder, manifest, preprocess, cache, role=folder.name, use="train")


def _task(bn: BatchNormMode, steps: int) -> TrainTask:
    return TrainTask(
        model=ModelConfig(feature_scale=16),
        train=TrainConfig(steps=steps, lr=3e-3, patch_size=PATCH, augment=False, amp=False),
        preprocess=PreprocessConfig(),
        deadline=3600.0,
        bn=bn,
    )


def federation(
    bn: BatchNormMode, sites: list[list[PreparedCase]], val: list[PreparedCase], rounds: int, steps: int
) -> tuple[list[tuple[float, list[float]]], ArrayRecord, list[RecordDict]]:
    """Per round: central Dice of the global model, and (``local``) Dice with each site's own BatchNorm; then the
    last global weights and each site's ``context.state``."""
    task = _task(bn, steps)
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
    return out, glob, states


def exported_site_model(glob: ArrayRecord, state: RecordDict, rounds: int, steps: int) -> torch.nn.Module:
    """What ``fed-client export-model`` writes for a site: :func:`site_model` of its FedBN state."""
    task = _task("local", steps)
    reference = build_model(task.model).state_dict()
    kept = state.array_records[LOCAL_BN_KEY]
    own = {key: torch.from_numpy(kept[key].numpy()) for key in kept}
    return site_model(SiteState(task, rounds, dict(state_dict_from_arrays(glob, reference)), own)).model


def dice(model: torch.nn.Module, weights: ArrayRecord | None, cases: list[PreparedCase]) -> float:
    """Mean foreground Dice of ``model`` (with ``weights`` loaded, if given) over ``cases``."""
    if weights is not None:
        load_arrays(model, weights)
    return validate(model, cases, PATCH, "cpu")["dice_mean"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 sites x (2 + 1 held out), 3 rounds x 3 steps")
    parser.add_argument("--sites", type=int, help="phantom sites (default 3; --quick 2)")
    parser.add_argument("--train", type=int, help="training cases per site (default 3; --quick 2)")
    parser.add_argument("--held", type=int, help="held-out cases per site (default 2; --quick 1)")
    args = parser.parse_args()
    rounds, steps = (3, 3) if args.quick else (6, 10)
    n_sites = args.sites or (2 if args.quick else 3)
    n_train = args.train or (2 if args.quick else 3)
    n_held = args.held or (1 if args.quick else 2)
    torch.set_num_threads(1)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "data"
        generate_phantoms(root, sites=n_sites, cases_per_site=n_train + n_held, val_cases=1, size=(32, 32, 32))
        pre = PreprocessConfig()
        every = [
            sorted(_cases(root / f"site-{i}", root / "cache" / f"s{i}", pre), key=lambda c: c.case_id)
            for i in range(1, n_sites + 1)
        ]
        sites, held = [cases[:n_train] for cases in every], [cases[n_train:] for cases in every]
        val = _cases(root / "validation", root / "cache" / "v", pre)
        pooled, pooled_glob, _ = federation("pooled", sites, val, rounds, steps)
        local, local_glob, states = federation("local", sites, val, rounds, steps)
        model = build_model(_task("pooled", steps).model).eval()
        rows = []
        for i, (cases, state) in enumerate(zip(held, states, strict=True), start=1):
            site = exported_site_model(local_glob, state, rounds, steps)
            scores = (dice(model, pooled_glob, cases), dice(model, local_glob, cases), dice(site, None, cases))
            rows.append((i, [c.case_id for c in cases], *scores))
    print(
        f"\n{rounds} rounds x {steps} steps, {n_sites} sites, 32^3 phantoms, feature_scale 16, FedAvg; mean Dice on the"
    )
    print("central validation case after each round\n")
    own_columns = " | ".join(f"local: site-{i} own BN" for i in range(1, n_sites + 1))
    print(f"| round | pooled: global model | local: global model (global BN) | {own_columns} |")
    print("| ---: | ---: | ---: |" + " ---: |" * n_sites)
    for rnd, ((p, _), (c, own)) in enumerate(zip(pooled, local, strict=True), start=1):
        print(f"| {rnd} | {p:.3f} | {c:.3f} | " + " | ".join(f"{d:.3f}" for d in own) + " |")
    print(f"\nMean Dice on each site's held-out cases (the last {n_held} of its {n_train + n_held} by case id; never")
    print(f"trained on) after round {rounds}\n")
    print("| site | held-out cases | pooled BN: global model | FedBN: global model (global BN) "
          "| FedBN: site model (export-model) | site model - pooled |")  # fmt: skip
    print("| ---: | --- | ---: | ---: | ---: | ---: |")
    for i, ids, pooled_dice, local_dice, site_dice in rows:
        print(f"| {i} | {', '.join(ids)} | {pooled_dice:.3f} | {local_dice:.3f} | {site_dice:.3f} "
              f"| {site_dice - pooled_dice:+.3f} |")  # fmt: skip
    print(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
