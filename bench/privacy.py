"""Privacy benchmark: what patient-level DP-SGD at ε ∈ {1, 3, 8} costs in Dice and step time, and what it buys
against membership inference on the final global model, beside the same federation without DP (ε = ∞).

Question: with DP-SGD at every site (δ = 1e-5, each site's ε over the whole run), how much worse is the federated
model's central Dice, how much slower is a step, and can someone holding the final model still tell a site's
training cases from other cases of the same hospitals?

Setup (every row the same but for DP): three phantom sites (``generate_phantoms``, 32³ at 2 mm, each site its own
scanner), each training on 8 cases; the Attention U-Net at feature scale 16 with ``model.norm = "group"`` (DP-SGD
cannot pass BatchNorm, so the non-DP row uses GroupNorm too), no augmentation, 32³ patches (a whole case), lr 3e-3,
batch 2 (under DP the expected batch: q = 2 / 8). Few cases and many steps, so that the non-DP model overfits and
the attack has something to find. Each round every site trains with its own ``train_locally`` (DP-SGD when
``privacy.mode = "dp-sgd"``: the site derives its noise multiplier from ε over the run's rounds × steps and keeps
its accountant across rounds) and the server aggregates with ``OfflineAggregator`` (the default reply screens,
capped case weights, FedAvg) with the loss screen on two validation patches, as ``fed-server`` does by default, but
with the direction check off (``min_update_cosine = -1``) in every row: a DP-SGD update is mostly noise, nearly
orthogonal to the other sites' (cosines about 0.000 in the smoke run), so the default check (cosine ≥ 0 with half of
the others) rejected DP replies by coin toss, and at ε = 1 every reply of a round.

Measured per row:

* Dice per organ of the final global model on 8 neutral validation phantoms (sliding window, fp32);
* ``step_time_ratio``: the median over sites and rounds (of the row's target and reference federations) of this
  process's CPU seconds per step (around each ``train_locally``, so the per-round Opacus wrapping and the site's
  noise calibration are included), ÷ that of the non-DP row of the same seed (both fp32, one torch thread). CPU
  time, because the machine is shared and its load drifts between rows; the trainer's wall clock per step gives
  ``step_time_ratio_wall``, kept beside;
* membership inference on the final model: members = the 24 training cases (8 per site), non-members = 24 other
  cases of the same three sites (8 per site, same scanners, never trained on). Per-case loss = the sites' training
  loss (the soft Dice loss) of the sliding-window prediction over the whole case; the same attacks on the mean
  voxel cross-entropy are reported beside (``mia_auc_ce``). Attacks: the loss threshold (Yeom et al. 2018, score
  −loss) and its difficulty-calibrated variant (Watson et al. 2022, offline: score = reference loss − target loss).
  Each row's reference is the same federation (same ε, same initial model, which every site receives) trained on a
  third, disjoint set of 8 cases per site, so neither members nor non-members are in it. It must be trained like
  the target: with one non-DP reference for every row (an earlier version), the DP rows' calibrated AUC was 0.65
  at every ε, which was only the reference's own ranking of these cases (its loss attack on them gave 0.35, i.e.
  0.65 reversed: by chance the members were the harder cases). ROC AUC with a 95 % stratified percentile bootstrap
  interval (2000 resamples), TPR at 5 % FPR (24 non-members allow one false positive), and the loss attack on the
  reference model itself (``mia_auc_reference``): what chance gives on these cases (0.5 expected; with 24 and 24
  cases its standard deviation is about 0.08).

DP-SGD draws its Poisson samples and noise from the operating system's entropy (by design), so DP rows do not
repeat exactly for the same seed.

Measured on 2026-12-07 (seed 0, 2 shared cores): without DP the loss attack reached AUC 0.66 [0.49, 0.80] and the
calibrated one 0.69 [0.54, 0.83] (TPR 0.25 at 5 % FPR); at ε = 8, 3 and 1 every attack was at chance (0.41-0.52,
every interval around 0.5), and so was the model: mean Dice 0.04, 0.03 and 0.005 against 0.57. Noise multipliers of
2.2-12.6 on an expected batch of 2 cases do not average out over 8 patients per site and 150 steps. A DP step took
4.0-4.2 x a non-DP step's CPU time.

``--modes client-dp,dp-sgd`` adds, for every finite ε, the server's client-level DP (``privacy.mode = "client-dp"``:
each site's update clipped to ``--clip``, by default the median update norm of the non-DP federation, equal weights,
Gaussian noise on the mean, ``min_replies = min_sites``; the sites train without DP) beside patient-level DP-SGD.
Measured on 2026-12-07 (seed 0, 5 sites, 6 rounds x 15 steps, ε 8, clip 6.20): mean Dice 0.540 without DP, 0.002
under client-dp (σ 1.56; noise on the mean σ x clip / 5 per weight), 0.010 under DP-SGD (σ 1.75); loss attack AUC
0.60, 0.62 and 0.51; CPU per step 1.02 x and 4.85 x the non-DP step (1402 s in all).

    nice -n 10 python bench/privacy.py --quick --markdown     # 2 rounds x 3 steps, every row: a smoke check (138 s;
                                                              # its step ratios measure the per-round DP setup)
    nice -n 10 python bench/privacy.py --markdown --json /tmp/privacy.json   # 6 rounds x 25 steps (1409 s, load 4 -> 1)
    nice -n 5 python bench/privacy.py --markdown --modes client-dp,dp-sgd --sites 5 --epsilons inf,8 --steps 15
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from torch import nn

from fedseg.client.budget import BudgetFile, SiteBudget
from fedseg.client.policy import PrivacyPolicy
from fedseg.client.training import train_locally
from fedseg.common.data.manifest import GLOBAL_CLASSES, site_manifest
from fedseg.common.data.preprocess import PreparedCase, PreprocessConfig
from fedseg.common.data.sitecache import prepare_labelled
from fedseg.common.engine.config import TrainConfig
from fedseg.common.engine.inference import sliding_window_predict
from fedseg.common.engine.validation import validate
from fedseg.common.eval.membership import AttackReport, attack_report, calibrated_scores, loss_scores
from fedseg.common.fl.protocol import TrainTask, round_seed
from fedseg.common.fl.weights import arrays_from_model, load_arrays
from fedseg.common.nn.loss import DiceLoss
from fedseg.common.nn.model import ModelConfig, build_model
from fedseg.common.privacy.accounting import noise_for, sample_rate
from fedseg.common.privacy.config import PrivacyConfig
from fedseg.common.synthetic.phantoms import generate_phantoms
from fedseg.server.config import ServerConfig, StrategyConfig
from fedseg.server.run.clientdp import ClientLevelDP
from fedseg.server.run.clientdp import noise_for as client_noise_for
from fedseg.server.run.lossscreen import LossScreen, masked_cross_entropy, screen_patches
from fedseg.server.run.offline import OfflineAggregator, SiteReply

ORGANS = GLOBAL_CLASSES[1:]
DELTA = 1e-5
#: ε per site over the run; None: DP off.
EPSILONS: tuple[float | None, ...] = (None, 8.0, 3.0, 1.0)
NDArray = np.ndarray
#: The per-case losses attacked: the sites' training loss and the voxel cross-entropy.
LOSS_KINDS = ("train", "ce")


@dataclass(frozen=True)
class Recipe:
    """The federation every row trains (module docstring) and the attack's settings."""

    rounds: int = 6
    steps: int = 25
    size: int = 32
    sites: int = 3
    cases: int = 8  # per site and pool: training (members), held out (non-members), the reference's training
    val_cases: int = 8
    lr: float = 3e-3
    batch: int = 2
    fpr: float = 0.05
    resamples: int = 2000
    mode: str = "dp-sgd"  # or "client-dp": the server clips every site's update to ``clip`` and noises the mean
    clip: float = 1.0  # client-dp's update_clip_norm

    def task(self, privacy: PrivacyConfig, seed: int) -> TrainTask:
        """The train task of every round (``privacy`` as the server sends it)."""
        train = TrainConfig(steps=self.steps, lr=self.lr, batch_size=self.batch, patch_size=(self.size,) * 3,
                            augment=False, amp=False, seed=seed)  # fmt: skip
        model = ModelConfig(feature_scale=16, norm="group")
        return TrainTask(model=model, train=train, preprocess=PreprocessConfig(), deadline=3600.0, privacy=privacy)

    def privacy(self, epsilon: float | None, federation: str) -> PrivacyConfig:
        """DP-SGD at ``epsilon`` per site over the run (None: off)."""
        if epsilon is None:
            return PrivacyConfig()
        if self.mode == "client-dp":
            return PrivacyConfig(mode="client-dp", epsilon=epsilon, delta=DELTA, rounds=self.rounds,
                                 federation=federation, update_clip_norm=self.clip)  # fmt: skip
        return PrivacyConfig(mode="dp-sgd", epsilon=epsilon, delta=DELTA, rounds=self.rounds, federation=federation)

    def noise(self, epsilon: float | None) -> float:
        """The noise multiplier a site with :attr:`cases` cases derives for ``epsilon`` (0: DP off)."""
        if epsilon is None:
            return 0.0
        if self.mode == "client-dp":
            return client_noise_for(epsilon, self.rounds, self.privacy(epsilon, "noise"), self.sites)
        return noise_for(epsilon, DELTA, sample_rate(self.batch, self.cases), self.rounds * self.steps)


