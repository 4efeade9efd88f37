"""``MODEL_CARD.md``: what an exported model is, what trained it, how well it scored, and what it is not for.

:func:`render` is a pure function of a :class:`CardFacts`; :func:`checkpoint_facts` gathers the facts of a
checkpoint from its metadata and, when the checkpoint sits in a ``fed-server`` run folder
(``RUN/checkpoints/*.pt`` beside ``RUN/config.json`` and ``RUN/history.json``), from that folder. Whatever is
not recorded is written as unknown, never guessed. Sites are never named: cases per site are sorted counts.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from torch import nn

from fedseg.common.data.preprocess import PreprocessConfig
from fedseg.common.engine.checkpoint import CheckpointMeta
from fedseg.common.export.contract import OVERLAP

log = logging.getLogger(__name__)

CARD_FILE = "MODEL_CARD.md"
UNKNOWN = "unknown"
INTENDED_USE = "Research use; not a medical device."
_DICE_PREFIX = "dice_"


@dataclass(frozen=True)
class Federation:
    """The federation that trained the weights; None fields were not recorded.

    Attributes:
        sites: sites that contributed a reply in any round up to the checkpoint's.
        cases: each such site's declared training cases (latest declaration), sorted: no site names.
        strategy: the aggregation rule (``strategy.name``).
        bn: BatchNorm mode (``pooled`` or ``local``).
        dp_mode: ``privacy.mode`` (``off``, ``dp-sgd``, ``client-dp``).
        epsilons: each site's latest recorded ε, sorted; empty when no site recorded one.
        delta: the δ of the epsilons.
    """

    sites: int | None = None
    cases: tuple[int, ...] | None = None
    strategy: str | None = None
    bn: str | None = None
    dp_mode: str | None = None
    epsilons: tuple[float, ...] = ()
    delta: float | None = None


@dataclass(frozen=True)
class OrganScore:
    """Dice of one organ: mean over ``n`` cases (``n`` None: not recorded), sd when recorded."""

    organ: str
    dice: float | None
    n: int | None = None
    sd: float | None = None


@dataclass(frozen=True)
class CardFacts:
    """Everything a model card says. ``federation`` None: not known how the weights were trained."""

    source: str
    arch: str
    feature_scale: int
    norm: str
    parameters: int
    class_names: tuple[str, ...]
    preprocess: PreprocessConfig
    patch_size: tuple[int, int, int]
    fedseg_version: str
    config_hash: str
    round: int | None = None
    epoch: int | None = None
    federation: Federation | None = None
    central: tuple[OrganScore, ...] = ()
    central_round: int | None = None
    cross_site: Mapping[int, tuple[OrganScore, ...]] = field(default_factory=dict)
    cross_site_round: int | None = None
    notes: tuple[str, ...] = ()


def _value(x: object | None, fmt: str = "") -> str:
    return UNKNOWN if x is None else format(x, fmt)


def _provenance(facts: CardFacts) -> list[str]:
    fed = facts.federation
    if facts.round is not None:
        trained = f"federated, {facts.round} rounds (the weights after global round {facts.round})"
    elif facts.epoch is not None:
        trained = f"centrally with fed-eval train, {facts.epoch} epochs (no federation)"
    else:
        trained = UNKNOWN
    lines = [f"- Trained: {trained}"]
    if facts.round is None:
        return lines
    if fed is None:
        return [*lines, "- Federation: unknown (the checkpoint was exported without its run folder)"]
    cases = UNKNOWN if fed.cases is None else ", ".join(map(str, fed.cases))
    lines += [
        f"- Sites: {_value(fed.sites)}",
        f"- Training cases per site (sorted, sites not named): {cases}",
        f"- Strategy: {_value(fed.strategy)}",
        f"- BatchNorm: {_value(fed.bn)}",
        f"- Differential privacy: {_value(fed.dp_mode)}",
    ]
    if fed.dp_mode not in (None, "off"):
        eps = ", ".join(f"{e:.3g}" for e in fed.epsilons) if fed.epsilons else "not recorded"
        lines.append(f"- ε per site (sorted, at δ = {_value(fed.delta, 'g')}): {eps}")
    return lines


def _score(score: OrganScore) -> str:
    dice = "n/a" if score.dice is None or math.isnan(score.dice) else f"{score.dice:.3f}"
    sd = f" ± {score.sd:.3f}" if score.sd is not None and not math.isnan(score.sd) else ""
    return f"{dice}{sd}"


def _central(facts: CardFacts) -> list[str]:
    if not facts.central:
        return ["Central validation: not recorded."]
    when = f" (round {facts.central_round})" if facts.central_round is not None else ""
    lines = [f"Central validation{when}:", "", "| organ | Dice | n |", "| --- | ---: | ---: |"]
    lines += [f"| {s.organ} | {_score(s)} | {_value(s.n)} |" for s in facts.central]
    return lines


def _cross_site(facts: CardFacts) -> list[str]:
    if not facts.cross_site:
        return ["Cross-site validation: not recorded."]
    when = f" (round {facts.cross_site_round})" if facts.cross_site_round is not None else ""
    organs = sorted({s.organ for scores in facts.cross_site.values() for s in scores})
    lines = [
        f"Cross-site validation{when}, each site scoring the global model on its own cases (sites numbered, "
        "not named; Dice mean ± sd, n cases):",
        "",
        "| site | " + " | ".join(organs) + " |",
        "| --- |" + " ---: |" * len(organs),
    ]
    for number, scores in sorted(facts.cross_site.items()):
        by_organ = {s.organ: s for s in scores}
        cells = [
            f"{_score(by_organ[o])} (n {_value(by_organ[o].n)})" if o in by_organ else "not annotated" for o in organs
        ]
        lines.append(f"| {number} | " + " | ".join(cells) + " |")
    return lines


def _preprocessing(pre: PreprocessConfig, patch: tuple[int, int, int]) -> list[str]:
    z, y, x = pre.target_spacing
    return [
        f"- Orientation: {pre.orientation}",
        f"- Spacing: {x:g} x {y:g} x {z:g} mm (x, y, z), {pre.interpolation} interpolation",
        f"- HU window: [{pre.hu_window[0]:g}, {pre.hu_window[1]:g}], then z-score over {pre.normalization}",
        f"- Patch (sliding window): {' x '.join(map(str, patch))} (z, y, x), overlap {OVERLAP:g}",
    ]


def render(facts: CardFacts) -> str:
    """The model card's markdown."""
    classes = ", ".join(f"{i} = {name}" for i, name in enumerate(facts.class_names))
    lines = [
        "# Model card",
        "",
        f"Exported from `{facts.source}` by fedseg {facts.fedseg_version} (config hash {facts.config_hash}).",
        "",
        "## Model",
        "",
        f"- Architecture: {facts.arch}, feature scale {facts.feature_scale}, {facts.norm} normalisation",
        f"- Parameters: {facts.parameters:,}",
        f"- Classes: {classes}",
        "",
        "## Training",
        "",
        *_provenance(facts),
        "",
        "## Evaluation",
        "",
        *_central(facts),
        "",
        *_cross_site(facts),
        "",
        "## Preprocessing",
        "",
        *_preprocessing(facts.preprocess, facts.patch_size),
        "",
        "## Intended use and limitations",
        "",
        f"- {INTENDED_USE}",
        "- Segments abdominal CT (pancreas, spleen, kidneys, liver) in Hounsfield units; other modalities, "
        "contrast phases or body regions than the training sites' are untested.",
        "- The Dice above was measured on the federation's own validation cases; it says nothing about other "
        "scanners or populations.",
    ]
    if facts.notes:
        lines += ["", "## Notes", "", *(f"- {note}" for note in facts.notes)]
    return "\n".join(lines) + "\n"


