"""Question: does federating pay off? Federated vs pooled (centralised) vs every site alone, equal compute, seeds.

Phantom sites scan differently (slice spacing, field of view, HU calibration, noise, blur, orientation: see
:func:`fedseg.common.synthetic.phantoms.site_acquisition`) and each has a few cases. Three settings see the
same number of training patches (stated in the table header):

* **federated**: every site trains ``--steps`` steps in rounds of ``--local-steps`` (in process, with the trainer the
  ClientApp runs and fed-server's default aggregation: see ``fedsim.py``);
* **centralised**: one model on all sites' cases pooled, ``sites × --steps`` steps (its validation curve is printed,
  to show it has converged);
* **alone**: each site on its own cases for ``sites × --steps`` steps.

Scored by Dice per organ on ``--val-cases`` phantoms from a neutral scanner that no site uses; every seed draws
other patients, other scanners and another initialisation. Goal: federated mean ≥ 0.98 × centralised and
≥ best site alone + 0.02, at every seed.

    python bench/payoff.py --quick --seeds 0             # smoke run, a few minutes
    python bench/payoff.py --json payoff.json            # the benchmark (defaults below)
    python bench/payoff.py --local-steps 10 --schedule poly --keep-optimizer    # one recipe change at a time
    python bench/payoff.py --settings federated --bn local                      # FedBN, federated row only
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Mapping, Sequence

import torch
from fedsim import (
    ORGAN_NAMES,
    Curve,
    Recipe,
    add_cpu_bf16_option,
    bf16_setting,
    federate,
    make_case,
    organ_dice,
    train_single,
)
from harness import Table, add_options, emit, progress

from fedseg.common.data.preprocess import PreparedCase, PreprocessConfig
from fedseg.common.data.sitecache import site_normalised
from fedseg.common.engine.config import TrainConfig
from fedseg.common.nn.model import ModelConfig, build_model

SETTINGS = ("federated", "centralised", "alone")
Scores = dict[str, float]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--cases", type=int, default=3, help="training cases per site")
    parser.add_argument("--val-cases", type=int, default=12, help="neutral-scanner validation phantoms")
    parser.add_argument("--size", type=int, default=48, help="phantom side at 2 mm (also the patch side)")
    parser.add_argument("--steps", type=int, default=400, help="training steps per site (federated)")
    parser.add_argument("--arch", choices=("attention-unet", "unet"), default="attention-unet")
    parser.add_argument("--feature-scale", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--local-steps", type=int, default=20, help="recipe: steps per round")
    parser.add_argument("--schedule", choices=("constant", "poly"), default="constant", help="recipe: lr schedule")
    parser.add_argument("--keep-optimizer", action="store_true", help="recipe: site Adam state across rounds")
    parser.add_argument("--prox-mu", type=float, default=0.0, help="recipe: FedProx mu")
    parser.add_argument("--bn", choices=("pooled", "local"), default="pooled", help="recipe: local = FedBN")
    parser.add_argument("--normalization", choices=("volume", "body", "site"), default="volume",
                        help="z-score statistics: per volume, per body, or pooled per site")  # fmt: skip
    parser.add_argument("--ce-weight", type=float, default=1.0, help="loss: Dice + this x cross-entropy (0: Dice only)")
    parser.add_argument("--baseline-schedule", choices=("constant", "poly"), default=None,
                        help="centralised/alone lr schedule (default: the recipe's)")  # fmt: skip
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--curve-points", type=int, default=5, help="centralised validation points")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    add_cpu_bf16_option(parser)
    add_options(parser, quick="32^3, 2 sites x 2 cases, 60 steps, 4 validation cases", seeds="0,1")
    args = parser.parse_args()
    if args.quick:
        args.size, args.sites, args.cases, args.val_cases, args.steps, args.local_steps = 32, 2, 2, 4, 60, 20
    return args


def run_seed(args: argparse.Namespace, seed: int) -> dict[str, Scores]:
    """Every requested setting at one seed; returns setting (or ``alone:site-k``) -> Dice per organ."""
    t0 = time.perf_counter()
    names = [f"site-{i}" for i in range(1, args.sites + 1)]
    pre = PreprocessConfig(normalization=args.normalization)
    sites = {
        n: site_normalised([make_case(args.size, i, c, seed, preprocess=pre) for c in range(args.cases)], pre)
        for i, n in enumerate(names, start=1)
    }
    val = site_normalised([make_case(args.size, 0, c, seed, preprocess=pre) for c in range(args.val_cases)], pre)
    patch = (args.size,) * 3
    progress(f"seed {seed}: {args.sites} sites x {args.cases} cases, {args.val_cases} validation cases "
             f"({time.perf_counter() - t0:.0f} s)")  # fmt: skip
    train_cfg = TrainConfig(
        patch_size=patch, batch_size=2, lr=args.lr, ce_weight=args.ce_weight, foreground_prob=0.67, augment=False,
        seed=seed, lr_schedule=args.baseline_schedule or args.schedule, cpu_bf16=bf16_setting(args.cpu_bf16),
    )  # fmt: skip
    recipe = Recipe(args.local_steps, args.schedule, args.keep_optimizer, args.prox_mu, args.bn)
    wanted = args.settings.split(",")
    out: dict[str, Scores] = {}

    def evaluate(model: torch.nn.Module) -> Scores:
        return dict(organ_dice(model, val, patch, train_cfg.cpu_bf16))

    def fresh() -> torch.nn.Module:
        torch.manual_seed(seed)  # the same initial weights for every setting of this seed
        return build_model(ModelConfig(arch=args.arch, feature_scale=args.feature_scale))

    pooled_steps = args.sites * args.steps
    if "federated" in wanted:
        model, _, seconds = federate(recipe, sites, fresh(), train_cfg, args.steps)
        out["federated"] = _report("federated", recipe.label(), evaluate(model), seconds)
    if "centralised" in wanted:
        every = max(1, pooled_steps // args.curve_points)
        pooled: list[PreparedCase] = [c for cases in sites.values() for c in cases]
        model, curve, seconds = train_single(pooled, fresh(), train_cfg, pooled_steps, evaluate, every)
        _print_curve(curve)
        out["centralised"] = _report("centralised", f"{pooled_steps} steps", curve[-1][1], seconds)
    if "alone" in wanted:
        for name, cases in sites.items():
            model, _, seconds = train_single(cases, fresh(), train_cfg, pooled_steps)
            out[f"alone:{name}"] = _report(f"{name} alone", f"{pooled_steps} steps", evaluate(model), seconds)
    return out


def _report(setting: str, detail: str, dice: Scores, seconds: float) -> Scores:
    scores = " ".join(f"{o}={d:.3f}" for o, d in dice.items())
    progress(f"  {setting:14s} {scores} mean={_mean(dice):.3f}  [{detail}, {seconds:.0f} s]")
    return dice


def _print_curve(curve: Curve) -> None:
    points = ", ".join(f"{steps}: {_mean(dice):.3f}" for steps, dice in curve)
    progress(f"  centralised curve (steps: mean Dice) {points}")


def _mean(dice: Mapping[str, float]) -> float:
    return statistics.fmean(dice[o] for o in ORGAN_NAMES)


def _cell(values: Sequence[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.3f}"
    return f"{statistics.fmean(values):.3f} ± {statistics.stdev(values):.3f}"


def table(args: argparse.Namespace, runs: Sequence[dict[str, Scores]]) -> Table:
    """Mean ± sd over seeds per organ and setting; the verdict per seed as notes."""
    patches = args.sites * args.steps * 2
    rows = [
        [key, *(_cell([r[key][o] for r in runs]) for o in ORGAN_NAMES), _cell([_mean(r[key]) for r in runs])]
        for key in runs[0]
    ]
    notes = []
    for seed, run in zip(args.seeds, runs, strict=True):
        if {"federated", "centralised"} <= set(run):
            ratio = _mean(run["federated"]) / max(_mean(run["centralised"]), 1e-9)
            notes.append(f"seed {seed}: federated / centralised = {ratio:.3f} (goal >= 0.98)")
        alone = [_mean(v) for k, v in run.items() if k.startswith("alone:")]
        if "federated" in run and alone:
            notes.append(
                f"seed {seed}: federated - best alone = {_mean(run['federated']) - max(alone):+.3f} (goal >= +0.02)"
            )
    columns = [f"setting ({patches} training patches each, {len(runs)} seeds)", *ORGAN_NAMES, "mean"]
    title = f"{args.sites} phantom sites x {args.cases} cases, {args.size}^3, {args.val_cases} validation cases"
    return Table(title, columns, rows, notes, align="l" + "r" * (len(ORGAN_NAMES) + 1))


def to_json(runs: Sequence[dict[str, Scores]]) -> dict[str, object]:
    """``{"federated": {organ: dice}, "centralised": {...}, "alone": {"site-1": {...}}}``, means over seeds."""
    out: dict[str, dict[str, object]] = {}
    for key in runs[0]:
        mean: dict[str, object] = {o: statistics.fmean(r[key][o] for r in runs) for o in ORGAN_NAMES}
        if key.startswith("alone:"):
            out.setdefault("alone", {})[key.split(":", 1)[1]] = mean
        else:
            out[key] = mean
    return dict(out)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)  # 1 on a shared 2-core box: 2 oversubscribed threads crawl
    start = time.perf_counter()
    runs = [run_seed(args, seed) for seed in args.seeds]
    progress(f"total {time.perf_counter() - start:.0f} s")
    emit(
        args,
        "payoff",
        [table(args, runs)],
        [{"seed": s, "dice": to_json([r])} for s, r in zip(args.seeds, runs, strict=True)],
    )


if __name__ == "__main__":
    main()