@dataclass(frozen=True)
class Pools:
    """One seed's cases: per site its training cases, its held-out cases and the reference's training cases."""

    train: list[list[PreparedCase]]
    held: list[list[PreparedCase]]
    reference: list[list[PreparedCase]]
    val: list[PreparedCase]


def make_pools(root: Path, recipe: Recipe, seed: int) -> Pools:
    """Generate the phantoms of ``seed`` under ``root`` and split every site's cases into three disjoint pools."""
    n = recipe.cases
    size = (recipe.size,) * 3
    generate_phantoms(root, sites=recipe.sites, cases_per_site=3 * n, val_cases=recipe.val_cases, size=size, seed=seed)
    cfg = PreprocessConfig()
    sites = []
    for i in range(1, recipe.sites + 1):
        folder = root / f"site-{i}"
        manifest = site_manifest(folder, str(folder / "labels.toml"))
        sites.append(prepare_labelled(folder, manifest, cfg, root / "cache" / f"s{i}", role=f"site-{i}", use="train"))
    val = root / "validation"
    manifest = site_manifest(val, str(val / "labels.toml"))
    cases = prepare_labelled(val, manifest, cfg, root / "cache" / "v", role="validation", use="validate")
    return Pools([s[:n] for s in sites], [s[n : 2 * n] for s in sites], [s[2 * n : 3 * n] for s in sites], cases)


