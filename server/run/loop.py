"""What the ServerApp does around Flower's round loop: central validation, checkpoints and history each round."""

from __future__ import annotations

import hashlib
import logging
import math
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from torch import nn

from fedseg.common.data.manifest import site_manifest
from fedseg.common.data.preprocess import PreparedCase
from fedseg.common.data.sitecache import prepare_labelled
from fedseg.common.engine.checkpoint import CheckpointMeta, config_hash, load_checkpoint
from fedseg.common.engine.keeper import CheckpointKeeper
from fedseg.common.engine.validation import MEAN_KEY, class_names_for
from fedseg.common.errors import ConfigError
from fedseg.common.fl.protocol import TrainTask, task_config
from fedseg.common.fl.weights import arrays_from_model, load_arrays
from fedseg.common.nn.model import build_model
from fedseg.common.runtime.events import EventWriter
from fedseg.server.config import RunSpec, ServerConfig, StrategyConfig
from fedseg.server.run.central import CentralValidator
from fedseg.server.run.clientdp import ClientLevelDP
from fedseg.server.run.crosssite import CrossSite
from fedseg.server.run.fltrust import RootTrust
from fedseg.server.run.history import History, RoundRow, clean_dice
from fedseg.server.run.lossscreen import LossScreen, screen_patches
from fedseg.server.run.overlap import Background
from fedseg.server.run.state import StrategyState, load_state, save_state
from fedseg.server.run.strategy import RecordingStrategy, RoundStats, build_strategy
from fedseg.server.run.telemetry import EVENTS_FILE, ServerTelemetry, TelemetryGrid
from fedseg.server.run.transport import pack_wanted

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
CACHE_DIR = "cache"
SPILL_DIR = "spill"  # a round's replies while it is screened (fedseg.server.run.spill)


def fresh_folder(path: Path) -> Path:
    """``path`` emptied (what a stopped run left there is of no use) and created."""
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def initial_model(spec: RunSpec) -> nn.Module:
    """The model of the first round: a checkpoint's weights when resuming, else a seeded initialisation."""
    cfg = spec.config
    if spec.initial_checkpoint is not None:
        loaded = load_checkpoint(
            spec.initial_checkpoint, expect=cfg.model, classes=class_names_for(cfg.model.n_classes)
        )
        return loaded.model
    torch.manual_seed(cfg.seed)
    return build_model(cfg.model)


def train_task(spec: RunSpec) -> TrainTask:
    """The per-round task sent to every site."""
    cfg = spec.config
    return TrainTask(
        model=cfg.model,
        train=cfg.train,
        preprocess=cfg.preprocess,
        deadline=cfg.round_timeout,
        round_offset=spec.first_round - 1,
        last_round=cfg.rounds,
        transport=cfg.transport,
        bn=cfg.strategy.bn,
        packed=pack_wanted() and cfg.privacy.mode != "client-dp",  # client-dp clips every array as it arrives
        privacy=cfg.privacy.for_run(cfg.rounds, str(cfg.output_dir)),
    )


@dataclass(frozen=True)
class FinishedRound:
    """What the end of a round fixes at once (its wall time, its statistics, the strategy's state, the weights);
    scoring, checkpoint and history can then happen later (:mod:`fedseg.server.run.overlap`)."""

    server_round: int
    global_round: int
    arrays: ArrayRecord
    seconds: float
    stats: RoundStats
    state: StrategyState | None