def parameter_count(model: nn.Module) -> int:
    """Trainable and frozen parameters (buffers such as BatchNorm statistics excluded)."""
    return sum(p.numel() for p in model.parameters())


def _central_scores(metrics: Mapping[str, float | None], n: int | None) -> tuple[OrganScore, ...]:
    return tuple(
        OrganScore(key.removeprefix(_DICE_PREFIX), None if value is None else float(value), n)
        for key, value in metrics.items()
        if key.startswith(_DICE_PREFIX) and key != "dice_mean"
    )


def run_folder(checkpoint: Path) -> Path | None:
    """The ``fed-server`` run folder of a checkpoint in its ``checkpoints/`` (None: not in one)."""
    folder = checkpoint.resolve().parent
    run = folder.parent
    if folder.name == "checkpoints" and (run / "config.json").is_file() and (run / "history.json").is_file():
        return run
    return None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        log.warning("model card: %s is not readable (%s); its facts are left unknown", path, err)
        return None


def _federation(config: Mapping[str, Any], rows: Sequence[Mapping[str, Any]]) -> Federation:
    cases: dict[str, int] = {}
    eps: dict[str, float] = {}
    delta: float | None = None
    for row in rows:
        for site in row.get("sites", []):
            cases[site["site"]] = int(site["cases"])
            if site.get("epsilon") is not None:
                eps[site["site"]] = float(site["epsilon"])
                delta = site.get("delta", delta)
    strategy = config.get("strategy", {})
    privacy = config.get("privacy", {})
    return Federation(
        sites=len(cases),
        cases=tuple(sorted(cases.values())),
        strategy=strategy.get("name"),
        bn=strategy.get("bn"),
        dp_mode=privacy.get("mode"),
        epsilons=tuple(sorted(eps.values())),
        delta=delta if delta is not None else privacy.get("delta"),
    )