@dataclass
class Trained:
    """A federation's final global model and what its rounds recorded."""

    model: nn.Module
    seconds_per_step: list[float] = field(default_factory=list)  # the trainer's wall clock
    cpu_per_step: list[float] = field(default_factory=list)  # this process's CPU time around train_locally
    epsilon: float | None = None
    rejected: int = 0
    load: list[float] = field(default_factory=list)  # the 1-minute load average after each round
    update_norms: list[float] = field(default_factory=list)  # each reply's L2 distance from the global model


def _numpy(arrays: ArrayRecord) -> dict[str, NDArray]:
    return {k: a.numpy() for k, a in arrays.items()}


def _record(weights: dict[str, NDArray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in weights.items()})


def _distance(weights: Mapping[str, NDArray], reference: Mapping[str, NDArray]) -> float:
    """The L2 norm of ``weights - reference`` over the float tensors (what client-dp clips)."""
    squares = [float(np.sum((w.astype(np.float64) - reference[k]) ** 2)) for k, w in weights.items()
               if np.issubdtype(w.dtype, np.floating)]  # fmt: skip
    return math.sqrt(sum(squares))


def federate(
    sites: Sequence[Sequence[PreparedCase]], task: TrainTask, rounds: int, val: Sequence[PreparedCase], label: str
) -> Trained:
    """``rounds`` rounds of ``task`` over ``sites`` (the sites' ``train_locally``, the server's aggregation)."""
    torch.manual_seed(task.train.seed)
    model = build_model(task.model)
    client_dp = task.privacy.mode == "client-dp"
    # see the module docstring: DP noise is all direction; client-dp needs a mean of n equal shares
    limits = StrategyConfig(min_update_cosine=-1.0, weighting="equal" if client_dp else "cases")
    patches = screen_patches(val, task.train.patch_size, limits.screen_cases)
    screen = LossScreen(patches, build_model(task.model), limits.max_loss_ratio)
    n = len(sites)
    cfg = ServerConfig(min_sites=n, min_replies=n if client_dp else 1, strategy=limits, rounds=rounds,
                       privacy=task.privacy, model=task.model, transport="fp32")  # fmt: skip
    aggregate = OfflineAggregator(cfg, loss_screen=screen)
    budgets = [SiteBudget(PrivacyPolicy(), BudgetFile(None)) for _ in sites]  # each site's accountant, in memory
    weights = _numpy(arrays_from_model(model))
    out = Trained(model)
    for rnd in range(1, rounds + 1):
        started, replies = time.perf_counter(), []
        for i, (cases, budget) in enumerate(zip(sites, budgets, strict=True), start=1):
            seed = round_seed(task.train.seed, rnd, f"site-{i}")
            cpu = time.process_time()
            arrays, result = train_locally(_record(weights), task, cases, "cpu", seed, budget=budget)
            out.cpu_per_step.append((time.process_time() - cpu) / task.train.total_steps)
            replies.append(SiteReply(f"site-{i}", _numpy(arrays), result.cases, loss=result.loss))
            out.update_norms.append(_distance(replies[-1].weights, weights))
            out.seconds_per_step.append(result.seconds / task.train.total_steps)
            if result.epsilon is not None:
                out.epsilon = max(result.epsilon, out.epsilon or 0.0)
        weights, stats = aggregate(weights, replies)
        out.rejected += len(stats.rejected)
        if isinstance(aggregate.strategy, ClientLevelDP):
            out.epsilon = aggregate.strategy.epsilon
        out.load.append(os.getloadavg()[0])
        spent = "" if out.epsilon is None else f", site epsilon {out.epsilon:.2f}"
        print(f"  {label} round {rnd}: {time.perf_counter() - started:.0f} s{spent}", flush=True)
    load_arrays(model, _record(weights))
    return out


