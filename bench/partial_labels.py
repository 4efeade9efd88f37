"""Partially labelled sites benchmark: naive vs exclusion vs marginal + class-aware head vs fully labelled.

Three phantom sites with different scanners (see :mod:`fedseg.common.synthetic.phantoms`) annotate different
organ sets: A pancreas only, B spleen + kidney, C liver + pancreas. The same federation (in process, ``fedsim.py``:
every round each site trains the global model with the ClientApp's trainer, then fed-server's default average by
training cases) runs four ways, from the same initial weights and the same per-round seeds:

    (a) naive       every site reads 0 as background (partial_loss = "naive"), plain FedAvg
    (b) exclusion   unannotated logits removed from the softmax (partial_loss = "exclusion"), plain FedAvg
    (c) marginal    marginal loss (the default) + class-aware head averaging (fedseg.server.run.headavg)
    (d) full        the same sites with every organ labelled, plain FedAvg
    marginal-plain  (not run by default) the marginal loss with plain FedAvg of the output head too
    marginal-pseudo (not run by default) (c) plus pseudo-labels from the round's global model (pseudo_weight 1)
    marginal-excl   (not run by default) (c) plus the paper's exclusion term (exclusion_weight 1)

Dice per organ of the global model on fully labelled phantoms from a neutral scanner no site uses (sliding
window), mean over ``--seeds`` (each seed: other patients, other scanners, another initialisation). Goals:
(c) >= 0.95 x (d) per organ, and (c) >= (a) + 0.10 on every organ some site leaves unlabelled (here all four).
``--archs attention-unet,unet`` runs every variant with both networks, for the pancreas side by side.

The defaults: 32^3 phantoms at 2 mm, 6 cases a site, the paper's random affine and flips on every patch, Dice + CE,
lr 2e-3, 60 rounds x 10 local steps (``payoff.py``'s recipe with twice the cases, augmentation and three times the
rounds: with 3 cases and no augmentation, more rounds overfit); ``--jobs`` runs that many variants at once, one
torch thread each.

    python bench/partial_labels.py --quick --json partial.json               # 2 seeds x 4 variants, 20 rounds
    python bench/partial_labels.py --seeds 0,1,2 --archs attention-unet,unet --jobs 2 --json partial.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import torch
from fedsim import (
    ORGAN_NAMES,
    Recipe,
    State,
    add_cpu_bf16_option,
    bf16_setting,
    federate,
    make_case,
    organ_dice,
    server_average,
)

from fedseg.common.data.preprocess import PreparedCase
from fedseg.common.engine.config import TrainConfig
from fedseg.common.nn.model import ModelConfig, build_model

SITES: dict[str, tuple[str, ...]] = {
    "A": ("pancreas",),
    "B": ("spleen", "kidney"),
    "C": ("liver", "pancreas"),
}
VARIANTS = ("naive", "exclusion", "marginal", "full")
#: Also runnable (``--variants``): the marginal loss with plain FedAvg of the output head too; marginal + class-aware
#: head + pseudo-labels from the round's global model (``pseudo_weight = 1``, :mod:`fedseg.common.nn.pseudo`);
#: marginal + class-aware head + the exclusion term (``exclusion_weight = 1``, :mod:`fedseg.common.nn.loss`).
EXTRA_VARIANTS = ("marginal-plain", "marginal-pseudo", "marginal-excl")
Scores = dict[str, float]


def class_aware_average(
    states: Sequence[State], site_cases: Sequence[Sequence[PreparedCase]], reference: State
) -> State:
    """fed-server's average with each site's annotated classes declared: each class's output-head row averaged only
    over the sites that annotate it."""
    return server_average(states, site_cases, reference, class_aware=True)


@dataclass(frozen=True)
class Job:
    """One federation: a variant of one network at one seed."""

    variant: str
    arch: str
    seed: int
    size: int
    cases: int
    val_cases: int
    rounds: int
    local_steps: int
    lr: float
    feature_scale: int
    threads: int
    cpu_bf16: str
    augment: bool = False
    pseudo_weight: float = 1.0
    exclusion_weight: float = 1.0


def run_job(job: Job) -> tuple[Job, Scores, float, Counter[str]]:
    """Federate ``job`` from the seed's initial weights; the final central Dice per organ, the seconds and the
    sites' step tally (steps, skipped, fp32_retries)."""
    torch.set_num_threads(job.threads)  # 1 per job on a shared 2-core box: oversubscribed threads crawl
    annotated = {name: ORGAN_NAMES if job.variant == "full" else organs for name, organs in SITES.items()}
    sites = {
        name: [make_case(job.size, i, c, job.seed, annotated[name]) for c in range(job.cases)]
        for i, name in enumerate(SITES, start=1)
    }
    val = [make_case(job.size, 0, c, job.seed) for c in range(job.val_cases)]
    patch = (job.size,) * 3
    loss = "marginal" if job.variant == "full" else job.variant.split("-")[0]
    train_cfg = TrainConfig(
        steps=job.local_steps, patch_size=patch, batch_size=2, lr=job.lr, ce_weight=1.0, foreground_prob=0.67,
        augment=job.augment, seed=job.seed, partial_loss=loss, cpu_bf16=bf16_setting(job.cpu_bf16),
        pseudo_weight=job.pseudo_weight if job.variant.endswith("-pseudo") else 0.0,
        exclusion_weight=job.exclusion_weight if job.variant.endswith("-excl") else 0.0,
    )  # fmt: skip
    torch.manual_seed(job.seed)  # the same initial weights for every variant of this seed and network
    model = build_model(ModelConfig(arch=job.arch, feature_scale=job.feature_scale))
    aggregate = class_aware_average if job.variant in ("marginal", "marginal-pseudo", "marginal-excl") else None
    recipe = Recipe(local_steps=job.local_steps)
    tally: Counter[str] = Counter()
    steps = job.rounds * job.local_steps
    model, _, seconds = federate(recipe, sites, model, train_cfg, steps, aggregate=aggregate, tally=tally)
    return job, organ_dice(model, val, patch, train_cfg.cpu_bf16), seconds, tally


