"""``fed-eval train``: centralised (or single-site) training with best/last checkpoints, a metrics CSV and resume.

Files in ``--out``: ``last.pt`` (after every epoch, with optimiser state), ``best.pt`` (highest validation
``dice_mean``, or lowest training loss without ``--val``), ``metrics.csv`` (one row per epoch, columns
:data:`CSV_COLUMNS` then with ``--val`` ``dice_<class>`` per foreground class and ``dice_mean``) and ``cache/``
(preprocessed cases).
"""

from __future__ import annotations

import csv
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import torch
import typer

from fedseg.common.cli.shell import (
    DEFAULT_DEVICE,
    DEVICE_HELP,
    SIZE_HELP,
    guarded,
    parse_triple,
    result_table,
    stdout_console,
)
from fedseg.common.data.manifest import site_manifest
from fedseg.common.data.preprocess import PreparedCase, PreprocessConfig
from fedseg.common.data.sitecache import prepare_labelled
from fedseg.common.engine.checkpoint import (
    CheckpointMeta,
    changed_settings,
    config_hash,
    load_checkpoint,
    load_optimizer_state,
    read_meta,
)
from fedseg.common.engine.config import TrainConfig
from fedseg.common.engine.device import resolve_device
from fedseg.common.engine.keeper import LAST, CheckpointKeeper
from fedseg.common.engine.train import make_optimizer, train_model
from fedseg.common.engine.validation import MEAN_KEY, class_names_for, validate
from fedseg.common.errors import ConfigError
from fedseg.common.nn.model import ModelConfig, build_model

log = logging.getLogger(__name__)

#: The first columns of ``metrics.csv``: epoch (int, from 1), mean training loss, wall seconds of the epoch
#: (validation included) and training samples per second; validation Dice columns follow with ``--val``.
CSV_COLUMNS = ("epoch", "loss", "seconds", "samples_per_second")


@dataclass(frozen=True)
class TrainRun:
    """A validated training request, built once at the CLI edge."""

    data: tuple[Path, ...]
    out: Path
    model: ModelConfig
    train: TrainConfig
    preprocess: PreprocessConfig
    device: torch.device
    val: Path | None = None
    resume: bool = False


def load_cases(roots: Sequence[Path], cfg: PreprocessConfig, cache_dir: Path, option: str) -> list[PreparedCase]:
    """The labelled cases of each dataset folder, using its ``labels.toml`` when present.

    Raises:
        DataError / ConfigError: a folder or its manifest cannot be used, or it has no labelled case.
    """
    cases: list[PreparedCase] = []
    use = "train on" if option == "--data" else "validate on"
    for root in roots:
        site_cases = prepare_labelled(root, site_manifest(root), cfg, cache_dir, role=option, use=use)
        log.info("%s: %d cases", root, len(site_cases))
        cases.extend(site_cases)
    return cases


def _score(metrics: dict[str, float]) -> float:
    """Higher is better: validation mean Dice when present, else minus the training loss."""
    dice = metrics.get(MEAN_KEY)
    return dice if dice is not None and not math.isnan(dice) else -metrics["loss"]


def _append_csv(path: Path, row: dict[str, float]) -> None:
    new = not path.exists()
    with path.open("a", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)