def case_losses(model: nn.Module, cases: Sequence[PreparedCase], cfg: TrainConfig) -> dict[str, NDArray]:
    """Each case's losses over the whole case, from its sliding-window probabilities (fp32; a probability's log is a
    logit whose softmax gives that probability back): ``train``, the sites' training loss (the project's Dice loss
    as ``cfg`` configures it), and ``ce``, the mean voxel cross-entropy (the server's ``masked_cross_entropy``)."""
    loss_fn = DiceLoss(ce_weight=cfg.ce_weight, partial=cfg.partial_loss, exclusion_weight=cfg.exclusion_weight)
    out: dict[str, list[float]] = {kind: [] for kind in LOSS_KINDS}
    for case in cases:
        assert case.label is not None  # prepare_labelled keeps labelled cases only
        probabilities = sliding_window_predict(model, case.image, cfg.patch_size, "cpu", amp=False).probabilities
        logits = torch.from_numpy(probabilities).clamp_min(1e-12).log()[None]
        label = torch.from_numpy(case.label.astype(np.int64))[None]
        with torch.no_grad():
            out["train"].append(float(loss_fn(logits, label, torch.tensor(case.annotated)[None])))
        out["ce"].append(masked_cross_entropy(logits, label, case.annotated))
    return {kind: np.asarray(values, dtype=np.float64) for kind, values in out.items()}


@dataclass(frozen=True)
class Losses:
    """A model's per-case losses (kind -> values) on the members (every site's training cases) and the non-members
    (the sites' held-out cases)."""

    members: dict[str, NDArray]
    non_members: dict[str, NDArray]


def pool_losses(model: nn.Module, pools: Pools, cfg: TrainConfig) -> Losses:
    """``model``'s :func:`case_losses` on every site's training and held-out cases."""
    members = [c for site in pools.train for c in site]
    others = [c for site in pools.held for c in site]
    return Losses(case_losses(model, members, cfg), case_losses(model, others, cfg))


