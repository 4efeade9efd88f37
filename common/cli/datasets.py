"""``fed-eval datasets list|fetch|split``: public abdominal CT in one command per step."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from fedseg.common.cli.shell import guarded, result_table, stdout_console
from fedseg.common.data.manifest import GLOBAL_CLASSES
from fedseg.common.datasets.fetch import FetchOptions, FetchResult, fetch_dataset
from fedseg.common.datasets.partition import Scheme, SplitRequest
from fedseg.common.datasets.registry import DatasetEntry, find_entry, load_registry
from fedseg.common.datasets.split import SplitResult, split_dataset

datasets_app = typer.Typer(
    help="Public abdominal CT datasets: list them, fetch one (resumable, checksum-verified, safely unpacked into a "
    "layout fedseg reads, with its labels.toml), split it into virtual hospitals.",
    no_args_is_help=True,
)

RegistryOption = Annotated[
    Path | None,
    typer.Option(
        "--registry",
        help="TOML file of \\[datasets.NAME] tables (url, md5 or sha256, organs, licence, ...) adding datasets or "
        "overriding built-in ones key by key, e.g. an intranet mirror's url.",
    ),
]


@datasets_app.command("list")
@guarded
def list_command(
    registry: RegistryOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the registry as one JSON object.")] = False,
) -> None:
    """List the known datasets: organs, cases, size, licence, source URL, checksum, citation."""
    entries = load_registry(registry)
    if as_json:
        typer.echo(json.dumps({name: e.model_dump(mode="json") for name, e in entries.items()}, indent=2))
        return
    _render_list(list(entries.values()), stdout_console())


@datasets_app.command("fetch")
@guarded
def fetch_command(
    name: Annotated[str, typer.Argument(help="Dataset name, as `fed-eval datasets list` shows it.")],
    out: Annotated[Path, typer.Option("--out", help="Folder to put the dataset in, as OUT/NAME.")],
    registry: RegistryOption = None,
    no_verify: Annotated[
        bool,
        typer.Option(
            "--no-verify",
            help="Fetch without checking the archive's checksum (needed for a dataset whose registry entry has "
            "none); its SHA-256 is printed and recorded so it can be pinned with --registry.",
        ),
    ] = False,
    max_extract_gib: Annotated[
        float | None,
        typer.Option(
            "--max-extract-gib",
            min=0.001,
            help="Refuse an archive that unpacks to more than this many GiB (default: the registry's "
            "max_extract_bytes, else 4 x the archive's size, at least 1 GiB).",
        ),
    ] = None,
) -> None:
    """Download (resuming with HTTP Range after a dropped connection), verify the published checksum, unpack
    safely and arrange OUT/NAME in a layout fedseg reads, with its labels.toml; nothing half-unpacked is ever
    left in OUT/NAME (the work happens in OUT/.NAME.fetch and is renamed into place when complete)."""
    entry = find_entry(load_registry(registry), name)
    limit = None if max_extract_gib is None else int(max_extract_gib * 2**30)
    result = fetch_dataset(entry, out, FetchOptions(verify=not no_verify, max_extract_bytes=limit))
    _render_fetch(entry, result, out, stdout_console())


@datasets_app.command("split")
@guarded
def split_command(
    name: Annotated[str, typer.Argument(help="Dataset name, as fetched.")],
    out: Annotated[Path, typer.Option("--out", help="Folder for site-1 ... site-N and validation/ (absent or empty).")],
    data: Annotated[
        Path, typer.Option("--data", help="fetch's --out folder (holding NAME/), or the dataset folder itself.")
    ] = Path("data"),
    sites: Annotated[int, typer.Option("--sites", min=1, help="Number of virtual hospitals site-1 ... site-N.")] = 3,
    scheme: Annotated[
        Scheme,
        typer.Option(
            "--scheme",
            help="iid: cases shuffled and dealt; by-organ: each site annotates one organ, the others relabelled "
            "background (ConDistFL's setting); by-source: by the dataset's institution field (TotalSegmentator).",
        ),
    ] = "iid",
    seed: Annotated[int, typer.Option("--seed", help="Random seed; the same seed writes the same split.")] = 0,
    val_fraction: Annotated[
        float,
        typer.Option(
            "--val-fraction",
            help="Share of cases held out as the central validation set, drawn from the seed alone (the same cases "
            "for every scheme and site count).",
        ),
    ] = 0.2,
    registry: RegistryOption = None,
) -> None:
    """Split a fetched dataset into virtual hospitals (MSD-layout site folders with their labels.toml) and a
    held-out central validation set; images are hard-linked to the fetched files (symlinked across file systems,
    copied only where neither works)."""
    entry = find_entry(load_registry(registry), name)
    request = SplitRequest(entry.name, (), entry.organs, sites, scheme, seed, val_fraction)
    _render_split(split_dataset(entry, data, out, request), stdout_console())


def _render_list(entries: list[DatasetEntry], screen: Console) -> None:
    """The datasets (name, organs, cases, size, licence, checksum), then their sources and citations."""
    table = result_table(screen, "public datasets (fed-eval datasets fetch NAME --out DIR)")
    for column in ("name", "organs", "cases", "size", "licence", "checksum"):
        table.add_column(column, overflow="fold")
    for entry in entries:
        table.add_row(entry.name, ", ".join(entry.organs), _cases(entry), _size(entry), entry.licence, _checksum(entry))
    screen.print(table)
    sources = result_table(screen, "sources and citations")
    for column in ("name", "source URL", "citation"):
        sources.add_column(column, overflow="fold")
    for entry in entries:
        sources.add_row(entry.name, entry.url or f"{entry.homepage} (no single archive)", entry.citation)
    screen.print(sources)
    published: dict[str, list[str]] = {}
    for entry in entries:
        if entry.checksum is not None:
            published.setdefault(entry.checksum_source or "the registry file", []).append(entry.name)
    for source, names in published.items():
        screen.print(f"checksums of {', '.join(names)}: as published by {source}", highlight=False)
    for entry in entries:
        if entry.note:
            screen.print(f"{entry.name}: {entry.note}", highlight=False)


def _render_fetch(entry: DatasetEntry, result: FetchResult, out: Path, screen: Console) -> None:
    state = "already fetched" if result.already_there else "fetched"
    check = f"verified by {result.verified_by}" if result.verified_by else "NOT verified (--no-verify)"
    screen.print(f"{entry.name}: {state}, {result.cases} labelled cases in {escape(str(result.path))}", highlight=False)
    screen.print(f"  archive {check}; SHA-256 {result.sha256}", highlight=False)
    if result.download is not None and len(result.download.resumed_at) > 0:
        offsets = ", ".join(f"{b:,}" for b in result.download.resumed_at)
        screen.print(f"  resumed with HTTP Range at byte {offsets}", highlight=False)
    screen.print(f"  licence {entry.licence}; cite: {entry.citation}", highlight=False)
    screen.print(f"next: fed-eval datasets split {entry.name} --data {escape(str(out))} --sites 3 --out sites",
                 highlight=False)  # fmt: skip


def _render_split(result: SplitResult, screen: Console) -> None:
    table = result_table(screen, f"{result.plan.scheme} split of seed {result.plan.seed} in {result.out}")
    for column in ("site", "cases", "annotates", "institutions"):
        table.add_column(column, overflow="fold")
    for site in result.plan.sites:
        table.add_row(site.name, str(len(site.cases)), ", ".join(site.annotated), ", ".join(site.institutions) or "-")
    if result.plan.validation:
        organs = [o for o in GLOBAL_CLASSES[1:] if any(o in site.annotated for site in result.plan.sites)]
        table.add_row("validation", str(len(result.plan.validation)), f"{', '.join(organs)} (central, held out)", "-")
    screen.print(table)
    placed = ", ".join(f"{kind} {count}" for kind, count in sorted(result.placed.items()))
    screen.print(f"files: {placed}", highlight=False)
    first = result.out / result.plan.sites[0].name
    screen.print(f"check a site: fed-client check {escape(str(first))}", highlight=False)


def _cases(entry: DatasetEntry) -> str:
    return "?" if entry.cases is None else str(entry.cases)


def _size(entry: DatasetEntry) -> str:
    return "?" if entry.size_bytes is None else f"{entry.size_bytes / 2**30:.1f} GiB"


def _checksum(entry: DatasetEntry) -> str:
    if entry.checksum is None:
        return "unknown (fetch needs --no-verify)" if entry.url else "-"
    algorithm, digest = entry.checksum
    return f"{algorithm} {digest}"