class RoundEvaluator:
    """Flower's ``evaluate_fn``: after each round, validate, checkpoint and append a history row.

    Args:
        spec: the run (global round numbering starts at ``spec.first_round``).
        model: a model instance the weights are loaded into.
        validator: central validation, or None to skip Dice.
        checkpoints: ``last.pt`` / ``best.pt`` keeper.
        history: the run's history files.
        stats: per-round statistics recorded by the strategy (read, not modified).
        state: the strategy's state after a global round, saved (atomically, per round) before ``last.pt``.
        background: where scoring, checkpoint and history go so that the next round need not wait (None: done
            before Flower's loop goes on).
    """

    def __init__(
        self,
        spec: RunSpec,
        model: nn.Module,
        validator: CentralValidator | None,
        checkpoints: CheckpointKeeper,
        history: History,
        stats: dict[int, RoundStats],
        state: Callable[[int], StrategyState] | None = None,
        background: Background | None = None,
    ) -> None:
        self.spec = spec
        self.model = model
        self.validator = validator
        self.checkpoints = checkpoints
        self.history = history
        self.stats = stats
        self.state = state
        self.background = background
        self.class_names = class_names_for(spec.config.model.n_classes)
        self.hash = config_hash(model=spec.config.model, preprocess=spec.config.preprocess)
        self.since = time.monotonic()
        self.on_row: Callable[[RoundRow], None] | None = None

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """Score, save and record the global model after ``server_round`` (0 = before training).

        With a background worker this returns at once (no metrics for Flower's own log): the round's row is
        written when its scoring is done, in round order.
        """
        if server_round == 0 and self.spec.first_round > 1:
            self.since = time.monotonic()
            return None  # a resumed run's starting model was scored by the run that produced it
        finished = self.finish(server_round, arrays)
        if self.background is None:
            return self.record(finished)
        self.background.submit(lambda: self.record(finished))
        return None

    def finish(self, server_round: int, arrays: ArrayRecord) -> FinishedRound:
        """Fix what belongs to the round now: its wall time, statistics, the strategy state and the weights."""
        global_round = self.spec.first_round - 1 + server_round
        now = time.monotonic()
        finished = FinishedRound(
            server_round=server_round,
            global_round=global_round,
            arrays=arrays,
            seconds=now - self.since,
            stats=self.stats.get(server_round, RoundStats()),
            state=self.state(global_round) if self.state is not None else None,
        )
        self.since = now
        return finished

    def record(self, done: FinishedRound) -> MetricRecord | None:
        """Central Dice of the round's model, then its strategy state, checkpoint and history row."""
        load_arrays(self.model, done.arrays)
        dice = self.validator(self.model) if self.validator is not None else {}
        metrics = {k: v for k, v in dice.items() if not math.isnan(v)}
        meta = CheckpointMeta(
            model=self.spec.config.model,
            class_names=self.class_names,
            preprocess=self.spec.config.preprocess,
            patch_size=self.spec.config.train.patch_size,
            config_hash=self.hash,
            seed=self.spec.config.seed,
            metrics=metrics,
            score=metrics.get(MEAN_KEY),
            round=done.global_round,
        )
        if done.state is not None:
            save_state(self.checkpoints.folder, done.state)
        best = self.checkpoints.save(self.model, meta)
        stats = done.stats
        row = RoundRow(
            round=done.global_round,
            seconds=done.seconds,
            sites=stats.sites,
            failures=stats.failures,
            rejected=stats.rejected,
            dice=clean_dice(dice),
            bytes_out=stats.bytes_out,
            bytes_in=stats.bytes_in,
            cross_site=stats.cross_site,
            best=best,
        )
        self.history.append(row)
        if self.on_row is not None:
            self.on_row(row)
        log.info("round %d done in %.1f s: %s", done.global_round, row.seconds, _dice_text(dice))
        record: dict[str, int | float | list[int] | list[float]] = dict(metrics)
        return MetricRecord(record) if record else None


def _dice_text(dice: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.3f}" for k, v in dice.items()) or "(no central validation)"


def loss_screen(cfg: ServerConfig, validator: CentralValidator | None) -> LossScreen | None:
    """The loss screen on the central validation set (:mod:`fedseg.server.run.lossscreen`) whenever there is
    central data, unless screening is off (FLTrust runs after it: the two see different attacks)."""
    if validator is None or cfg.strategy.screen == "off":
        return None
    patches = screen_patches(validator.cases, cfg.validation_patch, cfg.strategy.screen_cases)
    log.info("loss screen: %d patches of %s from the central validation set", len(patches), cfg.validation_patch)
    return LossScreen(patches, build_model(cfg.model), cfg.strategy.max_loss_ratio)


def root_trust(cfg: ServerConfig, validator: CentralValidator | None, cache_dir: Path) -> RootTrust | None:
    """FLTrust on the server's root set (:mod:`fedseg.server.run.fltrust`), when it is the chosen screen.

    Raises:
        ConfigError: a root case is also a central validation case (same image).
        DataError: the root folder has no labelled case.
    """
    s = cfg.strategy
    if s.screen != "fltrust" or s.root_data is None:
        return None
    manifest = site_manifest(s.root_data, None)
    use = "train the server's reference update on"
    cases = prepare_labelled(s.root_data, manifest, cfg.preprocess, cache_dir, role="strategy.root_data", use=use)
    cases = cases[: s.root_cases]
    if validator is not None:
        seen = {_digest(c): c.case_id for c in validator.cases}
        for case in cases:
            if (twin := seen.get(_digest(case))) is not None:
                raise ConfigError(
                    f"strategy.root_data case {case.case_id} is validation case {twin}: the root set must not hold "
                    "the cases the global model is scored on"
                )
    log.info("FLTrust: reference update on %d root cases from %s", len(cases), s.root_data)
    return RootTrust(cases, cfg.model, cfg.train, s.root_steps)