def attacks(target: Losses, reference: Losses, recipe: Recipe, seed: int) -> dict[str, AttackReport]:
    """The loss-threshold and the calibrated attack on ``target`` (``reference``: a model trained on neither group)
    with each loss kind: ``loss``, ``calibrated`` (training loss), ``ce_loss``, ``ce_calibrated``; and ``reference``,
    the loss attack on the reference model itself: what chance gives on these cases (0.5 expected)."""
    chance = loss_scores(reference.members["train"]), loss_scores(reference.non_members["train"])
    out = {"reference": attack_report(chance[0], chance[1], recipe.fpr, recipe.resamples, seed)}
    for kind in LOSS_KINDS:
        prefix = "" if kind == "train" else f"{kind}_"
        members, others = target.members[kind], target.non_members[kind]
        out[f"{prefix}loss"] = attack_report(loss_scores(members), loss_scores(others), recipe.fpr, recipe.resamples,
                                             seed)  # fmt: skip
        members = calibrated_scores(members, reference.members[kind])
        others = calibrated_scores(others, reference.non_members[kind])
        out[f"{prefix}calibrated"] = attack_report(members, others, recipe.fpr, recipe.resamples, seed)
    return out


def _rounded(value: float | None, digits: int = 4) -> float | None:
    return None if value is None or not math.isfinite(value) else round(value, digits)


@dataclass(frozen=True)
class Run:
    """One federation's row, as the ``--json`` file holds it (the keys the issue asks for first)."""

    epsilon: float | None
    dice: dict[str, float | None]
    mia_auc: float
    mia_auc_ci: tuple[float, float]
    step_time_ratio: float
    seed: int
    dice_mean: float | None
    mia_auc_calibrated: float
    mia_auc_calibrated_ci: tuple[float, float]
    tpr_at_fpr: dict[str, float | None]  # fpr, and the TPR of the loss and the calibrated attack there
    mia_auc_ce: float
    mia_auc_ce_ci: tuple[float, float]
    mia_auc_ce_calibrated: float
    mia_auc_ce_calibrated_ci: tuple[float, float]
    members: int
    non_members: int
    member_loss_mean: float
    non_member_loss_mean: float
    noise_multiplier: float
    epsilon_spent: float | None
    delta: float | None
    seconds_per_step: float
    cpu_seconds_per_step: float
    step_time_ratio_wall: float
    mia_auc_reference: float
    mia_auc_reference_ci: tuple[float, float]
    rejected_replies: int
    load_average: float  # the machine's 1-minute load average over the run's rounds (2 cores)
    mode: str = "off"  # off, dp-sgd (patient level, at the sites) or client-dp (site level, at the server)
    sites: int = 3
    update_clip_norm: float | None = None  # client-dp only
    update_norm_median: float = 0.0  # the median L2 norm of a site's update (its weights minus the global ones)


def _interval(report: AttackReport) -> tuple[float, float]:
    return round(report.ci[0], 4), round(report.ci[1], 4)


def run_row(
    epsilon: float | None, seed: int, trained: Trained, dice: dict[str, float], target: Losses,
    found: dict[str, AttackReport], timing: tuple[tuple[float, float], tuple[float, float]], recipe: Recipe,
) -> Run:  # fmt: skip
    """One run's row (``found``: :func:`attacks`; ``timing``: :func:`_per_step` of this ε's federations and of the
    non-DP ones)."""
    loss, calibrated = found["loss"], found["calibrated"]
    (cpu, per_step), (base_cpu, base_wall) = timing
    return Run(
        epsilon=epsilon,
        dice={organ: _rounded(dice[f"dice_{organ}"]) for organ in ORGANS},
        mia_auc=round(loss.auc, 4),
        mia_auc_ci=_interval(loss),
        step_time_ratio=round(cpu / base_cpu, 3),
        seed=seed,
        dice_mean=_rounded(dice["dice_mean"]),
        mia_auc_calibrated=round(calibrated.auc, 4),
        mia_auc_calibrated_ci=_interval(calibrated),
        tpr_at_fpr={"fpr": recipe.fpr, "loss": loss.tpr, "calibrated": calibrated.tpr},
        mia_auc_ce=round(found["ce_loss"].auc, 4),
        mia_auc_ce_ci=_interval(found["ce_loss"]),
        mia_auc_ce_calibrated=round(found["ce_calibrated"].auc, 4),
        mia_auc_ce_calibrated_ci=_interval(found["ce_calibrated"]),
        members=loss.members,
        non_members=loss.non_members,
        member_loss_mean=round(float(target.members["train"].mean()), 4),
        non_member_loss_mean=round(float(target.non_members["train"].mean()), 4),
        noise_multiplier=round(recipe.noise(epsilon), 4),
        epsilon_spent=_rounded(trained.epsilon),
        delta=DELTA if epsilon is not None else None,
        seconds_per_step=round(per_step, 4),
        cpu_seconds_per_step=round(cpu, 4),
        step_time_ratio_wall=round(per_step / base_wall, 3),
        mia_auc_reference=round(found["reference"].auc, 4),
        mia_auc_reference_ci=_interval(found["reference"]),
        rejected_replies=trained.rejected,
        load_average=round(statistics.mean(trained.load), 2),
        mode="off" if epsilon is None else recipe.mode,
        sites=recipe.sites,
        update_clip_norm=recipe.clip if epsilon is not None and recipe.mode == "client-dp" else None,
        update_norm_median=round(statistics.median(trained.update_norms), 4),
    )