def _mean(values: Sequence[float]) -> float:
    return statistics.fmean(values)


def _cell(values: Sequence[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.3f}"
    return f"{statistics.fmean(values):.3f} ± {statistics.stdev(values):.3f}"


def print_tables(results: Mapping[tuple[str, str], list[Scores]], archs: Sequence[str], seeds: int) -> None:
    """Mean ± sd per organ for every (network, variant); the goals for the first network; the pancreas by network."""
    print(f"\n| network | variant ({seeds} seeds) | " + " | ".join(ORGAN_NAMES) + " | mean |")
    print("|---|---|" + "---:|" * (len(ORGAN_NAMES) + 1))
    for (arch, variant), runs in results.items():
        cells = [_cell([r[o] for r in runs]) for o in ORGAN_NAMES]
        means = [_mean([r[o] for o in ORGAN_NAMES]) for r in runs]
        print(f"| {arch} | {variant} | " + " | ".join(cells) + f" | {_cell(means)} |")
    main = archs[0]
    organ_mean = {
        v: {o: _mean([r[o] for r in runs]) for o in ORGAN_NAMES} for (a, v), runs in results.items() if a == main
    }
    if {"marginal", "full", "naive"} <= set(organ_mean):
        m, f, n = organ_mean["marginal"], organ_mean["full"], organ_mean["naive"]
        print(f"\ngoals ({main}, means over seeds):")
        for organ in ORGAN_NAMES:
            ratio = m[organ] / f[organ] if f[organ] else float("nan")
            gain = m[organ] - n[organ]
            verdict = "met" if ratio >= 0.95 and gain >= 0.10 else "NOT met"
            print(f"  {organ:9s} marginal/full = {ratio:.3f} (>= 0.95), marginal - naive = {gain:+.3f} (>= +0.10): "
                  f"{verdict}")  # fmt: skip
    if len(archs) > 1:
        print("\npancreas Dice by network (mean ± sd over seeds):")
        for variant in VARIANTS + EXTRA_VARIANTS:
            cells = [_cell([r["pancreas"] for r in results[(a, variant)]]) for a in archs if (a, variant) in results]
            if len(cells) == len(archs):
                print(f"  {variant:10s} " + "  ".join(f"{a}: {c}" for a, c in zip(archs, cells, strict=True)))


def to_json(results: Mapping[tuple[str, str], list[Scores]], main: str) -> dict[str, Scores]:
    """``{variant: {organ: dice}}`` for the first network, ``{"unet:variant": ...}`` for the others (seed means)."""
    out: dict[str, Scores] = {}
    for (arch, variant), runs in results.items():
        key = variant if arch == main else f"{arch}:{variant}"
        out[key] = {o: _mean([r[o] for r in runs]) for o in ORGAN_NAMES}
    return out


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="seeds 0,1, 20 rounds x 10 steps, 6 validation cases")
    parser.add_argument("--size", type=int, default=32, help="phantom side at 2 mm (also the patch side)")
    parser.add_argument("--cases", type=int, default=6, help="training cases per site")
    parser.add_argument("--val-cases", type=int, default=12, help="neutral-scanner validation phantoms")
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--local-steps", type=int, default=10)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--archs", default="attention-unet", help="comma-separated: attention-unet, unet")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--feature-scale", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3, help="1e-2 diverged: every Dice 0.000")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per job")
    parser.add_argument("--jobs", type=int, default=1, help="federations run at once (processes)")
    parser.add_argument(
        "--augment",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the paper's random affine and flips on every patch",
    )
    parser.add_argument("--pseudo-weight", type=float, default=1.0, help="pseudo_weight of the *-pseudo variants")
    parser.add_argument("--exclusion-weight", type=float, default=1.0, help="exclusion_weight of the *-excl variants")
    add_cpu_bf16_option(parser)
    parser.add_argument("--json", type=Path, help="write {variant: {organ: dice}} (means over seeds) here")
    args = parser.parse_args()
    unknown = set(args.variants.split(",")) - set(VARIANTS + EXTRA_VARIANTS)
    if unknown:
        parser.error(f"unknown --variants {', '.join(sorted(unknown))}; known: {', '.join(VARIANTS + EXTRA_VARIANTS)}")
    if args.quick:
        args.seeds, args.rounds, args.val_cases = "0,1", 20, 6
    return args


