"""Partially labelled sites benchmark: naive vs exclusion vs marginal + class-aware head vs fully labelled.

Three phantom sites with different scanners (see :mod:`fedseg.common.synthetic.phantoms`) annotate different
organ sets: A pancreas only, B spleen + kidney, C liver + pancreas. The same federation (in process: every round
each site trains the global model with the shared trainer, then the server averages by training cases) runs four
ways, from the same initial weights and the same per-round seeds:

    (a) naive       every site reads 0 as background (partial_loss = "naive"), plain FedAvg
    (b) exclusion   unannotated logits removed from the softmax (partial_loss = "exclusion"), plain FedAvg
    (c) marginal    marginal loss (the default) + class-aware head averaging (fedseg.server.run.headavg)
    (d) full        the same sites with every organ labelled, plain FedAvg

Dice per organ of the global model on a fully labelled neutral validation set (sliding window). Goals:
(c) >= 0.95 x (d) per organ, and (c) >= (a) + 0.10 on every organ some site leaves unlabelled (here all four).

    python bench/partial_labels.py --quick --json partial.json     # tiny: 32^3 phantoms, feature_scale 16
    python bench/partial_labels.py --rounds 20 --local-steps 50 --size 48
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from fedsim import ORGAN_NAMES, Recipe, State, federate, make_case, organ_dice, server_average

from fedseg.common.data.preprocess import PreparedCase
from fedseg.common.engine.config import TrainConfig
from fedseg.common.nn.model import ModelConfig, build_model
from fedseg.server.run.headavg import SiteHead, class_aware_head

SITES: dict[str, tuple[str, ...]] = {
    "A": ("pancreas",),
    "B": ("spleen", "kidney"),
    "C": ("liver", "pancreas"),
}
VARIANTS = ("naive", "exclusion", "marginal", "full")


def class_aware_average(
    states: Sequence[State], site_cases: Sequence[Sequence[PreparedCase]], reference: State
) -> State:
    """fed-server's average, then each class's output-head row averaged only over the sites that annotate it."""
    merged = server_average(states, site_cases, reference)
    heads = [
        SiteHead(
            {k: v.numpy() for k, v in state.items()},
            len(cases),
            tuple(any(c.annotated[i] for c in cases) for i in range(len(cases[0].annotated))),
        )
        for state, cases in zip(states, site_cases, strict=True)
    ]
    fixed = class_aware_head(
        {k: v.numpy() for k, v in merged.items()}, {k: v.numpy() for k, v in reference.items()}, heads
    )
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in fixed.items()}


def run_variant(
    variant: str,
    sites: Mapping[str, list[PreparedCase]],
    val: list[PreparedCase],
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    rounds: int,
) -> tuple[dict[str, float], float]:
    """Run one variant from the same initial weights; return the final validation Dice per organ and the seconds."""
    torch.manual_seed(0)
    model = build_model(model_cfg)
    cfg = train_cfg.model_copy(update={"partial_loss": "marginal" if variant == "full" else variant})
    recipe = Recipe(local_steps=train_cfg.total_steps)
    aggregate = class_aware_average if variant == "marginal" else None
    model, _, seconds = federate(recipe, sites, model, cfg, rounds * recipe.local_steps, aggregate=aggregate)
    return organ_dice(model, val, train_cfg.patch_size), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="32^3 phantoms, 6 rounds x 20 steps, 2 cases a site")
    parser.add_argument("--size", type=int, default=48)
    parser.add_argument("--cases", type=int, default=3, help="training cases per site")
    parser.add_argument("--val-cases", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--local-steps", type=int, default=30)
    parser.add_argument("--arch", choices=("attention-unet", "unet"), default="attention-unet")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=2e-3, help="1e-2 diverged: every Dice 0.000 in --quick")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--json", type=Path, help="write {variant: {organ: dice}} here")
    args = parser.parse_args()
    if args.quick:
        args.size, args.cases, args.rounds, args.local_steps = 32, 2, 6, 20
    torch.set_num_threads(args.threads)  # 1 on a shared 2-core box: 2 oversubscribed threads were 13x slower
    patch = (32, 32, 32) if args.size <= 32 else (48, 48, 48)
    model_cfg = ModelConfig(arch=args.arch, feature_scale=16)
    train_cfg = TrainConfig(
        steps=args.local_steps, patch_size=patch, batch_size=2, lr=args.lr, ce_weight=1.0, foreground_prob=0.67,
        augment=False, seed=args.seed,
    )  # fmt: skip
    t0 = time.perf_counter()
    partial = {
        name: [make_case(args.size, i + 1, c, args.seed, organs) for c in range(args.cases)]
        for i, (name, organs) in enumerate(SITES.items())
    }
    full = {
        name: [make_case(args.size, i + 1, c, args.seed) for c in range(args.cases)] for i, name in enumerate(SITES)
    }
    val = [make_case(args.size, 0, c, args.seed) for c in range(args.val_cases)]
    print(f"phantoms ready in {time.perf_counter() - t0:.0f} s; sites {SITES}")
    results: dict[str, dict[str, float]] = {}
    for variant in args.variants.split(","):
        sites = full if variant == "full" else partial
        dice, seconds = run_variant(variant, sites, val, model_cfg, train_cfg, args.rounds)
        results[variant] = dice
        scores = " ".join(f"{o}={d:.3f}" for o, d in dice.items())
        print(f"{variant:10s} {scores}  ({seconds:.0f} s)", flush=True)
    print()
    print(f"| variant | {' | '.join(ORGAN_NAMES)} | mean |")
    print("|---|" + "---|" * (len(ORGAN_NAMES) + 1))
    for variant, dice in results.items():
        values = [dice[o] for o in ORGAN_NAMES]
        print(f"| {variant} | " + " | ".join(f"{v:.3f}" for v in values) + f" | {np.nanmean(values):.3f} |")
    if {"marginal", "full", "naive"} <= set(results):
        for organ in ORGAN_NAMES:
            m, f, n = results["marginal"][organ], results["full"][organ], results["naive"][organ]
            print(f"{organ}: marginal/full = {m / f if f else float('nan'):.2f} (goal >= 0.95), "
                  f"marginal - naive = {m - n:+.3f} (goal >= +0.10)")  # fmt: skip
    print(f"total {time.perf_counter() - t0:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