def _label(epsilon: float | None) -> str:
    return "ε=∞" if epsilon is None else f"ε={epsilon:g}"


def _per_step(runs: Sequence[Trained]) -> tuple[float, float]:
    """The median CPU and wall seconds per step over every site and round of ``runs``."""
    cpu = [x for r in runs for x in r.cpu_per_step]
    wall = [x for r in runs for x in r.seconds_per_step]
    return statistics.median(cpu), statistics.median(wall)


def run_seed(
    recipe: Recipe, seed: int, epsilons: Sequence[float | None], root: Path, modes: Sequence[str] = ("dp-sgd",)
) -> list[Run]:
    """The non-DP federation of one seed, then every finite ε under every mode: for each, the reference
    federation (the same training on the reference pool: the calibration's reference) and the target federation,
    attacked. A client-dp ``recipe.clip`` of 0 means the median update norm of the non-DP federation."""
    pools = make_pools(root / f"seed-{seed}", recipe, seed)
    plan = [(None, recipe)] + [(e, replace(recipe, mode=m)) for m in modes for e in epsilons if e is not None]
    done, clip = [], recipe.clip
    for epsilon, planned in plan:
        row = replace(planned, clip=clip)
        label = _label(epsilon) if epsilon is None else f"{row.mode} {_label(epsilon)}"
        task = row.task(row.privacy(epsilon, f"bench-{seed}-{label}"), seed)
        shadow = federate(pools.reference, task, row.rounds, pools.val, f"{label} reference")
        trained = federate(pools.train, task, row.rounds, pools.val, label)
        if epsilon is None and clip <= 0:
            clip = round(statistics.median(trained.update_norms), 4)
            print(f"  client-dp update_clip_norm = {clip:g} (the non-DP updates' median norm)", flush=True)
        dice = validate(trained.model, pools.val, task.train.patch_size, "cpu", cpu_bf16=False)
        target = pool_losses(trained.model, pools, task.train)
        found = attacks(target, pool_losses(shadow.model, pools, task.train), recipe, seed)
        done.append((epsilon, trained, dice, target, found, _per_step([trained, shadow]), row))
    base = next(times for e, *_, times, _ in done if e is None)
    return [run_row(e, seed, t, d, target, found, (times, base), row) for e, t, d, target, found, times, row in done]