def main() -> None:
    args = parse_args()
    archs = args.archs.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    jobs = [
        Job(v, a, s, args.size, args.cases, args.val_cases, args.rounds, args.local_steps, args.lr,
            args.feature_scale, args.threads, args.cpu_bf16, args.augment, args.pseudo_weight, args.exclusion_weight)
        for a in archs for v in args.variants.split(",") for s in seeds
    ]  # fmt: skip
    print(f"sites {SITES}; {len(jobs)} federations of {args.rounds} rounds x {args.local_steps} steps, "
          f"{args.jobs} at a time", flush=True)  # fmt: skip
    start = time.perf_counter()
    results: dict[tuple[str, str], list[Scores]] = {}
    total: Counter[str] = Counter()
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=get_context("spawn")) as pool:
        for job, dice, seconds, tally in pool.map(run_job, jobs):
            results.setdefault((job.arch, job.variant), []).append(dice)
            total.update(tally)
            scores = " ".join(f"{o}={d:.3f}" for o, d in dice.items())
            print(f"  {job.arch} {job.variant:9s} seed {job.seed}: {scores}  ({seconds:.0f} s; "
                  f"{tally['fp32_retries']} steps again in fp32, {tally['skipped']} skipped)", flush=True)  # fmt: skip
    print_tables(results, archs, len(seeds))
    print(f"site steps {total['steps']}: {total['fp32_retries']} not finite in bf16 and computed again in fp32, "
          f"{total['skipped']} skipped")  # fmt: skip
    print(f"total {time.perf_counter() - start:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(to_json(results, archs[0]), indent=2) + "\n")


if __name__ == "__main__":
    main()
