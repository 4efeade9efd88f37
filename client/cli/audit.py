"""``fed-client audit``: show what this site has sent (its egress ledger) and verify the ledger's hash chain."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from fedseg.client.ledger import LEDGER_FILE, Audit, Row, audit, head_path, ledger_path
from fedseg.common.cli.shell import fail, guarded, result_table, stdout_console


@dataclass
class RunTotal:
    """One run's messages and payload bytes, and the last ε (with δ) its replies reported."""

    run: int
    messages: int = 0
    bytes: int = 0
    epsilon: float | None = None
    delta: float | None = None


@guarded
def audit_command(
    workdir: Annotated[
        Path,
        typer.Option("--workdir", help="The site's workdir (fed-client join --workdir), which holds egress.jsonl."),
    ],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of tables.")] = False,
) -> None:
    """List every message this site sent (run, round, kind, payload bytes and SHA-256, ε after it) with totals,
    and verify the ledger's hash chain and head.

    Exit 0: the chain verifies. Exit 1: it names the first bad line (edited, duplicated, reordered, removed, torn).

    Exit 2: no such workdir, or no ledger in it.

    Keep the printed head hash elsewhere: only that catches a ledger rewritten with every hash recomputed.
    """
    result = _read(workdir)
    totals = _totals(result.rows)
    if as_json:
        typer.echo(json.dumps(_as_dict(result, totals)))
    else:
        out = stdout_console()
        _render(out, result, totals)
    if result.fault is not None:
        raise fail(f"{result.path}: {result.fault}", code=1)
    if not as_json:
        out.print(f"chain verified: {len(result.rows)} entries", style="green", highlight=False)
        out.print(f"head {result.head}", highlight=False)  # to keep elsewhere: see the help


def _read(workdir: Path) -> Audit:
    """The audit of ``workdir``'s ledger; exit 2 with one line when there is none to read."""
    if not workdir.is_dir():
        raise fail(f"--workdir {workdir} is not a folder; pass the site's workdir (fed-client join --workdir)", 2)
    ledger = ledger_path(workdir)
    if not ledger.exists() and not head_path(ledger).exists():
        raise fail(f"{workdir} holds no egress ledger ({LEDGER_FILE}): no reply was sent from this workdir", 2)
    try:
        return audit(ledger)
    except OSError as err:
        raise fail(f"cannot read {ledger}: {err.strerror or err}", 2) from None


def _totals(rows: tuple[Row, ...]) -> list[RunTotal]:
    """Per run, in order of first entry: messages, bytes and the ε of its latest entry (by seq) that reported one."""
    runs: dict[int, RunTotal] = {}
    for row in sorted(rows, key=lambda r: r.entry.seq):
        total = runs.setdefault(row.entry.run, RunTotal(row.entry.run))
        total.messages += 1
        total.bytes += row.entry.bytes
        if row.entry.epsilon is not None:
            total.epsilon, total.delta = row.entry.epsilon, row.entry.delta
    return list(runs.values())


def _epsilon(epsilon: float | None, delta: float | None) -> str:
    if epsilon is None:
        return "–"
    return f"{epsilon:.3g}" + (f" (δ {delta:.0e})" if delta is not None else "")


def _render(out: Console, result: Audit, totals: list[RunTotal]) -> None:
    """The entries (# is the line; runs are numbered, their Flower ids in the totals), then the totals."""
    number = {total.run: n for n, total in enumerate(totals, start=1)}
    table = result_table(out, f"Egress ledger {escape(str(result.path))}")
    for column in ("#", "time (UTC)", "run", "round", "kind", "bytes", "sha256", "ε"):
        right = column in ("#", "run", "round", "bytes")
        table.add_column(column, justify="right" if right else "left", overflow="fold")
    for row in result.rows:
        entry = row.entry
        when = entry.time[:16].replace("T", " ")
        round_text = "–" if entry.round is None else str(entry.round)
        cells = (when, str(number[entry.run]), round_text, entry.kind, f"{entry.bytes:,}", entry.sha256[:8])
        table.add_row(str(row.line), *(escape(c) for c in cells), _epsilon(entry.epsilon, None))
    out.print(table)
    summary = result_table(out, "Totals")
    for column in ("run", "Flower run id", "messages", "bytes", "last ε"):
        summary.add_column(column, justify="left" if column in ("Flower run id", "last ε") else "right")
    for total in totals:
        epsilon = _epsilon(total.epsilon, total.delta)
        summary.add_row(str(number[total.run]), str(total.run), str(total.messages), f"{total.bytes:,}", epsilon)
    all_bytes = sum(t.bytes for t in totals)
    summary.add_row("all", "", str(sum(t.messages for t in totals)), f"{all_bytes:,}", "", style="bold")
    out.print(summary)


def _as_dict(result: Audit, totals: list[RunTotal]) -> dict[str, Any]:
    fault = None if result.fault is None else {"line": result.fault.line, "why": result.fault.why}
    return {
        "ledger": str(result.path),
        "entries": [{"line": row.line, **row.entry.model_dump(mode="json")} for row in result.rows],
        "runs": [vars(total) for total in totals],
        "messages": len(result.rows),
        "bytes": sum(row.entry.bytes for row in result.rows),
        "verified": fault is None,
        "fault": fault,
        "head": result.head,
    }