def _cell(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown(rows: Sequence[Run], recipe: Recipe) -> str:
    """The runs as a markdown table (Dice ÷ non-DP: against the ε = ∞ run of the same seed)."""
    plain = {r.seed: r.dice_mean for r in rows if r.epsilon is None}
    lines = [
        f"| mode | sites | ε | seed | σ | ε spent | {' | '.join(ORGANS)} | mean Dice | ÷ non-DP | "
        f"MIA AUC loss [95 % CI] | MIA AUC calibrated [95 % CI] | TPR @ {100 * recipe.fpr:g} % FPR loss / cal. | "
        "AUC CE loss / cal. | "
        "AUC loss on the reference | CPU s / step | ÷ non-DP | wall ÷ non-DP | rejected |",
        "| ---: " * (17 + len(ORGANS)) + "|",
    ]
    for r in rows:
        base = plain.get(r.seed)
        ratio = r.dice_mean / base if r.dice_mean is not None and base else None
        (lo, hi), (clo, chi) = r.mia_auc_ci, r.mia_auc_calibrated_ci
        cells = [
            r.mode, str(r.sites), "∞" if r.epsilon is None else f"{r.epsilon:g}", str(r.seed),
            _cell(r.noise_multiplier, 2),
            _cell(r.epsilon_spent, 2), *(_cell(r.dice[o]) for o in ORGANS), _cell(r.dice_mean), _cell(ratio, 2),
            f"{r.mia_auc:.3f} [{lo:.3f}, {hi:.3f}]", f"{r.mia_auc_calibrated:.3f} [{clo:.3f}, {chi:.3f}]",
            f"{_cell(r.tpr_at_fpr['loss'], 2)} / {_cell(r.tpr_at_fpr['calibrated'], 2)}",
            f"{r.mia_auc_ce:.3f} / {r.mia_auc_ce_calibrated:.3f}", f"{r.mia_auc_reference:.3f}",
            _cell(r.cpu_seconds_per_step), _cell(r.step_time_ratio, 2), _cell(r.step_time_ratio_wall, 2),
            str(r.rejected_replies),
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _epsilons(text: str) -> list[float | None]:
    """``inf,8,3,1`` as ε values (None: DP off)."""
    return [None if item.strip() in ("inf", "∞") else float(item) for item in text.split(",")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 rounds x 3 steps: a smoke check of every row")
    parser.add_argument("--rounds", type=int, help="rounds (default 6, --quick 2)")
    parser.add_argument("--steps", type=int, help="local steps per round (default 25, --quick 3)")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds (phantoms, initial model, patches)")
    default = ",".join("inf" if e is None else f"{e:g}" for e in EPSILONS)
    parser.add_argument("--epsilons", default=default, help="comma-separated ε per site (inf: DP off)")
    parser.add_argument("--modes", default="dp-sgd", help="comma-separated: dp-sgd (patient level), client-dp")
    parser.add_argument("--sites", type=int, default=3, help="phantom sites (client-dp: 3-10 is the hospital case)")
    clip = "client-dp update_clip_norm (0: the median update norm of the non-DP federation)"
    parser.add_argument("--clip", type=float, default=0.0, help=clip)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (2 oversubscribed ones crawl)")
    parser.add_argument("--json", type=Path, help="write the runs to this file")
    parser.add_argument("--markdown", action="store_true", help="print the table in markdown")
    args = parser.parse_args()
    if None not in _epsilons(args.epsilons):
        parser.error("--epsilons must include inf: the non-DP run is every ratio's base")
    rounds, steps = (2, 3) if args.quick else (6, 25)
    recipe = Recipe(rounds=args.rounds or rounds, steps=args.steps or steps, sites=args.sites, clip=args.clip)
    modes = [m.strip() for m in args.modes.split(",")]
    if not set(modes) <= {"dp-sgd", "client-dp"}:
        parser.error(f"--modes takes dp-sgd and client-dp, not {args.modes}")
    torch.set_num_threads(args.threads)
    started, load = time.perf_counter(), os.getloadavg()[0]
    rows: list[Run] = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in (int(s) for s in args.seeds.split(",")):
            rows += run_seed(recipe, seed, _epsilons(args.epsilons), Path(tmp), modes)
    wall = time.perf_counter() - started
    if args.json:
        args.json.write_text(json.dumps({"runs": [asdict(r) for r in rows]}, indent=1))
    print(f"\n{recipe.rounds} rounds x {recipe.steps} steps, {recipe.sites} sites x {recipe.cases} cases, "
          f"{recipe.size}^3 phantoms, feature_scale 16, norm group, δ {DELTA:g}")  # fmt: skip
    if args.markdown:
        print(markdown(rows, recipe))
    else:
        for r in rows:
            print(json.dumps(asdict(r)))
    print(f"\ntotal {wall:.0f} s, load average {load:.1f} at the start, {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
