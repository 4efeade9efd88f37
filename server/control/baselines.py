"""Each site alone: why federating helps, in the demo's own numbers.

After a federation, the same network is trained on one site's data only, from the same initial weights, for as
many steps as that site trained in the whole federation (``rounds × train.steps``), and scored on the same central
validation set as the global model. :func:`comparison_lines` puts the two side by side.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from fedseg.common.console import console
from fedseg.common.data.manifest import GLOBAL_CLASSES, site_manifest
from fedseg.common.data.sitecache import prepare_labelled
from fedseg.common.engine.device import resolve_device
from fedseg.common.engine.train import train_model
from fedseg.common.nn.model import build_model
from fedseg.server.config import ServerConfig
from fedseg.server.run.central import CentralValidator

log = logging.getLogger(__name__)
ORGANS = GLOBAL_CLASSES[1:]


def steps_per_site(cfg: ServerConfig) -> int:
    """Training steps each site spent in the whole federation of ``cfg``: rounds × steps per round (after every
    override, so ``fed-server demo rounds=18 train.steps=10`` gives 180)."""
    return cfg.rounds * cfg.train.total_steps


def site_alone(
    cfg: ServerConfig,
    datasets: Mapping[str, tuple[Path, Path | None]],
    steps: int,
    cache: Path,
    on_site: Callable[[str], None] | None = None,
) -> dict[str, dict[str, float]]:
    """Dice per organ (``dice_<organ>``, ``dice_mean``) on the central set of a model trained on each site alone.

    Args:
        cfg: the federation's server config (model, training, preprocessing, validation set; the seed of the
            initial weights).
        datasets: site name -> (data folder, label manifest or None).
        steps: training steps per site (what each site trained in the federation).
        cache: folder for the preprocessed cases.
        on_site: called with a site's name before its training starts (progress).

    Raises:
        DataError, ConfigError: a dataset or manifest is unusable (as for the federation).
    """
    validator = CentralValidator(cfg, cache / "validation")
    train = cfg.train.model_copy(update={"steps": steps})
    device = resolve_device("auto")
    scores: dict[str, dict[str, float]] = {}
    for name, (data, labels) in datasets.items():
        if on_site is not None:
            on_site(name)
        cases = prepare_labelled(
            data, site_manifest(data, labels), cfg.preprocess, cache / name, role=f"site {name}", use="train on"
        )
        torch.manual_seed(cfg.seed)  # the federation's initial weights
        model = build_model(cfg.model)
        log.info("%s alone: training %d steps on %d cases", name, steps, len(cases))
        report = train_model(model, cases, train, device, progress=console.is_terminal)
        scores[name] = validator(model)
        log.info("%s alone: %d steps in %.0f s, mean Dice %.3f", name, steps, report.seconds, scores[name]["dice_mean"])
    return scores


def comparison_lines(federated: Mapping[str, float | None], alone: Mapping[str, Mapping[str, float]]) -> list[str]:
    """A plain table (≤ 80 columns): the federated model and each site alone, Dice per organ and mean."""
    header = f"{'model':<16}" + "".join(f"{o:>10}" for o in (*ORGANS, "mean"))
    rows = [("federated", federated), *((f"{name} alone", dice) for name, dice in alone.items())]
    lines = [header]
    for label, dice in rows:
        cells = "".join(f"{_fmt(dice.get(f'dice_{o}')):>10}" for o in (*ORGANS, "mean"))
        lines.append(f"{label:<16}{cells}")
    best = max((d.get("dice_mean", math.nan) for d in alone.values()), default=math.nan)
    fed = federated.get("dice_mean")
    if fed is not None and not math.isnan(fed) and not math.isnan(best):
        lines.append(f"federated - best site alone: {fed - best:+.3f} mean Dice (same steps per site)")
    return lines


def _fmt(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.3f}"
