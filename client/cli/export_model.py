"""``fed-client export-model``: this site's own model under FedBN (``bn = "local"``), as a fedseg checkpoint.

The site's model is the last global weights it received with its own BatchNorm tensors (γ, β and running
statistics of every BatchNorm layer) in place of the global ones: the model the site itself trains from and
scores cross-site with. ``fed-eval predict --model site.pt`` opens it like any checkpoint. Its model card goes
beside it as ``site.MODEL_CARD.md`` (:func:`card_path`): what a site knows of the federation is its own task.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import torch
import typer
from rich.markup import escape

from fedseg.client.localbn import STATE_FILE, SiteState, read_from_disk
from fedseg.common.cli.shell import guarded, result_table, stdout_console
from fedseg.common.engine.checkpoint import CheckpointMeta, config_hash, save_checkpoint
from fedseg.common.engine.validation import class_names_for
from fedseg.common.errors import ConfigError, IncompatibleModelError
from fedseg.common.export.modelcard import CardFacts, Federation, parameter_count, write_card
from fedseg.common.nn.model import build_model


@dataclass(frozen=True)
class SiteModel:
    """The merged model and how far its BatchNorm is from the global one."""

    model: torch.nn.Module
    meta: CheckpointMeta
    local_tensors: int
    total_tensors: int
    largest_change: float


def site_model(state: SiteState) -> SiteModel:
    """The global weights of ``state`` with its BatchNorm tensors replaced by the site's own.

    Raises:
        IncompatibleModelError: the kept tensors do not fit the round's model.
    """
    task = state.task
    model = build_model(task.model)
    merged = {**state.global_weights, **state.local_bn}
    try:
        model.load_state_dict(merged)
    except RuntimeError as err:
        first = str(err).splitlines()[0]
        raise IncompatibleModelError(f"the kept weights do not fit the round's model ({first})") from err
    preprocess = task.preprocess
    meta = CheckpointMeta(
        model=task.model,
        class_names=class_names_for(task.model.n_classes),
        preprocess=preprocess,
        patch_size=task.train.patch_size,
        config_hash=config_hash(model=task.model, preprocess=preprocess),
        seed=task.train.seed,
        round=state.round,
    )
    change = max(
        (float((state.local_bn[k].double() - state.global_weights[k].double()).abs().max()) for k in state.local_bn),
        default=0.0,
    )
    return SiteModel(model.eval(), meta, len(state.local_bn), len(merged), change)


def card_path(out: Path) -> Path:
    """Where the card of the site model ``out`` goes: ``site.pt`` -> ``site.MODEL_CARD.md``, beside it."""
    return out.with_name(f"{out.stem}.MODEL_CARD.md")


def site_card(built: SiteModel, state: SiteState, source: str) -> CardFacts:
    """The card facts of a site model: the round's task is all the site knows of the federation."""
    meta, task = built.meta, state.task
    return CardFacts(
        source=source,
        arch=meta.model.arch,
        feature_scale=meta.model.feature_scale,
        norm=meta.model.norm,
        parameters=parameter_count(built.model),
        class_names=meta.class_names,
        preprocess=meta.preprocess,
        patch_size=meta.patch_size,
        fedseg_version=meta.fedseg_version,
        config_hash=meta.config_hash,
        round=state.round,
        federation=Federation(bn=task.bn, dp_mode=task.privacy.mode, delta=task.privacy.delta),
        notes=(
            "A site model (fed-client export-model): the global weights of the round with this site's own "
            f"BatchNorm ({built.local_tensors} tensors); it fits this site's scans, not necessarily others'.",
            "A site does not see the federation's other sites, its strategy or the central validation: unknown.",
        ),
    )


@guarded
def export_model_command(
    workdir: Annotated[
        Path,
        typer.Option("--workdir", help=f"The site's workdir (fed-client join --workdir), which holds {STATE_FILE}."),
    ],
    out: Annotated[Path, typer.Option("--out", help="The checkpoint to write (e.g. site.pt); must not exist.")],
) -> None:
    """Write this site's own FedBN model: the last global weights it received with its own BatchNorm tensors.

    Needs a federation with bn = "local": after every round the site keeps its BatchNorm in WORKDIR/fedbn-state.pt.
    The result is a checkpoint for fed-eval predict and fed-eval export; it never leaves the site unless you send it.
    Its model card is written beside it (site.pt: site.MODEL_CARD.md).
    """
    card = card_path(out)
    for path in (out, card):
        if path.exists():
            raise ConfigError(f"--out {out}: {path} already exists; pass a new file name")
    state = read_from_disk(workdir)
    built = site_model(state)
    save_checkpoint(out, built.model, built.meta)
    write_card(card.parent, site_card(built, state, out.name), card.name)
    console = stdout_console()
    table = result_table(console, f"Site model {escape(str(out))}")
    table.add_column("", justify="left")
    table.add_column("value", justify="right", overflow="fold")
    table.add_row("round", str(state.round))
    table.add_row("model", f"{state.task.model.arch}, feature scale {state.task.model.feature_scale}")
    table.add_row("tensors", f"{built.total_tensors}")
    table.add_row("the site's own (BatchNorm)", f"{built.local_tensors}")
    table.add_row("largest |own - global|", f"{built.largest_change:.4g}")
    table.add_row("model card", escape(str(card)))
    console.print(table)