def screening_limits(cfg: ServerConfig) -> StrategyConfig:
    """The strategy table the replies are screened by: as configured, except that under DP-SGD the direction check
    is off. A DP-SGD update is mostly noise, nearly orthogonal to every other site's (cosines about 0), so a cosine
    bound rejects DP replies by coin toss (``bench/privacy.py`` saw every reply of a round rejected at ε = 1)."""
    if cfg.privacy.mode != "dp-sgd" or cfg.strategy.min_update_cosine <= -1:
        return cfg.strategy
    log.info("privacy.mode = dp-sgd: the direction check (min_update_cosine) is off; DP updates are mostly noise")
    return cfg.strategy.model_copy(update={"min_update_cosine": -1.0})


def private_driver(cfg: ServerConfig, strategy: RecordingStrategy) -> Strategy:
    """What runs the rounds: ``strategy`` itself, or under ``privacy.mode = "client-dp"`` Flower's DP wrapper
    around it (:mod:`fedseg.server.run.clientdp`; after ``strategy`` restored a resumed run's accountant)."""
    if cfg.privacy.mode != "client-dp":
        return strategy
    return ClientLevelDP(strategy, cfg.privacy, cfg.min_sites, cfg.rounds)


def _digest(case: PreparedCase) -> str:
    return hashlib.sha256(np.ascontiguousarray(case.image).tobytes()).hexdigest()


def serve(
    grid: Grid,
    spec: RunSpec,
    registered: Mapping[int, str] | None = None,
    pins: Mapping[str, int] | None = None,
) -> None:
    """Run ``spec.num_rounds`` rounds of the configured strategy on ``grid``, recording every round.

    Args:
        grid: Flower's grid (from ``@app.main``).
        spec: the validated run description.
        registered: node id -> site name of the registered site keys (node authentication); those names are
            locked (:meth:`~fedseg.server.run.replies.SiteRegistry.lock`).
        pins: site name -> the cases pinned in ``sites.toml`` (:mod:`fedseg.server.run.weighting`).
    """
    cfg = spec.config
    out: Path = cfg.output_dir
    model = initial_model(spec)
    validator = CentralValidator(cfg, out / CACHE_DIR / "validation") if cfg.validation.data is not None else None
    history = History(out)
    history.truncate(spec.first_round - 1)
    strategy = RecordingStrategy(
        build_strategy(cfg),
        cfg.min_sites,
        cfg.min_replies,
        cfg.site_wait_timeout,
        limits=screening_limits(cfg),
        round_offset=spec.first_round - 1,
        cross_site=CrossSite(cfg.cross_site_every, spec.num_rounds) if cfg.cross_site_every is not None else None,
        spill_dir=fresh_folder(out / CACHE_DIR / SPILL_DIR),
        pins=pins,
        loss_screen=loss_screen(cfg, validator),
        root_trust=root_trust(cfg, validator, out / CACHE_DIR / "root"),
    )
    if spec.initial_checkpoint is not None:
        try:
            strategy.restore(load_state(spec.initial_checkpoint.parent, spec.first_round - 1))
        except ConfigError as err:  # a run folder from before strategy state was saved
            log.warning("%s; the strategy state starts afresh", err)
    if registered:
        strategy.registry.lock(registered)
        log.info("site names locked to their keys: %s", ", ".join(f"{n}={s}" for n, s in sorted(registered.items())))
    keeper = CheckpointKeeper(out / CHECKPOINT_DIR)
    background = Background() if cfg.validation.overlap else None
    evaluator = RoundEvaluator(spec, model, validator, keeper, history, strategy.stats, strategy.state, background)
    telemetry = ServerTelemetry(EventWriter(out / EVENTS_FILE), spec.first_round, cfg.rounds)
    evaluator.on_row = telemetry.round_done
    log.info("rounds %d..%d with %s", spec.first_round, cfg.rounds, cfg.strategy.name)
    telemetry.run_state("running", first_round=spec.first_round, last_round=cfg.rounds, min_sites=cfg.min_sites)
    telemetry.enter("waiting")
    driver = private_driver(cfg, strategy)
    try:
        driver.start(
            grid=TelemetryGrid(grid, telemetry, cfg.min_sites),
            initial_arrays=arrays_from_model(model),
            num_rounds=spec.num_rounds,
            timeout=cfg.round_timeout,
            train_config=task_config(train_task(spec)),
            evaluate_config=task_config(train_task(spec)),
            evaluate_fn=telemetry.timed(evaluator),
        )
        if background is not None:
            background.drain()  # the last rounds' scores, checkpoints and rows
    except BaseException:
        telemetry.run_state("failed")
        raise
    finally:
        if background is not None:
            background.close()
    telemetry.run_state("completed")