def _resume_state(run: TrainRun, optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> int:
    """Load ``last.pt`` into model and optimiser; return the next epoch.

    Raises:
        ConfigError: the checkpoint was trained with other model or preprocessing settings.
    """
    last = run.out / LAST
    changed = changed_settings(read_meta(last), run.model, run.preprocess)
    if changed:
        raise ConfigError(
            f"--resume: {last} was trained with other {', '.join(changed)}; "
            "use the same options or train into a new --out"
        )
    loaded, meta = load_checkpoint(last, expect=run.model)
    model.load_state_dict(loaded.state_dict())
    load_optimizer_state(last, optimizer)
    return (meta.epoch or 0) + 1


def _epoch_meta(
    run: TrainRun, classes: tuple[str, ...], digest: str, row: dict[str, float], epoch: int
) -> CheckpointMeta:
    """The checkpoint metadata of one epoch; ``best.pt`` is chosen by :func:`_score` of ``row``."""
    return CheckpointMeta(
        model=run.model,
        class_names=classes,
        preprocess=run.preprocess,
        patch_size=run.train.patch_size,
        config_hash=digest,
        seed=run.train.seed,
        metrics=row,
        score=_score(row),
        epoch=epoch,
    )


def run_training(run: TrainRun, progress: bool = True) -> list[dict[str, float]]:
    """Train for ``run.train.epochs`` epochs (continuing from ``last.pt`` with ``resume``).

    Each epoch is one :func:`train_model` call of ``steps_per_epoch`` steps seeded ``seed + epoch``, so a
    resumed run repeats the sampling of an uninterrupted one.

    Returns:
        The metrics rows written to ``metrics.csv`` by this call.

    Raises:
        ConfigError: ``--out`` already holds a run and ``resume`` is off, or ``resume`` finds nothing.
        DataError: a dataset folder cannot be used, or the validation folder has no labels.
    """
    last = run.out / LAST
    if not run.resume and last.exists():
        raise ConfigError(f"{run.out} already holds a training run; pass --resume or choose another --out")
    if run.resume and not last.is_file():
        raise ConfigError(f"--resume: {last} does not exist; train without --resume first")
    run.out.mkdir(parents=True, exist_ok=True)
    cache = run.out / "cache"
    cases = load_cases(run.data, run.preprocess, cache, "--data")
    val_cases = load_cases([run.val], run.preprocess, cache, "--val") if run.val is not None else None
    torch.manual_seed(run.train.seed)
    model = build_model(run.model)
    model.to(run.device)
    optimizer = make_optimizer(model, run.train)
    start = _resume_state(run, optimizer, model) if run.resume else 1
    keeper = CheckpointKeeper(run.out)
    classes = class_names_for(run.model.n_classes)
    digest = config_hash(model=run.model, preprocess=run.preprocess)
    rows = []
    for epoch in range(start, run.train.epochs + 1):
        epoch_cfg = run.train.model_copy(update={"epochs": 1, "steps": None, "seed": run.train.seed + epoch})
        schedule = ((epoch - 1) * run.train.steps_per_epoch, run.train.epochs * run.train.steps_per_epoch)
        report = train_model(
            model, cases, epoch_cfg, run.device, progress=progress, optimizer=optimizer, schedule=schedule
        )
        row: dict[str, float] = {"epoch": epoch, "loss": report.mean_loss, "seconds": report.seconds}
        row["samples_per_second"] = report.samples_per_second
        if val_cases:
            row.update(validate(model, val_cases, run.train.patch_size, run.device, classes))
        meta = _epoch_meta(run, classes, digest, row, epoch)
        if keeper.save(model, meta, optimizer):
            log.info("epoch %d: new best.pt (%s %.4f)", epoch, "Dice" if val_cases else "-loss", meta.score)
        _append_csv(run.out / "metrics.csv", row)
        log.info("epoch %d: loss %.4f", epoch, report.mean_loss)
        rows.append(row)
    return rows


@guarded
def train_command(
    data: Annotated[list[Path], typer.Option("--data", help="Dataset folder (MSD layout or phantom site); repeat.")],
    out: Annotated[Path, typer.Option("--out", help="Output folder for checkpoints and metrics.csv.")],
    val: Annotated[Path | None, typer.Option("--val", help="Labelled validation dataset folder.")] = None,
    arch: Annotated[Literal["attention-unet", "unet"], typer.Option(help="Network.")] = "attention-unet",
    epochs: Annotated[int, typer.Option(help="Total epochs (a resumed run continues up to this).")] = 10,
    steps_per_epoch: Annotated[int, typer.Option(help="Optimiser steps per epoch.")] = 250,
    patch: Annotated[str, typer.Option(help=f"Patch size {SIZE_HELP}, multiples of 16.")] = "96,160,160",
    feature_scale: Annotated[int, typer.Option(help="Divides the base filters 64..1024 (paper: 4).")] = 4,
    batch_size: Annotated[int, typer.Option(help="Patches per step.")] = 2,
    lr: Annotated[float, typer.Option(help="Adam learning rate.")] = 1e-4,
    lr_schedule: Annotated[
        Literal["constant", "poly"], typer.Option(help="constant, or poly: (1 - t/T)^0.9 decay over all epochs.")
    ] = "constant",
    warmup: Annotated[int, typer.Option(help="Linear learning-rate warm-up steps.")] = 0,
    ce_weight: Annotated[float, typer.Option(help="Cross-entropy weight added to the Dice loss (paper: 0).")] = 0.0,
    batch_dice: Annotated[
        bool, typer.Option("--batch-dice", help="One Dice term per class over the batch (nnU-Net).")
    ] = False,
    cpu_bf16: Annotated[
        bool | None,
        typer.Option(
            "--cpu-bf16/--no-cpu-bf16",
            help="Force bf16 autocast on the CPU on or off (default: on where the CPU has AVX-512 BF16 / AMX).",
        ),
    ] = None,
    affine_prob: Annotated[
        float, typer.Option(help="Share of patches that get the paper's random affine (paper: 1; flips always).")
    ] = 1.0,
    device: Annotated[str, typer.Option("--device", help=DEVICE_HELP)] = DEFAULT_DEVICE,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from OUT/last.pt.")] = False,
    seed: Annotated[int, typer.Option(help="Seed for initialisation, sampling and augmentation.")] = 0,
) -> None:
    """Train one network centrally on one or more datasets, validating every epoch when --val is given."""
    for folder in [*data, *([val] if val is not None else [])]:
        if not folder.is_dir():
            raise ConfigError(f"{folder}: no such dataset folder; check --data / --val")
    try:
        patch_size = parse_triple(patch, "--patch")
    except typer.BadParameter as err:
        raise ConfigError(str(err)) from None
    train_cfg = TrainConfig.model_validate(
        {
            "epochs": epochs,
            "steps_per_epoch": steps_per_epoch,
            "patch_size": patch_size,
            "batch_size": batch_size,
            "lr": lr,
            "lr_schedule": lr_schedule,
            "warmup_steps": warmup,
            "ce_weight": ce_weight,
            "affine_prob": affine_prob,
            "batch_dice": batch_dice,
            "cpu_bf16": "auto" if cpu_bf16 is None else cpu_bf16,
            "seed": seed,
        }
    )
    run = TrainRun(
        data=tuple(data),
        out=out,
        val=val,
        resume=resume,
        device=resolve_device(device),
        model=ModelConfig(arch=arch, feature_scale=feature_scale),
        train=train_cfg,
        preprocess=PreprocessConfig(),
    )
    render_metrics(run_training(run), out)


def render_metrics(rows: list[dict[str, float]], out: Path) -> None:
    """Print the metrics rows of this call as a table (plain and 80 columns wide when stdout is not a TTY)."""
    console = stdout_console()
    if not rows:
        console.print(f"nothing to do: {out} already reached the requested epochs")
        return
    dice = any(key.startswith("dice_") for key in rows[0])
    table = result_table(console, f"Training in {out}" + (" (validation Dice per class)" if dice else ""))
    for key in rows[0]:
        table.add_column(_header(key), justify="right", overflow="fold")
    for row in rows:
        table.add_row(*(_cell(key, value) for key, value in row.items()))
    console.print(table)


def _header(key: str) -> str:
    """Short column title of a metrics.csv key (``dice_liver`` -> ``liver``), so nine columns fit 80."""
    return {"samples_per_second": "samples/s", "seconds": "s"}.get(key, key.removeprefix("dice_"))


def _cell(key: str, value: float) -> str:
    if key == "epoch":
        return str(int(value))
    digits = {"loss": 4, "seconds": 0, "samples_per_second": 2}.get(key, 3)
    return f"{value:.{digits}f}"