def _cross_site_scores(matrix: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> dict[int, tuple[OrganScore, ...]]:
    """Sites numbered 1.. in sorted-name order; a site's name never reaches the card."""
    out = {}
    for number, (_, organs) in enumerate(sorted(matrix.items()), start=1):
        scores = []
        for organ, metrics in sorted(organs.items()):
            dice = metrics.get("dice", {})
            n = dice.get("n")
            scores.append(OrganScore(organ, dice.get("mean"), None if n is None else int(n), dice.get("sd")))
        out[number] = tuple(scores)
    return out


def checkpoint_facts(model: nn.Module, meta: CheckpointMeta, checkpoint: Path) -> CardFacts:
    """The card facts of ``checkpoint`` (``model`` and ``meta`` loaded from it), its run folder read if found."""
    base = CardFacts(
        source=checkpoint.name,
        arch=meta.model.arch,
        feature_scale=meta.model.feature_scale,
        norm=meta.model.norm,
        parameters=parameter_count(model),
        class_names=meta.class_names,
        preprocess=meta.preprocess,
        patch_size=meta.patch_size,
        fedseg_version=meta.fedseg_version,
        config_hash=meta.config_hash,
        round=meta.round,
        epoch=meta.epoch,
        central=_central_scores(meta.metrics, None),
        central_round=meta.round,
    )
    last = meta.round
    run = run_folder(checkpoint) if last is not None else None
    if run is None or last is None:
        note = "Central Dice is the checkpoint's own record; the number of validation cases was not recorded."
        return replace(base, notes=(note,) if base.central else ())
    config, history = _read_json(run / "config.json"), _read_json(run / "history.json")
    if not isinstance(config, dict) or not isinstance(history, list):
        return replace(base, notes=("The run folder's config.json or history.json was not readable.",))
    rows = [r for r in history if isinstance(r, dict) and 0 < int(r.get("round", 0)) <= last]
    crossed = [r for r in rows if r.get("cross_site")]
    cross = _cross_site_scores(crossed[-1]["cross_site"]) if crossed else {}
    cross_round = int(crossed[-1]["round"]) if crossed else None
    notes = ["Central validation cases per organ (n) are not recorded in the run folder."] if base.central else []
    notes.append(f"Federation facts from the run folder's config.json and history.json ({len(rows)} rounds).")
    return replace(
        base,
        federation=_federation(config, rows),
        cross_site=cross,
        cross_site_round=cross_round,
        notes=tuple(notes),
    )


def write_card(folder: Path, facts: CardFacts, name: str = CARD_FILE) -> Path:
    """Write the card of ``facts`` as ``folder/name``."""
    path = folder / name
    path.write_text(render(facts), encoding="utf-8")
    return path
